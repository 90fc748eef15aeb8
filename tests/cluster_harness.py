"""Real multi-process clusters for tests: private Redis, fresh Postgres, and
gateway/router processes on loopback ports, all stopped by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from common.auth import mint_token
from common.settings import load_settings

API_KEY = "cluster-test-api-key-0123456789"
JWT_SECRET = "cluster-test-jwt-secret-0123456789-abcdef"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


_session_pg: PrivatePostgres | None = None


def pg_admin_dsn() -> str:
    """Where test databases are created: ``ARA_TEST_PG``, the local server, or a private one."""
    global _session_pg
    configured = os.environ.get("ARA_TEST_PG")
    if configured:
        return configured
    if _session_pg is not None:
        return _session_pg.dsn
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 5432), 0.5):
        return DEFAULT_PG
    _session_pg = PrivatePostgres()
    _session_pg.init()
    _session_pg.start()
    import atexit

    atexit.register(_session_pg.cleanup)
    return _session_pg.dsn


class RedisServer:
    """A private redis-server on a free port, in memory only."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="ara-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (initdb in a temp dir) that tests may stop."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="ara-pg-")
        self.data = os.path.join(self.dir, "data")
        self.proc: subprocess.Popen[bytes] | None = None
        # As root, run the server binaries themselves as 'postgres' (no runuser wrapper):
        # then self.proc is the postmaster, and a signal sent to it stops the server.
        # Through runuser the postmaster was a grandchild that outlived stop().
        self.as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_user = {"user": "postgres", "group": "postgres", "extra_groups": []}

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        subprocess.run(
            [_pg_bin("initdb"), "-D", self.data, "-U", "postgres",
             "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir,
            **self.as_user,
        )

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [_pg_bin("postgres"), "-D", self.data, "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=" + self.dir,
             "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir, **self.as_user,
        )
        wait_port(self.port, 30)
        if self.proc.poll() is not None:
            raise RuntimeError(f"postgres on port {self.port} exited with {self.proc.returncode}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: backends end too
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
            raise RuntimeError(f"postgres on port {self.port} is still accepting connections")

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise FileNotFoundError(name)


async def create_database(admin_dsn: str) -> str:
    name = f"ara_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = admin_dsn.rsplit("/", 1)[0]
    return f"{base}/{name}"


async def drop_database(admin_dsn: str, dsn: str) -> None:
    name = dsn.rsplit("/", 1)[1]
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@dataclass
class Proc:
    """One gateway or router process."""

    kind: str
    node_id: str
    port: int
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(10)


@dataclass
class Cluster:
    """Gateways and routers sharing one Redis and one Postgres database."""

    redis_url: str
    database_url: str
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    prefix: str = field(default_factory=lambda: f"ara{uuid.uuid4().hex[:8]}")

    def environment(self, node_id: str, port: int) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("SERVER_", "REDIS_", "DATABASE_", "NODE_", "QUEUE_", "RATELIMIT_"))
        }
        env.update(
            REDIS_URL=self.redis_url,
            DATABASE_URL=self.database_url,
            REDIS_KEY_PREFIX=self.prefix,
            NODE_ID=node_id,
            SERVER_HOST="127.0.0.1",
            SERVER_PORT=str(port),
            API_KEY=API_KEY,
            JWT_SECRET=JWT_SECRET,
            RATELIMIT_ENABLED="false",
            LOG_LEVEL="INFO",
            DRAIN_TIMEOUT_SECONDS="2",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.env)
        return env

    def start(self, kind: str, node_id: str | None = None, wait: bool = True) -> Proc:
        node_id = node_id or f"{kind[:2]}-{uuid.uuid4().hex[:6]}"
        port = free_port()
        log = self.workdir / f"{node_id}.log"
        handle = log.open("wb")
        popen = subprocess.Popen(
            [sys.executable, "-m", "common.cli", kind],
            env=self.environment(node_id, port), cwd=ROOT, stdout=handle,
            stderr=subprocess.STDOUT,
        )
        proc = Proc(kind, node_id, port, popen, log)
        self.procs.append(proc)
        if wait:
            self.wait_ready(proc)
        return proc

    def wait_ready(self, proc: Proc, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.node_id} exited:\n{proc.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(proc.base + "/ready", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{proc.node_id} not ready:\n{proc.log.read_text()[-3000:]}")

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            proc.kill()

    def gateways(self) -> list[Proc]:
        return [p for p in self.procs if p.kind == "gateway" and p.alive()]

    def routers(self) -> list[Proc]:
        return [p for p in self.procs if p.kind == "router" and p.alive()]

    def token(self, sub: str, tenant: str | None = None, ttl: int = 3600) -> str:
        settings = load_settings(jwt_secret=JWT_SECRET)
        return mint_token(settings, sub, tenant=tenant, ttl=ttl)

    async def wait_routed(self, timeout: float = 15.0) -> None:  # noqa: ASYNC109
        """Until every partition is held by some live router."""
        deadline = time.monotonic() + timeout
        gw = self.gateways()[0]
        async with httpx.AsyncClient(headers={"X-API-Key": API_KEY}) as client:
            while time.monotonic() < deadline:
                status = (await client.get(gw.base + "/api/v1/cluster/status")).json()
                owned = {p for r in status["routers"] if r["status"] == "healthy"
                         for p in r.get("partitions", [])}
                if len(owned) == status["partitions"]:
                    return
                await asyncio.sleep(0.2)
        raise TimeoutError("partitions were not all owned in time")


async def migrate(dsn: str) -> None:
    from common.backends.postgres import migrate as run_migrations

    await run_migrations(dsn)


@contextlib.asynccontextmanager
async def running_cluster(
    tmp_path: Path,
    gateways: int = 2,
    routers: int = 1,
    env: dict[str, str] | None = None,
    redis: RedisServer | None = None,
    admin_dsn: str | None = None,
) -> AsyncIterator[Cluster]:
    admin = admin_dsn or pg_admin_dsn()
    own_redis = redis is None
    server = redis or RedisServer()
    if own_redis:
        server.start()
    dsn = await create_database(admin)
    await migrate(dsn)
    cluster = Cluster(server.url, dsn, tmp_path, env=dict(env or {}))
    try:
        for _ in range(gateways):
            cluster.start("gateway")
        for _ in range(routers):
            cluster.start("router")
        if routers:
            await cluster.wait_routed()
        yield cluster
    finally:
        cluster.stop_all()
        if own_redis:
            server.stop()
        with contextlib.suppress(Exception):
            await drop_database(admin, dsn)


class Client:
    """A WebSocket client that records every notification it gets."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str, token: str) -> AsyncIterator[Client]:
        async with websockets.connect(f"{url}?token={token}", open_timeout=5) as ws:
            client = cls(ws)
            hello = await client.recv()
            assert hello["type"] == "connected", hello
            yield client

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        while True:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
            if frame["type"] != "heartbeat":
                self.frames.append(frame)
                return frame

    async def notifications(
        self, count: int, timeout: float = 10.0,  # noqa: ASYNC109 - callers pass timeout=
    ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                frame = await self.recv(remaining)
            except TimeoutError:
                break
            if frame["type"] == "notification":
                found.append(frame)
        return found

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def ack(self, notification_id: str) -> None:
        """ACK, ignoring a connection that is already closing (frames may still be queued)."""
        with contextlib.suppress(websockets.ConnectionClosed):
            await self.send({"type": "Ack", "payload": {"notification_id": notification_id}})

    async def read_until_closed(self, timeout: float = 10.0) -> int | None:  # noqa: ASYNC109
        """Read (and ACK) everything the server sends until it closes; returns the close code."""
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                frame = await self.recv(timeout)
                if frame["type"] == "notification":
                    await self.ack(frame["id"])
        return self.ws.close_code


def api(base: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, headers={"X-API-Key": API_KEY}, timeout=10)


@contextlib.asynccontextmanager
async def router_in_process(redis_url: str, node_id: str, prefix: str,
                            partitions: int = 4) -> AsyncIterator[tuple[Any, str]]:
    """A ``ClusterRouter`` (not started yet) on a throwaway database, and that database's DSN.

    The caller may patch the router before ``start()``; it is stopped on exit if it was
    started, and the database dropped.
    """
    from common.metrics import Metrics
    from router.cluster import ClusterRouter

    admin = pg_admin_dsn()
    dsn = await create_database(admin)
    router: ClusterRouter | None = None
    try:
        await migrate(dsn)
        settings = load_settings(redis_url=redis_url, database_url=dsn, node_id=node_id,
                                 router_partitions=partitions, redis_key_prefix=prefix,
                                 jwt_secret="x" * 40)
        router = ClusterRouter(settings, Metrics())
        yield router, dsn
    finally:
        if router is not None and router._tasks:
            await router.stop()
        with contextlib.suppress(Exception):
            await drop_database(admin, dsn)


async def wait_for_partitions(router: Any, count: int, within: float = 15.0) -> None:
    """Until the router holds ``count`` leases and has claimed what was pending on them."""
    deadline = time.monotonic() + within
    while len(router.leases.held()) < count or any(
            s.claim_needed for s in router.state.values()):
        assert time.monotonic() < deadline, "router did not take its partitions"
        await asyncio.sleep(0.05)
