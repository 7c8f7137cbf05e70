"""Command line: ``gateway serve``, ``gateway token``, ``gateway chat`` and ``gateway bench``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from pydantic import ValidationError

from config import Settings
from gateway.client.types import TokenSource


def _setting_name(loc: tuple[int | str, ...]) -> str:
    """The variable to fix, and where inside it for a structured one (the routes):
    ``GATEWAY_ROUTES_FILE routes.chat.deployments.0.base_url``."""
    if loc and loc[0] in ("routes", "routes_file") and len(loc) > 1:
        return f"GATEWAY_{str(loc[0]).upper()} {'.'.join(str(part) for part in loc[1:])}"
    return f"GATEWAY_{'_'.join(str(p) for p in loc).upper()}"


def _settings(**overrides: object) -> Settings:
    try:
        settings = Settings()
    except ValidationError as exc:
        lines = [f"  {_setting_name(e['loc'])}: {e['msg']}" for e in exc.errors(include_input=False, include_url=False)]
        raise SystemExit("invalid settings:\n" + "\n".join(lines)) from None
    updates = {key: value for key, value in overrides.items() if value is not None}
    return settings.model_copy(update=updates) if updates else settings


def _serve(args: argparse.Namespace) -> int:
    from gateway.serve import serve

    settings = _settings(host=args.host, port=args.port, workers=args.workers)
    try:
        serve(settings)
    except RuntimeError as exc:  # configuration refused at start, e.g. production without a key
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    return 0


def _token(args: argparse.Namespace) -> int:
    from gateway.auth import JWTAuthenticator

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
    print(JWTAuthenticator(settings).mint(args.sub, ttl_s=args.ttl, **claims))
    return 0


def _chat_token(args: argparse.Namespace) -> TokenSource | None:
    """The token for ``gateway chat``: --token, or in development one minted from the local
    key, anew on each connect, so an answer outlives a token that expires (close 4001)."""
    if args.token:
        return str(args.token)
    from gateway.auth import JWTAuthenticator

    settings = _settings()
    if settings.auth == "none":
        return None
    if settings.jwt_secret is None or settings.env != "dev":
        raise SystemExit(
            "gateway chat: pass --token <jwt> (gateway serve logs a development token), or set "
            "GATEWAY_JWT_SECRET (the server's HMAC secret, in development) to mint one here"
        )
    print(f"[no --token: minted a development token for user {args.user!r} from GATEWAY_JWT_SECRET, "
          "and a fresh one on each reconnect]", file=sys.stderr)
    authenticator = JWTAuthenticator(settings)
    return lambda: authenticator.mint(args.user, ttl_s=args.ttl)


def _chat(args: argparse.Namespace) -> int:
    import anyio

    from gateway.client.chat import run_chat

    token = _chat_token(args)
    url = args.url or f"ws://{_settings().host}:{_settings().port}/ws"
    try:
        return anyio.run(lambda: run_chat(url, token, auth=args.auth, max_tokens=args.max_tokens))
    except KeyboardInterrupt:  # Ctrl-C before the chat took it over
        return 130


def _bench(rest: list[str]) -> int:
    # The benchmarks live beside the package in a source checkout and are not installed with it.
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "benchmarks" / "run.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        # Imported by name: the benchmarks are not part of the typed package.
        runner = importlib.import_module("benchmarks.run")
    except ImportError:
        print("gateway bench: needs a source checkout (the benchmarks/ directory is not installed)", file=sys.stderr)
        return 2
    result: int = runner.main(rest)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="AI token-streaming WebSocket gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway (settings from GATEWAY_* and .env)")
    serve.add_argument("--host", help="bind address (default: GATEWAY_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: GATEWAY_PORT, 8000)")
    serve.add_argument("--workers", type=int,
                       help="worker processes (default: GATEWAY_WORKERS, 1; >1 needs GATEWAY_CLUSTER_URL=redis://…)")
    serve.set_defaults(handler=_serve)
    token = commands.add_parser("token", help="mint a development JWT from GATEWAY_JWT_SECRET")
    token.add_argument("--sub", required=True, help="user id (the 'sub' claim)")
    token.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds (default 3600)")
    token.add_argument("--roles", help="comma-separated roles claim")
    token.set_defaults(handler=_token)
    chat = commands.add_parser("chat", help="an interactive chat in the terminal")
    chat.add_argument("--url", help="the gateway's WebSocket URL (default: ws://GATEWAY_HOST:GATEWAY_PORT/ws)")
    chat.add_argument("--token", help="a JWT (default, in development: minted from GATEWAY_JWT_SECRET)")
    chat.add_argument("--user", default="dev", help="the user of a minted token (default dev)")
    chat.add_argument("--ttl", type=float, default=3600.0, help="lifetime of a minted token in seconds")
    chat.add_argument("--auth", choices=["subprotocol", "header", "query", "message"], default="subprotocol",
                      help="how the token is sent (default subprotocol)")
    chat.add_argument("--max-tokens", type=int, help="max_tokens of each answer (default: the server's)")
    chat.set_defaults(handler=_chat)
    bench = commands.add_parser(
        "bench",
        help="run the benchmarks (python -m benchmarks); options are passed on, see gateway bench --help",
        add_help=False,
    )
    bench.set_defaults(handler=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
