"""The `throttled` command: serve, migrate, check-config, sign, demo, portals connect."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from throttled import config as config_module
from throttled import logs
from throttled.config import Config, ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, _Fatal) as exc:
        print(f"throttled: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


class _Fatal(Exception):
    """An error to print and exit 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="throttled", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: object, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--config",
            help="config file (default ./throttled.toml, then /etc/throttled/throttled.toml)",
        )
        p.set_defaults(func=func)
        return p

    command("serve", _serve, "run the daemon")
    migrate = command("migrate", _migrate, "apply database migrations")
    migrate.add_argument("--status", action="store_true", help="list migrations and exit")
    command("check-config", _check_config, "validate the config and print it, secrets masked")
    sign = command("sign", _sign, "print HubSpot signature headers for a request")
    sign.add_argument("--secret", required=True, help="the app's client secret")
    sign.add_argument("--url", required=True, help="the full URL HubSpot calls")
    sign.add_argument(
        "--body", required=True, help="file with the exact request body (- for stdin)"
    )
    sign.add_argument("--method", default="POST")
    sign.add_argument("--v3", action="store_true", help="also add the v3 signature and timestamp")
    sign.add_argument("--curl", action="store_true", help="print a complete curl command")
    demo = command("demo", _demo, "mock mode: send actions to a few queues and watch them drain")
    demo.add_argument("--per-queue", type=int, default=30, help="actions per queue")
    portals = sub.add_parser("portals", help="manage connected HubSpot portals")
    portals_sub = portals.add_subparsers(dest="portals_command", required=True)
    connect = portals_sub.add_parser(
        "connect", help="store a portal's OAuth refresh token (encrypted)"
    )
    connect.add_argument("--config")
    connect.add_argument("--portal-id", type=int, required=True)
    connect.add_argument("--refresh-token", help="the refresh token (default: read from stdin)")
    connect.set_defaults(func=_portals_connect)
    return parser


def _load(args: argparse.Namespace) -> Config:
    cfg = config_module.load(args.config)
    logs.setup(cfg.logging.level, cfg.logging.format)
    return cfg


def _serve(args: argparse.Namespace) -> int:
    from throttled.daemon import StartupError, serve

    cfg = _load(args)
    try:
        asyncio.run(_with_signals(lambda stop: serve(cfg, stop=stop)))
    except StartupError as exc:
        raise _Fatal(str(exc)) from None
    return 0


async def _with_signals(run: object) -> None:
    """Run `run(stop)`; SIGTERM/SIGINT only set the stop event; old handlers restored after."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await run(stop)  # type: ignore[operator]
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _migrate(args: argparse.Namespace) -> int:
    from throttled.daemon import database_url
    from throttled.db import migrate

    cfg = _load(args)

    async def run() -> None:
        async with database_url(cfg) as url:
            if args.status:
                for item in await asyncio.to_thread(migrate.status, url):
                    print(f"{'applied' if item.applied else 'pending'}  {item.id}")
                return
            applied = await asyncio.to_thread(migrate.apply, url)
            print(
                f"applied {len(applied)} migration(s)"
                + (f": {', '.join(applied)}" if applied else "")
            )

    asyncio.run(run())
    return 0


def _check_config(args: argparse.Namespace) -> int:
    cfg = config_module.load(args.config)
    print(f"# effective configuration from {cfg.source} (+ environment), secrets masked")
    print(json.dumps(config_module.masked(cfg), indent=2, sort_keys=False))
    print("config OK", file=sys.stderr)
    return 0


def _sign(args: argparse.Namespace) -> int:
    from throttled.hubspot.signature import sign_headers

    body = sys.stdin.buffer.read() if args.body == "-" else Path(args.body).read_bytes()
    version = "v3" if args.v3 else "v2"
    headers = sign_headers(args.secret, args.method.upper(), args.url, body, version=version)
    if not args.curl:
        for name, value in headers.items():
            print(f"{name}: {value}")
        return 0
    parts = ["curl", "-sS", "-X", args.method.upper(), "-H", "'Content-Type: application/json'"]
    parts += [f"-H '{name}: {value}'" for name, value in headers.items()]
    parts += [f"--data-binary @{args.body}", f"'{args.url}'"]
    print(" ".join(parts))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from throttled.demo import run_demo

    cfg = _load(args)
    return int(asyncio.run(run_demo(cfg, per_queue=args.per_queue)))


def _portals_connect(args: argparse.Namespace) -> int:
    from throttled.daemon import StartupError, database_url, keyring_for
    from throttled.db.repository import Repository
    from throttled.tokens import _aad

    cfg = _load(args)
    token = args.refresh_token or sys.stdin.readline().strip()
    if not token:
        raise _Fatal("no refresh token given (--refresh-token or stdin)")
    if args.portal_id <= 0:
        raise _Fatal("--portal-id must be a positive integer")
    try:
        keyring = keyring_for(cfg)
    except StartupError as exc:
        raise _Fatal(str(exc)) from None

    async def run() -> None:
        async with database_url(cfg) as url, Repository.open(url, min_size=1, max_size=1) as repo:
            encrypted = keyring.encrypt(token, aad=_aad(args.portal_id, "refresh"))
            await repo.set_refresh_token(args.portal_id, encrypted)

    asyncio.run(run())
    print(f"portal {args.portal_id} connected (refresh token stored encrypted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
