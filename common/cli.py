"""``ara-notify``: the one command that starts every process kind."""

from __future__ import annotations

import argparse
import sys

from common.settings import SettingsError, load_settings


def _serve(args: argparse.Namespace) -> int:
    from common.logs import configure_logging
    from gateway.app import create_app
    from gateway.embedded import embedded_backends
    from gateway.server import run

    overrides = {}
    if args.port is not None:
        overrides["server_port"] = args.port
    if args.host is not None:
        overrides["server_host"] = args.host
    settings = load_settings(**overrides)
    configure_logging(settings.log_format, settings.log_level)
    app = create_app(settings, embedded_backends)
    run(app, settings)
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
