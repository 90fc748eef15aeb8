"""The ``/ws`` endpoint (PROTOCOL §2)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import cast

from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect

from common import jsoncodec
from common.errors import ApiError, BackendUnavailable
from common.protocol import (
    PONG_FRAME,
    ClientFrame,
    FrameError,
    error_frame,
    parse_client_frame,
)
from common.ratelimit import TokenBucket
from gateway.connection import CLOSE_LIMIT, Connection, OutItem
from gateway.fastws import EXTENSION, FastWebSocketProtocol
from gateway.http import JSONResponse
from gateway.node import ConnectionRefused, GatewayNode

log = logging.getLogger("ara.gateway.ws")


class WebSocketSink:
    """``Sink`` over a Starlette WebSocket.

    Under uvicorn with ``FastWebSocketProtocol`` (see ``gateway.fastws``) it writes
    through the protocol object: ``try_send`` puts the frame on the socket at once
    when the socket can take it, so the outbox and its writer task are only used
    for a client that is behind. Elsewhere it speaks plain ASGI messages.
    """

    __slots__ = ("fast", "websocket")

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.fast: FastWebSocketProtocol | None = websocket.scope.get("extensions", {}).get(
            EXTENSION
        )

    def try_send(self, item: OutItem) -> bool:
        """Write now if possible; False means queue it and wait (or no fast path)."""
        fast = self.fast
        return fast is not None and fast.write_text(item[2])

    async def send(self, item: OutItem) -> None:
        fast = self.fast
        if fast is None:
            await self.websocket.send({"type": "websocket.send", "text": item[2]})
            return
        while not fast.write_text(item[2]):
            await fast.wait_writable()

    async def close(self, code: int, reason: str) -> None:
        await self.websocket.send({"type": "websocket.close", "code": code, "reason": reason})


def bearer_token(websocket_or_request: WebSocket) -> str | None:
    token = websocket_or_request.query_params.get("token")
    if token:
        return token
    header = websocket_or_request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


async def websocket_endpoint(websocket: WebSocket) -> None:
    node: GatewayNode = websocket.app.state.node
    verifier = websocket.app.state.verifier
    try:
        token = bearer_token(websocket)
        if token is None:
            raise ApiError(401, "UNAUTHORIZED", "missing token")
        identity = verifier.verify_for_connection(token)
        await websocket.app.state.connect_limiter.check(websocket, identity)
    except ApiError as err:
        await websocket.send_denial_response(
            JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        )
        return
    sink = WebSocketSink(websocket)
    try:
        conn = await node.admit(identity, "websocket", sink)
    except BackendUnavailable:
        down = ApiError(503, "SERVICE_UNAVAILABLE", "session store unavailable; retry shortly",
                        headers={"Retry-After": "1"})
        await websocket.send_denial_response(
            JSONResponse(down.body(), status_code=down.status, headers=down.headers)
        )
        return
    except ConnectionRefused as refused:
        await websocket.accept()
        await websocket.send_text(error_frame(refused.code, refused.message))
        await websocket.close(CLOSE_LIMIT if refused.http_status == 429 else 1013)
        return
    await websocket.accept()
    try:
        await node.begin(conn)
        await _serve(node, conn, websocket, sink.fast)
    except WebSocketDisconnect:
        pass
    finally:
        conn.peer_gone()
        await node.end(conn)


async def _serve(
    node: GatewayNode,
    conn: Connection,
    websocket: WebSocket,
    fast: FastWebSocketProtocol | None = None,
) -> None:
    # After the accept Starlette's wrapper only tracks state; read the protocol directly.
    receive = cast(
        Callable[[], Awaitable[Message]], websocket.receive if fast is None else fast.receive
    )
    settings = node.settings
    limited = settings.ratelimit_enabled
    bucket = TokenBucket(
        settings.ratelimit_ws_messages_per_second, settings.ratelimit_ws_message_burst
    )
    metrics = node.metrics
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.disconnect":
            return
        if kind != "websocket.receive":
            continue
        conn.last_seen = time.monotonic()
        text = message.get("text")
        if text is None:
            _error(conn, node, "UNSUPPORTED_FORMAT", "binary frames are not supported; send text")
            continue
        if limited and bucket.take() > 0:
            _error(conn, node, "RATE_LIMITED", "too many messages; slow down")
            continue
        try:
            frame = parse_client_frame(text)
        except FrameError as err:
            _error(conn, node, err.code, err.message)
            continue
        metrics.client_messages.labels(frame.kind).inc()
        try:
            await _handle(node, conn, frame)
        except BackendUnavailable:
            # Redis or Postgres is away: say so on this socket and keep it open. A
            # Subscribe is already applied locally and reaches Redis with the next
            # heartbeat; a repeated Ack or Subscribe is answered normally.
            _error(conn, node, "SERVICE_UNAVAILABLE",
                   f"{frame.kind} could not be completed: a backend is unavailable; retry")


async def _handle(node: GatewayNode, conn: Connection, frame: ClientFrame) -> None:
    if frame.kind == "Ping":
        conn.push(("pong", None, PONG_FRAME))
    elif frame.kind == "Subscribe":
        accepted, problem = await node.subscribe(conn, frame.channels)
        if accepted or problem is None:
            conn.push(("subscribed", None,
                       jsoncodec.dumps_str({"type": "subscribed", "payload": accepted})))
        if problem:
            _error(conn, node, "SUBSCRIPTION_ERROR", problem)
    elif frame.kind == "Unsubscribe":
        done, problem = await node.unsubscribe(conn, frame.channels)
        if done or problem is None:
            conn.push(("unsubscribed", None,
                       jsoncodec.dumps_str({"type": "unsubscribed", "payload": done})))
        if problem:
            _error(conn, node, "SUBSCRIPTION_ERROR", problem)
    elif frame.kind == "Ack":
        assert frame.notification_id is not None
        problem = await node.ack(conn.identity, conn.id, frame.notification_id)
        if problem:
            _error(conn, node, "INVALID_ACK", problem)
        else:
            conn.push(("acked", None, jsoncodec.dumps_str(
                {"type": "acked", "notification_id": frame.notification_id})))


def _error(conn: Connection, node: GatewayNode, code: str, message: str) -> None:
    node.metrics.client_errors.labels(code).inc()
    conn.push(("error", None, error_frame(code, message)))
