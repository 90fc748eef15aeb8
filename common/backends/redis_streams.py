"""Redis streams that carry work: partition streams in, gateway streams out.

A partition stream (``ara:part:{NN}``) holds accepted notifications in the
order they were accepted; its consumer group ``routers`` lets a new owner
claim what a dead router left pending. A gateway stream (``ara:node:{id}``)
holds what one gateway must write to its sockets; only that gateway reads
it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from common import jsoncodec
from common.backends.base import Delivery
from common.backends.redis_client import RedisHandle
from common.backends.redis_lane import Command
from common.protocol import Notification, Target

GROUP = "routers"
NODE_STREAM_MAXLEN = 100_000


def encode_accepted(
    notification: Notification, target: Target, record_receipt: bool = False
) -> bytes:
    """A partition entry; ``record_receipt``: the router records the receipt."""
    record = orjson.Fragment(notification.record_json())
    body: dict[str, Any] = {"n": record, "t": target.to_dict()}
    if record_receipt:
        body["r"] = 1
    return jsoncodec.dumps(body)


def decode_entry(raw: bytes) -> tuple[Notification, Target, bool]:
    """A partition entry: the notification, its target, whether to record its receipt."""
    data = jsoncodec.loads(raw)
    return (Notification.from_record(data["n"]), Target.from_dict(data["t"]),
            data.get("r") == 1)


def decode_accepted(raw: bytes) -> tuple[Notification, Target]:
    notification, target, _ = decode_entry(raw)
    return notification, target


def encode_delivery(delivery: Delivery) -> bytes:
    record = orjson.Fragment(delivery.notification.record_json())
    body: dict[str, Any] = {"k": delivery.kind, "n": record}
    if delivery.user_ids:
        body["u"] = list(delivery.user_ids)
    if delivery.channels:
        body["c"] = list(delivery.channels)
    return jsoncodec.dumps(body)


def decode_delivery(raw: bytes) -> Delivery:
    data = jsoncodec.loads(raw)
    return Delivery(
        kind=data["k"],
        notification=Notification.from_record(data["n"]),
        user_ids=tuple(data.get("u", ())),
        channels=tuple(data.get("c", ())),
    )


class PartitionProducer:
    """Appends accepted notifications to their partition streams (one round trip)."""

    def __init__(self, handle: RedisHandle) -> None:
        self.redis = handle

    async def append(self, entries: Sequence[tuple[int, bytes]]) -> None:
        await self.redis.execute(self.commands(entries))

    def commands(self, entries: Sequence[tuple[int, bytes]]) -> list[Command]:
        """The appends as raw commands, for a lane round trip the caller makes."""
        keys = self.redis.keys
        return [("XADD", keys.partition(partition), "*", "e", payload)
                for partition, payload in entries]


# Appends ARGV[2..] to the stream KEYS[1] in order, each as an entry {d: payload},
# trimming to about ARGV[1] entries: one command per gateway per batch instead of one
# per delivery (a single key, so it is Redis Cluster safe).
XADD_MANY = """
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'd', ARGV[i])
end
return #ARGV - 1
"""


class RedisNodeDelivery:
    """``NodeDelivery`` that appends to the holding gateway's stream."""

    def __init__(self, handle: RedisHandle) -> None:
        self.redis = handle

    async def deliver(self, node_id: str, delivery: Delivery) -> None:
        await self.deliver_many([(node_id, delivery)])

    async def deliver_many(self, items: Sequence[tuple[str, Delivery]]) -> None:
        """Append each delivery to its gateway's stream, in order; one round trip."""
        if items:
            await self.redis.execute(self.commands(items))

    def commands(self, items: Sequence[tuple[str, Delivery]]) -> list[Command]:
        """The appends of ``deliver_many`` as raw commands, for a round trip the caller
        makes: one per gateway, each delivery encoded once however many gateways get it."""
        keys = self.redis.keys
        encoded: dict[int, bytes] = {}
        by_node: dict[str, list[bytes]] = {}
        for node_id, delivery in items:
            payload = encoded.get(id(delivery))
            if payload is None:
                payload = encoded[id(delivery)] = encode_delivery(delivery)
            by_node.setdefault(node_id, []).append(payload)

        commands: list[Command] = []
        for node_id, payloads in by_node.items():
            if len(payloads) == 1:
                commands.append(("XADD", keys.node_stream(node_id), "MAXLEN", "~",
                                 NODE_STREAM_MAXLEN, "*", "d", payloads[0]))
            else:
                commands.append(("EVAL", XADD_MANY, 1, keys.node_stream(node_id),
                                 NODE_STREAM_MAXLEN, *payloads))
        return commands
