"""Metrics, traces and logs after real traffic (issue: operations)."""

from __future__ import annotations

import asyncio
import gc
import json
import re
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from common.gctune import GcPauses
from common.telemetry import enable_tracing

_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))
trace.set_tracer_provider(_PROVIDER)

INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_PARENT = "00f067aa0ba902b7"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    enable_tracing(True)
    try:
        yield _EXPORTER
    finally:
        enable_tracing(False)
        _EXPORTER.clear()


def _by_name(exporter: InMemorySpanExporter) -> dict[str, list]:
    found: dict[str, list] = {}
    for finished in exporter.get_finished_spans():
        found.setdefault(finished.name, []).append(finished)
    return found


def _assert_chain(found: dict[str, list], server_name: str) -> None:
    server = found[server_name][0]
    dispatch = found["ara.dispatch"][0]
    route = found["ara.route"][0]
    deliver = found["ara.deliver"][0]
    for part in (server, dispatch, route, deliver):
        assert f"{part.context.trace_id:032x}" == INCOMING_TRACE, part.name
    assert f"{server.parent.span_id:016x}" == INCOMING_PARENT
    assert dispatch.parent.span_id == server.context.span_id
    assert route.parent.span_id == dispatch.context.span_id
    assert deliver.parent.span_id == route.context.span_id
    assert deliver.attributes["ara.connections"] == 1


async def test_rest_send_routing_and_delivery_are_one_trace_that_honours_traceparent(
    server, spans
):
    async with server.ws("trace-user") as client:
        response = await server.post(
            "/api/v1/notifications/send",
            {"target_user_id": "trace-user", "event_type": "traced"},
            headers={"traceparent": f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-01"},
        )
        assert response.status_code == 200
        await client.expect("notification")
    _assert_chain(_by_name(spans), "POST /api/v1/notifications/send")
    route = _by_name(spans)["ara.route"][0]
    assert route.attributes["ara.notification_id"] == response.json()["notification_id"]


async def test_no_spans_are_recorded_when_tracing_is_off(server):
    _EXPORTER.clear()
    async with server.ws("quiet-user") as client:
        await server.send_to_user("quiet-user")
        await client.expect("notification")
    assert _EXPORTER.get_finished_spans() == ()


async def test_trace_context_crosses_the_redis_streams_of_a_cluster(tmp_path, spans):
    from cluster_harness import RedisServer, create_database, drop_database, migrate, pg_admin_dsn
    from conftest import EmbeddedServer, make_settings

    from common.metrics import Metrics
    from gateway.cluster import cluster_backends
    from router.cluster import ClusterRouter

    redis = RedisServer()
    redis.start()
    admin = pg_admin_dsn()
    dsn = await create_database(admin)
    await migrate(dsn)
    settings = make_settings(tmp_path, redis_url=redis.url, database_url=dsn, node_id="gw-trace",
                             redis_key_prefix="aratrace")
    gateway = EmbeddedServer(settings, backends=cluster_backends)
    router = ClusterRouter(settings.model_copy(update={"node_id": "rt-trace"}), Metrics())
    try:
        await gateway.start()
        await router.start()
        for _ in range(100):
            if len(router.leases.held()) == settings.router_partitions:
                break
            await asyncio.sleep(0.1)
        async with gateway.ws("cluster-trace") as client:
            response = await gateway.post(
                "/api/v1/notifications/send",
                {"target_user_id": "cluster-trace", "event_type": "traced"},
                headers={"traceparent": f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-01"},
            )
            assert response.status_code == 200
            await client.expect("notification", within=10)
        _assert_chain(_by_name(spans), "POST /api/v1/notifications/send")
    finally:
        await router.stop()
        await gateway.stop()
        redis.stop()
        await drop_database(admin, dsn)


async def test_metrics_count_connections_deliveries_queue_acks_and_rate_limits(server_factory):
    server = await server_factory(ratelimit_http_requests_per_second=1,
                                  ratelimit_http_burst_size=5)
    async with server.ws("metric-user") as client:
        sent = await server.send_to_user("metric-user")
        await client.expect("notification")
        ack = {"type": "Ack", "payload": {"notification_id": sent["notification_id"]}}
        await client.send_json(ack)
        await client.expect("acked")
        await server.send_to_user("offline-metric-user")
        statuses = [(await server.post("/api/v1/notifications/broadcast",
                                        {"event_type": "x"})).status_code for _ in range(6)]
        assert 429 in statuses
        text = (await server.get("/metrics")).text

    def value(pattern: str) -> float:
        match = re.search(r"^" + pattern + r" ([0-9.e+]+)$", text, re.MULTILINE)
        assert match, f"{pattern} missing from /metrics"
        return float(match.group(1))

    assert value(r'ara_connections\{transport="websocket"\}') == 1
    assert value(r'ara_notifications_total\{source="http-api",target="user"\}') == 2
    assert value(r'ara_queue_enqueued_total') == 1
    assert value(r'ara_ack_latency_seconds_count') == 1
    assert value(r'ara_acks_total\{result="acked"\}') == 1
    assert value(r'ara_ratelimit_rejections_total\{scope="http"\}') >= 1
    assert value(r'ara_http_requests_total\{route="send_user",status="200"\}') == 2
    for line in text.splitlines():
        if line.startswith("ara_") and "{" in line:
            assert "metric-user" not in line, "user ids must never be label values"


async def test_gc_pauses_are_timed_by_generation_while_the_app_runs(server_factory):
    server = await server_factory()
    gc.collect()
    text = (await server.get("/metrics")).text
    match = re.search(r'^ara_gc_pause_seconds_count\{generation="2"\} ([0-9.e+]+)$', text,
                      re.MULTILINE)
    assert match and float(match.group(1)) >= 1
    await server.stop()
    assert not any(type(getattr(cb, "__self__", None)) is GcPauses for cb in gc.callbacks), (
        "the app's collector hook outlived its lifespan")


async def test_json_logs_carry_request_and_notification_ids(serve_process):
    proc = await serve_process(LOG_FORMAT="json", LOG_LEVEL="DEBUG")
    import httpx
    from conftest import API_HEADERS

    async with httpx.AsyncClient(base_url=proc.base_url, headers=API_HEADERS) as http:
        response = await http.post(
            "/api/v1/notifications/send",
            json={"target_user_id": "logged", "event_type": "x"},
            headers={"X-Request-ID": "req-abc-123"},
        )
    assert response.headers["x-request-id"] == "req-abc-123"
    notification_id = response.json()["notification_id"]
    records = []
    for _ in range(50):
        records = [json.loads(line) for line in proc.log.splitlines() if line.startswith("{")]
        if any(r.get("notification_id") == notification_id for r in records):
            break
        await asyncio.sleep(0.05)
    accepted = [r for r in records if r.get("notification_id") == notification_id]
    assert accepted, proc.log[-2000:]
    assert accepted[0]["request_id"] == "req-abc-123"
    assert accepted[0]["level"] == "DEBUG" and accepted[0]["message"] == "notification accepted"
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)
