"""Request plumbing shared by the REST handlers: auth, tenant, bodies, replies."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import Response

from common import jsoncodec
from common.auth import ApiPrincipal
from common.errors import ApiError
from common.protocol import valid_tenant

M = TypeVar("M", bound=BaseModel)

SEND_BODY_LIMIT = 64 * 1024
BATCH_BODY_LIMIT = 1024 * 1024


class JSONResponse(Response):
    """orjson-encoded JSON response."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return jsoncodec.dumps(content)


def header(conn: HTTPConnection, name: bytes) -> str | None:
    """One request header (``name`` lower-case, as ASGI gives them), first one wins.

    Starlette's ``Headers.get`` scans the header list on every call; a send asks
    for six of them. The table is built once per request and kept in its scope.
    """
    scope = conn.scope
    table: dict[bytes, bytes] | None = scope.get("ara.headers")
    if table is None:
        table = scope["ara.headers"] = {}
        for key, value in reversed(scope["headers"]):
            table[key] = value
    value = table.get(name)
    return None if value is None else value.decode("latin-1")


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def principal(request: Request) -> ApiPrincipal:
    checker = request.app.state.api_keys
    result: ApiPrincipal = checker.check(header(request, b"x-api-key"))
    return result


def tenant_of(request: Request, who: ApiPrincipal) -> str:
    """The tenant a REST call acts in: a bound key's, else ``X-Tenant-ID``."""
    settings = request.app.state.settings
    given = header(request, b"x-tenant-id")
    if given is not None and not valid_tenant(given):
        raise ApiError(
            422, "VALIDATION_ERROR", "X-Tenant-ID must be 1-64 of letters, digits, '-', '_', '.'",
            {"field": "X-Tenant-ID"},
        )
    if who.bound_tenant is not None:
        if given is not None and given != who.bound_tenant:
            raise ApiError(403, "FORBIDDEN", "this API key is bound to another tenant")
        return who.bound_tenant
    if settings.tenant_enabled and given:
        return given
    return "default"


async def read_json(request: Request, limit: int) -> Any:
    content_type = header(request, b"content-type") or "application/json"
    if "json" not in content_type.split(";")[0].lower():
        raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "send the body as application/json")
    declared = header(request, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = await _read_body(request, limit)
    if not body:
        raise ApiError(400, "INVALID_JSON", "request body is empty")
    try:
        data = jsoncodec.loads(body)
    except jsoncodec.JSONDecodeError as exc:
        raise ApiError(400, "INVALID_JSON", f"malformed JSON: {exc}") from None
    # Nesting needs as many brackets as levels: most bodies are cleared by a count.
    if (body.count(b"{") + body.count(b"[") > jsoncodec.MAX_INPUT_DEPTH
            and jsoncodec.too_deep(data)):
        raise ApiError(
            422, "VALIDATION_ERROR",
            f"JSON nests deeper than {jsoncodec.MAX_INPUT_DEPTH} levels", {"field": "body"},
        )
    return data


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body off ``receive``, at most ``limit`` bytes.

    Starlette's ``request.stream()`` is an async generator around the same loop; a
    send's body comes in one message, and the generator cost more than the rest of
    the body handling together.
    """
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def too_large(limit: int) -> ApiError:
    return ApiError(
        413, "PAYLOAD_TOO_LARGE", f"request body exceeds {limit} bytes", {"limit": limit}
    )


def validate(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise ApiError(422, "VALIDATION_ERROR", "body must be a JSON object", {"field": "body"})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_failure(exc) from None


def validation_failure(exc: ValidationError) -> ApiError:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    message = f"{field}: {first['msg']}" if field != "body" else first["msg"]
    return ApiError(
        422,
        "VALIDATION_ERROR",
        message,
        {
            "field": field,
            "errors": [
                {"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
                for e in errors[:20]
            ],
        },
    )
