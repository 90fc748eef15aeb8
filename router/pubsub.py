"""Redis Pub/Sub triggers (PROTOCOL §6), dispatched exactly once cluster-wide.

Pub/Sub delivers every message to every subscriber, so only one router —
the holder of the ``pubsub-leader`` lease — subscribes. It validates each
message and appends it to its partition stream like a REST send. A new
leader subscribes only after the old lease has lapsed, and a leader that
fails to renew unsubscribes first, so two routers never both dispatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from pydantic import ValidationError

from common import jsoncodec
from common.api_models import BatchItem, PubSubMessage, target_of
from common.backends.base import ReceiptStore, TemplateStore
from common.backends.redis_client import RedisHandle
from common.backends.redis_dispatch import ClusterDispatcher
from common.backends.redis_sessions import RedisSessionStore
from common.backends.redis_stats import RedisStats
from common.backends.redis_streams import PartitionProducer
from common.errors import ApiError
from common.metrics import Metrics
from common.protocol import valid_tenant
from common.sending import Sender
from common.settings import Settings

log = logging.getLogger("ara.router.pubsub")

LEADER_TTL_MS = 5000
# The same bound as one REST send body (PROTOCOL §7), so both entry points accept the
# same content: a bigger message is dropped as invalid instead of fanned out.
MAX_MESSAGE_BYTES = 64 * 1024
RENEW_SECONDS = 1.0

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""

RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class PubSubTrigger:
    """Leader-elected subscriber that turns Pub/Sub messages into dispatches."""

    def __init__(
        self,
        settings: Settings,
        handle: RedisHandle,
        sessions: RedisSessionStore,
        producer: PartitionProducer,
        templates: TemplateStore,
        receipts: ReceiptStore,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.redis = handle
        self.prefix = settings.redis_pubsub_prefix
        self.metrics = metrics
        self.stats = RedisStats(handle)
        self.sender = Sender(
            settings, ClusterDispatcher(settings, sessions, producer), templates, receipts, metrics,
            self.stats,
        )
        self.dispatched = 0
        self.stopping = False

    async def run(self, me: str) -> None:
        reader: asyncio.Task[None] | None = None
        await self.stats.start()
        self.stopping = False
        try:
            while not self.stopping:
                try:
                    leader = bool(
                        await self.redis.client.eval(
                            RENEW, 1, self.redis.keys.pubsub_leader, me, LEADER_TTL_MS
                        )
                    )
                except Exception as exc:
                    log.warning("pub/sub leadership check failed: %s", exc)
                    leader = False
                if leader and (reader is None or reader.done()):
                    log.info("%s is the pub/sub leader; subscribing to %s:*", me, self.prefix)
                    reader = asyncio.get_running_loop().create_task(self._read())
                elif not leader and reader is not None:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await reader
                    reader = None
                await asyncio.sleep(RENEW_SECONDS)
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
            await self.stats.stop()

    async def resign(self, me: str) -> None:
        self.stopping = True
        await self.redis.client.eval(RESIGN, 1, self.redis.keys.pubsub_leader, me)

    async def _read(self) -> None:
        pubsub = self.redis.blocking.pubsub()
        try:
            await pubsub.psubscribe(f"{self.prefix}:*")
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None or message.get("type") != "pmessage":
                    continue
                channel = message["channel"]
                channel = channel.decode() if isinstance(channel, bytes) else str(channel)
                await self.handle(channel, message["data"])
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def handle(self, channel: str, data: Any) -> bool:
        """Validate and dispatch one message; invalid ones are logged, counted, dropped."""
        try:
            if isinstance(data, (bytes, str)) and len(data) > MAX_MESSAGE_BYTES:
                raise ValueError(f"message exceeds {MAX_MESSAGE_BYTES} bytes")
            body = jsoncodec.loads(data)
            if jsoncodec.too_deep(body):
                raise ValueError(f"message nests deeper than {jsoncodec.MAX_INPUT_DEPTH} levels")
            message = PubSubMessage.model_validate(body)
            tenant = message.tenant_id or "default"
            if not valid_tenant(tenant):
                raise ValueError("invalid tenant_id")
            item = BatchItem.model_validate(
                {**message.event, "target": {"type": message.type, "value": message.target}}
            )
            target = target_of(item)
            notification = await self.sender.build(item, tenant, f"redis:{channel}")
            await self.sender.send(notification, target)
            self.dispatched += 1
            self.metrics.pubsub_dispatched.inc()
            return True
        except (ValueError, ValidationError, ApiError, jsoncodec.JSONDecodeError) as exc:
            self.metrics.pubsub_invalid.inc()
            log.warning("dropping invalid pub/sub message on %s: %s", channel, str(exc)[:300])
            return False
        except Exception:
            self.metrics.pubsub_invalid.inc()
            log.exception("pub/sub message on %s could not be dispatched", channel)
            return False
