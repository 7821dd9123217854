"""server.event_loop: asyncio's own loop (the default) or uvloop, validated, and what `throttled
serve` really runs on."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import config_mapping
from tests.daemon_process import DaemonProcess, write_config
from throttled import config as config_module
from throttled.config import ConfigError
from throttled.hubspot.fake import FakeHubSpot

IMPLEMENTATIONS = {"uvloop": "uvloop.Loop", "asyncio": "asyncio.unix_events._UnixSelectorEventLoop"}


def _validated(raw: dict, environ: dict[str, str] | None = None) -> config_module.Config:
    cfg = config_module.from_mapping(config_module._apply_env(raw, environ or {}))
    config_module.validate(cfg)
    return cfg


def test_the_event_loop_is_asyncio_unless_set_to_uvloop():
    raw = config_mapping("postgresql://u@h/db", "http://127.0.0.1:1")
    assert _validated(raw).server.event_loop == "asyncio"
    raw["server"]["event_loop"] = "uvloop"
    assert _validated(raw).server.event_loop == "uvloop"
    env = {"THROTTLED_SERVER_EVENT_LOOP": "asyncio"}
    assert _validated(raw, env).server.event_loop == "asyncio"


@pytest.mark.parametrize("value", ["trio", "UVLOOP", "", "asyncio "])
def test_an_unknown_event_loop_is_refused_by_name(value):
    raw = config_mapping("postgresql://u@h/db", "http://127.0.0.1:1")
    raw["server"]["event_loop"] = value
    with pytest.raises(ConfigError, match=r"^server\.event_loop: must be uvloop or asyncio$"):
        _validated(raw)


def test_an_event_loop_that_is_not_text_is_refused_by_name():
    raw = config_mapping("postgresql://u@h/db", "http://127.0.0.1:1")
    raw["server"]["event_loop"] = 1
    with pytest.raises(ConfigError, match=r"^server\.event_loop: "):
        _validated(raw)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_serve_runs_on_the_configured_event_loop(
    loop: str, tmp_path: Path, db_url: str, fake_hubspot: FakeHubSpot
):
    assert fake_hubspot.base_url is not None
    config_path, public_url = write_config(
        tmp_path / "throttled.toml",
        db_url=db_url,
        api_base_url=fake_hubspot.base_url,
        server={"event_loop": loop, "shutdown_timeout_s": 5.0},
        logging={"level": "debug"},  # (the loop is named at debug)
    )
    daemon = DaemonProcess(config_path, public_url, tmp_path / "serve.log")
    try:
        await daemon.start()
        daemon.send_signal(signal.SIGTERM)
        assert await daemon.wait(30) == 0
    finally:
        await daemon.kill()
    [event] = [e for e in daemon.events() if e.get("event") == "event_loop"]
    assert (event["loop"], event["implementation"]) == (loop, IMPLEMENTATIONS[loop])
