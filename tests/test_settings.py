"""Configuration from the environment (PROTOCOL §8) and the ``ara-notify`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import TEST_API_KEY, TEST_JWT_SECRET, free_port, serve_env

from common.settings import DEV_JWT_SECRET, SettingsError, load_settings

STRONG = {"JWT_SECRET": TEST_JWT_SECRET, "API_KEY": TEST_API_KEY}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No stray configuration from the environment or a ``.env`` file."""
    for key in list(os.environ):
        if key.startswith(("JWT_", "API_", "RUN_", "SERVER_", "QUEUE_", "WEBSOCKET_",
                           "RATELIMIT_", "DELIVERY_", "TENANT_", "LOG_", "NODE_", "SQLITE_",
                           "RECEIPT_")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def run_cli(tmp_path: Path, *args: str, **env: Any) -> subprocess.CompletedProcess[str]:
    environ = serve_env(tmp_path, free_port(), **env)
    for key in [k for k, v in env.items() if v is None]:
        environ.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "common.cli", *args], env=environ, cwd=tmp_path,
        capture_output=True, text=True, timeout=30,
    )


def test_defaults_match_the_documented_values() -> None:
    s = load_settings()
    assert (s.server_host, s.server_port) == ("0.0.0.0", 8081)
    assert s.run_mode == "development"
    assert s.router_partitions == 64
    assert s.router_batch_linger_ms == 1.0
    assert s.queue_enabled is True
    assert s.queue_max_size_per_user == 100
    assert s.queue_message_ttl_seconds == 3600
    assert s.ack_enabled is True and s.ack_timeout_seconds == 30
    assert s.receipt_retention_seconds == 86_400
    assert s.delivery_guarantee == "at-least-once"
    assert s.websocket_heartbeat_interval == 30
    assert s.websocket_connection_timeout == 120
    assert s.websocket_max_connections == 10_000
    assert s.websocket_max_connections_per_user == 5
    assert s.websocket_max_subscriptions_per_connection == 50
    assert s.ratelimit_http_requests_per_second == 100
    assert s.ratelimit_http_burst_size == 200
    assert s.ratelimit_ws_connections_per_minute == 10
    assert s.jwt_leeway_seconds == 30
    assert s.jwt_algorithm == "HS256"


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVER_PORT", "9100")
    monkeypatch.setenv("DELIVERY_GUARANTEE", "at-most-once")
    monkeypatch.setenv("TENANT_API_KEYS", "acme:key-1, globex:key-2")
    monkeypatch.setenv("CORS_ORIGINS", "https://a.test,https://b.test")
    s = load_settings()
    assert s.server_port == 9100
    assert s.at_least_once is False
    assert s.tenant_keys == {"key-1": "acme", "key-2": "globex"}
    assert s.cors_origins == ["https://a.test", "https://b.test"]


def test_receipt_retention_is_read_and_may_be_zero_but_not_negative(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RECEIPT_RETENTION_SECONDS", "0")
    assert load_settings().receipt_retention_seconds == 0
    monkeypatch.setenv("RECEIPT_RETENTION_SECONDS", "604800")
    assert load_settings().receipt_retention_seconds == 604_800
    for bad in ("-1", "a day"):
        monkeypatch.setenv("RECEIPT_RETENTION_SECONDS", bad)
        with pytest.raises(SettingsError) as info:
            load_settings()
        assert "RECEIPT_RETENTION_SECONDS" in str(info.value)


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("QUEUE_MAX_SIZE_PER_USER=7\nNODE_ID=from-dotenv\n")
    s = load_settings()
    assert s.queue_max_size_per_user == 7
    assert s.node_id == "from-dotenv"


def test_invalid_environment_reports_every_error_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SERVER_PORT", "not-a-port")
    monkeypatch.setenv("QUEUE_MAX_SIZE_PER_USER", "0")
    monkeypatch.setenv("JWT_ALGORITHM", "ES256")
    monkeypatch.setenv("LOG_FORMAT", "xml")
    monkeypatch.setenv("DELIVERY_GUARANTEE", "exactly-once")
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    for name in ("SERVER_PORT", "QUEUE_MAX_SIZE_PER_USER", "JWT_ALGORITHM", "LOG_FORMAT",
                 "DELIVERY_GUARANTEE"):
        assert name in message, name


def test_field_errors_and_cross_field_errors_are_reported_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SERVER_PORT", "99999")
    monkeypatch.setenv("JWT_SECRET", "too-short")
    monkeypatch.setenv("TENANT_API_KEYS", "no-colon-here")
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert "SERVER_PORT" in message
    assert "JWT_SECRET must be at least 32 characters" in message
    assert "no-colon-here" in message


@pytest.mark.parametrize("env", [
    {},
    {"JWT_SECRET": DEV_JWT_SECRET, "API_KEY": TEST_API_KEY},
    {"JWT_SECRET": TEST_JWT_SECRET},
    {"JWT_SECRET": TEST_JWT_SECRET, "API_KEY": "short-key"},
])
def test_production_mode_refuses_weak_secrets(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
) -> None:
    monkeypatch.setenv("RUN_MODE", "production")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "production mode needs" in str(info.value)


def test_production_mode_accepts_strong_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUN_MODE", "production")
    for key, value in STRONG.items():
        monkeypatch.setenv(key, value)
    assert load_settings().production is True


def test_rs256_needs_a_public_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JWT_ALGORITHM", "RS256")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "JWT_PUBLIC_KEY" in str(info.value)


def test_serve_in_production_with_weak_secrets_exits_2_with_the_reasons(
    tmp_path: Path,
) -> None:
    result = run_cli(tmp_path, "serve", RUN_MODE="production", JWT_SECRET=None, API_KEY=None)
    assert result.returncode == 2
    assert "production mode needs a strong JWT_SECRET" in result.stderr
    assert "production mode needs API_KEY" in result.stderr


def test_serve_with_invalid_environment_exits_2_listing_every_error(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "serve", WEBSOCKET_MAX_CONNECTIONS="0",
                     QUEUE_MESSAGE_TTL_SECONDS="soon", RUN_MODE="staging")
    assert result.returncode == 2
    for name in ("WEBSOCKET_MAX_CONNECTIONS", "QUEUE_MESSAGE_TTL_SECONDS", "RUN_MODE"):
        assert name in result.stderr, result.stderr


def test_token_command_prints_a_token_the_server_accepts(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "token", "--sub", "u9", "--tenant", "acme", "--ttl", "120",
                     "--role", "admin")
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), TEST_JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "u9"
    assert claims["tenant_id"] == "acme"
    assert claims["roles"] == ["admin"]
    assert claims["exp"] - claims["iat"] == 120
