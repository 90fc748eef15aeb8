"""Property-based fuzzing of the socket surfaces and the Pub/Sub trigger.

Hypothesis generates WebSocket text frames (random JSON of every shape,
protocol-shaped messages with hostile fields, deep nesting, oversized frames,
non-JSON text, binary frames), SSE query strings, and Redis Pub/Sub bodies.
The promise under test is DESIGN's last fault-table row: bad input on any
surface gets a clear error frame or 4xx, never a crash, and nothing else is
affected. Concretely:

- every WebSocket survives its fuzzed frames and still answers ``Ping`` with
  ``pong`` within 5 s; the only allowed close is 1009 for a frame over 64 KiB;
  every server frame is a JSON object of a documented type and error code;
- every SSE request gets a 2xx stream that opens with ``connected`` or a 4xx
  with the error envelope;
- ``PubSubTrigger.handle`` never raises and never hits its unexpected-error
  path: invalid bodies are counted and dropped, valid ones reach a partition
  stream; a burst of garbage published to a real cluster leaves the next valid
  message delivered exactly once.

The servers are real processes on loopback; the number of examples is bounded
so the module runs in well under a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TEST_JWT_SECRET, free_port, serve_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from common.auth import mint_token
from common.backends.base import Template
from common.backends.redis_client import RedisHandle
from common.backends.redis_sessions import RedisSessionStore
from common.backends.redis_streams import PartitionProducer, decode_accepted
from common.metrics import Metrics
from common.protocol import FrameError, parse_client_frame
from common.settings import load_settings
from router.pubsub import PubSubTrigger

# Run this checkout's code, whatever else is installed.
ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example, HealthCheck.filter_too_much],
)
FRAME_LIMIT = 65_536
SERVER_TYPES = {"subscribed", "unsubscribed", "error", "acked", "pong", "heartbeat",
                "notification"}
ERROR_CODES = {"INVALID_MESSAGE", "UNSUPPORTED_FORMAT", "SUBSCRIPTION_ERROR", "INVALID_ACK"}
TOKENS = load_settings(jwt_secret=TEST_JWT_SECRET)


@dataclass
class Node:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    users: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self) -> str:
        self.users += 1
        return mint_token(TOKENS, f"fuzz-{self.users}")

    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?token={self.token()}"

    def alive(self) -> None:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """``ara-notify serve`` in a child process, killed by PID at the end."""
    tmp = tmp_path_factory.mktemp("fuzz-node")
    port = free_port()
    env = serve_env(tmp, port, WEBSOCKET_MAX_CONNECTIONS_PER_USER=1000, LOG_LEVEL="ERROR")
    log = tmp / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "common.cli", "serve"], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
    fuzz_node = Node(port, proc, log)
    try:
        deadline = time.monotonic() + 20
        while True:
            fuzz_node.alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(fuzz_node.base + "/ready", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "fuzz node did not start"
            time.sleep(0.05)
        yield fuzz_node
        fuzz_node.alive()
        health = httpx.get(fuzz_node.base + "/health", timeout=5).json()
        assert health["status"] == "healthy"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# -- strategies ----------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=40,
)
channel_like = st.one_of(
    st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True),
    st.text(alphabet=string.printable + "\u043e\uff4f\u200b\u202e\x00\x1f:{}|", max_size=70),
    json_values,
)
kinds = st.sampled_from(["Subscribe", "Unsubscribe", "Ping", "Ack", "subscribe", "PING",
                         "Pong", "", "notification", "__proto__"])
shaped = st.fixed_dictionaries(
    {"type": kinds | json_values},
    optional={"payload": st.one_of(
        json_values,
        st.fixed_dictionaries({"channels": st.lists(channel_like, max_size=60) | json_values}),
        st.fixed_dictionaries({"notification_id": st.text(max_size=200) | json_values}),
    )},
)


def _deep(depth: int) -> str:
    return '{"type":"Subscribe","payload":{"channels":[' + "[" * depth + "]" * depth + "]}}"


ws_frames = st.one_of(
    shaped.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=300),
    st.binary(max_size=300),
    st.integers(1, 1100).map(_deep),
    st.integers(1, 1100).map(lambda d: '{"type":' + "[" * d + "]" * d + "}"),
    st.integers(FRAME_LIMIT - 200, FRAME_LIMIT + 4000).map(
        lambda n: json.dumps({"type": "Ping", "pad": "x" * n})),
)


def _size(frame: str | bytes) -> int:
    return len(frame.encode() if isinstance(frame, str) else frame)


# -- WebSocket --------------------------------------------------------------------------


def _check_frame(raw: str | bytes) -> dict[str, Any]:
    assert isinstance(raw, str), "the server only sends text frames"
    frame = json.loads(raw)
    assert isinstance(frame, dict) and frame.get("type") in SERVER_TYPES, frame
    if frame["type"] == "error":
        assert frame["code"] in ERROR_CODES, frame
        assert isinstance(frame["message"], str) and len(frame["message"]) < 1000
    return frame


def _pings(frames: list[str | bytes]) -> int:
    """How many of the frames the server takes as a Ping (each gets a pong)."""
    count = 0
    for frame in frames:
        with contextlib.suppress(FrameError):
            if isinstance(frame, str) and parse_client_frame(frame).kind == "Ping":
                count += 1
    return count


@FUZZ
@given(frames=st.lists(ws_frames, min_size=1, max_size=6))
def test_websocket_survives_any_frames_and_still_answers_ping(node: Node, frames: list) -> None:
    oversized = next((i for i, f in enumerate(frames) if _size(f) > FRAME_LIMIT), None)
    if oversized is not None:
        # The server fails the connection on a frame over the limit; anything sent after it
        # would only race the close (the peer may answer unread data with a TCP reset).
        frames = frames[: oversized + 1]
    with connect(node.ws_url(), open_timeout=5, max_size=None, proxy=None) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "connected"
        deadline = time.monotonic() + 5
        try:
            for frame in frames:
                ws.send(frame)
            if oversized is None:
                # Ours is the last Ping: its pong proves the socket still works.
                ws.send('{"type":"Ping"}')
                pongs = _pings(frames) + 1
            else:
                pongs = -1  # read on until the server closes
            while pongs:
                frame = _check_frame(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
                pongs -= frame["type"] == "pong"
        except ConnectionClosed as closed:
            assert oversized is not None, f"closed {closed.rcvd} without an oversized frame"
            assert closed.rcvd is not None and closed.rcvd.code == 1009, closed.rcvd
        else:
            assert oversized is None
    node.alive()


# -- SSE ----------------------------------------------------------------------------

query_keys = st.sampled_from(["token", "channels", "channel", "connection_id", "last_event_id",
                              "tenant_id", ""]) | st.text(max_size=12)
query_values = st.text(max_size=300) | st.lists(channel_like.filter(
    lambda c: isinstance(c, str)), max_size=60).map(",".join)
raw_query = st.lists(st.sampled_from(
    ["%", "%ff", "%00", "%zz", "&", "=", "+", ";", "channels=", "token=", "a", ",", "%2C",
     "%E2%80%AE", "?", "#", "[]", "%F0%9F%98%80"]), max_size=30).map("".join)


def _sse(node: Node, url: httpx.URL | str, params: Any = None) -> None:
    with httpx.Client(timeout=5) as http:
        with http.stream("GET", url, params=params) as response:
            assert response.status_code < 500, response.status_code
            if response.status_code == 200:
                assert response.headers["content-type"].startswith("text/event-stream")
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        assert line == "event: connected", line
                        break
            else:
                response.read()
                assert response.status_code in (400, 401, 404, 422, 429), response.status_code
                error = response.json()["error"]
                assert isinstance(error["code"], str) and isinstance(error["message"], str)


@FUZZ
@given(pairs=st.lists(st.tuples(query_keys, query_values), max_size=6),
       token=st.sampled_from(["valid", "missing", "garbage", "expired"]))
def test_sse_query_strings_get_a_stream_or_a_4xx(node: Node, pairs: list, token: str) -> None:
    params: list[tuple[str, str]] = []
    if token == "valid":
        params.append(("token", node.token()))
    elif token == "garbage":
        params.append(("token", "x.y.z"))
    elif token == "expired":
        params.append(("token", mint_token(TOKENS, "late", ttl=-3600)))
    params.extend(pairs)
    _sse(node, node.base + "/sse", params)
    node.alive()


def _raw_get(node: Node, target: str) -> tuple[int, bytes]:
    """One request with the request-target exactly as given (no client-side escaping)."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: fuzz\r\n\r\n".encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data or (b" 200 " in data[:13] and b"event:" not in data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


@FUZZ
@given(query=raw_query)
def test_sse_raw_query_bytes_get_a_stream_or_a_4xx(node: Node, query: str) -> None:
    status, data = _raw_get(node, f"/sse?token={node.token()}&{query}")
    assert status < 500, data
    if status == 200:
        assert b"event: connected" in data, data
    else:
        assert status in (400, 401, 422), data
    node.alive()


# -- Pub/Sub ----------------------------------------------------------------------------


class MemoryTemplates:
    def __init__(self) -> None:
        now = time.time()
        self.one = Template("tpl", "default", None, "tpl.event",
                            {"text": "hi {{name}}", "n": "{{count}}", "deep": "{{a.b.c}}"},
                            "Normal", None, None, now, now)

    async def get(self, tenant_id: str, template_id: str) -> Template | None:
        return self.one if (tenant_id, template_id) == ("default", "tpl") else None

    async def list(self, tenant_id: str) -> list[Template]:
        return [self.one] if tenant_id == "default" else []

    async def create(self, template: Template) -> bool:
        return False

    async def replace(self, template: Template) -> bool:
        return False

    async def delete(self, tenant_id: str, template_id: str) -> bool:
        return False


class NoReceipts:
    async def record(self, *args: Any) -> None:
        return None


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Trigger:
    trigger: PubSubTrigger
    handle: RedisHandle
    loop: asyncio.AbstractEventLoop
    metrics: Metrics
    errors: Errors

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def backlog(self) -> int:
        async def count() -> int:
            total = 0
            for p in range(8):
                total += await self.handle.client.xlen(self.handle.keys.partition(p))
            return total

        return int(self.run(count()))

    def invalid(self) -> float:
        return self.metrics.registry.get_sample_value("ara_pubsub_invalid_total") or 0.0


@pytest.fixture(scope="module")
def trigger() -> Iterator[Trigger]:
    from cluster_harness import RedisServer

    redis = RedisServer()
    redis.start()
    loop = asyncio.new_event_loop()
    errors = Errors()
    logging.getLogger("ara.router.pubsub").addHandler(errors)
    try:
        settings_ = load_settings(redis_url=redis.url, database_url="postgresql://unused/none",
                                  jwt_secret=TEST_JWT_SECRET, router_partitions=8,
                                  tenant_enabled=True)
        handle = RedisHandle(redis.url, "fuzz")
        metrics = Metrics()
        pubsub = PubSubTrigger(
            settings_, handle, RedisSessionStore(handle, None, None), PartitionProducer(handle),
            MemoryTemplates(), NoReceipts(), metrics,  # type: ignore[arg-type]
        )
        yield Trigger(pubsub, handle, loop, metrics, errors)
        loop.run_until_complete(handle.close())
    finally:
        logging.getLogger("ara.router.pubsub").removeHandler(errors)
        loop.close()
        redis.stop()


user_ids = st.text(min_size=1, max_size=20) | st.text(max_size=300) | json_values
events = st.fixed_dictionaries(
    {},
    optional={
        "event_type": st.text(max_size=140) | json_values,
        "payload": json_values,
        "priority": st.sampled_from(["Low", "Normal", "High", "Critical", "urgent"]) | json_values,
        "ttl": st.integers(-5, 40 * 24 * 3600) | json_values,
        "correlation_id": st.text(max_size=140) | json_values,
        "template_id": st.sampled_from(["tpl", "missing", "../tpl"]) | json_values,
        "variables": st.dictionaries(st.sampled_from(["name", "count", "a"]), json_values)
        | json_values,
    },
)
pubsub_bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["user", "users", "broadcast", "channel", "channels", "all"])
         | json_values, "event": events | json_values},
        optional={"target": user_ids | st.lists(user_ids, max_size=5),
                  "tenant_id": st.sampled_from(["default", "acme", "a:b", "", "x" * 65])
                  | json_values},
    ).map(lambda v: json.dumps(v).encode()),
    st.integers(1, 1100).map(lambda d: (
        '{"type":"user","target":"u1","event":{"event_type":"e","payload":'
        + "[" * d + "]" * d + "}}").encode()),
)
valid_bodies = st.fixed_dictionaries({
    "type": st.just("user"),
    "target": st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True),
    "event": st.fixed_dictionaries({"event_type": st.from_regex(r"[a-z.]{1,20}", fullmatch=True),
                                    "payload": json_values}),
})


@FUZZ
@given(body=pubsub_bodies, channel=st.sampled_from(["notification:user:u1",
                                                    "notification:broadcast", "notification:x"]))
def test_pubsub_handle_drops_bad_bodies_cleanly(trigger: Trigger, body: bytes,
                                                channel: str) -> None:
    before_invalid, before_backlog = trigger.invalid(), trigger.backlog()
    accepted = trigger.run(asyncio.wait_for(trigger.trigger.handle(channel, body), 5))
    assert isinstance(accepted, bool)
    if accepted:
        assert trigger.backlog() > before_backlog
    else:
        assert trigger.invalid() == before_invalid + 1
        assert trigger.backlog() == before_backlog
    assert not trigger.errors.records, [r.getMessage() for r in trigger.errors.records]


@FUZZ
@given(body=valid_bodies)
def test_pubsub_handle_accepts_valid_bodies_into_a_partition_stream(
    trigger: Trigger, body: dict[str, Any],
) -> None:
    assert trigger.run(trigger.trigger.handle("notification:user:x", json.dumps(body).encode()))

    sent = body["event"]["payload"]
    payload = {} if sent is None else sent  # an absent payload is sent as {}

    async def newest() -> Any:
        for p in range(8):
            for _, fields in await trigger.handle.client.xrevrange(
                    trigger.handle.keys.partition(p), count=50):
                notification, target = decode_accepted(fields[b"e"])
                if notification.payload == payload and target.user_ids == (
                        body["target"],):
                    return notification
        return None

    found = trigger.run(newest())
    assert found is not None and found.event_type == body["event"]["event_type"]
    assert found.source == "redis:notification:user:x"


@pytest.mark.cluster
@pytest.mark.timeout(90)
async def test_garbage_published_to_a_cluster_leaves_it_delivering_exactly_once(tmp_path):
    import redis.asyncio as aioredis
    from cluster_harness import API_KEY, Client, running_cluster

    garbage = [
        b"", b"\xff\xfe", b"null", b"[]", b'"str"', b"{}", b'{"type":"user"}',
        b'{"type":"user","target":"u1","event":{}}',
        b'{"type":"user","target":"u1","event":{"event_type":"e","payload":'
        + b"[" * 900 + b"]" * 900 + b"}}",
        b'{"type":"user","target":"u1","tenant_id":"a:b","event":{"event_type":"e"}}',
        b'{"type":"users","target":[],"event":{"event_type":"e"}}',
        b'{"type":"channel","target":"bad name","event":{"event_type":"e"}}',
        b'{"type":"user","target":"u1","event":{"template_id":"nope"}}',
        b'{"type":"user","target":"u1","event":{"event_type":"e","ttl":0}}',
        json.dumps({"type": "user", "target": "u1",
                    "event": {"event_type": "e", "payload": "x" * 200_000}}).encode(),
    ]
    async with running_cluster(tmp_path, gateways=1, routers=2) as cluster:
        [gw] = cluster.gateways()
        r = aioredis.Redis.from_url(cluster.redis_url)
        try:
            async with Client.connect(gw.ws, cluster.token("u1")) as u1:
                await asyncio.sleep(1.5)  # a leader is subscribed
                for body in garbage:
                    await r.publish("notification:user:u1", body)
                await r.publish("notification:user:u1", json.dumps({
                    "type": "user", "target": "u1",
                    "event": {"event_type": "after.garbage", "payload": {"ok": True}}}))
                got = await u1.notifications(2, 3.0)
                assert [g["event_type"] for g in got] == ["after.garbage"], got
        finally:
            await r.aclose()
        invalid = 0.0
        async with httpx.AsyncClient(timeout=5, headers={"X-API-Key": API_KEY}) as http:
            for router in cluster.routers():
                text = (await http.get(router.base + "/metrics")).text
                for line in text.splitlines():
                    if line.startswith("ara_pubsub_invalid_total"):
                        invalid += float(line.split()[-1])
        assert invalid == len(garbage)
        assert len(cluster.routers()) == 2
        for router in cluster.routers():
            log = router.log.read_text()
            assert "could not be dispatched" not in log and "Traceback" not in log, log[-2000:]
