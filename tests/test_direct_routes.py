"""The send endpoints served past Starlette's routing (``gateway.direct``) answer as before."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from conftest import ServerFactory
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from gateway.app import SEND_ROUTES, GatewayApp
from gateway.direct import DirectRoutes, handler_for

SEND = "/api/v1/notifications/send"


class Boom(Exception):
    pass


class SubBoom(Boom):
    pass


async def _fallback(scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse({"via": "stack"})(scope, receive, send)


def _edge(inner: Any) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def tagged(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"x-edge", b"1")]}
            await send(message)

        await inner(scope, receive, tagged)
    return app


async def _boom_handler(request: Request, exc: Exception) -> Response:
    return JSONResponse({"handled": type(exc).__name__}, status_code=418)


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_a_post_to_a_direct_path_runs_its_endpoint_inside_the_edge() -> None:
    async def endpoint(request: Request) -> Response:
        return JSONResponse({"body": (await request.json())["x"],
                             "endpoint": request.scope["endpoint"].__name__})

    app = DirectRoutes(_fallback, {"/direct": endpoint}, {}, _edge)
    async with _client(app) as client:
        response = await client.post("/direct", json={"x": 7})
    assert response.json() == {"body": 7, "endpoint": "endpoint"}
    assert response.headers["x-edge"] == "1"


@pytest.mark.parametrize(("method", "path"), [("GET", "/direct"), ("POST", "/direct/"),
                                              ("POST", "/other")])
async def test_other_methods_and_paths_fall_through_to_the_stack(method: str, path: str) -> None:
    async def endpoint(request: Request) -> Response:
        raise AssertionError("not this one")

    app = DirectRoutes(_fallback, {"/direct": endpoint}, {}, _edge)
    async with _client(app) as client:
        response = await client.request(method, path)
    assert response.json() == {"via": "stack"}
    assert "x-edge" not in response.headers


async def test_an_exception_is_answered_by_the_handler_of_its_closest_class() -> None:
    async def endpoint(request: Request) -> Response:
        raise SubBoom("no")

    app = DirectRoutes(_fallback, {"/direct": endpoint}, {Boom: _boom_handler}, _edge)
    async with _client(app) as client:
        response = await client.post("/direct")
    assert response.status_code == 418
    assert response.json() == {"handled": "SubBoom"}
    assert handler_for({Exception: _boom_handler}, KeyError()) is _boom_handler
    assert handler_for({Boom: _boom_handler}, KeyError()) is None


async def test_an_exception_without_a_handler_propagates() -> None:
    async def endpoint(request: Request) -> Response:
        raise KeyError("unhandled")

    app = DirectRoutes(_fallback, {"/direct": endpoint}, {Boom: _boom_handler}, _edge)
    with pytest.raises(KeyError):
        async with _client(app) as client:
            await client.post("/direct")


async def test_the_gateway_serves_every_send_endpoint_directly(
        server_factory: ServerFactory) -> None:
    server = await server_factory()
    assert isinstance(server.app, GatewayApp)
    stack = server.app.build_middleware_stack()
    assert isinstance(stack, DirectRoutes)
    assert set(stack.routes) == set(SEND_ROUTES)
    routed = {r.path for r in server.app.routes if "POST" in (getattr(r, "methods", None) or ())}
    assert set(SEND_ROUTES) <= routed  # the Starlette routes stay for the fall-through


async def test_with_cors_configured_every_request_goes_through_starlette(
        server_factory: ServerFactory) -> None:
    server = await server_factory(cors_origins=["https://app.example"])
    assert not isinstance(server.app.build_middleware_stack(), DirectRoutes)
    response = await server.post(SEND, {"target_user_id": "u", "event_type": "e"},
                                 headers={"Origin": "https://app.example"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example"


async def test_direct_sends_keep_request_id_metrics_and_error_bodies(
        server_factory: ServerFactory) -> None:
    server = await server_factory()
    ok = await server.post(SEND, {"target_user_id": "u", "event_type": "e"},
                           headers={"X-Request-ID": "req-1"})
    assert ok.status_code == 200
    assert ok.headers["x-request-id"] == "req-1"
    invalid = await server.post(SEND, {"target_user_id": "u"})
    assert invalid.status_code == 422
    assert invalid.json()["error"]["code"] == "VALIDATION_ERROR"
    assert invalid.headers["x-request-id"]
    missing = await server.post(SEND, {"target_user_id": "u", "template_id": "nope"})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "TEMPLATE_NOT_FOUND"
    counted = server.node.metrics.http_requests
    assert counted.labels("send_user", "200")._value.get() == 1
    assert counted.labels("send_user", "422")._value.get() == 1
    assert counted.labels("send_user", "404")._value.get() == 1


async def test_a_direct_send_over_the_rate_limit_is_refused_with_its_headers(
        server_factory: ServerFactory) -> None:
    server = await server_factory(ratelimit_enabled=True, ratelimit_http_requests_per_second=0.001,
                                  ratelimit_http_burst_size=1)
    body = {"target_user_id": "u", "event_type": "e"}
    assert (await server.post(SEND, body)).status_code == 200
    refused = await server.post(SEND, body)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "RATE_LIMITED"
    assert refused.headers["x-ratelimit-remaining"] == "0"
