"""OpenTelemetry tracing: one trace from the REST send to the socket write.

The trace context travels inside the notification record (``trace``, W3C
``traceparent``) through the partition stream and the gateway stream, so a
send, its routing on a router process and its delivery on another gateway
are spans of one trace. With ``OTEL_ENABLED`` off nothing is recorded and the
hot paths skip the work entirely.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind

log = logging.getLogger("ara.telemetry")

_enabled = False
tracer = trace.get_tracer("ara-notify")


def tracing_enabled() -> bool:
    return _enabled


def enable_tracing(on: bool = True) -> None:
    """Switch span recording on (tests install their own provider first)."""
    global _enabled
    _enabled = on


def setup_tracing(service_name: str, enabled: bool) -> None:
    """Install the SDK with the OTLP/HTTP exporter; standard ``OTEL_*`` variables apply."""
    if not enabled:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    enable_tracing(True)
    log.info("OpenTelemetry tracing on, service %s", service_name)


def carrier() -> dict[str, str] | None:
    """The current span context as a W3C carrier, or None when not tracing."""
    if not _enabled:
        return None
    found: dict[str, str] = {}
    propagate.inject(found)
    return found or None


@contextlib.contextmanager
def span(
    name: str,
    parent: Mapping[str, str] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: dict[str, Any] | None = None,
) -> Iterator[Span | None]:
    """A span under ``parent`` (a carrier) or the current context; no-op when off."""
    if not _enabled:
        yield None
        return
    token = None
    if parent:
        token = otel_context.attach(propagate.extract(dict(parent)))
    try:
        with tracer.start_as_current_span(name, kind=kind, attributes=attributes) as current:
            yield current
    finally:
        if token is not None:
            otel_context.detach(token)
