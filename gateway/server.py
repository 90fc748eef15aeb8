"""Running the ASGI app under uvicorn with a graceful drain on SIGTERM.

uvicorn's own shutdown closes sockets before the app can speak, so the
first SIGTERM/SIGINT is caught here: the node drains (``shutdown`` frames,
close 1001, ``/ready`` 503), then uvicorn is told to exit.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from common.settings import Settings
from gateway.node import GatewayNode

log = logging.getLogger("ara.server")


class DrainingServer(uvicorn.Server):
    """uvicorn Server whose first exit signal triggers the node's drain."""

    def __init__(self, config: uvicorn.Config, node: GatewayNode) -> None:
        super().__init__(config)
        self.node = node
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
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
        try:
            await asyncio.wait_for(
                self.node.drain(), timeout=self.node.settings.drain_timeout_seconds + 10
            )
        except Exception:
            log.exception("drain did not finish cleanly")
        self.should_exit = True


def uvicorn_config(app: Starlette, settings: Settings) -> uvicorn.Config:
    loop = "auto"
    return uvicorn.Config(
        app,
        host=settings.server_host,
        port=settings.server_port,
        loop=loop,
        http="auto",
        ws="websockets-sansio",
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
