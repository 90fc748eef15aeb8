"""The ``/sse`` stream and ``POST /sse/ack`` (PROTOCOL §3), as plain ASGI.

The stream is written straight to the ASGI ``send`` by the connection's
writer, so SSE and WebSocket share the outbox, replay and slow-consumer
rules.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from common.api_models import AckRequest
from common.auth import Identity
from common.errors import ApiError, BackendUnavailable
from common.protocol import valid_channel
from gateway.connection import OutItem
from gateway.http import JSONResponse, error_response, read_json, validate
from gateway.node import ConnectionRefused, GatewayNode

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"connection", b"keep-alive"),
]


def _token(request: Request) -> str | None:
    token = request.query_params.get("token")
    if token:
        return token
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def authenticate(request: Request, for_stream: bool = False) -> Identity:
    token = _token(request)
    if token is None:
        raise ApiError(401, "UNAUTHORIZED", "missing token")
    verifier = request.app.state.verifier
    identity: Identity = (
        verifier.verify_for_connection(token) if for_stream else verifier.verify(token)
    )
    return identity


def encode_event(item: OutItem) -> bytes:
    event, event_id, data = item
    head = f"id: {event_id}\nevent: {event}\ndata: " if event_id else f"event: {event}\ndata: "
    return (head + data + "\n\n").encode()


class _Writer:
    """Binds an ASGI ``send`` as the connection's sink."""

    __slots__ = ("_send", "finished")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.finished = False

    async def send(self, item: OutItem) -> None:
        if self.finished:
            raise ConnectionError("stream finished")
        await self._send(
            {"type": "http.response.body", "body": encode_event(item), "more_body": True}
        )

    async def close(self, code: int, reason: str) -> None:
        if not self.finished:
            self.finished = True
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})


def _channels(request: Request, limit: int) -> list[str]:
    raw = request.query_params.get("channels")
    if not raw:
        return []
    names = list(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    bad = [n for n in names if not valid_channel(n)]
    if bad:
        raise ApiError(
            422, "SUBSCRIPTION_ERROR", f"invalid channel name {bad[0][:80]!r}",
            {"field": "channels"},
        )
    if len(names) > limit:
        raise ApiError(
            422, "SUBSCRIPTION_ERROR", f"at most {limit} channels per connection",
            {"field": "channels"},
        )
    return names


async def _sse_stream(scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive)
    node: GatewayNode = request.app.state.node
    try:
        if request.method != "GET":
            raise ApiError(405, "METHOD_NOT_ALLOWED", "use GET")
        identity = authenticate(request, for_stream=True)
        channels = _channels(request, node.settings.websocket_max_subscriptions_per_connection)
        await request.app.state.connect_limiter.check(request, identity)
        writer = _Writer(send)
        try:
            conn = await node.admit(identity, "sse", writer)
        except ConnectionRefused as refused:
            raise ApiError(refused.http_status, refused.code, refused.message) from None
        except BackendUnavailable:
            raise ApiError(503, "SERVICE_UNAVAILABLE", "session store unavailable; retry shortly",
                           headers={"Retry-After": "1"}) from None
    except ApiError as err:
        await error_response(err)(scope, receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    disconnected = asyncio.get_running_loop().create_task(_wait_disconnect(receive))
    try:
        await node.begin(conn, channels)
        closed = asyncio.ensure_future(conn.wait_closed())
        await asyncio.wait({closed, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
    finally:
        disconnected.cancel()
        conn.peer_gone()
        await node.end(conn)
        if not writer.finished:
            writer.finished = True
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})


class _AsgiEndpoint:
    """A plain ASGI endpoint for ``Route``, which wraps bare functions as request -> response."""

    def __init__(self, func: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.func = func
        self.__name__ = "sse_endpoint"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.func(scope, receive, send)


sse_endpoint = _AsgiEndpoint(_sse_stream)


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def sse_ack(request: Request) -> Response:
    node: GatewayNode = request.app.state.node
    identity = authenticate(request)
    data = await read_json(request, 4096)
    body = validate(AckRequest, data)
    connection_id = request.query_params.get("connection_id") or "sse"
    problem = await node.ack(identity, connection_id[:64], body.notification_id)
    if problem:
        raise ApiError(422, "INVALID_ACK", problem, {"field": "notification_id"})
    return JSONResponse({"type": "acked", "success": True, "notification_id": body.notification_id})
