"""The router's small HTTP surface: ``/health``, ``/ready``, ``/metrics``.

Kubernetes probes and Prometheus need the same endpoints on routers as on
gateways; the router's work itself runs in the lifespan of this app.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from common import jsoncodec
from common.gctune import GcPauses
from common.metrics import Metrics
from common.settings import Settings
from router.cluster import ClusterRouter


def _json(body: object, status: int = 200) -> Response:
    return Response(jsoncodec.dumps(body), status_code=status, media_type="application/json")


def create_router_app(settings: Settings) -> Starlette:
    metrics = Metrics()
    router = ClusterRouter(settings, metrics)
    gc_pauses = GcPauses(metrics.gc_pauses)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gc_pauses.start()
        await router.start()
        try:
            yield
        finally:
            await router.stop()
            gc_pauses.stop()

    async def health(request: Request) -> Response:
        return _json(router.health())

    async def ready(request: Request) -> Response:
        if router.ready and not router.stopping:
            return _json({"ready": True, "router_id": router.router_id})
        return _json({"ready": False}, status=503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/ready", ready),
            Route("/metrics", metrics_endpoint),
        ],
        lifespan=lifespan,
    )
    app.state.router = router
    return app
