"""Command line: ``gateway serve`` and ``gateway token``."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from config import Settings


def _settings(**overrides: object) -> Settings:
    try:
        settings = Settings()
    except ValidationError as exc:
        lines = [
            f"  GATEWAY_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        ]
        raise SystemExit("invalid settings:\n" + "\n".join(lines)) from None
    updates = {key: value for key, value in overrides.items() if value is not None}
    return settings.model_copy(update=updates) if updates else settings


def _serve(args: argparse.Namespace) -> int:
    from gateway.server import serve

    settings = _settings(host=args.host, port=args.port, workers=args.workers)
    try:
        serve(settings)
    except RuntimeError as exc:  # configuration refused at start, e.g. production without a key
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    return 0


def _token(args: argparse.Namespace) -> int:
    from gateway.auth import Authenticator

    settings = _settings()
    if settings.jwt_secret is None:
        print(
            "gateway token: set GATEWAY_JWT_SECRET (an HMAC secret the server also uses) to mint tokens",
            file=sys.stderr,
        )
        return 2
    claims = {}
    if args.roles:
        claims["roles"] = [r.strip() for r in args.roles.split(",") if r.strip()]
    print(Authenticator(settings).mint(args.sub, ttl_s=args.ttl, **claims))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="AI token-streaming WebSocket gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway (settings from GATEWAY_* and .env)")
    serve.add_argument("--host", help="bind address (default: GATEWAY_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: GATEWAY_PORT, 8000)")
    serve.add_argument("--workers", type=int, help="worker processes (default: GATEWAY_WORKERS, 1; >1 needs Redis)")
    serve.set_defaults(handler=_serve)
    token = commands.add_parser("token", help="mint a development JWT from GATEWAY_JWT_SECRET")
    token.add_argument("--sub", required=True, help="user id (the 'sub' claim)")
    token.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds (default 3600)")
    token.add_argument("--roles", help="comma-separated roles claim")
    token.set_defaults(handler=_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
