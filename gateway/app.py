"""The Starlette application: routes, error envelope, rate limits, lifespan."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from opentelemetry.trace import SpanKind
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.auth import ApiKeyChecker, TokenVerifier
from common.errors import ApiError, BackendUnavailable
from common.gctune import GcPauses
from common.idempotency import Idempotency
from common.logs import current_request
from common.metrics import Metrics
from common.sending import Sender
from common.settings import Settings
from common.telemetry import span, tracing_enabled
from gateway import rest_info, rest_send
from gateway.connections import ConnectionManager
from gateway.direct import DirectRoutes
from gateway.http import JSONResponse, error_response, header
from gateway.limits import ConnectLimiter, HttpLimiter
from gateway.node import Backends, GatewayNode
from gateway.openapi import build_openapi
from gateway.sse import sse_ack, sse_endpoint
from gateway.ws import websocket_endpoint

log = logging.getLogger("ara.gateway.app")

BackendsFactory = Callable[[Settings, ConnectionManager, Metrics], Backends]

UNLIMITED_PATHS = ("/health", "/ready", "/metrics")


def _request_id(given: str | None) -> str:
    if given and len(given) <= 128 and given.isprintable():
        return given
    return os.urandom(16).hex()


def _trace_headers(request: Request) -> dict[str, str] | None:
    parent = header(request, b"traceparent")
    if not parent:
        return None
    found = {"traceparent": parent}
    state = header(request, b"tracestate")
    if state:
        found["tracestate"] = state
    return found


class EdgeMiddleware:
    """Request id, server span, REST rate limit and request metrics, before routing."""

    def __init__(self, app: ASGIApp, limiter: HttpLimiter, metrics: Metrics) -> None:
        self.app = app
        self.limiter = limiter
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        request = Request(scope)
        request_id = _request_id(header(request, b"x-request-id"))
        extra: dict[str, str] = {"X-Request-ID": request_id}
        status_box = [500]
        token = current_request.set(request_id)
        try:
            if not (tracing_enabled() and path.startswith("/api/")):
                await self._guarded(scope, receive, send, extra, status_box)
                return
            with span(
                f"{scope['method']} {path}",
                parent=_trace_headers(request),
                kind=SpanKind.SERVER,
                attributes={"http.method": scope["method"], "http.target": path},
            ) as current:
                await self._guarded(scope, receive, send, extra, status_box)
                if current is not None:
                    current.set_attribute("http.status_code", status_box[0])
        finally:
            current_request.reset(token)

    async def _guarded(
        self, scope: Scope, receive: Receive, send: Send, extra: dict[str, str],
        status_box: list[int],
    ) -> None:
        path: str = scope["path"]
        if self.limiter.enabled and (path.startswith("/api/") or path == "/stats"):
            try:
                extra.update(await self.limiter.check(Request(scope)))
            except ApiError as err:
                self._count(scope, err.status)
                err.headers.update(extra)
                await error_response(err)(scope, receive, send)
                return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                if extra:
                    headers = list(message.get("headers", []))
                    headers.extend((k.lower().encode(), v.encode()) for k, v in extra.items())
                    message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._count(scope, status_box[0])

    def _count(self, scope: Scope, status: int) -> None:
        endpoint = scope.get("endpoint")
        name = getattr(endpoint, "__name__", "unmatched")
        self.metrics.child(self.metrics.http_requests, name, str(status)).inc()


SEND_ROUTES = {
    "/api/v1/notifications/send": rest_send.send_user,
    "/api/v1/notifications/send-to-users": rest_send.send_users,
    "/api/v1/notifications/broadcast": rest_send.send_broadcast,
    "/api/v1/notifications/channel": rest_send.send_channel,
    "/api/v1/notifications/channels": rest_send.send_channels,
    "/api/v1/notifications/batch": rest_send.send_batch,
}


class GatewayApp(Starlette):
    """Starlette with the send endpoints served directly (``gateway.direct``).

    ``direct_edge`` builds the ``EdgeMiddleware`` around a direct call; None (CORS
    configured: its middleware must see every request) keeps the plain stack.
    """

    direct_edge: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        if self.direct_edge is None:
            return stack
        return DirectRoutes(stack, SEND_ROUTES, self.exception_handlers, self.direct_edge)


def create_app(settings: Settings, make_backends: BackendsFactory) -> Starlette:
    metrics = Metrics()
    manager = ConnectionManager()
    backends = make_backends(settings, manager, metrics)
    node = GatewayNode(settings, manager, backends, metrics)
    sender = Sender(settings, backends.dispatcher, backends.templates, backends.receipts, metrics,
                    backends.stats)

    gc_pauses = GcPauses(metrics.gc_pauses)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gc_pauses.start()
        await node.start()
        try:
            yield
        finally:
            await node.stop()
            gc_pauses.stop()

    async def health(request: Request) -> Response:
        return JSONResponse(await node.health())

    async def ready(request: Request) -> Response:
        if node.ready and backends.available():
            return JSONResponse({"ready": True, "node_id": node.node_id})
        reason = "draining" if node.draining else "starting" if not node.ready else "backend down"
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    openapi_doc = build_openapi()

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_doc)

    routes = [
        WebSocketRoute("/ws", websocket_endpoint),
        Route("/sse", sse_endpoint, methods=["GET"]),
        Route("/sse/ack", sse_ack, methods=["POST"]),
        # Served by DirectRoutes first; kept here for CORS setups and the fall-through.
        *(Route(path, endpoint, methods=["POST"]) for path, endpoint in SEND_ROUTES.items()),
        Route("/api/v1/notifications/{notification_id}", rest_info.get_receipt, methods=["GET"]),
        Route("/api/v1/channels", rest_info.list_channels, methods=["GET"]),
        Route("/api/v1/channels/{name}", rest_info.get_channel, methods=["GET"]),
        Route("/api/v1/users/{user_id}/subscriptions", rest_info.user_subscriptions,
              methods=["GET"]),
        Route("/api/v1/stats", rest_info.stats, methods=["GET"]),
        Route("/stats", rest_info.stats, methods=["GET"]),
        Route("/api/v1/stats/acks", rest_info.ack_stats, methods=["GET"]),
        Route("/api/v1/tenants", rest_info.list_tenants, methods=["GET"]),
        Route("/api/v1/tenants/{tenant_id}", rest_info.get_tenant, methods=["GET"]),
        Route("/api/v1/cluster/status", rest_info.cluster_status, methods=["GET"]),
        Route("/api/v1/cluster/users/{user_id}", rest_info.cluster_user, methods=["GET"]),
        Route("/api/v1/templates", rest_info.create_template, methods=["POST"]),
        Route("/api/v1/templates", rest_info.list_templates, methods=["GET"]),
        Route("/api/v1/templates/{template_id}", rest_info.get_template, methods=["GET"]),
        Route("/api/v1/templates/{template_id}", rest_info.replace_template, methods=["PUT"]),
        Route("/api/v1/templates/{template_id}", rest_info.delete_template, methods=["DELETE"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        codes = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}
        code = codes.get(exc.status_code, "HTTP_ERROR")
        return error_response(ApiError(exc.status_code, code, str(exc.detail)))

    async def unavailable(request: Request, exc: Exception) -> Response:
        return error_response(
            ApiError(503, "SERVICE_UNAVAILABLE", "a required backend is unavailable",
                     headers={"Retry-After": "1"})
        )

    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        message = "Internal server error" if settings.production else f"{type(exc).__name__}: {exc}"
        return error_response(ApiError(500, "INTERNAL_ERROR", message))

    limiter = HttpLimiter(settings, backends.rate_limiter, metrics)
    middleware = [Middleware(EdgeMiddleware, limiter=limiter, metrics=metrics)]
    if settings.cors_origins:
        middleware.insert(0, Middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
            allow_headers=["*"],
        ))
    handlers: dict[Any, Any] = {
        ApiError: api_error,
        HTTPException: http_error,
        BackendUnavailable: unavailable,
        Exception: internal,
    }
    app = GatewayApp(routes=routes, middleware=middleware, exception_handlers=handlers,
                     lifespan=lifespan)
    if not settings.cors_origins:
        app.direct_edge = lambda inner: EdgeMiddleware(inner, limiter=limiter, metrics=metrics)
    app.state.settings = settings
    app.state.node = node
    app.state.sender = sender
    app.state.metrics = metrics
    app.state.verifier = TokenVerifier(settings)
    app.state.api_keys = ApiKeyChecker(settings)
    app.state.connect_limiter = ConnectLimiter(settings, backends.rate_limiter, metrics)
    app.state.idempotency = Idempotency(backends.idempotency)
    return app
