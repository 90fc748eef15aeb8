"""Running the ASGI app under uvicorn with a graceful drain on SIGTERM.

uvicorn's own shutdown closes sockets before the app can speak, so the
first SIGTERM/SIGINT is caught here: the node drains (``shutdown`` frames,
close 1001, ``/ready`` 503), the clients' close replies are awaited (a
socket cut before the client has read its close frame can lose both frames;
``DrainingServer._await_close_replies``), then uvicorn is told to exit.

HTTP runs on uvicorn's httptools protocol behind
``gateway.httpproto.BoundedHttpToolsProtocol`` (a request-head bound and a
read deadline).

The hot path of ``/ws`` is shortened here too (docs/benchmarks.md has the
figures): WebSockets use ``gateway.fastws.FastWebSocketProtocol`` (uvicorn's
sans-I/O protocol with synchronous, pre-encoded writes and lighter
per-connection state), and ``DirectWebSocketRoute`` hands ``/ws`` straight
to its endpoint instead of through Starlette's middleware and router, whose
coroutine frames would otherwise stay alive, per socket, for the socket's
whole life. The route stays registered in the app, so any other ASGI server
or the test client reaches the same endpoint the ordinary way.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from common.settings import Settings
from gateway.fastws import FastWebSocketProtocol, compatible
from gateway.httpproto import BoundedHttpToolsProtocol
from gateway.node import GatewayNode
from gateway.ws import websocket_endpoint

log = logging.getLogger("ara.server")


class DrainingServer(uvicorn.Server):
    """uvicorn Server whose first exit signal triggers the node's drain."""

    def __init__(self, config: uvicorn.Config, node: GatewayNode) -> None:
        super().__init__(config)
        self.node = node
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is None and self._loop is not None and not self.should_exit:
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        window = self.node.settings.drain_timeout_seconds
        try:
            await asyncio.wait_for(self.node.drain(), timeout=window + 10)
        except Exception:
            log.exception("drain did not finish cleanly")
        await self._await_close_replies(within=max(1.0, window))
        self.should_exit = True

    def _closing_websockets(self) -> int:
        """WebSockets whose close frame is sent and whose peer has not answered yet."""
        return sum(
            1
            for protocol in self.server_state.connections
            if getattr(protocol, "close_sent", False)
            and not getattr(protocol, "disconnected", True)
        )

    async def _await_close_replies(self, within: float) -> None:
        """Let every client answer its close frame before uvicorn's shutdown runs.

        ``node.drain()`` returns once the ``shutdown`` and close frames are written,
        not once the clients have read them. uvicorn's ``Server.shutdown()`` then calls
        ``shutdown()`` on each protocol, which for a WebSocket whose close frame is sent
        closes the TCP connection at once instead of waiting for the peer's close frame.
        A client that is behind (still reading queued notifications and ACKing them)
        then writes to a fully closed socket, gets a reset, and its WebSocket library
        drops everything still unread, the ``shutdown`` and close frames included: the
        client sees 1006 and no ``shutdown`` frame. The peer's close frame makes uvicorn
        close the connection itself (and remove it from ``server_state.connections``);
        a client that has not answered within ``within`` seconds is cut by the shutdown.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self._closing_websockets():
            if loop.time() >= deadline:
                log.warning(
                    "%d clients did not answer their close frame within %.0f s; closing",
                    self._closing_websockets(), within,
                )
                return
            await asyncio.sleep(0.02)


class DirectWebSocketRoute:
    """ASGI front: ``/ws`` goes straight to its endpoint, everything else to the app.

    The WebSocket endpoint needs nothing from the middleware (the edge middleware
    and CORS only act on HTTP; the endpoint answers its own errors), so skipping it
    saves a dozen coroutine frames per open socket. ``__call__`` returns the
    endpoint's coroutine instead of awaiting it, which saves one more.
    """

    def __init__(self, app: Starlette, path: str = "/ws") -> None:
        self.app = app
        self.path = path

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "websocket" and scope["path"] == self.path:
            scope["app"] = self.app
            return websocket_endpoint(WebSocket(scope, receive, send))
        return self.app(scope, receive, send)

    def __getattr__(self, name: str) -> object:
        return getattr(self.app, name)


def uvicorn_config(app: Starlette, settings: Settings) -> uvicorn.Config:
    loop = "auto"  # uvloop when installed
    fast = compatible()
    if not fast:
        log.warning("uvicorn's WebSocket protocol changed; using it without the fast path")
    return uvicorn.Config(
        DirectWebSocketRoute(app) if fast else app,
        host=settings.server_host,
        port=settings.server_port,
        loop=loop,
        # httptools, with a request-head bound and a read deadline (gateway/httpproto.py).
        http=BoundedHttpToolsProtocol,
        ws=FastWebSocketProtocol if fast else "websockets-sansio",
        interface="asgi3",
        ws_max_size=settings.websocket_max_frame_bytes,
        ws_per_message_deflate=settings.websocket_compression,
        ws_ping_interval=settings.websocket_ping_interval,
        ws_ping_timeout=settings.websocket_ping_timeout,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_seconds) + 5,
        timeout_keep_alive=30,
    )


def run(app: Starlette, settings: Settings) -> None:
    node: GatewayNode = app.state.node
    server = DrainingServer(uvicorn_config(app, settings), node)
    server.run()
