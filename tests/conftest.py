"""Shared fixtures: real servers on free ports, driven by real clients.

Everything here is reusable by the cluster tests:

- ``free_port()`` picks a TCP port nobody listens on.
- ``EmbeddedServer`` runs ``gateway.app.create_app`` under uvicorn inside the
  test's event loop on ``127.0.0.1`` (no signal handlers installed).
- ``ServeProcess`` runs ``python -m common.cli serve`` as a child process, for
  SIGTERM drains and restart persistence; it is killed by PID on teardown.
- ``WsClient`` wraps ``websockets.asyncio.client.connect`` with bounded
  ``recv_json`` / ``expect`` helpers that can skip heartbeats.
- ``SseClient`` reads ``/sse`` with httpx streaming and parses
  ``id:``/``event:``/``data:`` records into ``SseEvent``.

Every wait is bounded, so a broken server fails a test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from common.auth import mint_token
from common.settings import Settings, load_settings
from gateway.app import BackendsFactory, create_app
from gateway.embedded import embedded_backends
from gateway.node import GatewayNode
from gateway.server import uvicorn_config

TEST_JWT_SECRET = "test-jwt-secret-0123456789-abcdefghijklmnop"
TEST_API_KEY = "test-api-key-0123456789"
API_HEADERS = {"X-API-Key": TEST_API_KEY}

#: Limits high enough that no test trips them unless it is about limits.
NO_LIMITS: dict[str, Any] = {
    "ratelimit_http_requests_per_second": 1_000_000,
    "ratelimit_http_burst_size": 1_000_000,
    "ratelimit_ws_connections_per_minute": 1_000_000,
    "ratelimit_ws_messages_per_second": 1_000_000,
    "ratelimit_ws_message_burst": 1_000_000,
}

DEFAULT_TIMEOUT = 5.0


def rsa_pair() -> tuple[str, str]:
    """A fresh RSA key pair as PEM strings: (private PKCS#8, public SubjectPublicKeyInfo)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return private, public


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Test settings: SQLite under ``tmp_path``, fixed node id, limits out of the way."""
    values: dict[str, Any] = {
        "server_host": "127.0.0.1",
        "server_port": 0,
        "node_id": "gw-test",
        "sqlite_path": str(tmp_path / "ara.sqlite3"),
        "jwt_secret": TEST_JWT_SECRET,
        "api_key": TEST_API_KEY,
        "drain_timeout_seconds": 1,
        **NO_LIMITS,
    }
    values.update(overrides)
    return load_settings(**values)


def token_for(settings: Settings, sub: str, **kwargs: Any) -> str:
    """A client JWT the server described by ``settings`` accepts."""
    return mint_token(settings, sub, **kwargs)


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], within: float = DEFAULT_TIMEOUT,
    interval: float = 0.02,
) -> None:
    """Poll ``check`` until it is true, failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


# -- WebSocket client ------------------------------------------------------------


class WsClient:
    """A WebSocket client with bounded, JSON-aware receive helpers."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.hello: dict[str, Any] = {}

    async def send_json(self, value: Any) -> None:
        await self.ws.send(json.dumps(value))

    async def send_text(self, text: str) -> None:
        await self.ws.send(text)

    async def ack(self, notification_id: str) -> None:
        await self.send_json({"type": "Ack", "payload": {"notification_id": notification_id}})

    async def recv_json(self, within: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), within)
        assert isinstance(raw, str), f"expected a text frame, got {raw!r}"
        value = json.loads(raw)
        assert isinstance(value, dict)
        return value

    async def recv(self, within: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The next frame that is not a ``heartbeat``."""
        deadline = time.monotonic() + within
        while True:
            frame = await self.recv_json(max(0.001, deadline - time.monotonic()))
            if frame.get("type") != "heartbeat":
                return frame

    async def expect(self, kind: str, within: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The next non-heartbeat frame, asserting its ``type``."""
        frame = await self.recv(within)
        assert frame.get("type") == kind, f"expected {kind!r}, got {frame}"
        return frame

    async def notifications(self, count: int, within: float = DEFAULT_TIMEOUT) -> list[dict]:
        """The next ``count`` frames, all of which must be notifications."""
        deadline = time.monotonic() + within
        frames = []
        for _ in range(count):
            frames.append(
                await self.expect("notification", max(0.001, deadline - time.monotonic()))
            )
        return frames

    async def assert_silent(self, duration: float = 0.3) -> None:
        """Nothing but heartbeats arrives within ``duration`` seconds."""
        deadline = time.monotonic() + duration
        while (left := deadline - time.monotonic()) > 0:
            try:
                frame = await self.recv_json(left)
            except TimeoutError:
                return
            assert frame.get("type") == "heartbeat", f"unexpected frame {frame}"

    async def wait_closed(self, within: float = DEFAULT_TIMEOUT) -> int | None:
        """Read until the server closes; returns the close code it sent."""
        async def drain() -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await self.ws.recv()

        await asyncio.wait_for(drain(), within)
        await asyncio.wait_for(self.ws.wait_closed(), within)
        return self.close_code

    @property
    def close_code(self) -> int | None:
        rcvd = self.ws.protocol.close_rcvd
        return rcvd.code if rcvd is not None else None

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 3)


@contextlib.asynccontextmanager
async def ws_connect(
    url: str, *, headers: dict[str, str] | None = None, connected: bool = True,
    **kwargs: Any,
) -> AsyncIterator[WsClient]:
    """Open a WebSocket; with ``connected`` the ``connected`` frame is read first.

    The frame is kept on ``client.hello``.
    """
    kwargs.setdefault("open_timeout", DEFAULT_TIMEOUT)
    kwargs.setdefault("close_timeout", 2)
    kwargs.setdefault("ping_interval", None)
    kwargs.setdefault("max_size", None)
    kwargs.setdefault("compression", None)
    ws = await connect(url, additional_headers=headers, proxy=None, **kwargs)
    client = WsClient(ws)
    try:
        if connected:
            client.hello = await client.expect("connected")
        yield client
    finally:
        await client.close()


@dataclass
class Rejection:
    """An HTTP answer a WebSocket upgrade got instead of ``101``."""

    status_code: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@contextlib.asynccontextmanager
async def ws_connect_stalled(url: str) -> AsyncIterator[WsClient]:
    """A WebSocket client that reads nothing until told to.

    Its socket has a tiny receive buffer and the client queues one frame, so the
    server's writes back up after a few KiB. Reading later with ``recv_json`` works.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, (host, int(port))), DEFAULT_TIMEOUT
        )
        ws = await asyncio.wait_for(
            connect(url, sock=sock, proxy=None, ping_interval=None, max_queue=1, max_size=None,
                    compression=None, close_timeout=2),
            DEFAULT_TIMEOUT,
        )
    except BaseException:
        sock.close()
        raise
    client = WsClient(ws)
    try:
        yield client
    finally:
        await client.close()


async def ws_rejection(url: str, headers: dict[str, str] | None = None) -> Rejection:
    """Connect expecting an HTTP refusal before the upgrade, and return it."""
    with pytest.raises(InvalidStatus) as info:
        ws = await connect(url, additional_headers=headers, proxy=None, open_timeout=5)
        await ws.close()
    response = info.value.response
    return Rejection(
        response.status_code,
        {k.lower(): v for k, v in response.headers.raw_items()},
        bytes(response.body or b""),
    )


# -- SSE client ------------------------------------------------------------------


@dataclass
class SseEvent:
    event: str | None
    id: str | None
    data: Any
    raw: str


class SseClient:
    """Reads an SSE stream in a background task; events are taken with a deadline."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.queue: asyncio.Queue[SseEvent | None] = asyncio.Queue()
        self.ended = False
        self.hello: SseEvent | None = None
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        fields: dict[str, list[str]] = {}
        lines: list[str] = []
        try:
            async for line in self.response.aiter_lines():
                if line == "":
                    if fields:
                        data = "\n".join(fields.get("data", []))
                        try:
                            parsed: Any = json.loads(data)
                        except ValueError:
                            parsed = data
                        await self.queue.put(SseEvent(
                            event=(fields.get("event") or [None])[-1],
                            id=(fields.get("id") or [None])[-1],
                            data=parsed,
                            raw="\n".join(lines),
                        ))
                    fields, lines = {}, []
                    continue
                lines.append(line)
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
        except (httpx.HTTPError, asyncio.CancelledError):
            pass
        finally:
            self.ended = True
            self.queue.put_nowait(None)

    async def next(self, within: float = DEFAULT_TIMEOUT) -> SseEvent | None:
        """The next event (``None`` once the stream has ended)."""
        return await asyncio.wait_for(self.queue.get(), within)

    async def expect(self, event: str, within: float = DEFAULT_TIMEOUT) -> SseEvent:
        """The next event that is not a heartbeat, asserting its name."""
        deadline = time.monotonic() + within
        while True:
            got = await self.next(max(0.001, deadline - time.monotonic()))
            assert got is not None, f"stream ended while waiting for {event!r}"
            if got.event == "heartbeat" and event != "heartbeat":
                continue
            assert got.event == event, f"expected {event!r}, got {got}"
            return got

    async def wait_end(self, within: float = DEFAULT_TIMEOUT) -> list[SseEvent]:
        """Collect events until the server ends the stream."""
        seen: list[SseEvent] = []
        deadline = time.monotonic() + within
        while True:
            got = await self.next(max(0.001, deadline - time.monotonic()))
            if got is None:
                return seen
            seen.append(got)

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self._task, 2)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.response.aclose(), 2)


@contextlib.asynccontextmanager
async def sse_connect(
    url: str, *, headers: dict[str, str] | None = None, connected: bool = True,
) -> AsyncIterator[SseClient]:
    """Open ``/sse``; with ``connected`` the status is checked and ``connected`` read."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(DEFAULT_TIMEOUT, read=None)) as http:
        request = http.build_request("GET", url, headers=headers)
        response = await asyncio.wait_for(http.send(request, stream=True), DEFAULT_TIMEOUT)
        client = SseClient(response)
        try:
            if connected:
                assert response.status_code == 200, response.status_code
                client.hello = await client.expect("connected")
            yield client
        finally:
            await client.aclose()


# -- servers ---------------------------------------------------------------------


class _QuietServer(uvicorn.Server):
    """uvicorn in the test's own loop: never touches process signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        # uvicorn polls ``should_exit`` every 0.1 s; poll faster so tests stop quickly.
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864_000
            await asyncio.sleep(0.01)


class ServerUrls:
    """URL helpers shared by in-process and subprocess servers."""

    port: int
    settings: Settings

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, token: str | None = None, path: str = "/ws") -> str:
        url = f"ws://127.0.0.1:{self.port}{path}"
        return f"{url}?token={token}" if token is not None else url

    def sse_url(self, token: str | None = None, channels: str | None = None) -> str:
        params = []
        if token is not None:
            params.append(f"token={token}")
        if channels is not None:
            params.append(f"channels={channels}")
        return f"{self.base_url}/sse" + ("?" + "&".join(params) if params else "")

    def token(self, sub: str, **kwargs: Any) -> str:
        return token_for(self.settings, sub, **kwargs)

    def ws(self, sub: str, **kwargs: Any) -> contextlib.AbstractAsyncContextManager[WsClient]:
        """Connect a WebSocket as user ``sub`` (``connected`` frame already read)."""
        token_kwargs = {k: kwargs.pop(k) for k in ("tenant", "ttl", "roles") if k in kwargs}
        return ws_connect(self.ws_url(self.token(sub, **token_kwargs)), **kwargs)

    def sse(self, sub: str, channels: str | None = None, **kwargs: Any
            ) -> contextlib.AbstractAsyncContextManager[SseClient]:
        token_kwargs = {k: kwargs.pop(k) for k in ("tenant", "ttl", "roles") if k in kwargs}
        return sse_connect(self.sse_url(self.token(sub, **token_kwargs), channels), **kwargs)

    def http(self, **kwargs: Any) -> httpx.AsyncClient:
        """An httpx client for the REST API (API key header set)."""
        kwargs.setdefault("headers", dict(API_HEADERS))
        kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
        return httpx.AsyncClient(base_url=self.base_url, **kwargs)


class EmbeddedServer(ServerUrls):
    """The embedded node under real uvicorn, as a task in the running loop."""

    def __init__(self, settings: Settings, backends: BackendsFactory = embedded_backends) -> None:
        self.settings = settings
        self.port = settings.server_port or free_port()
        self.app = create_app(settings, backends)
        config = uvicorn_config(self.app, settings)
        config.host = "127.0.0.1"
        config.port = self.port
        # Tests close their clients; do not wait the production grace period.
        config.timeout_graceful_shutdown = 2
        self.server = _QuietServer(config)
        self.task: asyncio.Task[None] | None = None
        self.client: httpx.AsyncClient | None = None

    @property
    def node(self) -> GatewayNode:
        node: GatewayNode = self.app.state.node
        return node

    async def start(self, within: float = 10.0) -> EmbeddedServer:
        self.task = asyncio.get_running_loop().create_task(self.server.serve())
        deadline = time.monotonic() + within
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise RuntimeError("server exited during startup")
            if time.monotonic() > deadline:
                raise TimeoutError("embedded server did not start")
            await asyncio.sleep(0.01)
        self.client = self.http()
        return self

    async def stop(self, within: float = 10.0) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        if self.task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), within)
        except TimeoutError:
            self.server.force_exit = True
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.task, 5)
            raise
        finally:
            self.task = None

    # REST shortcuts on the shared client --------------------------------------

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        assert self.client is not None
        return await self.client.post(path, json=body, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        assert self.client is not None
        return await self.client.get(path, **kwargs)

    async def send_to_user(self, user: str, event_type: str = "test.event",
                           payload: Any = None, **extra: Any) -> dict[str, Any]:
        body = {"target_user_id": user, "event_type": event_type,
                "payload": {} if payload is None else payload, **extra}
        response = await self.post("/api/v1/notifications/send", body)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result


ServerFactory = Callable[..., Awaitable[EmbeddedServer]]


@pytest.fixture
async def server_factory(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Start embedded servers with setting overrides; all are stopped at teardown."""
    started: list[EmbeddedServer] = []

    async def start(**overrides: Any) -> EmbeddedServer:
        server = EmbeddedServer(make_settings(tmp_path, **overrides))
        await server.start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        with contextlib.suppress(Exception):
            await server.stop()


@pytest.fixture
def redis_server() -> Iterator[Any]:
    """A private redis-server on a free port (``cluster_harness.RedisServer``) that the
    test may kill, stop or restart; stopped by its PID at teardown."""
    from cluster_harness import RedisServer

    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def sqlite_database(tmp_path: Path) -> AsyncIterator[Any]:
    """An opened embedded-store ``SQLiteDatabase`` in the test's temporary folder."""
    from common.backends.sqlite import SQLiteDatabase

    database = SQLiteDatabase(str(tmp_path / "receipts.sqlite3"))
    await database.open()
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
async def pg_receipts() -> AsyncIterator[Any]:
    """``PostgresReceipts`` on a fresh, migrated database of the local Postgres, dropped at
    teardown."""
    from cluster_harness import create_database, drop_database, pg_admin_dsn

    from common.backends.postgres import PostgresHandle, PostgresReceipts, migrate

    admin = pg_admin_dsn()
    url = await create_database(admin)
    pg = PostgresHandle(url)
    try:
        await migrate(url)
        await pg.open()
        yield PostgresReceipts(pg)
    finally:
        await pg.close()
        await drop_database(admin, url)


@pytest.fixture
async def server(server_factory: ServerFactory) -> EmbeddedServer:
    """One embedded server with test defaults."""
    return await server_factory()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedServer]:
    """One server for a module's stateless checks (error answers, refusals).

    Tests using it run in the module's loop (``@pytest.mark.asyncio(loop_scope="module")``)
    and must neither rely on nor leave state behind.
    """
    server = EmbeddedServer(make_settings(tmp_path_factory.mktemp("shared")))
    await server.start()
    yield server
    await server.stop()


# -- subprocess server -----------------------------------------------------------


def serve_env(tmp_path: Path, port: int, **env: Any) -> dict[str, str]:
    """Environment for ``python -m common.cli serve`` with test defaults."""
    base = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("JWT_", "API_KEY", "RUN_MODE", "SQLITE_", "NODE_ID", "SERVER_",
                               "QUEUE_", "WEBSOCKET_", "RATELIMIT_", "DRAIN_", "REDIS_",
                               "DATABASE_", "DELIVERY_", "ACK_", "TENANT_", "LOG_", "OTEL_",
                               "CORS_", "ROUTER_"))
    }
    values: dict[str, Any] = {
        "SERVER_HOST": "127.0.0.1",
        "SERVER_PORT": port,
        "NODE_ID": "gw-proc",
        "SQLITE_PATH": str(tmp_path / "ara-proc.sqlite3"),
        "JWT_SECRET": TEST_JWT_SECRET,
        "API_KEY": TEST_API_KEY,
        "DRAIN_TIMEOUT_SECONDS": 1,
        "LOG_LEVEL": "WARNING",
        **{k.upper(): v for k, v in NO_LIMITS.items()},
    }
    values.update(env)
    base.update({k: str(v) for k, v in values.items()})
    return base


class ServeProcess(ServerUrls):
    """``python -m common.cli serve`` in a child process."""

    def __init__(self, tmp_path: Path, port: int | None = None, **env: Any) -> None:
        self.tmp_path = tmp_path
        self.port = port or free_port()
        self.env = serve_env(tmp_path, self.port, **env)
        overrides = {k.lower(): v for k, v in env.items()}
        self.settings = make_settings(tmp_path, **{
            k: v for k, v in overrides.items() if k in Settings.model_fields
        })
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = tmp_path / f"serve-{self.port}-{time.monotonic_ns()}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, within: float = 20.0) -> ServeProcess:
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "common.cli", "serve",
                env=self.env, cwd=self.tmp_path, stdout=log, stderr=asyncio.subprocess.STDOUT,
            )
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=1.0) as http:
            while True:
                if not self.running:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log}")
                with contextlib.suppress(httpx.HTTPError):
                    response = await http.get(f"{self.base_url}/ready")
                    if response.status_code == 200:
                        return self
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server did not become ready:\n{self.log}")
                await asyncio.sleep(0.05)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    async def wait_exit(self, within: float = 15.0) -> int:
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            raise TimeoutError(f"server did not exit:\n{self.log}") from None

    async def kill(self) -> None:
        """SIGKILL by PID (if still running) and reap the process."""
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)


@pytest.fixture
async def serve_process(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ServeProcess]]]:
    """Start ``ara-notify serve`` subprocesses; each is killed by PID on teardown."""
    procs: list[ServeProcess] = []

    async def start(port: int | None = None, **env: Any) -> ServeProcess:
        proc = ServeProcess(tmp_path, port, **env)
        procs.append(proc)
        return await proc.start()

    yield start
    for proc in procs:
        await proc.kill()
