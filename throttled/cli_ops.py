"""`throttled config ...`, `throttled queues ...`, `throttled actions show`, `throttled audit`.

They work on the database directly, so they work with the daemon down. A change goes through
steering.Steering, as the admin API's do: the change, its audit entry (actor `cli:<user>`)
and a NOTIFY in one transaction, so a running daemon takes it up at once. The JSON printed
is the admin API's; what only a running daemon knows (its limiter's recent sends, the rows
its senders hold) is not known here: a queue's estimate starts from an empty rate window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from throttled.cli import MAX_PORTAL_ID as MAX_ID
from throttled.cli import _Fatal, _int_in, cli_actor
from throttled.cli_portals import _database, _dump, _load, _span, _table, _text

if TYPE_CHECKING:
    from throttled.config import Config
    from throttled.db.operator import QueueDetail
    from throttled.db.repository import Repository
    from throttled.intake import Intake
    from throttled.steering import Steering

MAX_CALLBACK_ID = 255
_CONFIG_HELP = "config file (default ./throttled.toml, then /etc/throttled/throttled.toml)"

Handler = Callable[[argparse.Namespace], int]


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Register `config ...`, `queues ...`, `actions show` and `audit`."""
    _config_commands(sub)
    _queue_commands(sub)
    _log_commands(sub)


# --- the parsers -----------------------------------------------------------------------------


def _described(text: str, examples: list[str]) -> dict[str, Any]:
    lines = "\n".join(f"  {e}" for e in examples)
    return {
        "help": text,
        "description": f"{text}\n\nexample:\n{lines}",
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def _child(
    children: argparse._SubParsersAction[Any],
    group: str,
    name: str,
    func: Handler,
    text: str,
    examples: list[str],
    *,
    inherit: bool = False,
) -> argparse.ArgumentParser:
    """A subcommand with --config and --json. `inherit`: the parent has them too, and a
    value given before the subcommand is kept (argparse would reset it to the default)."""
    p: argparse.ArgumentParser = children.add_parser(name, **_described(text, examples))
    p.add_argument("--config", help=_CONFIG_HELP, default=_default(None, inherit))
    p.add_argument(
        "--json", action="store_true", help="print the API's JSON", default=_default(False, inherit)
    )
    p.set_defaults(func=func, command=f"{group} {name}")
    return p


def _default(value: Any, inherit: bool) -> Any:
    """A flag's default; SUPPRESS where the parent parser sets it (its value is kept)."""
    return argparse.SUPPRESS if inherit else value


def _rate_flags(p: argparse.ArgumentParser, *, limit_required: bool) -> None:
    """The rate fields of `POST /api/config`, as flags (checked by its validation)."""
    p.add_argument(
        "--max-throughput", metavar="N", required=limit_required, help="sends per period"
    )
    p.add_argument("--time-period", metavar="N", help="the period, in time units (default 1)")
    p.add_argument(
        "--time-unit", metavar="U", help="seconds, minutes, hours or days (default seconds)"
    )
    p.add_argument("--pacing", metavar="P", help="window (bursts) or even (spaced out)")
    p.add_argument("--release-days", metavar="D", help="days sends may go, e.g. mon-fri")
    p.add_argument("--release-hours", metavar="H", help="hours sends may go, e.g. 09:00-17:00")
    p.add_argument("--timezone", metavar="TZ", help="the schedule's IANA zone, e.g. Europe/Oslo")
    p.add_argument("--start-at", metavar="T", help="no send before this ISO instant")


def _config_ids(p: argparse.ArgumentParser) -> None:
    ids = _int_in(1, MAX_ID)
    p.add_argument("portal_id", metavar="PORTAL", type=ids, help="the portal (hub) id")
    p.add_argument("action_id", metavar="ACTION", type=ids, help="the action definition id")


def _config_commands(sub: argparse._SubParsersAction[Any]) -> None:
    parent = sub.add_parser(
        "config",
        **_described(
            "throttle configs per (portal, action definition): the daemon may be down",
            ["throttled config set 62515 1234567 --max-throughput 10 --time-unit minutes"],
        ),
    )
    children = parent.add_subparsers(required=True, metavar="COMMAND")
    text = "create or replace a config (input fields and queue overrides still win)"
    examples = [
        "throttled config set 62515 1234567 --max-throughput 10 --time-unit minutes",
        "throttled config set 62515 1234567 --max-throughput 100 --time-period 1 "
        "--time-unit hours --release-days mon-fri --release-hours 09:00-17:00 "
        "--timezone America/New_York",
    ]
    p = _child(children, "config", "set", _config_set, text, examples)
    _config_ids(p)
    _rate_flags(p, limit_required=True)
    for name, func, text in (
        ("get", _config_get, "one config"),
        ("delete", _config_delete, "delete a config: its actions fall back to the defaults"),
    ):
        p = _child(children, "config", name, func, text, [f"throttled config {name} 62515 1234567"])
        _config_ids(p)
    text = "every config, in (portal, action) order"
    _child(children, "config", "list", _config_list, text, ["throttled config list --json"])


def _listing_flags(p: argparse.ArgumentParser, *, inherit: bool) -> None:
    from throttled.queue_view import SORTS, STATES

    p.add_argument(
        "--portal",
        metavar="ID",
        type=_int_in(1, MAX_ID),
        help="only this portal's",
        default=_default(None, inherit),
    )
    p.add_argument(
        "--state", choices=STATES, help="only queues in this state", default=_default(None, inherit)
    )
    p.add_argument(
        "--at-risk",
        action="store_true",
        help="only queues that will not drain before their latest deadline",
        default=_default(False, inherit),
    )
    p.add_argument(
        "--sort",
        choices=SORTS,
        help="largest backlog first (default), most urgent first, or by id",
        default=_default("backlog", inherit),
    )
    p.add_argument(
        "--limit",
        type=_int_in(1, 1_000_000),
        help="at most N queues",
        default=_default(None, inherit),
    )
    p.add_argument(
        "--watch",
        action="store_true",
        help="redraw the table until Ctrl-C",
        default=_default(False, inherit),
    )
    p.add_argument(
        "--interval",
        metavar="S",
        type=_seconds,
        help="seconds between redraws with --watch (default 2)",
        default=_default(2.0, inherit),
    )
    p.add_argument(
        "--count",
        metavar="N",
        type=_int_in(1, 1_000_000),
        help="with --watch: stop after N redraws",
        default=_default(None, inherit),
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= 3600:  # (False for NaN too)
        raise argparse.ArgumentTypeError("must be a number of seconds 0.1..3600")
    return value


def _queue_commands(sub: argparse._SubParsersAction[Any]) -> None:
    listing = [
        "throttled queues --state draining --sort urgency",
        "throttled queues --at-risk --json",
        "throttled queues --watch --interval 1",
    ]
    parent = sub.add_parser(
        "queues",
        **_described(
            "queues: backlog, rate, next send, drain ETA (alone: `queues list`); the daemon "
            "may be down",
            listing,
        ),
    )
    parent.add_argument("--config", help=_CONFIG_HELP)
    parent.add_argument("--json", action="store_true", help='print {"queues": [...]}')
    _listing_flags(parent, inherit=False)
    parent.set_defaults(func=_queues_list, command="queues")
    children = parent.add_subparsers(required=False, metavar="COMMAND")

    def child(name: str, func: Handler, text: str, *examples: str) -> argparse.ArgumentParser:
        p = _child(children, "queues", name, func, text, list(examples), inherit=True)
        if name != "list":
            p.add_argument("queue", metavar="ID|KEY", help="the queue's id, or its key")
        return p

    _listing_flags(child("list", _queues_list, "the queue table", *listing), inherit=True)
    child("show", _queue_show, "one queue in detail", "throttled queues show 12")
    child(
        "pause",
        _queue_op,
        "hold a queue: nothing is sent until resumed (kept across restarts)",
        "throttled queues pause 12",
    )
    child("resume", _queue_op, "end a hold", "throttled queues resume queue:62515:9:7:0")
    rate = child(
        "set-rate",
        _queue_op,
        "an operator's rate override; a part of the rate given alone keeps the rest",
        "throttled queues set-rate 12 --max-throughput 5",
        "throttled queues set-rate 12 --max-throughput 2 --time-unit seconds --pacing even",
    )
    _rate_flags(rate, limit_required=False)
    child("clear-rate", _queue_op, "remove the override", "throttled queues clear-rate 12")
    child(
        "retry-failed",
        _queue_op,
        "failed actions whose block has not expired go again",
        "throttled queues retry-failed 12",
    )
    fail = child(
        "fail-pending",
        _queue_op,
        "complete every pending action FAIL_CONTINUE (the workflow goes on without it)",
        "throttled queues fail-pending 12 --yes",
    )
    fail.add_argument("--yes", action="store_true", help="confirm: every pending action fails")


def _log_commands(sub: argparse._SubParsersAction[Any]) -> None:
    parent = sub.add_parser(
        "actions",
        **_described("look up one action by its callbackId", ["throttled actions show X"]),
    )
    children = parent.add_subparsers(required=True, metavar="COMMAND")
    text = "one action: state, queue, attempts, last error, timestamps"
    examples = ["throttled actions show ap-62515-1-0 --json"]
    show = _child(children, "actions", "show", _action_show, text, examples)
    show.add_argument("callback_id", metavar="CALLBACK_ID", help="HubSpot's callbackId")
    audit = sub.add_parser(
        "audit",
        **_described(
            "the audit log of operator changes, newest first",
            ["throttled audit --target queue:12", "throttled audit --limit 5 --json"],
        ),
    )
    audit.add_argument("--config", help=_CONFIG_HELP)
    audit.add_argument("--json", action="store_true", help='print {"entries": [...], ...}')
    audit.add_argument("--target", metavar="T", help="only this target, e.g. config:62515:9")
    audit.add_argument(
        "--limit", type=_int_in(1, 1000), default=50, help="at most N entries (default 50)"
    )
    audit.add_argument(
        "--before", metavar="ID", type=_int_in(1, MAX_ID), help="entries older than this id"
    )
    audit.set_defaults(func=_audit, command="audit")


# --- set-up ----------------------------------------------------------------------------------


async def intake_for(cfg: Config, repo: Repository) -> Intake:
    """Intake as the daemon builds it: the defaults, the readable stored configs."""
    from throttled.intake import Intake
    from throttled.steering import readable_config

    stored = await repo.action_configs()
    return Intake(
        defaults=cfg.default_policy_spec(),
        block_expiration_s=cfg.block_expiration_s(),
        action_configs={k: s for k, v in stored.items() if (s := readable_config(v)) is not None},
        clock=time.time,
    )


@contextlib.asynccontextmanager
async def _steering(cfg: Config) -> AsyncIterator[Steering]:
    from throttled.steering import Steering

    async with _database(cfg) as repo:
        yield Steering(repo, await intake_for(cfg, repo))


def _flag(field: str) -> str:
    names = {"portal_id": "PORTAL", "action_id": "ACTION", "body": "arguments"}
    return names.get(field, "--" + field.replace("_", "-"))


def _invalid(problems: list[dict[str, str]]) -> _Fatal:
    """Every bad field, named as its flag, in one line."""
    return _Fatal("; ".join(f"{_flag(p['field'])}: {p['message']}" for p in problems))


def _given(args: argparse.Namespace) -> dict[str, str]:
    from throttled.web.config_api import RATE_FIELDS

    return {k: v for k in RATE_FIELDS if (v := getattr(args, k, None)) is not None}


def _pairs(pairs: list[tuple[str, str]]) -> list[str]:
    """`key: value` lines, the values aligned."""
    width = max(len(k) for k, _ in pairs) + 2
    return [f"{(k + ':').ljust(width)}{v}" for k, v in pairs]


def _compact(value: Any, limit: int = 200) -> str:
    return "-" if value is None else _text(json.dumps(value, separators=(",", ":")), limit)


# --- config ----------------------------------------------------------------------------------


def _rate_text(policy: Any) -> str:
    """A config's rate in words (a row edited by hand may make none)."""
    from throttled import rates

    try:
        spec = rates.spec_from_mapping(policy, where="config")
        return rates.resolve([spec]).describe()
    except (ValueError, ArithmeticError, TypeError, AttributeError):
        return "(cannot be read: its actions get the defaults)"


def _print_config(args: argparse.Namespace, view: dict[str, Any], head: str) -> None:
    if args.json:
        _dump(view)
        return
    print(f"{head}: {_rate_text(view)}")
    fields = [(k, _text(v)) for k, v in view.items() if k not in ("portal_id", "action_id")]
    print("\n".join("  " + line for line in _pairs(fields)) if fields else "  (no rate fields)")


def _config_set(args: argparse.Namespace) -> int:
    from throttled.web.config_api import _view, validate

    body = {"portal_id": args.portal_id, "action_id": args.action_id, **_given(args)}
    checked = validate(body)
    if isinstance(checked, list):
        raise _invalid(checked)
    portal, action, policy = checked
    cfg = _load(args)

    async def run() -> None:
        async with _steering(cfg) as steering:
            await steering.set_config(cli_actor(), portal, action, policy)

    asyncio.run(run())
    _print_config(args, _view(portal, action, policy), f"portal {portal}, action {action} set")
    return 0


def _no_config(args: argparse.Namespace) -> _Fatal:
    return _Fatal(f"no config for portal {args.portal_id}, action {args.action_id}")


def _config_get(args: argparse.Namespace) -> int:
    from throttled.web.config_api import _view

    cfg = _load(args)

    async def run() -> Any:
        async with _database(cfg) as repo:
            return await repo.get_action_config(args.portal_id, args.action_id)

    policy = asyncio.run(run())
    if policy is None:
        raise _no_config(args)
    view = _view(args.portal_id, args.action_id, policy)
    _print_config(args, view, f"portal {args.portal_id}, action {args.action_id}")
    return 0


def _config_list(args: argparse.Namespace) -> int:
    from throttled.web.config_api import _view

    cfg = _load(args)

    async def run() -> list[tuple[int, int, Any]]:
        rows: list[tuple[int, int, Any]] = []
        async with _database(cfg) as repo:
            while True:
                after = (rows[-1][0], rows[-1][1]) if rows else None
                page = await repo.list_action_configs(after, 1000)
                rows += page
                if len(page) < 1000:
                    return rows

    views = [_view(p, a, policy) for p, a, policy in asyncio.run(run())]
    if args.json:
        _dump({"configs": views})
    elif not views:
        print(
            "no configs: actions get their input fields' rate, else the defaults; add one: "
            "throttled config set PORTAL ACTION --max-throughput N"
        )
    else:
        rows = [[str(v["portal_id"]), str(v["action_id"]), _rate_text(v)] for v in views]
        print("\n".join(_table(["PORTAL", "ACTION", "RATE"], rows, right={0, 1})))
    return 0


def _config_delete(args: argparse.Namespace) -> int:
    cfg = _load(args)
    portal, action = args.portal_id, args.action_id

    async def run() -> bool:
        async with _steering(cfg) as steering:
            return await steering.set_config(cli_actor(), portal, action, None)

    if not asyncio.run(run()):
        raise _no_config(args)
    if args.json:
        _dump({"portal_id": portal, "action_id": action, "deleted": True})
    else:
        print(
            f"config for portal {portal}, action {action} deleted: its actions get their input "
            "fields' rate, else the defaults"
        )
    return 0


# --- queues ----------------------------------------------------------------------------------


def view_of(intake: Intake, detail: QueueDetail, stats: Any, now: float) -> dict[str, Any]:
    """A queue's view as the API makes it, without a daemon's memory."""
    from throttled.queue_view import queue_view

    config = intake.action_configs.get((detail.portal_id, detail.action_id or 0))
    return queue_view(detail, stats, None, config=config, defaults=intake.defaults, now=now)


def relative(iso: str | None, now: float) -> str:
    """An ISO instant (or "never") as "now", "in 5m"..."""
    if iso is None:
        return "-"
    if iso == "never":
        return "never"
    seconds = datetime.fromisoformat(iso).timestamp() - now
    return "now" if seconds < 1 else f"in {_span(seconds)}"


def _queues_list(args: argparse.Namespace) -> int:
    from throttled.cli_watch import list_queues

    return list_queues(args)


async def _find(steering: Steering, text: str) -> QueueDetail:
    from throttled.steering import QueueNotFound

    try:
        return await steering.find_queue(text)
    except QueueNotFound:
        raise _Fatal(
            f"no queue {_text(text, 100)!r} (an id or a key, as `throttled queues` lists them)"
        ) from None


async def _view(steering: Steering, queue_id: int, fallback: QueueDetail) -> dict[str, Any]:
    detail = await steering.repo.find_queue(queue_id) or fallback
    stats = (await steering.repo.queue_stats([queue_id])).get(queue_id)
    return view_of(steering.intake, detail, stats, time.time())


def _queue_show(args: argparse.Namespace) -> int:
    cfg = _load(args)

    async def run() -> dict[str, Any]:
        async with _steering(cfg) as steering:
            found = await _find(steering, args.queue)
            return await _view(steering, found.id, found)

    view = asyncio.run(run())
    if args.json:
        _dump(view)
    else:
        print("\n".join(_queue_lines(view)))
    return 0


def _queue_lines(v: dict[str, Any]) -> list[str]:
    now = time.time()
    rate = v["rate"]
    sources = ", ".join(f"{k} from {s}" for k, s in v["rate_sources"].items())
    pairs = [
        ("queue", f"{v['id']} ({_text(v['key'])})"),
        ("portal", str(v["portal_id"])),
        ("action definition", str(v["action_id"] or "-")),
        ("state", v["state"] + (f" since {v['paused_at']}" if v["paused_at"] else "")),
        ("backlog", f"{v['backlog']} pending ({v['released']} released FAIL_CONTINUE)"),
        ("rate", "-" if rate is None else _text(rate["text"])),
        ("rate sources", sources or "-"),
        ("override", _compact(v["override"])),
        ("held", _text(v["held"] or "-")),
        ("next send", relative(v["next_send_at"], now)),
        ("drains", f"{relative(v['drains_at'], now)} ({v['drains_at'] or '-'})"),
        ("oldest deadline", v["oldest_deadline"] or "-"),
        ("latest deadline", v["latest_deadline"] or "-"),
        ("at risk", "yes" if v["at_risk"] else "no"),
        ("failed", str(v["failed"])),
        ("expired", str(v["expired"])),
        ("created", v["created_at"]),
        ("updated", v["updated_at"]),
    ]
    return _pairs(pairs)


def _override(args: argparse.Namespace) -> dict[str, Any]:
    """set-rate's flags, checked as `PUT /api/queues/{id}/rate` checks its body."""
    from pydantic import ValidationError

    from throttled.web.config_api import RateFields, _problems

    given = _given(args)
    if not given:
        raise _Fatal("set-rate: give at least one rate flag, e.g. --max-throughput N")
    try:
        return RateFields.model_validate(given).policy()
    except ValidationError as exc:
        raise _invalid(_problems(exc)) from None


async def _operate(
    steering: Steering, queue: QueueDetail, args: argparse.Namespace
) -> dict[str, Any]:
    """Do the subcommand's change; what the API answers beside the queue."""
    actor, op = cli_actor(), args.command.removeprefix("queues ")
    if op in ("pause", "resume"):
        await steering.pause(actor, queue, op == "pause")
    elif op in ("set-rate", "clear-rate"):
        try:
            await steering.set_override(actor, queue, args.override)
        except ValueError as exc:
            raise _Fatal(f"invalid rate: {exc}") from None
    elif op == "retry-failed":
        retried, left = await steering.retry_failed(actor, queue)
        return {"retried": retried, "not_retried_block_expired": left}
    elif op == "fail-pending":
        if not args.yes:
            stats = (await steering.repo.queue_stats([queue.id])).get(queue.id)
            count = 0 if stats is None else stats.pending - stats.released
            raise _Fatal(
                f"queue {queue.id} has {count} pending action(s) that would be completed "
                "FAIL_CONTINUE; add --yes to fail them"
            )
        return {"released": await steering.fail_pending(actor, queue)}
    return {}


def _queue_op(args: argparse.Namespace) -> int:
    op = args.command.removeprefix("queues ")
    args.override = _override(args) if op == "set-rate" else None
    cfg = _load(args)

    async def run() -> dict[str, Any]:
        async with _steering(cfg) as steering:
            found = await _find(steering, args.queue)
            extra = await _operate(steering, found, args)
            return {**extra, "queue": await _view(steering, found.id, found)}

    body = asyncio.run(run())
    if args.json:
        _dump(body)
    else:
        print(_done(op, body))
    return 0


def _done(op: str, body: dict[str, Any]) -> str:
    """What an operation did, in one line."""
    v = body["queue"]
    name = f"queue {v['id']} ({_text(v['key'], 80)})"
    rate = "-" if v["rate"] is None else v["rate"]["text"]
    if op == "pause":
        return f"{name} paused: nothing is sent until: throttled queues resume {v['id']}"
    if op == "resume":
        return f"{name} resumed: {v['backlog']} pending"
    if op == "set-rate":
        return f"{name} rate override set: {rate}"
    if op == "clear-rate":
        return f"{name} rate override cleared: {rate} (from {v['rate_sources'].get('rate')})"
    if op == "retry-failed":
        return (
            f"{name}: {body['retried']} failed action(s) go again; "
            f"{body['not_retried_block_expired']} not retried (their block expired)"
        )
    return (
        f"{name}: {body['released']} pending action(s) released, to be completed "
        "FAIL_CONTINUE by the daemon within the portal's API budget"
    )


# --- actions and audit -----------------------------------------------------------------------


def _action_show(args: argparse.Namespace) -> int:
    text: str = args.callback_id
    if not text or len(text) > MAX_CALLBACK_ID or not text.isprintable():
        raise _Fatal(f"CALLBACK_ID must be 1..{MAX_CALLBACK_ID} printable characters")
    cfg = _load(args)

    async def run() -> dict[str, Any] | None:
        async with _database(cfg) as repo:
            return await repo.get_action(text)

    row = asyncio.run(run())
    if row is None:
        raise _Fatal(f"no action with callbackId {_text(text, 80)!r}")
    body = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}
    if args.json:
        _dump(body)
    else:
        print("\n".join(_pairs([(k.replace("_", " "), _text(v, 500)) for k, v in body.items()])))
    return 0


def _audit(args: argparse.Namespace) -> int:
    from throttled.db.repository import readable_json as _readable

    target: str | None = args.target
    if target is not None and (not target or len(target) > 300 or not target.isprintable()):
        raise _Fatal("--target: must be 1..300 printable characters")
    cfg = _load(args)

    async def run() -> list[dict[str, Any]]:
        async with _database(cfg) as repo:
            return await repo.list_audit(target, args.before, args.limit + 1)

    rows = asyncio.run(run())
    page = rows[: args.limit]
    entries = [
        {
            **r,
            "at": r["at"].isoformat(),
            "before": _readable(r["before"]),
            "after": _readable(r["after"]),
        }
        for r in page
    ]
    next_cursor = str(page[-1]["id"]) if len(rows) > args.limit else None
    if args.json:
        _dump({"entries": entries, "next_cursor": next_cursor})
        return 0
    if not entries:
        print("no audit entries" + (f" for {_text(target)}" if target else ""))
        return 0
    table = [
        [
            str(e["id"]),
            datetime.fromisoformat(e["at"]).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
            _text(e["actor"], 40),
            _text(e["action"], 40),
            _text(e["target"], 60),
            f"{_compact(e['before'], 60)} -> {_compact(e['after'], 100)}",
        ]
        for e in entries
    ]
    print("\n".join(_table(["ID", "AT", "ACTOR", "ACTION", "TARGET", "CHANGE"], table, {0})))
    if next_cursor:
        print(f"(older entries: throttled audit --before {next_cursor})")
    return 0
