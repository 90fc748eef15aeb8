"""Shared plumbing of the benchmarks: processes, pinning, CPU/RSS probes, results.

Every benchmark pins the servers it measures to core 0 (``taskset``) and
itself (the client side) to core 1, reads server CPU time from
``/proc/<pid>/stat`` through psutil over the measurement window, stops
every process it started by PID, and writes one JSON file to
``bench/results/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from prometheus_client.samples import Sample

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
SERVER_CORE = 0
CLIENT_CORE = 1
API_KEY = "bench-api-key-0123456789abcdef"
JWT_SECRET = "bench-jwt-secret-0123456789-abcdefghijkl"
PG_ADMIN = os.environ.get("ARA_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def pin_self(core: int = CLIENT_CORE) -> None:
    """Pin the calling (client-side) process to one core."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > core:
        os.sched_setaffinity(0, {core})


def raise_nofile(wanted: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before opening {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children)."""
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def cpu_detail(pid: int) -> dict[str, float]:
    """CPU split (user/system seconds) and context switches of one process, for deltas."""
    proc = psutil.Process(pid)
    t, c = proc.cpu_times(), proc.num_ctx_switches()
    return {"user": t.user, "system": t.system, "voluntary_cs": c.voluntary,
            "involuntary_cs": c.involuntary}


def postgres_backends_cpu(database: str) -> float:
    """User + system CPU seconds of the Postgres backends serving ``database`` now (a
    backend's title names its database). Postgres is the machine's own server and is not
    pinned, so its share is recorded beside the pinned processes'."""
    total = 0.0
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("postgres:") and f" {database} " in cmdline[0]:
            t = proc.info["cpu_times"]
            total += t.user + t.system
    return total


def cores_busy() -> list[float]:
    """Busy (non-idle) CPU seconds of each core so far, for deltas over a window."""
    return [t.user + t.nice + t.system + t.irq + t.softirq + t.steal
            for t in psutil.cpu_times(percpu=True)]


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Server:
    """One process started (pinned) by a benchmark; stopped by its PID."""

    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def cpu_detail(self) -> dict[str, float]:
        return cpu_detail(self.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-n:]
        return ""


@dataclass
class Processes:
    """Everything a run started; ``stop_all`` ends them by PID, newest first."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ara-bench-")))
    servers: list[Server] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        port: int | None = None,
        core: int | None = SERVER_CORE,
        wait: bool = True,
    ) -> Server:
        log = self.workdir / f"{name}.log"
        cmd = list(argv)
        if core is not None and shutil.which("taskset") and (os.cpu_count() or 1) > core:
            cmd = ["taskset", "-c", str(core), *cmd]
        full_env = dict(os.environ)
        full_env.update(env or {})
        # ARA_BENCH_EXTRA_PATH: extra import paths for the servers only (e.g. a
        # ``pip install --target`` of an optional package being evaluated).
        extra_path = os.environ.get("ARA_BENCH_EXTRA_PATH")
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (extra_path, str(ROOT), os.environ.get("PYTHONPATH")) if p)
        handle = log.open("wb")
        popen = subprocess.Popen(
            cmd, env=full_env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
            preexec_fn=_raise_child_nofile,
        )
        server = Server(name, popen, port or 0, log)
        self.servers.append(server)
        if wait and port:
            try:
                wait_port(port, 30, popen)
            except Exception:
                print(server.tail(), file=sys.stderr)
                raise
        return server

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            with contextlib.suppress(Exception):
                server.stop()
        self.servers.clear()

    def cleanup(self) -> None:
        self.stop_all()
        keep = os.environ.get("ARA_BENCH_LOG_DIR")  # copy the servers' logs out before removal
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            for log in self.workdir.glob("*.log"):
                shutil.copy(log, Path(keep) / log.name)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _raise_child_nofile() -> None:
    with contextlib.suppress(Exception):
        raise_nofile()


@contextlib.contextmanager
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.cleanup()


# -- servers under test ---------------------------------------------------------------


def gateway_env(port: int, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("SERVER_", "REDIS_", "DATABASE_", "NODE_", "QUEUE_", "RATELIMIT_",
                             "WEBSOCKET_"))
    }
    env.update(
        SERVER_HOST="127.0.0.1",
        SERVER_PORT=str(port),
        API_KEY=API_KEY,
        JWT_SECRET=JWT_SECRET,
        RATELIMIT_ENABLED="false",
        WEBSOCKET_MAX_CONNECTIONS="50000",
        WEBSOCKET_MAX_CONNECTIONS_PER_USER="5",
        LOG_LEVEL="WARNING",
        DRAIN_TIMEOUT_SECONDS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def start_bare(procs: Processes, name: str = "bare") -> Server:
    port = free_port()
    return procs.start(
        name, [server_python(), str(BENCH / "bare_server.py"), "--port", str(port)], port=port
    )


def start_bare_pipeline(procs: Processes, redis_url: str, prefix: str) -> list[Server]:
    """``bench/bare_pipeline.py``'s two gateways and router, on the server core; returns
    them gateways first, once the gateways answer and the router has made its groups."""
    import redis

    script = str(BENCH / "bare_pipeline.py")
    common = ["--redis", redis_url, "--prefix", prefix]
    gateways = []
    for i in range(2):
        port = free_port()
        gateways.append(procs.start(
            f"bare-gw-{i}", [server_python(), script, "--role", "gateway", "--node", f"bare-gw-{i}",
                             "--port", str(port), *common], port=port))
    router = procs.start("bare-router", [server_python(), script, "--role", "router", *common])
    for gateway in gateways:
        wait_http_ok(gateway.port, "/ready")
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 30
        while not client.exists(f"{prefix}:router-ready"):
            if time.monotonic() > deadline or router.popen.poll() is not None:
                raise TimeoutError("the bare pipeline's router did not start")
            time.sleep(0.1)
    finally:
        client.close()
    return [*gateways, router]


def start_embedded(procs: Processes, name: str = "gateway", **extra: str) -> Server:
    port = free_port()
    env = gateway_env(port, SQLITE_PATH=str(procs.workdir / f"{name}.sqlite3"), **extra)
    return procs.start(name, [server_python(), "-m", "common.cli", "serve"], env=env, port=port)


def token(sub: str, tenant: str | None = None, ttl: int = 24 * 3600) -> str:
    sys.path.insert(0, str(ROOT))
    from common.auth import mint_token
    from common.settings import load_settings

    global _settings
    if _settings is None:
        _settings = load_settings(jwt_secret=JWT_SECRET)
    return str(mint_token(_settings, sub, tenant=tenant, ttl=ttl))


_settings: Any = None


# -- results --------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "server_core": SERVER_CORE,
        "client_core": CLIENT_CORE,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    versions = {}
    for mod in ("websockets", "uvicorn", "starlette", "uvloop", "orjson", "redis", "asyncpg"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    info["packages"] = versions
    info["cpuidle"] = cpuidle()
    if os.environ.get("ARA_BENCH_EXTRA_PATH"):
        info["servers_extra_path"] = os.environ["ARA_BENCH_EXTRA_PATH"]
    with contextlib.suppress(Exception):
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        info["git_dirty"] = bool(dirty)
    return info


def cpuidle() -> dict[str, str]:
    """How the cores idle: the driver, and on a KVM guest its halt-polling window
    (``guest_halt_poll_ns``; 0 means an idle core halts at once and its next wake-up
    goes through the hypervisor)."""
    found: dict[str, str] = {}
    for key, path in (("driver", "/sys/devices/system/cpu/cpuidle/current_driver"),
                      ("governor", "/sys/devices/system/cpu/cpuidle/current_governor_ro"),
                      ("guest_halt_poll_ns", "/sys/module/haltpoll/parameters/guest_halt_poll_ns")):
        with contextlib.suppress(OSError):
            found[key] = Path(path).read_text().strip()
    return found


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {
        "benchmark": name,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        **data,
    }
    path.write_text(json.dumps(body, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def ratio(value: float, base: float) -> float | None:
    return round(value / base, 3) if base else None


def new_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# -- profiling ------------------------------------------------------------------------


def start_profiler(server: Server, label: str,
                   gil_only: bool = False) -> subprocess.Popen[bytes] | None:
    """py-spy the server (collapsed stacks, for ``bench/profile_report.py``), if installed.

    ``gil_only`` samples only while the GIL is held: under uvloop an idle process waits in
    C code that py-spy cannot tell from work, so without it a lightly loaded server's
    profile is mostly its event loop sleeping."""
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy not installed; no profile", file=sys.stderr)
        return None
    out = RESULTS / "profiles"
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [spy, "record", "--pid", str(server.pid), "--rate", "250", "--format", "raw",
         "--nonblocking", *(["--gil"] if gil_only else []), "-o", str(out / f"{label}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def stop_profiler(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(20)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(5)


# -- cluster pieces -------------------------------------------------------------------


def start_redis(procs: Processes, core: int | None = CLIENT_CORE) -> Server:
    port = free_port()
    rdir = procs.workdir / f"redis-{port}"
    rdir.mkdir()
    return procs.start(
        f"redis-{port}",
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(rdir)],
        port=port, core=core,
    )


async def create_database(synchronous_commit: bool = True) -> str:
    """A fresh, migrated database. ``synchronous_commit=False`` sets that for this
    database only: commits return before their WAL is flushed (a Postgres crash may
    lose the last few hundred ms of commits; a killed gateway or router loses nothing)."""
    import asyncpg

    name = f"ara_bench_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        if not synchronous_commit:
            await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    finally:
        await conn.close()
    dsn = f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"
    sys.path.insert(0, str(ROOT))
    from common.backends.postgres import migrate

    await migrate(dsn)
    return dsn


async def drop_database(dsn: str) -> None:
    import asyncpg

    name = dsn.rsplit("/", 1)[1]
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def cluster_env(port: int, node_id: str, redis_url: str, dsn: str, prefix: str,
                **extra: str) -> dict[str, str]:
    return gateway_env(
        port, REDIS_URL=redis_url, DATABASE_URL=dsn, REDIS_KEY_PREFIX=prefix, NODE_ID=node_id,
        **extra,
    )


def server_python() -> str:
    """The interpreter the measured servers run on: this one, or ``ARA_BENCH_SERVER_PYTHON``
    (a virtualenv's ``python`` with the project's dependencies installed, to compare
    Python versions in one run of the same benchmark: the clients stay on this one)."""
    return os.environ.get("ARA_BENCH_SERVER_PYTHON") or sys.executable


def start_cluster_process(procs: Processes, kind: str, node_id: str, redis_url: str, dsn: str,
                          prefix: str, core: int | None = SERVER_CORE, **extra: str) -> Server:
    port = free_port()
    env = cluster_env(port, node_id, redis_url, dsn, prefix, **extra)
    command = [server_python(), "-m", "common.cli", kind]
    cprofile_dir = os.environ.get("ARA_BENCH_CPROFILE_DIR")
    only = os.environ.get("ARA_BENCH_CPROFILE_ONLY")  # e.g. "router-1": profile just that one
    if cprofile_dir and (not only or node_id in only.split(",")):
        # CPU-time attribution, see bench/_cprofile_run.py
        command = [server_python(), str(BENCH / "_cprofile_run.py"),
                   str(Path(cprofile_dir) / f"{node_id}.prof"), "common.cli", kind]
    return procs.start(node_id, command, env=env, port=port, core=core)


def wait_http_ok(port: int, path: str, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception), urllib.request.urlopen(
            f"http://127.0.0.1:{port}{path}", timeout=1
        ) as resp:
            if resp.status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{path} on {port} not OK in {timeout}s")


def get_json(port: int, path: str, headers: dict[str, str] | None = None) -> Any:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def metric_samples(port: int) -> list[Sample]:
    """Every sample of a server's ``/metrics``, parsed."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [sample for family in text_string_to_metric_families(text)
            for sample in family.samples]


def metric_values(port: int, names: Collection[str]) -> dict[str, float]:
    """Unlabelled samples of a server's ``/metrics`` by sample name (0.0 when absent)."""
    found = dict.fromkeys(names, 0.0)
    for sample in metric_samples(port):
        if sample.name in found and not sample.labels:
            found[sample.name] = float(sample.value)
    return found


def gc_pauses(port: int) -> dict[str, dict[str, float]]:
    """A server's ``ara_gc_pause_seconds`` by generation: collections, seconds paused in
    all, and collections that paused at most 10 ms (cumulative since it started)."""
    found: dict[str, dict[str, float]] = {}
    for sample in metric_samples(port):
        generation = sample.labels.get("generation")
        if not sample.name.startswith("ara_gc_pause_seconds_") or generation is None:
            continue
        entry = found.setdefault(generation, {"count": 0.0, "seconds": 0.0,
                                              "under_10ms": 0.0})
        if sample.name.endswith("_count"):
            entry["count"] = float(sample.value)
        elif sample.name.endswith("_sum"):
            entry["seconds"] = float(sample.value)
        elif sample.name.endswith("_bucket") and sample.labels.get("le") == "0.01":
            entry["under_10ms"] = float(sample.value)
    return found


def gc_pauses_between(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """What ``gc_pauses`` counted between two readings, per generation (ms paused in all,
    collections, collections over 10 ms)."""
    out: dict[str, dict[str, float]] = {}
    for generation, now in sorted(after.items()):
        then = before.get(generation, {"count": 0.0, "seconds": 0.0, "under_10ms": 0.0})
        count = now["count"] - then["count"]
        out[generation] = {
            "collections": count,
            "paused_ms": round((now["seconds"] - then["seconds"]) * 1000, 3),
            "over_10ms": count - (now["under_10ms"] - then["under_10ms"]),
        }
    return out


def redis_command_stats(port: int) -> dict[str, tuple[float, float]]:
    """A Redis server's ``INFO commandstats``: calls and µs spent, by command
    (cumulative since it started or since ``CONFIG RESETSTAT``)."""
    import redis

    client = redis.Redis(port=port)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): (float(v["calls"]), float(v["usec"]))
            for name, v in stats.items()}


def redis_commands_between(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], per: int,
) -> dict[str, dict[str, float]]:
    """Calls and Redis CPU (µs) per ``per`` (e.g. notifications sent) of each command
    run between two ``redis_command_stats`` readings, dearest first. Only the time
    Redis spent executing commands: its network reads and writes are not in it."""
    rows: dict[str, dict[str, float]] = {}
    for name, (calls, usec) in after.items():
        calls0, usec0 = before.get(name, (0.0, 0.0))
        if calls > calls0 and per:
            rows[name] = {"calls": round((calls - calls0) / per, 3),
                          "us": round((usec - usec0) / per, 2)}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["us"]))


async def commit_latency(dsn: str, count: int = 200) -> dict[str, float]:
    """p50/p99 of a one-row INSERT commit on ``dsn`` (what one fsync costs here)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS bench_commit_probe (x int)")
        lat = []
        for _ in range(count):
            t = time.perf_counter()
            await conn.execute("INSERT INTO bench_commit_probe VALUES (1)")
            lat.append((time.perf_counter() - t) * 1000)
        await conn.execute("DROP TABLE bench_commit_probe")
    finally:
        await conn.close()
    return {"p50_ms": round(percentile(lat, 0.5), 3), "p99_ms": round(percentile(lat, 0.99), 3)}
