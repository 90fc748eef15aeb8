"""The REST send endpoints, served without Starlette's routing and exception layers.

A send is the request a gateway serves most, and the framework around it cost
nearly as much CPU as its own work: in a cProfile of ``bench/rest.py`` about
40 % of a request's time was spent outside the endpoint, much of it in
``ServerErrorMiddleware``, ``ExceptionMiddleware``, the router's regex matching
over every route and the send wrappers each layer adds. The send routes have
fixed paths and one method, so a dict finds them. What a client sees stays the
same: the request goes through the same ``EdgeMiddleware`` (request id, server
span, rate limit, request metrics), and an exception becomes the same response
through the application's own exception handlers. Anything else (another
method, a trailing slash, a ``root_path``) falls through to Starlette.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]
ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


def handler_for(handlers: Mapping[Any, ErrorHandler], exc: Exception) -> ErrorHandler | None:
    """The handler registered for the closest class of ``exc`` (as Starlette looks it up)."""
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None


class DirectRoutes:
    """ASGI app: POSTs to the given paths go straight to their endpoint, the rest to ``app``.

    ``edge`` wraps the endpoint call the way it wraps the Starlette stack, so the
    request id, span, rate limit and metrics apply to both paths alike.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: Mapping[str, Endpoint],
        handlers: Mapping[Any, ErrorHandler],
        edge: Callable[[ASGIApp], ASGIApp],
    ) -> None:
        self.app = app
        self.routes = dict(routes)
        self.handlers = dict(handlers)
        self.edge = edge(self._serve)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.routes.get(scope["path"])
            if endpoint is not None:
                scope["endpoint"] = endpoint
                await self.edge(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await scope["endpoint"](request)
        except Exception as exc:
            handler = handler_for(self.handlers, exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)
