"""``ara-notify``: the one command that starts every process kind."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from common.settings import Settings, SettingsError, load_settings
from common.telemetry import setup_tracing


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "port", None) is not None:
        overrides["server_port"] = args.port
    if getattr(args, "host", None) is not None:
        overrides["server_host"] = args.host
    settings = load_settings(**overrides)
    from common.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    return settings


def _serve(args: argparse.Namespace) -> int:
    from gateway.app import create_app
    from gateway.embedded import embedded_backends
    from gateway.server import run

    settings = _settings(args)
    setup_tracing("ara-notify", settings.otel_enabled)
    run(create_app(settings, embedded_backends), settings)
    return 0


def _require_cluster(settings: Settings) -> None:
    missing = [n for n, v in (("REDIS_URL", settings.redis_url),
                              ("DATABASE_URL", settings.database_url)) if not v]
    if missing:
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(
            f"{name}: required for this command" for name in missing))


def _gateway(args: argparse.Namespace) -> int:
    from gateway.app import create_app
    from gateway.cluster import cluster_backends
    from gateway.server import run

    settings = _settings(args)
    _require_cluster(settings)
    setup_tracing("ara-gateway", settings.otel_enabled)
    run(create_app(settings, cluster_backends), settings)
    return 0


def _router(args: argparse.Namespace) -> int:
    import uvicorn

    from common.gctune import tune_gc
    from router.app import create_router_app

    settings = _settings(args)
    _require_cluster(settings)
    setup_tracing("ara-router", settings.otel_enabled)
    tune_gc()
    uvicorn.run(
        create_router_app(settings), host=settings.server_host, port=settings.server_port,
        log_config=None, access_log=False, lifespan="on",
    )
    return 0


def _migrate(args: argparse.Namespace) -> int:
    import asyncio

    from common.backends.postgres import migrate

    settings = _settings(args)
    if not settings.database_url:
        raise SettingsError("invalid configuration:\n  DATABASE_URL: required for migrate")
    version = asyncio.run(migrate(settings.database_url))
    print(f"schema at version {version}")
    return 0


def _token(args: argparse.Namespace) -> int:
    from common.auth import mint_token

    settings = load_settings()
    private_key = None
    if args.private_key:
        with open(args.private_key) as handle:
            private_key = handle.read()
    print(mint_token(settings, args.sub, tenant=args.tenant, ttl=args.ttl,
                     roles=args.role or None, private_key=private_key))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ara-notify", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the embedded single node (no Redis, no Postgres)")
    serve.add_argument("--host", default=None, help="bind address (default SERVER_HOST)")
    serve.add_argument("--port", type=int, default=None, help="port (default SERVER_PORT)")
    serve.set_defaults(func=_serve)
    for name, func, text in (
        ("gateway", _gateway, "run a cluster edge gateway (REDIS_URL, DATABASE_URL)"),
        ("router", _router, "run a cluster router shard (REDIS_URL, DATABASE_URL)"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--host", default=None, help="bind address (default SERVER_HOST)")
        cmd.add_argument("--port", type=int, default=None, help="port (default SERVER_PORT)")
        cmd.set_defaults(func=func)
    migrate = sub.add_parser("migrate", help="create or upgrade the Postgres schema")
    migrate.set_defaults(func=_migrate)
    token = sub.add_parser("token", help="print a client JWT signed with the configured key")
    token.add_argument("--sub", required=True, help="user id")
    token.add_argument("--tenant", default=None, help="tenant id (default: 'default')")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.add_argument("--role", action="append", help="role claim (repeatable)")
    token.add_argument("--private-key", default=None, help="PEM file for RS256 signing")
    token.set_defaults(func=_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
