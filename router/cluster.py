"""The ClusterRouter process: owns partitions, routes their streams in order.

Each router heartbeats in ``ara:routers``; every tick it computes which
partitions the consistent-hash ring gives it among the live routers, takes
the leases of those, and gives back the ones that moved away. For each
partition it holds it first claims what the previous owner left pending
(``XAUTOCLAIM``), then reads new entries with its consumer group, routes
them in batches and acknowledges them only once routed.

If Postgres is down, events still go out live; their mailbox writes are
kept in order and retried, and their stream entries stay unacknowledged
until written, so a router dying meanwhile loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from common import jsoncodec
from common.backends.base import MailboxPut, ReceiptRow
from common.backends.postgres import (
    PostgresHandle,
    PostgresMailbox,
    PostgresReceipts,
    PostgresTemplates,
)
from common.backends.redis_client import RedisHandle
from common.backends.redis_lane import Command, stream_entries
from common.backends.redis_receipts import forget_pending_commands
from common.backends.redis_sessions import RedisSessionStore
from common.backends.redis_streams import (
    GROUP,
    PartitionProducer,
    RedisNodeDelivery,
    decode_entry,
)
from common.errors import BackendUnavailable
from common.metrics import Metrics
from common.ring import partition_owners
from common.settings import Settings
from router.leases import Leases
from router.linger import Linger
from router.pubsub import PubSubTrigger
from router.routing import Accepted, Router

log = logging.getLogger("ara.router.cluster")

ROUTER_TTL = 5.0
LEASE_TTL = 5.0
TICK = 1.0
BATCH = 500
READ_BLOCK_MS = 200
MERGE_LIMIT = 500
MAX_BACKLOG = 10_000
DEAD_NODE_GRACE = 600.0
# An entry pending this long with any consumer is claimed by the partition's owner: it
# was read by a router that then lost the lease before routing it (see ``_consume_loop``).
STALE_PENDING_MS = 10_000
STALE_SWEEP_SECONDS = 5.0


@dataclass
class PartitionState:
    """Per-partition work: whether pending entries must be claimed, and the backlog of
    routed entries whose durable writes wait for Postgres."""

    claim_needed: bool = True
    backlog_ids: list[bytes] = field(default_factory=list)
    backlog_puts: list[MailboxPut] = field(default_factory=list)
    backlog_receipts: list[ReceiptRow] = field(default_factory=list)


@dataclass
class Decoded:
    """One partition's share of a read: its entries decoded, their stream ids, and the
    ids of the notifications whose receipts this router records."""

    p: int
    state: PartitionState
    batch: list[Accepted] = field(default_factory=list)
    ids: list[bytes] = field(default_factory=list)
    record: list[str] = field(default_factory=list)


class ClusterRouter:
    """One router process of the cluster."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        if not settings.redis_url or not settings.database_url:
            raise ValueError("a router needs REDIS_URL and DATABASE_URL")
        self.settings = settings
        self.metrics = metrics
        self.router_id = settings.node_id
        self.partitions = settings.router_partitions
        self.redis = RedisHandle(settings.redis_url, settings.redis_key_prefix)
        self.pg = PostgresHandle(settings.database_url, min_size=0, max_size=10)
        self.keys = self.redis.keys
        self.sessions = RedisSessionStore(self.redis, None, None)
        self.mailbox = PostgresMailbox(self.pg, settings.queue_max_size_per_user)
        self.receipts = PostgresReceipts(self.pg)
        self.router = Router(settings, self.sessions, self.mailbox, RedisNodeDelivery(self.redis),
                             self.receipts)
        self.leases = Leases(self.redis, self.router_id, LEASE_TTL)
        self.state: dict[int, PartitionState] = {}
        self.reads = self.redis.blocking_lane(READ_BLOCK_MS / 1000)
        self._stream_keys = [self.keys.partition(p) for p in range(self.partitions)]
        # Partitions not read until their backlog (waiting for Postgres) is written.
        self.full_backlogs: set[int] = set()
        self._new_entries = (">",) * self.partitions  # XREADGROUP's id per stream
        self.linger = Linger(settings.router_batch_linger_ms / 1000,
                             settings.router_batch_linger_busy_ms / 1000)
        # Routed entries whose XACK/XDEL rides with the next read (one round trip less
        # per batch); flushed before a lease is given back or the router leaves.
        self.unacked: list[tuple[int, list[bytes]]] = []
        # Notifications whose receipts are in Postgres now: their pending records in
        # Redis (``common/backends/redis_receipts.py``) are deleted with the next read.
        self.recorded: list[tuple[int, list[str]]] = []
        self.lock = asyncio.Lock()
        self.ready = False
        self.stopping = False
        self.started_at = time.time()
        self.routed = 0
        self.pubsub = PubSubTrigger(
            settings, self.redis, self.sessions, PartitionProducer(self.redis),
            PostgresTemplates(self.pg), self.receipts, metrics,
        )
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        await self.pg.open()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._membership_loop()),
            loop.create_task(self._consume_loop()),
            loop.create_task(self._janitor_loop()),
            loop.create_task(self.pubsub.run(self.router_id)),
        ]

    async def stop(self) -> None:
        self.stopping = True
        self.pubsub.stopping = True
        self.ready = False
        async with self.lock:
            for task in self._tasks:
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pubsub.resign(self.router_id), timeout=2)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._leave(), timeout=3)
        await self.pg.close()
        await self.redis.close()

    async def _leave(self) -> None:
        with contextlib.suppress(Exception):
            await self._flush_acks()
        await self.leases.release(sorted(self.leases.valid_until))

        async def op(r: Any) -> Any:
            async with r.pipeline(transaction=False) as pipe:
                pipe.zrem(self.keys.routers, self.router_id)
                pipe.hdel(self.keys.router_info, self.router_id)
                return await pipe.execute()

        await self.redis.run(op)
        log.info("router %s left the cluster", self.router_id)

    # -- membership and leases ---------------------------------------------------

    async def _membership_loop(self) -> None:
        await self._ensure_groups()
        while not self.stopping:
            try:
                await self._tick()
                self.ready = True
                self.metrics.backend_up.labels("redis").set(1)
            except Exception as exc:
                self.leases.suspend()
                self.metrics.backend_up.labels("redis").set(0)
                log.warning("membership tick failed: %s", exc)
            await asyncio.sleep(TICK)

    async def _tick(self) -> None:
        now = time.time()
        info = jsoncodec.dumps({
            "partitions": self.leases.held(),
            "routed": self.routed,
            "started_at": self.started_at,
            "backlog": sum(len(s.backlog_puts) for s in self.state.values()),
        })

        async def op(r: Any) -> Any:
            async with r.pipeline(transaction=False) as pipe:
                pipe.zadd(self.keys.routers, {self.router_id: now})
                pipe.hset(self.keys.router_info, self.router_id, info)
                pipe.zrangebyscore(self.keys.routers, now - ROUTER_TTL, "+inf")
                return await pipe.execute()

        *_, members = await self.redis.run(op)
        await self._measure_lag()
        live = [m.decode() for m in members]
        owners = partition_owners(live, self.partitions)
        desired = {p for p, owner in owners.items() if owner == self.router_id}
        for p in await self.leases.renew():
            log.warning("lease of partition %d was lost", p)
            self.state.pop(p, None)
            self.full_backlogs.discard(p)
        held = set(self.leases.held())
        moving = sorted(held - desired)
        if moving:
            async with self.lock:
                await self._flush_acks()
                await self.leases.release(moving)
                for p in moving:
                    self.state.pop(p, None)
                    self.full_backlogs.discard(p)
            log.info("released partitions %s", moving)
        won = await self.leases.acquire(sorted(desired - held))
        for p in won:
            self.state[p] = PartitionState()
        if won:
            log.info("took partitions %s", won)

    async def _measure_lag(self) -> None:
        held = self.leases.held()
        self.metrics.router_partitions.set(len(held))
        self.metrics.router_backlog.set(sum(len(s.backlog_puts) for s in self.state.values()))
        if not held:
            return

        lengths = await self.redis.execute(
            [("XLEN", self._stream_keys[p]) for p in held])
        for p, length in zip(held, lengths, strict=True):
            self.metrics.router_lag.labels(str(p)).set(length)

    async def _ensure_groups(self) -> None:
        while True:
            try:
                async def op(r: Any) -> Any:
                    async with r.pipeline(transaction=False) as pipe:
                        for p in range(self.partitions):
                            pipe.xgroup_create(self.keys.partition(p), GROUP, id="0", mkstream=True)
                        return await pipe.execute(raise_on_error=False)

                results = await self.redis.run(op)
                for result in results:
                    if isinstance(result, Exception) and "BUSYGROUP" not in str(result):
                        raise result
                return
            except Exception as exc:
                log.warning("creating consumer groups failed: %s", exc)
                await asyncio.sleep(0.5)

    # -- consuming -------------------------------------------------------------------

    async def _consume_loop(self) -> None:
        # ``while not stopping``: redis-py may turn a cancellation mid-read into a
        # connection error, so cancelling alone does not reliably end this loop.
        backoff = 0.05
        next_sweep = time.monotonic() + STALE_SWEEP_SECONDS
        while not self.stopping:
            held = [p for p in self.leases.held() if p in self.state]
            if not held:
                await asyncio.sleep(0.05)
                continue
            try:
                sweep = time.monotonic() >= next_sweep
                if sweep:
                    next_sweep = time.monotonic() + STALE_SWEEP_SECONDS
                for p in held:
                    if self.state[p].claim_needed:
                        await self._claim(p)
                if sweep:
                    await self._sweep_stale(held)
                await self._retry_backlogs()
                # The read and the routing of what it returns hold the lock, so a
                # partition cannot be released between them: entries read for a
                # partition this router no longer works would sit in its pending list.
                async with self.lock:
                    # Held again, now: a lease may have lapsed during the claims above.
                    # (Built once per read, so it is kept cheap: 64+ partitions.)
                    states, names, full = self.state, self._stream_keys, self.full_backlogs
                    streams = [names[p] for p in self.leases.held()
                               if p in states and p not in full]
                    response = await self._read(streams)
                    failed = await self._route_read(response)
                backoff = 0.05
                # Traffic flowing in small batches: let the next one gather (linger.py).
                pause = self.linger.pause(sum(len(entries) for _, entries in response or ()))
                if pause:
                    await asyncio.sleep(pause)
                if not streams:
                    await asyncio.sleep(0.2)
                elif failed:
                    await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                raise
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    log.warning("consumer groups are gone (Redis restarted?); recreating")
                    self.leases.suspend()  # its lease keys went with them
                    await self._ensure_groups()
                    for state in self.state.values():
                        state.claim_needed = True
                else:
                    log.warning("reading partitions failed: %s", exc)
                    await asyncio.sleep(backoff)
                continue
            except Exception as exc:
                # Redis may come back empty, without our lease keys: hold off until
                # the next tick has renewed them (or found them lost).
                self.leases.suspend()
                log.warning("reading partitions failed: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                continue

    async def _read(self, streams: list[str]) -> Any:
        """``XREADGROUP`` of the streams, preceded in the same round trip by the
        acknowledgements of what the previous read routed."""
        commands = self._ack_commands()
        if streams:
            commands.append(("XREADGROUP", "GROUP", GROUP, self.router_id, "COUNT", BATCH,
                             "BLOCK", READ_BLOCK_MS, "STREAMS", *streams,
                             *self._new_entries[:len(streams)]))
        if not commands:
            return None
        replies = await self.redis.execute(commands, lane=self.reads, raise_on_error=False)
        # The acknowledgements ran (an error reply to one means its group is gone,
        # and with it what it would have acknowledged).
        self.unacked.clear()
        self.recorded.clear()
        if not streams:
            return None
        if isinstance(replies[-1], ResponseError):
            raise replies[-1]
        return stream_entries(replies[-1])

    def _ack_commands(self) -> list[Command]:
        commands: list[Command] = []
        for p, ids in self.unacked:
            key = self.keys.partition(p)
            commands.append(("XACK", key, GROUP, *ids))
            commands.append(("XDEL", key, *ids))
        commands += forget_pending_commands(self.keys, self.recorded)
        return commands

    async def _flush_acks(self) -> None:
        """Send the acknowledgements waiting for the next read now (caller holds the lock)."""
        if self.unacked or self.recorded:
            await self.redis.execute(self._ack_commands(), raise_on_error=False)
            self.unacked.clear()
            self.recorded.clear()

    async def _route_read(self, response: Any) -> bool:
        """Route what ``XREADGROUP`` returned (caller holds the lock); True on failure."""
        parts = []
        for stream, entries in response or []:
            p = int(stream.decode().rsplit("{", 1)[1].rstrip("}"))
            if self.leases.holds(p) and p in self.state:
                parts.append((p, entries))
            elif p in self.state:
                # The lease lapsed locally during the read (a stalled tick): the entries
                # are pending with us; claim them once the lease is renewed.
                self.state[p].claim_needed = True
        try:
            await self._process_read(parts)
        except Exception as exc:
            # E.g. the acknowledgement failed on a Redis hiccup. The entries stay
            # pending and are claimed again; this loop must not end, or the
            # router would keep renewing leases on partitions nobody reads.
            log.warning("partitions %s: processing failed (%s); will retry",
                        sorted(p for p, _ in parts), exc)
            for p, _ in parts:
                if p in self.state:
                    self.state[p].claim_needed = True
            return True
        return False

    async def _sweep_stale(self, held: list[int]) -> None:
        """Claim what has sat too long in anyone's pending list, on every held partition.

        One read-only ``XPENDING … IDLE`` probe per partition, all in one round trip;
        only partitions that have such an entry are claimed. (Claiming every partition
        in turn took 64 round trips under the lock every 5 s: a ~20 ms stall of the
        consume loop that showed in the latency tail.)
        """
        parts = [p for p in held if p in self.state and not self.state[p].claim_needed]
        if not parts:
            return
        # What the last read routed is acknowledged with the next read; a read that
        # took longer than the idle limit to route would otherwise be claimed again.
        async with self.lock:
            await self._flush_acks()
        replies = await self.redis.execute(
            [("XPENDING", self._stream_keys[p], GROUP,
              "IDLE", STALE_PENDING_MS, "-", "+", 1) for p in parts],
            raise_on_error=False)
        for p, reply in zip(parts, replies, strict=True):
            if reply and not isinstance(reply, Exception):
                await self._claim(p, min_idle_ms=STALE_PENDING_MS)

    async def _claim(self, p: int, min_idle_ms: int = 0) -> None:
        """Take over and route the partition's pending entries.

        With ``min_idle_ms`` 0 (a newly won lease, or after a failure) every pending
        entry is claimed; the periodic sweep only claims entries idle for longer,
        which no live owner is still working on. Entries waiting in this router's
        own mailbox backlog are pending too and are skipped, not routed twice.
        """
        key = self.keys.partition(p)
        start: Any = "0-0"
        async with self.lock:
            if not self.leases.holds(p) or p not in self.state:
                return
            state = self.state[p]
            waiting = set(state.backlog_ids)
            while True:
                reply = await self.redis.client.xautoclaim(
                    key, GROUP, self.router_id, min_idle_time=min_idle_ms, start_id=start,
                    count=BATCH,
                )
                start, entries = reply[0], reply[1]
                deleted = list(reply[2]) if len(reply) > 2 else []
                if deleted:
                    await self._ack(p, deleted)
                if waiting:
                    entries = [e for e in entries if e[0] not in waiting]
                if entries:
                    log.info("partition %d: claimed %d pending entries", p, len(entries))
                    self.metrics.router_claimed.inc(len(entries))
                    await self._process(p, entries)
                if start in (b"0-0", "0-0"):
                    break
            state.claim_needed = False

    async def _process_read(self, parts: list[tuple[int, list[Any]]]) -> None:
        """Route what one read returned, its partitions merged into few batches.

        One user's events all live in one partition and concatenating partitions
        keeps each one's order, so partitions are merged (up to ``MERGE_LIMIT``
        entries a batch) and each batch goes through one ``route_many``: one
        durable write, one session lookup, one append per gateway and one
        acknowledgement pipeline, however many partitions it holds. Batches are
        routed concurrently, so a large backlog still overlaps its round trips.
        Partitions that have mailbox writes waiting (Postgres was down) are routed
        on their own, as is every partition of a batch whose mailbox write fails
        (it comes before any delivery, so nothing has gone out yet).
        """
        decoded: list[Decoded] = []
        for p, entries in parts:
            part = await self._decode(p, entries)
            if part.batch:
                decoded.append(part)
        if not decoded:
            return
        if any(part.state.backlog_ids for part in decoded):
            await self._route_each(decoded)
            return
        groups: list[list[Decoded]] = []
        size = 0
        for part in decoded:
            if not groups or size + len(part.batch) > MERGE_LIMIT:
                groups.append([])
                size = 0
            groups[-1].append(part)
            size += len(part.batch)
        outcomes = await asyncio.gather(*(self._route_group(g) for g in groups),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _route_group(self, decoded: list[Decoded]) -> None:
        merged = [item for part in decoded for item in part.batch]
        record = {nid for part in decoded for nid in part.record}
        started = time.perf_counter()
        try:
            result = await self.router.route_many(merged, mailbox_up=True, record=record)
        except BackendUnavailable as exc:
            if exc.backend != "postgres":
                self._retry_later(decoded, exc)
                await asyncio.sleep(0.1)
                return
            await self._route_each(decoded)
            return
        except Exception as exc:
            self._retry_later(decoded, exc)
            await asyncio.sleep(0.1)
            return
        self.metrics.router_batch_seconds.observe(time.perf_counter() - started)
        self.metrics.router_batch_entries.observe(len(merged))
        start = 0
        for part in decoded:
            reports = result.reports[start:start + len(part.batch)]
            start += len(part.batch)
            if any(r.failed for r in reports):
                part.state.claim_needed = True
                continue
            self.routed += len(part.batch)
            self.metrics.routed.inc(len(part.batch))
            if part.ids:
                self.unacked.append((part.p, part.ids))
            self.recorded.append((part.p, part.record))

    def _retry_later(self, decoded: list[Decoded], exc: Exception) -> None:
        # Redis trouble mid-batch: leave the entries pending and claim them again.
        log.warning("partitions %s: routing failed (%s); will retry",
                    [part.p for part in decoded], exc)
        for part in decoded:
            part.state.claim_needed = True

    async def _route_each(self, decoded: list[Decoded]) -> None:
        """Route partitions separately (concurrently; each keeps its own order)."""
        outcomes = await asyncio.gather(*(self._route(part) for part in decoded),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _decode(self, p: int, entries: list[Any]) -> Decoded:
        """Decoded entries and their ids; undecodable entries are acknowledged and dropped."""
        part = Decoded(p, self.state[p])
        dropped: list[bytes] = []
        for entry_id, fields in entries:
            if not fields or b"e" not in fields:
                dropped.append(entry_id)
                continue
            try:
                notification, target, record = decode_entry(fields[b"e"])
            except Exception:
                log.exception("partition %d: dropping undecodable entry %r", p, entry_id)
                dropped.append(entry_id)
                continue
            part.batch.append((notification, target))
            part.ids.append(entry_id)
            if record:
                part.record.append(notification.id)
        if dropped:
            await self._ack(p, dropped)
        return part

    async def _process(self, p: int, entries: list[Any]) -> None:
        part = await self._decode(p, entries)
        if part.batch:
            await self._route(part)

    async def _route(self, part: Decoded) -> None:
        p, state = part.p, part.state
        mailbox_up = not state.backlog_ids
        started = time.perf_counter()
        try:
            try:
                result = await self.router.route_many(
                    part.batch, mailbox_up=mailbox_up, record=set(part.record))
            except BackendUnavailable as exc:
                if exc.backend != "postgres":
                    raise
                log.warning("partition %d: mailbox unavailable, delivering live only", p)
                self.metrics.backend_up.labels("postgres").set(0)
                result = await self.router.route_many(
                    part.batch, mailbox_up=False, record=set(part.record))
        except Exception as exc:
            # Redis trouble mid-batch: leave the entries pending and claim them again.
            log.warning("partition %d: routing failed (%s); will retry", p, exc)
            state.claim_needed = True
            await asyncio.sleep(0.1)
            return
        self.metrics.router_batch_seconds.observe(time.perf_counter() - started)
        if any(r.failed for r in result.reports):
            state.claim_needed = True
            return
        self.routed += len(part.batch)
        self.metrics.routed.inc(len(part.batch))
        if result.unwritten or result.unwritten_receipts or state.backlog_ids:
            state.backlog_ids.extend(part.ids)
            state.backlog_puts.extend(result.unwritten)
            state.backlog_receipts.extend(result.unwritten_receipts)
            if len(state.backlog_ids) >= MAX_BACKLOG:
                self.full_backlogs.add(p)
            return
        await self._ack(p, part.ids)
        self.recorded.append((p, part.record))

    async def _retry_backlogs(self) -> None:
        for p, state in list(self.state.items()):
            if not state.backlog_ids:
                continue
            async with self.lock:
                if p not in self.state or not self.leases.holds(p):
                    continue
                try:
                    await self.mailbox.put(state.backlog_puts, state.backlog_receipts)
                except BackendUnavailable:
                    return
                log.info("partition %d: wrote %d delayed mailbox entries and %d receipts", p,
                         len(state.backlog_puts), len(state.backlog_receipts))
                self.metrics.backend_up.labels("postgres").set(1)
                await self._ack(p, state.backlog_ids)
                self.recorded.append((p, [n.id for n, _, _ in state.backlog_receipts]))
                state.backlog_ids.clear()
                state.backlog_puts.clear()
                state.backlog_receipts.clear()
                self.full_backlogs.discard(p)

    async def _ack(self, p: int, ids: list[bytes]) -> None:
        await self._ack_many([(p, ids)])

    async def _ack_many(self, done: list[tuple[int, list[bytes]]]) -> None:
        """``XACK`` and ``XDEL`` routed entries of several partitions, one round trip."""
        done = [(p, ids) for p, ids in done if ids]
        if not done:
            return

        async def op(r: Any) -> Any:
            async with r.pipeline(transaction=False) as pipe:
                for p, ids in done:
                    key = self.keys.partition(p)
                    pipe.xack(key, GROUP, *ids)
                    pipe.xdel(key, *ids)
                return await pipe.execute()

        await self.redis.run(op)

    # -- housekeeping ----------------------------------------------------------------

    async def _janitor_loop(self) -> None:
        while not self.stopping:
            await asyncio.sleep(30)
            try:
                await self._sweep()
            except Exception as exc:
                log.warning("janitor sweep failed: %s", exc)

    async def _sweep(self) -> None:
        """Forget gateways and routers dead for longer than ``DEAD_NODE_GRACE``."""
        cutoff = time.time() - DEAD_NODE_GRACE

        async def op(r: Any) -> tuple[list[str], list[str]]:
            async with r.pipeline(transaction=False) as pipe:
                pipe.zrangebyscore(self.keys.nodes, "-inf", cutoff)
                pipe.zrangebyscore(self.keys.routers, "-inf", cutoff)
                pipe.smembers(self.keys.tenants)
                gateways, routers, tenants = await pipe.execute()
            dead_gateways = [n.decode() for n in gateways]
            dead_routers = [n.decode() for n in routers]
            if not dead_gateways and not dead_routers:
                return [], []
            async with r.pipeline(transaction=False) as pipe:
                for name in dead_gateways:
                    pipe.delete(self.keys.node_stream(name), self.keys.node_mark(name))
                    pipe.hdel(self.keys.node_info, name)
                    for tenant in tenants:
                        pipe.hdel(self.keys.tenant_conns(tenant.decode()),
                                  *(f"{name}|{kind}" for kind in ("websocket", "sse", "users")))
                for name in dead_routers:
                    pipe.hdel(self.keys.router_info, name)
                pipe.zremrangebyscore(self.keys.nodes, "-inf", cutoff)
                pipe.zremrangebyscore(self.keys.routers, "-inf", cutoff)
                await pipe.execute()
            return dead_gateways, dead_routers

        dead_gateways, dead_routers = await self.redis.run(op)
        if dead_gateways or dead_routers:
            log.info("forgot %d dead gateways and %d dead routers",
                     len(dead_gateways), len(dead_routers))
        if self.leases.holds(0):
            await self._purge(time.time())
        else:
            # The janitor's figure is the cluster's; this router's would be stale.
            self.metrics.queue_depth.set(0)

    async def _purge(self, now: float) -> None:
        """Expired mailbox rows and the queue depth (``ara_queue_depth``), and receipts
        whose notification expired more than ``RECEIPT_RETENTION_SECONDS`` ago.

        Run by the router holding partition 0 only, for the whole cluster: the gateways
        leave both stores alone. Each part that fails is logged and tried again by the
        next sweep; neither stops the other.
        """
        try:
            removed = await self.mailbox.purge_expired(now)
            if removed:
                log.info("purged %d expired mailbox entries", removed)
                self.metrics.purged.labels("mailbox").inc(removed)
            self.metrics.queue_depth.set(await self.mailbox.depth())
        except Exception as exc:
            log.warning("mailbox purge failed: %s", exc)
        try:
            purged = await self.receipts.purge(now - self.settings.receipt_retention_seconds)
        except Exception as exc:
            log.warning("receipt purge failed (%s); retried by the next sweep", exc)
            return
        if purged:
            log.info("purged %d receipts past their retention", purged)
            self.metrics.purged.labels("receipts").inc(purged)

    def health(self) -> dict[str, Any]:
        return {
            "status": "healthy" if self.redis.breaker.healthy else "degraded",
            "router_id": self.router_id,
            "partitions": self.leases.held(),
            "routed": self.routed,
            "backlog": sum(len(s.backlog_puts) for s in self.state.values()),
            "uptime_seconds": round(time.time() - self.started_at, 3),
        }
