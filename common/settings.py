"""Service configuration from environment variables and a ``.env`` file.

Every name in PROTOCOL §8 is a field here, validated once at start. All
problems are collected and reported together, so an operator fixes a broken
deployment in one round instead of one variable per restart.
"""

from __future__ import annotations

import os
import socket
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class RunMode(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class DeliveryGuarantee(StrEnum):
    AT_LEAST_ONCE = "at-least-once"
    AT_MOST_ONCE = "at-most-once"


DEV_JWT_SECRET = "ara-development-secret-change-me-0123456789"
DEV_API_KEY = "ara-dev-api-key"
WEAK_SECRETS = {DEV_JWT_SECRET, "secret", "changeme", "change-me", "password"}


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Validated settings; see docs/operations.md for the meaning of each."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    server_host: str = "0.0.0.0"
    server_port: int = Field(8081, ge=0, le=65535)
    run_mode: RunMode = RunMode.DEVELOPMENT
    node_id: str = Field(default_factory=_default_node_id, min_length=1, max_length=128)

    jwt_secret: str | None = None
    jwt_algorithm: str = "HS256"
    jwt_public_key: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: int = Field(30, ge=0, le=3600)
    api_key: str | None = None

    redis_url: str | None = None
    redis_key_prefix: str = "ara"
    database_url: str | None = None
    router_partitions: int = Field(64, ge=1, le=4096)
    router_batch_linger_ms: float = Field(1.0, ge=0, le=100)
    router_batch_linger_busy_ms: float = Field(0.0, ge=0, le=100)
    sqlite_path: str = "ara-notify.sqlite3"

    queue_enabled: bool = True
    queue_max_size_per_user: int = Field(100, ge=1, le=100_000)
    queue_message_ttl_seconds: int = Field(3600, ge=1)
    ack_enabled: bool = True
    ack_timeout_seconds: int = Field(30, ge=1)
    receipt_retention_seconds: int = Field(86_400, ge=0)
    delivery_guarantee: DeliveryGuarantee = DeliveryGuarantee.AT_LEAST_ONCE

    websocket_heartbeat_interval: float = Field(30, gt=0)
    websocket_connection_timeout: float = Field(120, gt=0)
    websocket_max_connections: int = Field(10_000, ge=1)
    websocket_max_connections_per_user: int = Field(5, ge=1)
    websocket_max_connections_per_tenant: int = Field(0, ge=0)
    websocket_max_subscriptions_per_connection: int = Field(50, ge=1)
    websocket_max_frame_bytes: int = Field(65_536, ge=1024)
    websocket_send_queue_size: int = Field(1024, ge=1)
    websocket_compression: bool = False
    websocket_ping_interval: float = Field(20, gt=0)
    websocket_ping_timeout: float = Field(20, gt=0)

    ratelimit_enabled: bool = True
    ratelimit_http_requests_per_second: float = Field(100, gt=0)
    ratelimit_http_burst_size: int = Field(200, ge=1)
    ratelimit_ws_connections_per_minute: int = Field(10, ge=1)
    ratelimit_ws_messages_per_second: float = Field(20, gt=0)
    ratelimit_ws_message_burst: int = Field(40, ge=1)

    tenant_enabled: bool = False
    tenant_api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)

    otel_enabled: bool = False
    log_format: str = Field("text", pattern="^(json|text)$")
    log_level: str = "INFO"
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    drain_timeout_seconds: float = Field(20, ge=0)
    redis_pubsub_prefix: str = "notification"

    _split_lists = field_validator("tenant_api_keys", "cors_origins", mode="before")(_split_csv)

    @field_validator("jwt_algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        if value not in ("HS256", "RS256"):
            raise ValueError("must be HS256 or RS256")
        return value

    @model_validator(mode="after")
    def _check_combination(self) -> Settings:
        problems: list[str] = []
        production = self.run_mode is RunMode.PRODUCTION
        if self.jwt_algorithm == "RS256":
            if not self.jwt_public_key:
                problems.append("JWT_PUBLIC_KEY is required when JWT_ALGORITHM=RS256")
        elif self.jwt_secret is not None and len(self.jwt_secret) < 32:
            problems.append("JWT_SECRET must be at least 32 characters")
        elif production and (not self.jwt_secret or self.jwt_secret in WEAK_SECRETS):
            problems.append("production mode needs a strong JWT_SECRET (>= 32 characters)")
        if production and (not self.api_key or len(self.api_key) < 16):
            problems.append("production mode needs API_KEY of at least 16 characters")
        if self.api_key is not None and not self.api_key:
            problems.append("API_KEY must not be empty")
        for entry in self.tenant_api_keys:
            tenant, _, key = entry.partition(":")
            if not tenant or not key:
                problems.append(f"TENANT_API_KEYS entry {entry!r} is not tenant:key")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def production(self) -> bool:
        return self.run_mode is RunMode.PRODUCTION

    @property
    def effective_jwt_secret(self) -> str:
        return self.jwt_secret or DEV_JWT_SECRET

    @property
    def effective_api_key(self) -> str:
        return self.api_key or DEV_API_KEY

    @cached_property
    def tenant_keys(self) -> dict[str, str]:
        """API key -> tenant id for tenant-bound keys."""
        result: dict[str, str] = {}
        for entry in self.tenant_api_keys:
            tenant, _, key = entry.partition(":")
            result[key] = tenant
        return result

    @property
    def at_least_once(self) -> bool:
        return self.delivery_guarantee is DeliveryGuarantee.AT_LEAST_ONCE

    def public_key_pem(self) -> str | None:
        if not self.jwt_public_key:
            return None
        value = self.jwt_public_key
        if "-----BEGIN" in value:
            return value
        return Path(value).read_text()


class SettingsError(Exception):
    """Raised with every configuration problem listed, one per line."""


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        errors = list(exc.errors())
    # A field error stops pydantic before the cross-field checks; run those too, with
    # the broken fields at their defaults, so every problem is reported at once.
    broken = {str(err["loc"][0]) for err in errors if err["loc"]} & set(Settings.model_fields)
    if broken:
        defaults = {
            name: Settings.model_fields[name].get_default(call_default_factory=True)
            for name in broken
        }
        try:
            Settings(**{**overrides, **defaults})
        except ValidationError as again:
            errors.extend(err for err in again.errors() if not err["loc"])
    lines = []
    for err in errors:
        where = ".".join(str(p) for p in err["loc"]).upper() or "configuration"
        lines.append(f"{where}: {err['msg']}")
    raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines))
