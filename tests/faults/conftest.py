"""The fault suite: throttled run as a real process (or in-process where a test needs its
internals), broken on purpose, and what came out of it counted.

Each test runs a short version by default (the one `make test` and CI run) and the full one
with `make faults` (THROTTLED_FAULTS=full): the same code, more tries. Every test records its
figures (what was tried, how many times, what was lost); they are printed at the end of the
run and, with THROTTLED_FAULTS_REPORT=path, written there as JSON (docs/reliability.md quotes
them).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import random
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_process import DaemonProcess, write_config
from throttled.hubspot.fake import FakeHubSpot

FULL = os.environ.get("THROTTLED_FAULTS", "") == "full"
SEED = int(os.environ.get("THROTTLED_FAULTS_SEED", "0")) or random.SystemRandom().randrange(
    1, 10**6
)

_FIGURES: list[dict[str, Any]] = []


def tries(short: int, full: int) -> int:
    """How many times to try a fault: `full` in the full run, else `short`."""
    return full if FULL else short


def scale(short: float, full: float) -> float:
    """A duration or size: `full` in the full run, else `short`."""
    return full if FULL else short


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """The random moments of one test, reproducible from THROTTLED_FAULTS_SEED."""
    return random.Random(f"{SEED}:{request.node.name}")


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A dict the test fills with its figures; kept for the report when the test ends."""
    figures: dict[str, Any] = {}
    yield figures
    if figures:
        _FIGURES.append({"test": request.node.name, "full": FULL, "seed": SEED, **figures})


SEND_MARGIN_MS = 50.0  # (the fake stamps a request on the test's loop, a little late)

Daemons = Callable[..., DaemonProcess]


@pytest.fixture
async def daemons(tmp_path: Path, db_url: str, fake_hubspot: FakeHubSpot) -> AsyncIterator[Daemons]:
    """Make `throttled serve` children on one config (same database, same key), each with its
    own log; every one still running at the end is killed. `daemons(api_base_url=...,
    db_url_=...)` points a child elsewhere (through a fault proxy, say); other keywords are
    config sections, merged into the defaults."""
    made: list[DaemonProcess] = []
    runs = itertools.count(1)
    key = base64.b64encode(secrets.token_bytes(32)).decode()  # (one for all: same database)

    def make(
        *,
        api_base_url: str | None = None,
        db_url_: str | None = None,
        **sections: dict[str, Any],
    ) -> DaemonProcess:
        n = next(runs)
        base = api_base_url or fake_hubspot.base_url
        assert base is not None
        config_path, public_url = write_config(
            tmp_path / f"throttled-{n}.toml",
            db_url=db_url_ or db_url,
            api_base_url=base,
            **{
                **sections,
                "server": {"shutdown_timeout_s": 15.0, **sections.get("server", {})},
                "security": {"encryption_key": key},
                "sender": {"send_margin_ms": SEND_MARGIN_MS, **sections.get("sender", {})},
            },
        )
        proc = DaemonProcess(config_path, public_url, tmp_path / f"serve-{n}.log")
        made.append(proc)
        return proc

    try:
        yield make
    finally:
        for proc in made:
            await proc.kill()


async def connect(daemon: DaemonProcess, fake: FakeHubSpot, portal_id: int) -> None:
    """Connect a portal the fake knows, through the daemon's CLI."""
    token = f"refresh-{portal_id}-{secrets.token_hex(4)}"
    fake.register_portal(portal_id, token)
    await daemon.connect_portal(portal_id, token)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section(f"fault suite figures ({'full' if FULL else 'short'}, seed {SEED})")
    for figures in _FIGURES:
        shown = ", ".join(f"{k}={v}" for k, v in figures.items() if k not in ("full", "seed"))
        terminalreporter.write_line(shown)
    path = os.environ.get("THROTTLED_FAULTS_REPORT")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(_FIGURES, indent=2) + "\n", encoding="utf-8")
        terminalreporter.write_line(f"written to {path}")
