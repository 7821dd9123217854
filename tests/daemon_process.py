"""`throttled serve` as a real child process, and a signed-action load generator.

The child talks to a fake HubSpot that runs in the test's event loop, so everything here is
asynchronous: nothing may block the loop while the child is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from tests.conftest import CLIENT_SECRET, config_mapping

THROTTLED = str(Path(sys.executable).with_name("throttled"))
ACTION_PATH = "/api/hubspot/action"

# Variables that would override the config file in the child (throttled.config.LEGACY_ENV).
_OVERRIDING_ENV = {
    "DATABASE_URL",
    "ENCRYPTION_KEY",
    "HUBSPOT_CLIENT_ID",
    "HUBSPOT_CLIENT_SECRET",
    "HUBSPOT_REDIRECT_URI",
    "BASE_URL",
    "PORT",
}


def free_port() -> int:
    """A TCP port that was free a moment ago on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(
    path: Path, *, db_url: str, api_base_url: str, **sections: dict[str, Any]
) -> tuple[Path, str]:
    """Write a daemon config on a free port; return (path, public URL)."""
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    sections = {
        **sections,
        "logging": {"level": "info", "format": "json", **sections.get("logging", {})},
    }
    raw = config_mapping(db_url, api_base_url, **sections)
    raw["server"].update(port=port, public_url=public_url)
    lines: list[str] = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path, public_url


def child_env() -> dict[str, str]:
    """This environment without variables that would override the child's config file."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in _OVERRIDING_ENV
        and not (k.startswith("THROTTLED_") and not k.startswith("THROTTLED_TEST_"))
    }


class DaemonProcess:
    """One `throttled serve --config ...` child; its stderr (JSON log lines) goes to a file."""

    def __init__(self, config_path: Path, public_url: str, log_path: Path) -> None:
        self.config_path = config_path
        self.url = public_url
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def cli(self, *args: str, timeout: float = 60.0) -> str:
        """Run another `throttled` subcommand with this config; return its stdout."""
        proc = await asyncio.create_subprocess_exec(
            THROTTLED,
            *args,
            "--config",
            str(self.config_path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=child_env(),
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        if proc.returncode != 0:
            raise AssertionError(
                f"throttled {' '.join(args)} exited {proc.returncode}: {err.decode()[-2000:]}"
            )
        return out.decode()

    async def connect_portal(self, portal_id: int, refresh_token: str) -> None:
        """`throttled portals connect` (the fake must know the token)."""
        await self.cli(
            "portals", "connect", "--portal-id", str(portal_id), "--refresh-token", refresh_token
        )

    async def start(self, timeout: float = 60.0) -> None:
        """Spawn `throttled serve` and wait until /readyz answers 200."""
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                THROTTLED,
                "serve",
                "--config",
                str(self.config_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=child_env(),
            )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(
                        f"throttled serve exited {self.proc.returncode} during start-up:\n"
                        + self.log_tail()
                    )
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    async with session.get(
                        self.url + "/readyz", timeout=aiohttp.ClientTimeout(total=2)
                    ) as resp:
                        if resp.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise AssertionError("throttled serve not ready in time:\n" + self.log_tail())
                await asyncio.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def send_signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        """The exit code; AssertionError if the process has not exited within `timeout`."""
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"throttled serve still running after {timeout}s:\n" + self.log_tail()
            ) from None

    async def kill(self) -> None:
        """SIGKILL if still running (test teardown)."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            await self.proc.wait()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (other lines skipped)."""
        out: list[dict[str, Any]] = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    out.append(doc)
        return out


@contextlib.asynccontextmanager
async def started_daemon(
    tmp_path: Path, *, db_url: str, api_base_url: str, **sections: dict[str, Any]
) -> AsyncIterator[DaemonProcess]:
    """A daemon child process on its own config, started, and killed on exit."""
    config_path, public_url = write_config(
        tmp_path / "throttled.toml", db_url=db_url, api_base_url=api_base_url, **sections
    )
    proc = DaemonProcess(config_path, public_url, tmp_path / "serve.log")
    try:
        await proc.start()
        yield proc
    finally:
        await proc.kill()


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """One signed POST as the client saw it."""

    callback_id: str
    started: float  # time.time() just before the request was sent
    finished: float  # time.time() once the answer (or the failure) was in
    status: int | None  # None: connection error / no answer
    retry_after: str | None
    body: Any
    error: str | None


async def post_signed(
    session: aiohttp.ClientSession, public_url: str, payload: dict[str, Any]
) -> Outcome:
    """POST one signed action; connection-level failures become an Outcome with status None."""
    from throttled.hubspot.signature import sign_headers

    url = public_url + ACTION_PATH
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    headers.update(sign_headers(CLIENT_SECRET, "POST", url, body))
    started = time.time()
    try:
        async with session.post(
            url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=60)
        ) as resp:
            text = await resp.text()
            try:
                doc: Any = json.loads(text)
            except ValueError:
                doc = text
            return Outcome(
                callback_id=payload["callbackId"],
                started=started,
                finished=time.time(),
                status=resp.status,
                retry_after=resp.headers.get("Retry-After"),
                body=doc,
                error=None,
            )
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return Outcome(
            callback_id=payload["callbackId"],
            started=started,
            finished=time.time(),
            status=None,
            retry_after=None,
            body=None,
            error=f"{type(exc).__name__}: {exc}",
        )


async def _fire(
    public_url: str,
    make_payload: Callable[[], dict[str, Any]],
    until: threading.Event,
    concurrency: int,
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not until.is_set():
                outcome = await post_signed(session, public_url, make_payload())
                outcomes.append(outcome)
                if outcome.status is None:
                    await asyncio.sleep(0.01)  # listener closed: do not spin

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


async def fire(
    public_url: str,
    make_payload: Callable[[], dict[str, Any]],
    until: threading.Event,
    *,
    concurrency: int = 20,
) -> list[Outcome]:
    """`concurrency` workers POST signed actions back to back until `until` is set.

    They run on their own event loop in a thread, so the load does not delay the fake
    HubSpot serving (and timestamping) the daemon's completions on the test's loop.
    """
    return await asyncio.to_thread(asyncio.run, _fire(public_url, make_payload, until, concurrency))


def _rows(db_url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return list(conn.execute(sql, params).fetchall())


async def query(db_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run a query in a thread (the fake HubSpot shares this event loop)."""
    return await asyncio.to_thread(_rows, db_url, sql, params)


async def stored_callback_ids(db_url: str, callback_ids: list[str]) -> set[str]:
    """The subset of `callback_ids` that have a row in `actions`."""
    rows = await query(
        db_url, "SELECT callback_id FROM actions WHERE callback_id = ANY(%s)", callback_ids
    )
    return {r[0] for r in rows}
