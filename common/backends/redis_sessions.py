"""``SessionStore`` on Redis: who is connected on which gateway, cluster-wide.

Each gateway writes only its own entries and heartbeats in ``ara:nodes``;
readers ignore entries of gateways whose heartbeat has lapsed, so a gateway
killed with ``kill -9`` stops receiving traffic within ``NODE_TTL`` seconds.
Counters are written as absolute values from the gateway's local view, so
re-registering after Redis lost its data is the same operation as a normal
write. Keys also carry a TTL that heartbeats refresh, so nothing of a dead
gateway outlives it for long.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from common import jsoncodec
from common.backends.base import SessionInfo
from common.backends.redis_client import RedisHandle
from common.backends.redis_lane import Command, pairs_to_dict
from common.errors import BackendUnavailable

NODE_TTL = 6.0
KEY_TTL_SECONDS = 900


@dataclass(frozen=True, slots=True)
class LocalView:
    """What the gateway can tell the store about its own sockets."""

    sessions: Callable[[], Iterable[SessionInfo]]
    tenant_counts: Callable[[str], dict[str, int]]
    channel_count: Callable[[str, str], int]
    channels: Callable[[], Iterable[tuple[str, str]]]


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisSessionStore:
    """Session, channel and membership index shared by all gateways and routers."""

    def __init__(self, handle: RedisHandle, node_id: str | None, local: LocalView | None) -> None:
        self.redis = handle
        self.keys = handle.keys
        self.node_id = node_id
        self.local = local
        self._live_cache: tuple[float, set[str]] = (0.0, set())
        # Writes that failed while Redis was away; the next heartbeat repairs them.
        self.dirty = False
        self._failed_removals: list[SessionInfo] = []

    async def _write(self, op: Callable[[Any], Awaitable[None]]) -> None:
        try:
            await self.redis.run(op)
        except BackendUnavailable:
            self.dirty = True
            raise

    # -- writes (gateway only) ---------------------------------------------------

    def _session_value(self, s: SessionInfo) -> bytes:
        return jsoncodec.dumps(
            {"n": s.node_id, "t": s.transport, "at": s.connected_at, "c": sorted(s.channels)}
        )

    def _tenant_fields(self, tenant_id: str) -> dict[str, int]:
        assert self.local is not None and self.node_id is not None
        counts = self.local.tenant_counts(tenant_id)
        return {f"{self.node_id}|{k}": v for k, v in counts.items()}

    async def register(self, session: SessionInfo) -> None:
        key = self.keys.session(session.tenant_id, session.user_id)

        async def op(r: Any) -> None:
            async with r.pipeline(transaction=False) as pipe:
                pipe.hset(key, session.connection_id, self._session_value(session))
                pipe.expire(key, KEY_TTL_SECONDS)
                pipe.hset(self.keys.tenant_conns(session.tenant_id),
                          mapping=self._tenant_fields(session.tenant_id))
                pipe.expire(self.keys.tenant_conns(session.tenant_id), KEY_TTL_SECONDS)
                pipe.sadd(self.keys.tenants, session.tenant_id)
                await pipe.execute()

        await self._write(op)

    async def unregister(self, session: SessionInfo) -> None:
        key = self.keys.session(session.tenant_id, session.user_id)

        async def op(r: Any) -> None:
            async with r.pipeline(transaction=False) as pipe:
                pipe.hdel(key, session.connection_id)
                for channel in session.channels:
                    self._write_channel(pipe, session.tenant_id, channel)
                pipe.hset(self.keys.tenant_conns(session.tenant_id),
                          mapping=self._tenant_fields(session.tenant_id))
                await pipe.execute()
            await self._forget_empty_channels(r, session.tenant_id, session.channels)

        await self.redis.run(op)

    async def update_channels(
        self, session: SessionInfo, added: Sequence[str], removed: Sequence[str]
    ) -> None:
        assert self.local is not None
        tenant = session.tenant_id
        key = self.keys.session(tenant, session.user_id)

        async def op(r: Any) -> None:
            async with r.pipeline(transaction=False) as pipe:
                for channel in [*added, *removed]:
                    self._write_channel(pipe, tenant, channel)
                pipe.hset(key, session.connection_id, self._session_value(session))
                await pipe.execute()
            await self._forget_empty_channels(r, tenant, removed)

        await self._write(op)

    async def _forget_empty_channels(self, r: Any, tenant: str, channels: Sequence[str]) -> None:
        """Drop channels nobody subscribes to any more from ``chans:{tenant}``.

        The set only feeds listings and stats, but without this it would collect every
        channel name ever used while the tenant stays active (its TTL keeps being
        refreshed). A name removed in a race with a subscribe on another gateway is
        written back by that gateway's next full rewrite.
        """
        assert self.local is not None
        emptied = [c for c in channels if not self.local.channel_count(tenant, c)]
        if not emptied:
            return
        async with r.pipeline(transaction=False) as pipe:
            for channel in emptied:
                pipe.exists(self.keys.channel(tenant, channel))
            found = await pipe.execute()
        gone = [c for c, exists in zip(emptied, found, strict=True) if not exists]
        if gone:
            await r.srem(self.keys.channel_names(tenant), *gone)

    def _write_channel(self, pipe: Any, tenant: str, channel: str) -> None:
        assert self.local is not None and self.node_id is not None
        count = self.local.channel_count(tenant, channel)
        key = self.keys.channel(tenant, channel)
        if count:
            pipe.hset(key, self.node_id, count)
            pipe.expire(key, KEY_TTL_SECONDS)
            pipe.sadd(self.keys.channel_names(tenant), channel)
            pipe.expire(self.keys.channel_names(tenant), KEY_TTL_SECONDS)
        else:
            pipe.hdel(key, self.node_id)

    async def heartbeat(self, info: dict[str, Any], refresh_ttls: bool) -> bool:
        """Announce this gateway; re-register everything if Redis lost our data.

        Returns True when a full re-registration was done.
        """
        assert self.node_id is not None and self.local is not None
        node_id = self.node_id
        now = time.time()

        async def op(r: Any) -> bool:
            async with r.pipeline(transaction=False) as pipe:
                pipe.zadd(self.keys.nodes, {self.node_id: now})
                pipe.hset(self.keys.node_info, self.node_id, jsoncodec.dumps(info))
                pipe.set(self.keys.node_mark(node_id), b"1", nx=True, ex=KEY_TTL_SECONDS * 4)
                pipe.expire(self.keys.node_mark(node_id), KEY_TTL_SECONDS * 4)
                results = await pipe.execute()
            lost = bool(results[2])
            if lost or refresh_ttls or self.dirty:
                self.dirty = False
                await self._write_everything(r)
            return lost

        return await self.redis.run(op)

    async def _write_everything(self, r: Any) -> None:
        assert self.local is not None
        tenants: set[str] = set()
        removals, self._failed_removals = self._failed_removals, []
        async with r.pipeline(transaction=False) as pipe:
            for s in removals:
                pipe.hdel(self.keys.session(s.tenant_id, s.user_id), s.connection_id)
                tenants.add(s.tenant_id)
            for s in self.local.sessions():
                key = self.keys.session(s.tenant_id, s.user_id)
                pipe.hset(key, s.connection_id, self._session_value(s))
                pipe.expire(key, KEY_TTL_SECONDS)
                tenants.add(s.tenant_id)
            for tenant, channel in self.local.channels():
                self._write_channel(pipe, tenant, channel)
            for tenant in tenants:
                pipe.hset(self.keys.tenant_conns(tenant), mapping=self._tenant_fields(tenant))
                pipe.expire(self.keys.tenant_conns(tenant), KEY_TTL_SECONDS)
                pipe.sadd(self.keys.tenants, tenant)
            await pipe.execute()

    async def leave(self) -> None:
        """Remove this gateway's membership (clean shutdown)."""
        assert self.node_id is not None
        node = self.node_id

        async def op(r: Any) -> None:
            async with r.pipeline(transaction=False) as pipe:
                pipe.zrem(self.keys.nodes, node)
                pipe.hdel(self.keys.node_info, node)
                pipe.delete(self.keys.node_mark(node), self.keys.node_stream(node))
                await pipe.execute()

        await self.redis.run(op)

    # -- reads ------------------------------------------------------------------

    async def live_nodes(self) -> list[str]:
        return sorted(await self._live())

    async def _live(self) -> set[str]:
        stamp, cached = self._live_cache
        now = time.monotonic()
        if now - stamp < 0.5:
            return cached

        async def op(r: Any) -> Any:
            return await r.zrangebyscore(self.keys.nodes, time.time() - NODE_TTL, "+inf")

        live = parse_live(await self.redis.run(op))
        self._live_cache = (now, live)
        return live

    def forget_live_cache(self) -> None:
        self._live_cache = (0.0, set())

    def live_read_command(self) -> Command:
        """The read of the live gateways as a raw command (see ``parse_live``)."""
        return ("ZRANGEBYSCORE", self.keys.nodes, repr(time.time() - NODE_TTL), "+inf")

    async def _hgetall_many(self, keys: list[str]) -> tuple[list[dict[bytes, bytes]], set[str]]:
        """``HGETALL`` of several hashes, and the live gateways, in one round trip.

        The live set is read with the rows, not from the cache: a gateway that has just
        (re)registered (after Redis restarted empty, or after it looked dead for a
        while) writes its node entry and its sessions in one heartbeat, and a cached
        live set older than that would drop its sessions for up to the cache's age.
        """

        members, *replies = await self.redis.execute(
            [self.live_read_command(), *(("HGETALL", key) for key in keys)])
        live = parse_live(members)
        self._live_cache = (time.monotonic(), live)
        return [pairs_to_dict(reply) for reply in replies], live

    async def sessions_of(
        self, tenant_id: str, user_ids: Sequence[str]
    ) -> dict[str, list[SessionInfo]]:
        if not user_ids:
            return {}
        rows, live = await self._hgetall_many(
            [self.keys.session(tenant_id, u) for u in user_ids])
        return parse_sessions(tenant_id, user_ids, rows, live)

    async def sessions_with(
        self, by_tenant: dict[str, list[str]], commands: Sequence[Command]
    ) -> tuple[dict[tuple[str, str], list[SessionInfo]], list[Any]]:
        """Sessions of the users (per tenant) and ``commands`` run in the same round
        trip, after the reads: the router's lookup and the deliveries it can send
        before knowing its answer. Returns the sessions by (tenant, user) and the
        commands' raw replies (error replies left in place)."""
        keys = [self.keys.session(tenant, u) for tenant, users in by_tenant.items()
                for u in users]
        replies = await self.redis.execute(
            [self.live_read_command(), *(("HGETALL", key) for key in keys), *commands],
            raise_on_error=False)
        reads = replies[:len(keys) + 1]
        for reply in reads:
            if isinstance(reply, Exception):
                raise reply
        live = parse_live(reads[0])
        self._live_cache = (time.monotonic(), live)
        rows = iter(pairs_to_dict(reply) for reply in reads[1:])
        found: dict[tuple[str, str], list[SessionInfo]] = {}
        for tenant, users in by_tenant.items():
            parsed = parse_sessions(tenant, users, [next(rows) for _ in users], live)
            for user, sessions in parsed.items():
                found[(tenant, user)] = sessions
        return found, replies[len(keys) + 1:]

    async def channel_nodes(
        self, tenant_id: str, channels: Sequence[str]
    ) -> dict[str, dict[str, int]]:
        if not channels:
            return {}
        rows, live = await self._hgetall_many([self.keys.channel(tenant_id, c) for c in channels])
        return parse_channel_nodes(channels, rows, live)

    async def channel_counts(self, tenant_id: str | None) -> dict[tuple[str, str], int]:
        tenants = [tenant_id] if tenant_id is not None else await self._all_tenants()
        result: dict[tuple[str, str], int] = {}
        for tenant in tenants:

            async def names_op(r: Any, tenant: str = tenant) -> Any:
                return await r.smembers(self.keys.channel_names(tenant))

            names = sorted(_decode(n) for n in await self.redis.run(names_op))
            placement = await self.channel_nodes(tenant, names)
            for name, nodes in placement.items():
                total = sum(nodes.values())
                if total:
                    result[(tenant, name)] = total
        return result

    async def _tenant_counts(self, tenant_id: str) -> dict[str, int]:
        live = await self._live()

        async def op(r: Any) -> Any:
            return await r.hgetall(self.keys.tenant_conns(tenant_id))

        return parse_tenant_counts(await self.redis.run(op), live)

    async def tenant_connections(self, tenant_id: str) -> int:
        counts = await self._tenant_counts(tenant_id)
        return counts["websocket"] + counts["sse"]

    async def tenant_summary(self, tenant_id: str | None) -> dict[str, int]:
        tenants = [tenant_id] if tenant_id is not None else await self._all_tenants()
        totals = {"websocket": 0, "sse": 0, "users": 0}
        for tenant in tenants:
            for kind, value in (await self._tenant_counts(tenant)).items():
                totals[kind] += value
        return totals

    async def _all_tenants(self) -> list[str]:
        async def op(r: Any) -> Any:
            return await r.smembers(self.keys.tenants)

        return sorted(_decode(t) for t in await self.redis.run(op))

    async def tenants(self) -> list[str]:
        found = []
        for tenant in await self._all_tenants():
            if await self.tenant_connections(tenant) > 0:
                found.append(tenant)
        return found

    async def node_infos(self) -> dict[str, dict[str, Any]]:
        async def op(r: Any) -> Any:
            async with r.pipeline(transaction=False) as pipe:
                pipe.zrange(self.keys.nodes, 0, -1, withscores=True)
                pipe.hgetall(self.keys.node_info)
                return await pipe.execute()

        members, infos = await self.redis.run(op)
        now = time.time()
        result: dict[str, dict[str, Any]] = {}
        for node, score in members:
            name = _decode(node)
            info = infos.get(node) or infos.get(name.encode())
            data = jsoncodec.loads(info) if info else {}
            data["node_id"] = name
            data["last_heartbeat_age_seconds"] = round(now - float(score), 3)
            data["status"] = "healthy" if now - float(score) < NODE_TTL else "dead"
            result[name] = data
        return result



# Parsers of the rows read above, shared with callers that put the reads in a larger
# pipeline (the cluster dispatcher previews and appends in one round trip).


def parse_live(members: Sequence[bytes | str]) -> set[str]:
    """Node ids from the ``nodes`` sorted-set range read by ``live_read_command``."""
    return {_decode(n) for n in members}


def parse_sessions(
    tenant_id: str, user_ids: Sequence[str], rows: Sequence[dict[bytes, bytes] | None],
    live: set[str],
) -> dict[str, list[SessionInfo]]:
    """Sessions per user from ``HGETALL`` rows of their session hashes, live gateways only."""
    result: dict[str, list[SessionInfo]] = {}
    for user_id, row in zip(user_ids, rows, strict=True):
        found: list[SessionInfo] = []
        for conn_id, raw in (row or {}).items():
            data = jsoncodec.loads(raw)
            if data["n"] not in live:
                continue
            found.append(
                SessionInfo(
                    connection_id=_decode(conn_id),
                    tenant_id=tenant_id,
                    user_id=user_id,
                    node_id=data["n"],
                    transport=data["t"],
                    connected_at=data["at"],
                    channels=tuple(data.get("c", ())),
                )
            )
        result[user_id] = found
    return result


def parse_channel_nodes(
    channels: Sequence[str], rows: Sequence[dict[bytes, bytes] | None], live: set[str]
) -> dict[str, dict[str, int]]:
    """Subscriber count per live gateway, per channel, from the channel hashes."""
    result: dict[str, dict[str, int]] = {}
    for channel, row in zip(channels, rows, strict=True):
        result[channel] = {
            _decode(node): int(count)
            for node, count in (row or {}).items()
            if _decode(node) in live and int(count) > 0
        }
    return result


def parse_tenant_counts(row: dict[bytes, bytes] | None, live: set[str]) -> dict[str, int]:
    """Connections and users of a tenant over the live gateways, from ``tenant_conns``."""
    totals = {"websocket": 0, "sse": 0, "users": 0}
    for field, value in (row or {}).items():
        node, _, kind = _decode(field).rpartition("|")
        if node in live and kind in totals:
            totals[kind] += int(value)
    return totals
