"""The ``/ws`` endpoint (PROTOCOL §2)."""

from __future__ import annotations

import logging
import time

from starlette.websockets import WebSocket, WebSocketDisconnect

from common import jsoncodec
from common.errors import ApiError, BackendUnavailable
from common.protocol import PONG_FRAME, FrameError, error_frame, parse_client_frame
from common.ratelimit import TokenBucket
from gateway.connection import CLOSE_LIMIT, Connection, OutItem
from gateway.http import JSONResponse
from gateway.node import ConnectionRefused, GatewayNode

log = logging.getLogger("ara.gateway.ws")


class WebSocketSink:
    """``Sink`` over a Starlette WebSocket."""

    __slots__ = ("websocket",)

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket

    async def send(self, item: OutItem) -> None:
        await self.websocket.send({"type": "websocket.send", "text": item[2]})

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
        identity = verifier.verify(token)
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
        err = ApiError(503, "SERVICE_UNAVAILABLE", "session store unavailable; retry shortly",
                       headers={"Retry-After": "1"})
        await websocket.send_denial_response(
            JSONResponse(err.body(), status_code=err.status, headers=err.headers)
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
        await _serve(node, conn, websocket)
    except WebSocketDisconnect:
        pass
    finally:
        conn.peer_gone()
        await node.end(conn)


async def _serve(node: GatewayNode, conn: Connection, websocket: WebSocket) -> None:
    settings = node.settings
    limited = settings.ratelimit_enabled
    bucket = TokenBucket(settings.ratelimit_ws_messages_per_second, settings.ratelimit_ws_message_burst)
    metrics = node.metrics
    while True:
        message = await websocket.receive()
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
