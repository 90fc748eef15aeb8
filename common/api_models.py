"""Request bodies of the REST API (PROTOCOL §4) as pydantic models.

They validate every send, feed ``/openapi.json``, and are reused by the
Redis Pub/Sub trigger so both entry points accept exactly the same content.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.protocol import CHANNEL_RE, TEMPLATE_ID_RE, Target, valid_event_type, valid_user_id

Priority = Literal["Low", "Normal", "High", "Critical"]
MAX_TTL = 30 * 24 * 3600

UserId = Annotated[str, Field(min_length=1, max_length=256)]
ChannelName = Annotated[str, Field(pattern=CHANNEL_RE.pattern, min_length=1, max_length=64)]


def _check_user_id(value: str) -> str:
    if not valid_user_id(value):
        raise ValueError("user id must be 1-256 printable characters")
    return value


def _check_channel(value: str) -> str:
    if CHANNEL_RE.fullmatch(value) is None:
        raise ValueError("channel names are 1-64 of letters, digits, '-', '_', '.'")
    return value


class Content(BaseModel):
    """What to send: direct content, or a template with variables."""

    model_config = ConfigDict(extra="ignore")

    event_type: str | None = Field(None, description="1-128 printable characters")
    payload: Any = None
    template_id: str | None = None
    variables: dict[str, Any] | None = None
    priority: Priority | None = None
    ttl: int | None = Field(None, ge=1, le=MAX_TTL)
    correlation_id: str | None = Field(None, min_length=1, max_length=128)

    @field_validator("event_type")
    @classmethod
    def _event_type(cls, value: str | None) -> str | None:
        if value is not None and not valid_event_type(value):
            raise ValueError("event_type must be 1-128 printable characters")
        return value

    @field_validator("template_id")
    @classmethod
    def _template_id(cls, value: str | None) -> str | None:
        if value is not None and TEMPLATE_ID_RE.fullmatch(value) is None:
            raise ValueError("template ids are 1-128 of letters, digits, '-', '_', '.'")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Content:
        if self.template_id is None and self.event_type is None:
            raise ValueError("either event_type or template_id is required")
        if self.template_id is not None and self.event_type is not None:
            raise ValueError("give event_type or template_id, not both")
        return self


class SendRequest(Content):
    target_user_id: str

    _uid = field_validator("target_user_id")(_check_user_id)


class SendToUsersRequest(Content):
    target_user_ids: list[str] = Field(min_length=1, max_length=10_000)

    @field_validator("target_user_ids")
    @classmethod
    def _uids(cls, value: list[str]) -> list[str]:
        for uid in value:
            _check_user_id(uid)
        return value


class BroadcastRequest(Content):
    pass


class ChannelRequest(Content):
    channel: str

    _ch = field_validator("channel")(_check_channel)


class ChannelsRequest(Content):
    channels: list[str] = Field(min_length=1, max_length=100)

    @field_validator("channels")
    @classmethod
    def _chs(cls, value: list[str]) -> list[str]:
        for ch in value:
            _check_channel(ch)
        return value


class BatchTarget(BaseModel):
    type: Literal["user", "users", "broadcast", "channel", "channels"]
    value: Any = None

    @model_validator(mode="after")
    def _value_fits(self) -> BatchTarget:
        v = self.value
        if self.type == "user":
            if not isinstance(v, str):
                raise ValueError("target.value must be a user id")
            _check_user_id(v)
        elif self.type == "users":
            if not isinstance(v, list) or not 1 <= len(v) <= 10_000:
                raise ValueError("target.value must be a list of 1-10000 user ids")
            for uid in v:
                if not isinstance(uid, str):
                    raise ValueError("target.value must be a list of user ids")
                _check_user_id(uid)
        elif self.type == "channel":
            if not isinstance(v, str):
                raise ValueError("target.value must be a channel name")
            _check_channel(v)
        elif self.type == "channels":
            if not isinstance(v, list) or not 1 <= len(v) <= 100:
                raise ValueError("target.value must be a list of 1-100 channel names")
            for ch in v:
                if not isinstance(ch, str):
                    raise ValueError("target.value must be a list of channel names")
                _check_channel(ch)
        return self


class BatchItem(Content):
    target: BatchTarget


class BatchOptions(BaseModel):
    stop_on_error: bool = False
    deduplicate: bool = False


class BatchRequest(BaseModel):
    notifications: list[dict[str, Any]] = Field(min_length=1, max_length=100)
    options: BatchOptions = Field(default_factory=BatchOptions)


class TemplateBody(BaseModel):
    """Template create/replace body; ``priority``/``ttl`` are accepted as aliases."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    id: str | None = None
    name: str | None = Field(None, max_length=256)
    event_type: str
    payload_template: Any = Field(default_factory=dict)
    default_priority: Priority = "Normal"
    default_ttl: int | None = Field(None, ge=1, le=MAX_TTL)
    description: str | None = Field(None, max_length=2048)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if "priority" in data and "default_priority" not in data:
                data["default_priority"] = data.pop("priority")
            if "ttl" in data and "default_ttl" not in data:
                data["default_ttl"] = data.pop("ttl")
        return data

    @field_validator("id")
    @classmethod
    def _template_id(cls, value: str | None) -> str | None:
        if value is not None and TEMPLATE_ID_RE.fullmatch(value) is None:
            raise ValueError("template ids are 1-128 of letters, digits, '-', '_', '.'")
        return value

    @field_validator("event_type")
    @classmethod
    def _event_type(cls, value: str) -> str:
        if not valid_event_type(value):
            raise ValueError("event_type must be 1-128 printable characters")
        return value


class AckRequest(BaseModel):
    notification_id: str = Field(min_length=1, max_length=64)


class PubSubMessage(BaseModel):
    """A Redis Pub/Sub trigger body (PROTOCOL §6)."""

    type: Literal["user", "users", "broadcast", "channel", "channels"]
    target: Any = None
    tenant_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    event: dict[str, Any]


def target_of(model: Content) -> Target:
    if isinstance(model, SendRequest):
        return Target("user", user_ids=(model.target_user_id,))
    if isinstance(model, SendToUsersRequest):
        return Target("users", user_ids=tuple(model.target_user_ids))
    if isinstance(model, ChannelRequest):
        return Target("channel", channels=(model.channel,))
    if isinstance(model, ChannelsRequest):
        return Target("channels", channels=tuple(model.channels))
    if isinstance(model, BatchItem):
        value = model.target.value
        if model.target.type == "user":
            return Target("user", user_ids=(value,))
        if model.target.type == "users":
            return Target("users", user_ids=tuple(value))
        if model.target.type == "channel":
            return Target("channel", channels=(value,))
        if model.target.type == "channels":
            return Target("channels", channels=tuple(value))
    return Target("broadcast")
