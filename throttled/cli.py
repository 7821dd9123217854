"""The `throttled` command: serve, migrate, check-config, sign, demo, portals, keys, cluster."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import structlog

from throttled import config as config_module
from throttled import logs
from throttled.config import Config, ConfigError, brief

MAX_PORTAL_ID = 2**63 - 1
MAX_BODY_BYTES = 16 << 20
_DIGITS = re.compile(r"[0-9]{1,30}")

log = structlog.get_logger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script: any error is one line on stderr and exit 2."""
    for stream in (sys.stdout, sys.stderr):  # stored text a terminal cannot show is escaped
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `throttled portals list | head -1`: the reader has gone
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # every command ends here: one line, never a traceback
        _report(args, exc)
        return 2


class _Fatal(Exception):
    """An error to print and exit 2."""


def _report(args: argparse.Namespace, exc: Exception) -> None:
    """Print the error as one line; an unexpected one's traceback goes to the log."""
    leaf = _leaf(exc)
    try:
        message = _known_message(leaf)
    except Exception:  # a broken installation: the error types cannot even be imported
        message = None
    if message is None:
        if getattr(args, "logging_ready", False) and logs.json_lines:  # one JSON line
            log.error("command_failed", command=args.command, exc_info=leaf)
        elif getattr(args, "logging_ready", False):  # on a terminal, the traceback at debug
            log.error("command_failed", command=args.command, error=type(leaf).__name__)
            log.debug("command_failed_traceback", exc_info=leaf)
        message = f"internal error: {type(leaf).__name__}: {leaf}"
    print(f"throttled: {' '.join(message.split())}", file=sys.stderr)


def _leaf(exc: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups, e.g. from a TaskGroup."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _known_message(exc: BaseException) -> str | None:
    """The operator's message for the project's own errors; None for an unexpected one."""
    from throttled.crypto import CryptoError
    from throttled.daemon import StartupError
    from throttled.db.migrate import MigrationError
    from throttled.db.repository import DatabaseError, DatabaseUnavailable

    if isinstance(exc, DatabaseUnavailable):
        return f"database unavailable: {exc}"
    if isinstance(exc, DatabaseError):
        return f"database error: {exc}"
    if isinstance(exc, ConfigError | _Fatal | StartupError | MigrationError | CryptoError):
        return str(exc)
    if isinstance(exc, OSError):  # e.g. the listen address is in use
        return str(exc)
    return None


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit 2)."""

    def error(self, message: str) -> NoReturn:
        """Print one line and exit 2. Stray arguments are counted, not shown: one may be a
        token typed in the wrong place."""
        if message.startswith("unrecognized arguments:"):
            count = len(message.split(":", 1)[1].split())
            message = f"{count} unrecognized argument(s) (not shown)"
        self.exit(2, f"throttled: {message} (see: {self.prog} --help)\n")


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an integer lo..hi."""

    def parse(text: str) -> int:
        value = int(text) if _DIGITS.fullmatch(text) else lo - 1  # (int() takes '١٢', '1_0')
        if not lo <= value <= hi:
            # (a long value is not echoed: it may be a token typed in the wrong place)
            shown = brief(text) if len(text) <= 24 else f"{len(text)} characters"
            raise argparse.ArgumentTypeError(f"must be an integer {lo}..{hi}, got {shown}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="throttled", description=__doc__)
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
    demo.add_argument(
        "--per-queue", type=_int_in(1, 10_000), default=30, help="actions per queue (1..10000)"
    )
    # (these modules import this one's helpers: imported here, once it is loaded)
    from throttled import cli_cluster, cli_definition, cli_import, cli_ops, cli_portals

    for module in (cli_portals, cli_import, cli_definition, cli_ops, cli_cluster):
        module.add_commands(sub)
    return parser


def cli_actor() -> str:
    """The audit log's actor for a change made through this command: cli:<unix user>."""
    try:
        import pwd

        name = pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError, OSError):
        name = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"cli:{name[:64]}"


def _config(args: argparse.Namespace) -> Config:
    """The validated config named by --config (an empty path is an error, not the default)."""
    if args.config == "":
        raise _Fatal("--config: empty path")
    return config_module.load(args.config)


def _load(args: argparse.Namespace) -> Config:
    cfg = _config(args)
    logs.setup(cfg.logging.level, cfg.logging.format)
    args.logging_ready = True
    return cfg


def _serve(args: argparse.Namespace) -> int:
    from throttled.daemon import serve

    cfg = _load(args)

    async def run(stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        kind = f"{type(loop).__module__}.{type(loop).__qualname__}"
        log.debug("event_loop", loop=cfg.server.event_loop, implementation=kind)
        await serve(cfg, stop=stop)

    with asyncio.Runner(loop_factory=_loop_factory(cfg.server.event_loop)) as runner:
        runner.run(_with_signals(run))
    return 0


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """server.event_loop: uvloop's loop, or None for asyncio's own."""
    if name != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        raise ConfigError(
            'server.event_loop: "uvloop" cannot be imported here (pip install uvloop), '
            'or set it to "asyncio"'
        ) from None
    return uvloop.new_event_loop


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
    timeout = cfg.database.connect_timeout_s

    async def run() -> None:
        async with database_url(cfg) as url:
            if args.status:
                items = await asyncio.to_thread(migrate.status, url, connect_timeout_s=timeout)
                for item in items:
                    print(f"{'applied' if item.applied else 'pending'}  {item.id}")
                return
            applied = await asyncio.to_thread(migrate.apply, url, connect_timeout_s=timeout)
            print(
                f"applied {len(applied)} migration(s)"
                + (f": {', '.join(applied)}" if applied else "")
            )

    asyncio.run(run())
    return 0


def _check_config(args: argparse.Namespace) -> int:
    cfg = _config(args)
    print(f"# effective configuration from {cfg.source} (+ environment), secrets masked")
    print(json.dumps(config_module.masked(cfg), indent=2, sort_keys=False))
    print("config OK", file=sys.stderr)
    return 0


def _sign(args: argparse.Namespace) -> int:
    from throttled.hubspot.signature import sign_headers

    for flag, value in (("--secret", args.secret), ("--url", args.url), ("--method", args.method)):
        _check_arg(flag, value)
    body = _read_body(args.body)
    version = "v3" if args.v3 else "v2"
    headers = sign_headers(args.secret, args.method.upper(), args.url, body, version=version)
    if not args.curl:
        for name, value in headers.items():
            print(f"{name}: {value}")
        return 0
    parts = ["curl", "-sS", "-X", args.method.upper(), "-H", "Content-Type: application/json"]
    for name, value in headers.items():
        parts += ["-H", f"{name}: {value}"]
    parts += ["--data-binary", f"@{args.body}", args.url]
    print(" ".join(shlex.quote(part) for part in parts))
    return 0


def _check_arg(flag: str, value: str) -> None:
    """A text argument must be non-empty, printable UTF-8."""
    if not value:
        raise _Fatal(f"{flag}: must not be empty")
    if not value.isprintable():
        raise _Fatal(f"{flag}: must be printable UTF-8 text")


def _read_body(name: str) -> bytes:
    """The request body from a file, or from stdin for "-" (at most 16 MiB)."""
    if not name:
        raise _Fatal("--body: empty path")
    try:
        if name == "-":
            data = sys.stdin.buffer.read(MAX_BODY_BYTES + 1)
        else:
            with open(name, "rb") as file:
                data = file.read(MAX_BODY_BYTES + 1)
    except OSError as exc:
        raise _Fatal(f"--body: cannot read {name}: {exc.strerror or exc}") from None
    if len(data) > MAX_BODY_BYTES:
        raise _Fatal(f"--body: {name} is larger than {MAX_BODY_BYTES} bytes")
    return data


def _demo(args: argparse.Namespace) -> int:
    from throttled.demo import run_demo

    cfg = _load(args)
    return int(asyncio.run(run_demo(cfg, per_queue=args.per_queue)))


if __name__ == "__main__":
    sys.exit(main())
