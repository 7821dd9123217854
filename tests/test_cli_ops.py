"""The operator's commands (`config`, `queues`, `actions show`, `audit`) and the audit
entries of `portals connect/disconnect` and `keys rotate`, run in this process through
`throttled.cli.main` against a real PostgreSQL; one change also reaches a running daemon."""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb
from rich.console import Console

from tests.conftest import action_payload, config_mapping, wait_for
from throttled import cli, cli_watch, logs
from throttled import config as config_module
from throttled.cli import cli_actor
from throttled.cli_watch import Progress, render, watch
from throttled.rates import RatePolicy

PORTAL = 62515
ACTION = 9


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


class Cli:
    """`throttled ...` in this process with a written config file; (exit, stdout, stderr)."""

    def __init__(self, tmp_path: Path, db_url: str, capsys: Any) -> None:
        self.db_url = db_url
        self.capsys = capsys
        self.path = tmp_path / "throttled.toml"
        self.write()

    def write(self, **sections: dict[str, Any]) -> None:
        raw = config_mapping(self.db_url, "http://127.0.0.1:9", **sections)
        raw["database"]["connect_timeout_s"] = 2.0
        self.key = raw["security"]["encryption_key"]
        self.path.write_text(
            "".join(
                f"[{section}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
                for section, values in raw.items()
            )
        )

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        code = cli.main([*argv, "--config", str(self.path)])
        out, err = self.capsys.readouterr()
        return code, out, err

    async def off_loop(self, *argv: str) -> tuple[int, str, str]:
        """The CLI runs its own event loop: off this one (a daemon runs on it)."""
        code = await asyncio.to_thread(cli.main, [*argv, "--config", str(self.path)])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *argv: str) -> Any:
        code, out, err = self(*argv, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def run(tmp_path, db_url, capsys, monkeypatch) -> Cli:
    """No configuration from the environment; logging left as the tests set it."""
    for name in list(os.environ):
        if name.startswith("THROTTLED_") and not name.startswith("THROTTLED_TEST_"):
            monkeypatch.delenv(name)
    for name in (*config_module.LEGACY_ENV, "FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(logs, "setup", lambda *args, **kwargs: None)
    return Cli(tmp_path, db_url, capsys)


def one_error_line(result: tuple[int, str, str]) -> str:
    code, out, err = result
    assert code == 2, out + err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("throttled: ")
    return lines[0]


_n = iter(range(1, 10**6))


def add_queue(
    db_url: str,
    *,
    portal: int = PORTAL,
    pending: int = 0,
    failed: int = 0,
    failed_expired_block: int = 0,
    expired: int = 0,
    done: int = 0,
    limit: int = 10,
    period_s: float = 60,
    paused: bool = False,
) -> tuple[int, str]:
    """A queue with actions in these states, as intake and the senders leave them."""
    key = f"queue:{portal}:1:{ACTION}:{next(_n)}"
    policy = RatePolicy(limit=limit, period_s=period_s).to_json()
    with psycopg.connect(db_url) as conn:
        (queue_id,) = conn.execute(
            "INSERT INTO queues (key, portal_id, policy, action_id, inputs, paused_at) "
            "VALUES (%s, %s, %s, %s, '{}', CASE WHEN %s THEN now() END) RETURNING id",
            (key, portal, Jsonb(policy), ACTION, paused),
        ).fetchone()
        rows = [
            *[("pending", "1 day")] * pending,
            *[("failed", "1 day")] * failed,
            *[("failed", "-1 hour")] * failed_expired_block,
            *[("expired", "-1 hour")] * expired,
            *[("done", "1 day")] * done,
        ]
        for state, until in rows:
            conn.execute(
                "INSERT INTO actions (callback_id, queue_id, portal_id, state, deadline, "
                "last_error) VALUES (%s, %s, %s, %s, now() + %s::interval, %s)",
                (
                    f"cb-{queue_id}-{secrets.token_hex(6)}",
                    queue_id,
                    portal,
                    state,
                    until,
                    "HTTP 500 from HubSpot" if state == "failed" else None,
                ),
            )
    return queue_id, key


def audit_rows(db_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT actor, action, target, before, after FROM audit_log ORDER BY id"
        ).fetchall()


def queue_row(db_url: str, queue_id: int) -> tuple[Any, ...]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT paused_at IS NOT NULL, override, releasing FROM queues WHERE id = %s",
            (queue_id,),
        ).fetchone()


def action_states(db_url: str, queue_id: int) -> dict[tuple[str, Any], int]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT state, complete_as, count(*) FROM actions WHERE queue_id = %s "
            "GROUP BY state, complete_as",
            (queue_id,),
        ).fetchall()
    return {(s, c): n for s, c, n in rows}


# --- help ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["config"],
        ["config", "set"],
        ["config", "get"],
        ["config", "list"],
        ["config", "delete"],
        ["queues"],
        ["queues", "list"],
        *[
            ["queues", op]
            for op in (
                "show",
                "pause",
                "resume",
                "set-rate",
                "clear-rate",
                "retry-failed",
                "fail-pending",
            )
        ],
        ["actions", "show"],
        ["audit"],
    ],
)
def test_every_command_has_help_with_an_example(capsys, argv):
    assert cli.main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert "example:" in out
    assert f"throttled {' '.join(argv)}" in out


# --- config ----------------------------------------------------------------------------------


def test_config_set_get_list_delete_round_trip_with_audit(run):
    code, out, err = run(
        "config", "set", str(PORTAL), "77", "--max-throughput", "10", "--time-unit", "minutes"
    )
    assert code == 0, err
    assert out.startswith(f"portal {PORTAL}, action 77 set: 10 per 1 minute, window")
    stored = {
        "portal_id": PORTAL,
        "action_id": 77,
        "max_throughput": 10,
        "time_period": 1,
        "time_unit": "minutes",
    }
    assert run.json("config", "get", str(PORTAL), "77") == stored
    body = run.json(
        "config",
        "set",
        str(PORTAL),
        "78",
        "--max-throughput",
        "100",
        "--time-unit",
        "hours",
        "--pacing",
        "even",
        "--release-days",
        "mon-fri",
        "--release-hours",
        "09:00-17:00",
        "--timezone",
        "Europe/Oslo",
    )
    assert body["pacing"] == "even"
    assert body["release_days"] == "mon-fri"
    listed = run.json("config", "list")
    assert [(c["portal_id"], c["action_id"]) for c in listed["configs"]] == [
        (PORTAL, 77),
        (PORTAL, 78),
    ]
    assert listed["configs"][0] == stored
    code, out, _ = run("config", "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["PORTAL", "ACTION", "RATE"]
    assert "10 per 1 minute" in rows[0]
    assert "Europe/Oslo" in rows[1]

    code, out, err = run("config", "delete", str(PORTAL), "77")
    assert code == 0, err
    assert "deleted" in out
    line = one_error_line(run("config", "get", str(PORTAL), "77"))
    assert line == f"throttled: no config for portal {PORTAL}, action 77"
    assert "no config" in one_error_line(run("config", "delete", str(PORTAL), "77"))

    audit = audit_rows(run.db_url)
    assert [(a[0], a[1], a[2]) for a in audit] == [
        (cli_actor(), "config.set", f"config:{PORTAL}:77"),
        (cli_actor(), "config.set", f"config:{PORTAL}:78"),
        (cli_actor(), "config.delete", f"config:{PORTAL}:77"),
    ]
    assert cli_actor().startswith("cli:")
    assert audit[2][3] == {k: v for k, v in stored.items() if k not in ("portal_id", "action_id")}


def test_config_set_names_each_bad_field_in_one_line(run):
    line = one_error_line(run("config", "set", "1", "2", "--max-throughput", "0"))
    assert line.startswith("throttled: --max-throughput: ")
    line = one_error_line(
        run("config", "set", "1", "2", "--max-throughput", "5", "--time-unit", "weeks")
    )
    assert "--time-unit" in line
    assert "--max-throughput" not in line
    line = one_error_line(
        run("config", "set", "1", "2", "--max-throughput", "x", "--timezone", "Mars/Olympus")
    )
    assert "--max-throughput" in line
    assert "--timezone" in line
    assert "must be an integer" in one_error_line(run("config", "get", "0", "2"))
    assert "required" in one_error_line(run("config", "set", "1", "2"))
    assert audit_rows(run.db_url) == []  # nothing was stored
    assert run.json("config", "list") == {"configs": []}


def test_config_list_empty_and_the_database_down(run):
    code, out, _ = run("config", "list")
    assert code == 0
    assert out.startswith("no configs")
    run.db_url = "postgresql://postgres@127.0.0.1:1/nowhere"
    run.write()
    for argv in (["config", "list"], ["queues"], ["queues", "pause", "1"], ["audit"]):
        line = one_error_line(run(*argv))
        assert "127.0.0.1:1" in line or "unavailable" in line or "connect" in line, line


# --- queues: the listing ---------------------------------------------------------------------


def _three_queues(db_url: str) -> dict[str, int]:
    big, _ = add_queue(db_url, pending=30, limit=10, period_s=60)
    unfinished, _ = add_queue(db_url, pending=2, failed=2, expired=1, done=4, limit=5, period_s=1)
    other, _ = add_queue(db_url, portal=777, done=1)
    paused, _ = add_queue(db_url, pending=3, paused=True)
    return {"big": big, "unfinished": unfinished, "other": other, "paused": paused}


def test_queues_list_json_has_the_api_shape_and_filters(run):
    ids = _three_queues(run.db_url)
    listed = run.json("queues")["queues"]
    assert [q["id"] for q in listed] == [ids["big"], ids["paused"], ids["unfinished"], ids["other"]]
    assert [q["id"] for q in run.json("queues", "list")["queues"]] == [q["id"] for q in listed]
    by_id = {q["id"]: q for q in listed}
    big = by_id[ids["big"]]
    assert (big["state"], big["backlog"], big["portal_id"]) == ("draining", 30, PORTAL)
    assert big["rate"]["max_throughput"] == 10
    assert big["rate"]["time_unit"] == "minutes"
    assert big["next_send_at"] is not None
    assert big["drains_at"] is not None
    assert big["rate_sources"]["rate"] == "defaults"  # (no override, inputs nor config)
    unfinished = by_id[ids["unfinished"]]
    assert (unfinished["failed"], unfinished["expired"], unfinished["backlog"]) == (2, 1, 2)
    assert by_id[ids["other"]]["state"] == "idle"
    paused = by_id[ids["paused"]]
    assert paused["state"] == "paused"
    assert paused["paused"] is True
    assert paused["at_risk"] is True  # (a paused queue never drains)
    expected_keys = {
        "id", "key", "portal_id", "action_id", "state", "paused", "paused_at", "backlog",
        "released", "oldest_pending_age_s", "rate", "held", "rate_sources", "override",
        "next_send_at", "drains_at", "oldest_deadline", "latest_deadline",
        "beats_oldest_deadline", "at_risk", "failed", "expired", "created_at", "updated_at",
    }  # fmt: skip
    assert set(big) == expected_keys

    def ids_of(*argv: str) -> list[int]:
        return [q["id"] for q in run.json("queues", *argv)["queues"]]

    assert ids_of("--portal", "777") == [ids["other"]]
    assert ids_of("--state", "paused") == [ids["paused"]]
    assert ids_of("--at-risk") == [ids["paused"]]
    assert ids_of("--sort", "id") == sorted(ids.values())
    assert ids_of("--sort", "urgency")[0] == ids["paused"]
    assert ids_of("--limit", "2") == [ids["big"], ids["paused"]]
    assert ids_of("list", "--portal", "999") == []


def test_queues_table_is_aligned_with_every_column(run):
    ids = _three_queues(run.db_url)
    code, out, err = run("queues")
    assert code == 0, err
    header, *lines = out.splitlines()
    for name in ("ID", "KEY", "PORTAL", "STATE", "BACKLOG", "RATE", "NEXT SEND", "DRAIN ETA"):
        assert name in header
    assert header.rstrip().endswith("FAILED  EXPIRED")
    rows = {int(line.split()[0]): line for line in lines}
    assert list(rows) == [ids["big"], ids["paused"], ids["unfinished"], ids["other"]]
    state_at = header.index("STATE")
    assert rows[ids["big"]][state_at:].startswith("draining ")
    assert rows[ids["paused"]][state_at:].startswith("paused ")
    backlog_end = header.index("BACKLOG") + len("BACKLOG")
    assert rows[ids["big"]][backlog_end - 2 : backlog_end] == "30"  # right-aligned
    assert "10/1m" in rows[ids["big"]]
    assert "5/1s" in rows[ids["unfinished"]]
    assert "AT RISK" in rows[ids["paused"]]
    assert rows[ids["unfinished"]].split()[-2:] == ["2", "1"]
    code, out, _ = run("queues", "--state", "held")
    assert (code, out) == (0, "no queues match\n")


# --- queues: operations ----------------------------------------------------------------------


def test_queue_operations_change_the_database_and_write_audit_entries(run):
    queue_id, key = add_queue(
        run.db_url, pending=4, failed=2, failed_expired_block=1, limit=10, period_s=60
    )
    qid = str(queue_id)

    code, out, err = run("queues", "pause", qid)
    assert code == 0, err
    assert out.startswith(f"queue {queue_id} ({key}) paused")
    assert queue_row(run.db_url, queue_id)[0] is True
    body = run.json("queues", "resume", key)  # (by key)
    assert body["queue"]["paused"] is False
    assert body["queue"]["state"] == "draining"
    assert queue_row(run.db_url, queue_id)[0] is False

    body = run.json("queues", "set-rate", qid, "--max-throughput", "5")
    override = {"max_throughput": 5, "time_period": 1, "time_unit": "minutes"}
    assert body["queue"]["override"] == override
    assert body["queue"]["rate_sources"]["rate"] == "override"
    assert queue_row(run.db_url, queue_id)[1] == override
    line = one_error_line(run("queues", "set-rate", qid, "--pacing", "sometimes"))
    assert line.startswith("throttled: --pacing: ")
    assert "at least one" in one_error_line(run("queues", "set-rate", qid))
    code, out, err = run("queues", "clear-rate", qid)
    assert code == 0, err
    assert "override cleared" in out
    assert queue_row(run.db_url, queue_id)[1] is None

    body = run.json("queues", "retry-failed", qid)
    assert (body["retried"], body["not_retried_block_expired"]) == (2, 1)
    assert action_states(run.db_url, queue_id) == {("pending", None): 6, ("failed", None): 1}

    line = one_error_line(run("queues", "fail-pending", qid))
    assert "6 pending action(s)" in line
    assert "--yes" in line
    assert action_states(run.db_url, queue_id)[("pending", None)] == 6  # untouched
    code, out, err = run("queues", "fail-pending", qid, "--yes")
    assert code == 0, err
    assert "6 pending action(s) released" in out
    assert action_states(run.db_url, queue_id)[("pending", "FAIL_CONTINUE")] == 6
    assert queue_row(run.db_url, queue_id)[2] is True  # releasing
    shown = run.json("queues", "show", qid)
    assert (shown["state"], shown["released"]) == ("releasing", 6)

    audit = audit_rows(run.db_url)
    assert [a[1] for a in audit] == [
        "queue.pause",
        "queue.resume",
        "queue.rate.set",
        "queue.rate.clear",
        "queue.retry_failed",
        "queue.fail_pending",
    ]
    assert {a[0] for a in audit} == {cli_actor()}
    assert {a[2] for a in audit} == {f"queue:{queue_id}"}
    assert audit[4][4] == {"retried": 2, "not_retried_expired": 1}


def test_queue_show_text_and_an_unknown_queue(run):
    queue_id, key = add_queue(run.db_url, pending=3)
    code, out, err = run("queues", "show", str(queue_id))
    assert code == 0, err
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines())}
    assert fields["queue"] == f"{queue_id} ({key})"
    assert fields["state"] == "draining"
    assert fields["backlog"].startswith("3 pending")
    assert fields["rate"].startswith("10 per 1 minute")
    for argv in (["show", "999"], ["pause", "999"], ["fail-pending", "999", "--yes"]):
        line = one_error_line(run("queues", *argv))
        assert line.startswith("throttled: no queue '999'")
    assert "no queue 'nonsense'" in one_error_line(run("queues", "resume", "nonsense"))
    assert audit_rows(run.db_url) == []


# --- the watch -------------------------------------------------------------------------------


def test_queues_watch_prints_each_refresh_as_plain_text(run):
    add_queue(run.db_url, pending=5)
    code, out, err = run("queues", "--watch", "--count", "3", "--interval", "0.2")
    assert code == 0, err
    assert [line for line in out.splitlines() if "refresh" in line] == [
        line for line in out.splitlines() if line.startswith("throttled queues at ")
    ]
    assert out.count("throttled queues at ") == 3
    for n in (1, 2, 3):
        assert f"refresh {n}/3" in out
    assert out.count("DRAIN ETA") == 3
    assert "\x1b[" not in out  # no terminal codes when not a terminal
    assert "--json" in one_error_line(run("queues", "--watch", "--json"))


def test_progress_counts_what_left_the_backlog_since_the_start():
    progress = Progress()
    view = {"id": 1, "backlog": 10, "state": "draining"}
    progress.update([view])
    assert progress.fraction(view) == 0.0
    progress.update([{**view, "backlog": 4}])
    assert progress.fraction({**view, "backlog": 4}) == 0.6
    progress.update([{**view, "backlog": 6}])  # (new arrivals)
    assert progress.fraction({**view, "backlog": 6}) == 0.5
    assert progress.fraction({"id": 2, "backlog": 0}) is None

    def row(v: dict[str, Any], now: float) -> list[str]:
        return [str(v["id"]), "[bold]not markup[/bold]"]

    table = render(
        [{**view, "backlog": 6}], headers=["ID", "X"], right={0}, row=row, progress=progress,
        title="t",
    )  # fmt: skip
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(table)
    text = console.export_text()
    assert "[bold]not markup[/bold]" in text
    assert "50%" in text


async def test_on_a_terminal_the_table_is_redrawn_in_place():
    views = [{"id": 7, "backlog": 4, "state": "draining"}]
    fetched = 0

    async def fetch() -> list[dict[str, Any]]:
        nonlocal fetched
        fetched += 1
        views[0] = {**views[0], "backlog": 4 - fetched}  # (one sent per refresh)
        return list(views)

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=150)
    await watch(
        fetch,
        headers=["ID", "KEY"],
        right={0},
        row=lambda v, now: [str(v["id"]), "queue:x"],
        interval=0.05,
        count=3,
        console=console,
    )
    assert fetched == 3
    text = out.getvalue()
    assert "\x1b[" in text  # drawn with terminal codes, the cursor moved back up
    assert "refresh 3/3" in text
    assert "67%" in text  # 2 sent of 3 since the watch started


def test_ctrl_c_ends_a_watch_with_exit_0(run, monkeypatch):
    add_queue(run.db_url, pending=1)
    calls = 0
    real = cli_watch.queue_views

    async def interrupted(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return await real(*args)

    monkeypatch.setattr(cli_watch, "queue_views", interrupted)
    code, out, err = run("queues", "--watch", "--interval", "0.1")
    assert (code, err) == (0, "")
    assert out.count("throttled queues at ") == 1


# --- actions and audit -----------------------------------------------------------------------


def test_actions_show(run):
    queue_id, key = add_queue(run.db_url, failed=1)
    with psycopg.connect(run.db_url) as conn:
        (callback_id,) = conn.execute(
            "SELECT callback_id FROM actions WHERE queue_id = %s", (queue_id,)
        ).fetchone()
    body = run.json("actions", "show", callback_id)
    assert body["callback_id"] == callback_id
    assert (body["state"], body["queue_id"], body["queue_key"]) == ("failed", queue_id, key)
    assert body["last_error"] == "HTTP 500 from HubSpot"
    assert body["deadline"].endswith("+00:00")
    code, out, err = run("actions", "show", callback_id)
    assert code == 0, err
    assert "last error:" in out
    assert "HTTP 500 from HubSpot" in out
    line = one_error_line(run("actions", "show", "no-such-callback"))
    assert line == "throttled: no action with callbackId 'no-such-callback'"
    assert "printable" in one_error_line(run("actions", "show", "x" * 300))


def test_audit_lists_newest_first_with_target_limit_and_paging(run):
    queue_id, _ = add_queue(run.db_url, pending=1)
    for op in ("pause", "resume", "pause"):
        assert run("queues", op, str(queue_id))[0] == 0
    assert run("config", "set", "1", "2", "--max-throughput", "3")[0] == 0
    doc = run.json("audit")
    entries = doc["entries"]
    assert [e["action"] for e in entries] == [
        "config.set",
        "queue.pause",
        "queue.resume",
        "queue.pause",
    ]
    assert doc["next_cursor"] is None
    assert set(entries[0]) == {"id", "at", "actor", "action", "target", "before", "after"}
    assert entries[1]["before"] == {"paused": False}
    assert entries[1]["after"] == {"paused": True}
    page = run.json("audit", "--target", f"queue:{queue_id}", "--limit", "2")
    assert [e["action"] for e in page["entries"]] == ["queue.pause", "queue.resume"]
    assert page["next_cursor"] == str(page["entries"][-1]["id"])
    rest = run.json("audit", "--target", f"queue:{queue_id}", "--before", page["next_cursor"])
    assert [e["action"] for e in rest["entries"]] == ["queue.pause"]
    code, out, err = run("audit", "--limit", "1")
    assert code == 0, err
    header, row, more = out.splitlines()
    assert header.split() == ["ID", "AT", "ACTOR", "ACTION", "TARGET", "CHANGE"]
    assert cli_actor() in row
    assert "config.set" in row
    assert "config:1:2" in row
    assert more.startswith("(older entries: throttled audit --before ")
    assert run("audit", "--target", "nothing")[1] == "no audit entries for nothing\n"


# --- portals and keys leave audit entries ----------------------------------------------------


def test_portals_connect_disconnect_and_keys_rotate_are_audited(run):
    token = "refresh-" + secrets.token_hex(12)
    code, _, err = run("portals", "connect", "--portal-id", "501", "--refresh-token", token)
    assert code == 0, err
    code, _, err = run("portals", "disconnect", "501", "--no-revoke")
    assert code == 0, err
    code, _, err = run("keys", "rotate")
    assert code == 0, err
    audit = audit_rows(run.db_url)
    assert [(a[0], a[1], a[2]) for a in audit] == [
        (cli_actor(), "portal.connect", "portal:501"),
        (cli_actor(), "portal.disconnect", "portal:501"),
        (cli_actor(), "keys.rotate", "keys"),
    ]
    assert audit[0][3:] == (None, {"connection": "connected"})
    assert audit[1][3] == {"connection": "connected"}
    assert audit[1][4] == {
        "connection": "disconnected",
        "revoked": False,
        "revocation": "not_requested",
    }
    rotated = audit[2][4]
    assert set(rotated) == {"key_id", "previous_key_ids", "rotated", "current", "unreadable"}
    assert (rotated["rotated"], rotated["unreadable"]) == (0, 0)
    assert len(rotated["key_id"]) == 8
    text = json.dumps([list(a[3:]) for a in audit])
    assert token not in text
    assert run.key not in text


# --- a running daemon ------------------------------------------------------------------------


async def test_a_cli_pause_reaches_a_running_daemon(run, daemon_factory):
    async with daemon_factory() as daemon:
        for _ in range(3):  # (the portal is not connected: the actions wait)
            payload = action_payload(portal_id=PORTAL, input_fields={"maxThroughput": "1"})
            status, body = await daemon.post_action(payload)
            assert status == 200, body
        scheduler = daemon.runtime.scheduler
        await wait_for(lambda: len(scheduler.queues) == 1)
        (queue_id,) = scheduler.queues
        assert not scheduler.queues[queue_id].paused

        code, _, err = await run.off_loop("queues", "pause", str(queue_id))
        assert code == 0, err
        await wait_for(lambda: scheduler.queues[queue_id].paused, timeout=5)
        code, _, err = await run.off_loop("queues", "resume", str(queue_id))
        assert code == 0, err
        await wait_for(lambda: not scheduler.queues[queue_id].paused, timeout=5)

        code, _, err = await run.off_loop(
            "config", "set", str(PORTAL), "1234567", "--max-throughput", "4"
        )
        assert code == 0, err
        intake = daemon.runtime.services.intake
        await wait_for(lambda: (PORTAL, 1234567) in intake.action_configs, timeout=5)
