"""Wire protocol: names, the notification record, targets and socket frames.

A ``Notification`` is encoded to its JSON frame once per variant (plain,
per channel, redelivered) and the same string is written to every socket,
so fan-out cost does not grow with serialization.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from common import jsoncodec

CHANNEL_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}", re.ASCII)
TEMPLATE_ID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,128}", re.ASCII)
TENANT_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}", re.ASCII)
PRIORITIES = ("Low", "Normal", "High", "Critical")
TargetKind = Literal["user", "users", "broadcast", "channel", "channels"]


def valid_channel(name: object) -> bool:
    return isinstance(name, str) and CHANNEL_RE.fullmatch(name) is not None


def valid_user_id(user_id: object) -> bool:
    return (
        isinstance(user_id, str)
        and 1 <= len(user_id) <= 256
        and user_id.isprintable()
    )


def valid_event_type(event_type: object) -> bool:
    return isinstance(event_type, str) and 1 <= len(event_type) <= 128 and event_type.isprintable()


def valid_tenant(tenant: object) -> bool:
    return isinstance(tenant, str) and TENANT_RE.fullmatch(tenant) is not None


def utc_iso(ts: float) -> str:
    """RFC 3339 UTC with milliseconds and a ``Z`` suffix."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def new_id() -> str:
    """A random (version 4) UUID as text: ``str(uuid.uuid4())`` without the ``UUID``
    object, whose checks cost more than the random bytes (two ids per send)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True, slots=True)
class Target:
    """Who a notification is for, inside one tenant."""

    kind: TargetKind
    user_ids: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        value: Any
        if self.kind == "user":
            value = self.user_ids[0]
        elif self.kind == "users":
            value = list(self.user_ids)
        elif self.kind == "channel":
            value = self.channels[0]
        elif self.kind == "channels":
            value = list(self.channels)
        else:
            value = None
        return {"type": self.kind, "value": value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Target:
        kind = data["type"]
        value: Any = data.get("value")
        if kind == "user":
            return cls(kind, user_ids=(value,))
        if kind == "users":
            return cls(kind, user_ids=tuple(value))
        if kind == "channel":
            return cls(kind, channels=(value,))
        if kind == "channels":
            return cls(kind, channels=tuple(value))
        return cls("broadcast")


@dataclass(slots=True)
class Notification:
    """One accepted event, stamped with its id and time; immutable once sent."""

    id: str
    tenant_id: str
    event_type: str
    payload: Any
    created_at: float
    priority: str = "Normal"
    ttl: int | None = None
    correlation_id: str | None = None
    source: str = "http-api"
    expires_at: float = 0.0
    trace: dict[str, str] | None = None
    _frames: dict[tuple[str | None, bool], str] = field(
        default_factory=dict, repr=False, compare=False
    )
    _record: tuple[dict[str, str] | None, bytes] | None = field(
        default=None, repr=False, compare=False
    )

    @classmethod
    def create(
        cls,
        tenant_id: str,
        event_type: str,
        payload: Any,
        *,
        priority: str = "Normal",
        ttl: int | None = None,
        correlation_id: str | None = None,
        source: str = "http-api",
        default_ttl: int,
        now: float | None = None,
    ) -> Notification:
        created = time.time() if now is None else now
        lifetime = ttl if ttl is not None else default_ttl
        return cls(
            id=new_id(),
            tenant_id=tenant_id,
            event_type=event_type,
            payload=payload,
            created_at=created,
            priority=priority,
            ttl=ttl,
            correlation_id=correlation_id,
            source=source,
            expires_at=created + lifetime,
        )

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def wire(self, channel: str | None = None, redelivered: bool = False) -> dict[str, Any]:
        metadata: dict[str, Any] = {"source": self.source, "priority": self.priority}
        if self.ttl is not None:
            metadata["ttl"] = self.ttl
        if self.correlation_id:
            metadata["correlation_id"] = self.correlation_id
        if channel:
            metadata["channel"] = channel
        if redelivered:
            metadata["redelivered"] = True
        return {
            "type": "notification",
            "id": self.id,
            "occurred_at": utc_iso(self.created_at),
            "event_type": self.event_type,
            "payload": self.payload,
            "metadata": metadata,
        }

    def frame(self, channel: str | None = None, redelivered: bool = False) -> str:
        """The encoded socket frame, built once per variant and then shared."""
        key = (channel, redelivered)
        cached = self._frames.get(key)
        if cached is None:
            cached = jsoncodec.dumps_str(self.wire(channel, redelivered))
            self._frames[key] = cached
        return cached

    def to_record(self) -> dict[str, Any]:
        """A storable form (mailbox rows, stream entries)."""
        record: dict[str, Any] = {
            "id": self.id,
            "tenant_id": self.tenant_id,
            "event_type": self.event_type,
            "payload": self.payload,
            "created_at": self.created_at,
            "priority": self.priority,
            "source": self.source,
            "expires_at": self.expires_at,
        }
        if self.ttl is not None:
            record["ttl"] = self.ttl
        if self.correlation_id:
            record["correlation_id"] = self.correlation_id
        if self.trace:
            record["trace"] = self.trace
        return record

    def record_json(self) -> bytes:
        """``to_record()`` encoded, built once and shared by the mailbox row and every
        stream entry that carries this notification (rebuilt if ``trace`` changes)."""
        cached = self._record
        if cached is None or cached[0] is not self.trace:
            cached = (self.trace, jsoncodec.dumps(self.to_record()))
            self._record = cached
        return cached[1]

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Notification:
        return cls(
            id=record["id"],
            tenant_id=record["tenant_id"],
            event_type=record["event_type"],
            payload=record.get("payload"),
            created_at=record["created_at"],
            priority=record.get("priority", "Normal"),
            ttl=record.get("ttl"),
            correlation_id=record.get("correlation_id"),
            source=record.get("source", "http-api"),
            expires_at=record["expires_at"],
            trace=record.get("trace"),
        )


def error_frame(code: str, message: str) -> str:
    return jsoncodec.dumps_str({"type": "error", "code": code, "message": message})


def shutdown_frame(reason: str, reconnect_after: int) -> str:
    return jsoncodec.dumps_str(
        {"type": "shutdown", "reason": reason, "reconnect_after_seconds": reconnect_after}
    )


PONG_FRAME = '{"type":"pong"}'
HEARTBEAT_FRAME = '{"type":"heartbeat"}'


class FrameError(Exception):
    """A client frame that breaks the protocol; becomes an ``error`` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ClientFrame:
    """A parsed client message: ``kind`` plus its validated arguments."""

    kind: Literal["Subscribe", "Unsubscribe", "Ping", "Ack"]
    channels: tuple[Any, ...] = ()
    notification_id: str | None = None


def parse_client_frame(text: str) -> ClientFrame:
    try:
        data = jsoncodec.loads(text)
    except jsoncodec.JSONDecodeError:
        raise FrameError("INVALID_MESSAGE", "frame is not valid JSON") from None
    if not isinstance(data, dict):
        raise FrameError("INVALID_MESSAGE", "frame must be a JSON object")
    kind = data.get("type")
    if kind == "Ping":
        return ClientFrame("Ping")
    payload = data.get("payload")
    if kind in ("Subscribe", "Unsubscribe"):
        if not isinstance(payload, dict) or "channels" not in payload:
            raise FrameError("INVALID_MESSAGE", f"{kind} needs payload.channels")
        channels = payload["channels"]
        if not isinstance(channels, list):
            raise FrameError("INVALID_MESSAGE", "payload.channels must be a list")
        return ClientFrame(kind, channels=tuple(channels))
    if kind == "Ack":
        if not isinstance(payload, dict) or not isinstance(payload.get("notification_id"), str):
            raise FrameError("INVALID_MESSAGE", "Ack needs payload.notification_id")
        return ClientFrame("Ack", notification_id=payload["notification_id"])
    if kind is None:
        raise FrameError("INVALID_MESSAGE", "frame has no type")
    raise FrameError("INVALID_MESSAGE", f"unknown message type {jsoncodec.preview(kind, 64)!r}")
