"""The original Throttle's database, read for `throttled import-throttle`.

One read-only snapshot; every value is read as bounded text (timestamps as Unix seconds)
and checked here, so a row that cannot be read is skipped with its reason, never a crash.
What the rows become is a Plan: the tokens decrypted, the configs as POST /api/config stores
them, the pending actions as throttled's `actions` rows. Writing it is cli_import's.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

MAX_ID = 2**63 - 1
MAX_TEXT = 255  # characters of a value read (callbackId, rate fields, ids)
MAX_SEALED = 8192  # characters of a stored token
MAX_COUNTER = 1_000_000
EXAMPLES = 10  # rows named per skip reason
REQUIRED = {
    "oauth_tokens": ("portal_id", "access_token", "refresh_token", "expires_at"),
    "throttle_configs": ("portal_id", "action_id", "max_throughput", "time_period", "time_unit"),
    "action_executions": (
        *("queue_id", "callback_id", "processed", "max_throughput", "time", "period"),
        "inserted_at",
    ),
}
_QUEUE_ID = re.compile(r"queue:([0-9]{1,19}):([0-9]{1,19}):([0-9]{1,19}):([0-9]{1,19})")
_INTEGER = re.compile(r"\s*[+-]?[0-9]{1,19}\s*")


class SourceError(Exception):
    """The original's database cannot be read, or is not the original's (one line)."""


# --- what was done ---------------------------------------------------------------------------


@dataclass
class Tally:
    """One table's outcome: rows imported, rows skipped by reason (a few named), notes."""

    imported: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, ref: str) -> None:
        """Count a row skipped; name the first few."""
        self.skipped[reason] += 1
        named = self.examples.setdefault(reason, [])
        if len(named) < EXAMPLES:
            named.append(ref[:100])

    def counts(self) -> dict[str, Any]:
        """What the audit log keeps."""
        return {
            "imported": self.imported,
            "skipped": sum(self.skipped.values()),
            "skip_reasons": dict(sorted(self.skipped.items())),
            "notes": dict(sorted(self.notes.items())),
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenImport:
    """A portal's tokens, decrypted (never shown in a repr)."""

    portal_id: int
    refresh: str = field(repr=False)
    access: str | None = field(repr=False)
    expires_at: datetime | None


@dataclass(frozen=True, kw_only=True, slots=True)
class ActionImport:
    """A pending action, as it is stored in throttled's `actions`."""

    callback_id: str
    queue_key: str
    portal_id: int
    workflow_id: int
    action_id: int
    received_at: datetime
    deadline: datetime
    not_before: datetime | None
    attempts: int
    failures: int
    last_error: str | None
    fields: dict[str, str]  # the original's rate fields, as intake keeps input fields


@dataclass
class Plan:
    """What the source holds that can be imported, and what cannot (with reasons)."""

    tokens: list[TokenImport] = field(default_factory=list)
    configs: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)
    actions: list[ActionImport] = field(default_factory=list)
    tallies: dict[str, Tally] = field(default_factory=lambda: {t: Tally() for t in REQUIRED})
    plaintext: list[int] = field(default_factory=list)  # portals with an unencrypted token

    def counts(self) -> dict[str, Any]:
        """The counts per table, as printed with --json and kept in the audit log."""
        tables = {name: t.counts() for name, t in self.tallies.items()}
        return {"tables": tables, "plaintext_token_portals": self.plaintext}


# --- the source ------------------------------------------------------------------------------


def _as_text(column: str, limit: int = MAX_TEXT) -> str:
    """A column as text, one character past the limit (so that a longer value is seen)."""
    return f'left(("{column}")::text, {limit + 1}) AS "{column}"'


def _as_epoch(column: str) -> str:
    """A timestamp as Unix seconds (one without a time zone is UTC, as Ecto writes it)."""
    return f'extract(epoch FROM "{column}")::float8 AS "{column}"'


def _queries(columns: Mapping[str, set[str]]) -> dict[str, str]:
    """The three SELECTs, for the columns this version of the original has."""
    have = columns["action_executions"]

    def maybe(column: str, expr: str) -> str:
        return expr if column in have else f'NULL AS "{column}"'

    tokens = [_as_text("portal_id"), _as_text("access_token", MAX_SEALED)]
    tokens += [_as_text("refresh_token", MAX_SEALED), _as_epoch("expires_at")]
    configs = [_as_text(c) for c in REQUIRED["throttle_configs"]]
    actions = [_as_text(c) for c in ("queue_id", "callback_id", "max_throughput", "time", "period")]
    actions += [_as_epoch("inserted_at"), maybe("on_hold_until", _as_epoch("on_hold_until"))]
    actions += [maybe(c, _as_text(c, 20)) for c in ("consecutive_failures", "total_attempts")]
    actions.append(maybe("last_failure_reason", _as_text("last_failure_reason", 300)))
    pending = "processed = false"
    if "permanently_failed" in have:
        pending += " AND NOT coalesce(permanently_failed, false)"
    return {
        "oauth_tokens": f"SELECT {', '.join(tokens)} FROM oauth_tokens ORDER BY 1",
        "throttle_configs": f"SELECT {', '.join(configs)} FROM throttle_configs ORDER BY 1, 2",
        "action_executions": f"SELECT {', '.join(actions)} FROM action_executions "
        f"WHERE {pending} ORDER BY inserted_at",
    }


_COLUMNS = """
SELECT table_name::text AS t, column_name::text AS c FROM information_schema.columns
WHERE table_schema = current_schema() AND table_name = ANY($1::text[])
"""


def audit_target(url: str) -> str:
    """The audit target for a source URL: `import:host[:port]/database`, no credentials."""
    if not url.startswith(("postgresql://", "postgres://")):
        raise SourceError("--from: must be a postgresql:// URL (not shown: it may hold a password)")
    try:
        parts = urlsplit(url)
        host, port, query = parts.hostname, parts.port, parse_qs(parts.query)
    except ValueError:
        raise SourceError("--from: not a valid URL (not shown: it may hold a password)") from None
    host = host or query.get("host", ["localhost"])[0]
    database = unquote(parts.path.lstrip("/")) or query.get("dbname", [""])[0]
    return f"import:{host}{f':{port}' if port else ''}/{database or parts.username or ''}"


def _secrets_in(url: str) -> list[str]:
    parts = urlsplit(url)
    found = [parts.password or "", *parse_qs(parts.query).get("password", [])]
    return [s for p in found if p for s in {p, unquote(p)}]


async def read(url: str, timeout: float) -> dict[str, list[Any]]:
    """Every row to import, from one read-only snapshot of the original's database."""
    import asyncpg

    shown = audit_target(url).removeprefix("import:")

    def why(exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        for secret in _secrets_in(url):
            text = text.replace(secret, "***")
        return text[:300]

    try:
        conn = await asyncpg.connect(url, timeout=timeout, command_timeout=600)
    except (OSError, TimeoutError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        raise SourceError(f"cannot connect to the original's database {shown}: {why(e)}") from None
    try:
        async with conn.transaction(readonly=True, isolation="repeatable_read"):
            columns: dict[str, set[str]] = {t: set() for t in REQUIRED}
            for row in await conn.fetch(_COLUMNS, list(REQUIRED)):
                columns[row["t"]].add(row["c"])
            _check_schema(columns, shown)
            return {t: list(await conn.fetch(sql)) for t, sql in _queries(columns).items()}
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, UnicodeError) as e:
        raise SourceError(f"reading the original's database {shown}: {why(e)}") from None
    finally:
        await conn.close()


def _check_schema(columns: Mapping[str, set[str]], shown: str) -> None:
    missing = [t for t, have in columns.items() if not have]
    if missing:
        raise SourceError(
            f"the original's database {shown} has no table {', '.join(missing)}: "
            "is it the original Throttle's (its migrations applied)?"
        )
    for table, needed in REQUIRED.items():
        absent = [c for c in needed if c not in columns[table]]
        if absent:
            raise SourceError(f"the original's table {table} has no column {', '.join(absent)}")


# --- reading rows ----------------------------------------------------------------------------


def _int(value: Any, lo: int, hi: int) -> int | None:
    number = int(value) if isinstance(value, str) and _INTEGER.fullmatch(value) else None
    return number if number is not None and lo <= number <= hi else None


def _instant(value: Any) -> datetime | None:
    """Unix seconds read from a timestamp, if finite and within what throttled stores."""
    from throttled import rates

    ok = isinstance(value, float) and rates.EPOCH.timestamp() <= value <= rates.HORIZON_EPOCH
    return datetime.fromtimestamp(value, UTC) if ok else None


def _open(value: Any, keys: tuple[bytes, ...], plaintext_ok: bool) -> tuple[str | None, str]:
    """(token, outcome) for a stored token column."""
    from throttled import legacy_crypto
    from throttled.hubspot.oauth import valid_token

    if not isinstance(value, str) or not value.strip():
        return None, "empty"
    if len(value) > MAX_SEALED:
        return None, "too long"
    try:
        return legacy_crypto.decrypt(value, keys), "decrypted"
    except legacy_crypto.CannotDecrypt:
        return None, "cannot decrypt"
    except legacy_crypto.NotCiphertext:
        if not valid_token(value):
            return None, "unreadable"
        return (value, "plaintext") if plaintext_ok else (None, "plaintext refused")


def plan_tokens(
    rows: Sequence[Mapping[str, Any]], keys: tuple[bytes, ...], plaintext_ok: bool, plan: Plan
) -> None:
    """Decrypt every portal's tokens; SourceError if not one ciphertext opens (the key)."""
    tally, seen = plan.tallies["oauth_tokens"], set()
    opened = failed = 0
    for row in rows:
        pid = _int(row["portal_id"], 1, MAX_ID)
        ref = f"portal {pid if pid is not None else row['portal_id']}"
        if pid is None or pid in seen:
            tally.skip("invalid portal_id" if pid is None else "duplicate portal_id", ref)
            continue
        seen.add(pid)
        refresh, outcome = _open(row["refresh_token"], keys, plaintext_ok)
        access, access_outcome = _open(row["access_token"], keys, plaintext_ok)
        opened += [outcome, access_outcome].count("decrypted")
        failed += [outcome, access_outcome].count("cannot decrypt")
        if "plaintext" in outcome or "plaintext" in access_outcome:
            plan.plaintext.append(pid)
        if refresh is None:
            reason = {"plaintext refused": "plaintext token (see --accept-plaintext-tokens)"}
            tally.skip(reason.get(outcome, f"refresh_token {outcome}"), ref)
            continue
        expires = _instant(row["expires_at"])
        if access is None or expires is None:
            access = None
            if access_outcome != "empty":
                tally.notes["access_token left out (unreadable): refreshed at first use"] += 1
        plan.tokens.append(
            TokenImport(portal_id=pid, refresh=refresh, access=access, expires_at=expires)
        )
    if failed and not opened:
        raise SourceError(
            f"none of the {failed} encrypted token(s) in oauth_tokens decrypts with the "
            "original's key given: it is probably the wrong key (nothing was imported)"
        )


def plan_configs(rows: Sequence[Mapping[str, Any]], plan: Plan) -> None:
    """Each config as POST /api/config would store it."""
    from throttled.web.config_api import validate

    tally, seen = plan.tallies["throttle_configs"], set()
    for row in rows:
        ref = f"portal {row['portal_id']} action {row['action_id']}"
        if any(isinstance(v, str) and len(v) > MAX_TEXT for v in row.values()):
            tally.skip("value too long", ref)
            continue
        unit = row["time_unit"]
        body = {**dict(row), "time_unit": unit.strip().lower() if isinstance(unit, str) else unit}
        checked = validate(body)
        if isinstance(checked, list):
            tally.skip("invalid " + ", ".join(p["field"] for p in checked), ref)
        elif checked[:2] in seen:
            tally.skip("duplicate (portal, action)", ref)
        else:
            seen.add(checked[:2])
            plan.configs.append(checked)


def _action(row: Mapping[str, Any], expiry_s: float, now: float) -> ActionImport | str:
    """The action to import, or why not."""
    from throttled.hubspot.action import MAX_CALLBACK_ID
    from throttled.intake import MAX_DEADLINE

    callback_id = row["callback_id"]
    if not isinstance(callback_id, str) or not callback_id.strip():
        return "no callback_id"
    if len(callback_id) > MAX_CALLBACK_ID:
        return "callback_id too long"
    match = _QUEUE_ID.fullmatch(row["queue_id"] or "")
    ids = [int(g) for g in match.groups()] if match else []
    if not ids or min(ids[:3]) < 1 or max(ids) > MAX_ID:
        return "queue_id not queue:{portal}:{workflow}:{action}:{index}"
    received = _instant(row["inserted_at"])
    if received is None:
        return "unreadable inserted_at"
    deadline = min(received.timestamp() + expiry_s, MAX_DEADLINE)
    if deadline <= now:
        return "block expired"
    hold = _instant(row["on_hold_until"])
    if hold is None and row["on_hold_until"] is not None:
        return "unreadable on_hold_until"
    counters = [
        _int(row[c] or "0", -(2**63), 2**63) for c in ("total_attempts", "consecutive_failures")
    ]
    if None in counters:
        return "unreadable total_attempts or consecutive_failures"
    attempts, failures = (max(0, min(c or 0, MAX_COUNTER)) for c in counters)
    fields = {"maxThroughput": row["max_throughput"], "time": row["time"], "period": row["period"]}
    error = row["last_failure_reason"]
    return ActionImport(
        callback_id=callback_id,
        queue_key="queue:{}:{}:{}:{}".format(*ids),  # (as intake spells it: no leading 0s)
        portal_id=ids[0],
        workflow_id=ids[1],
        action_id=ids[2],
        received_at=received,
        deadline=datetime.fromtimestamp(deadline, UTC),
        not_before=hold,
        attempts=attempts,
        failures=failures,
        last_error=error[:299] + "…" if error and len(error) > 300 else error,
        fields={k: v for k, v in fields.items() if v is not None and len(v) <= MAX_TEXT},
    )


def plan_actions(
    rows: Sequence[Mapping[str, Any]], expiry_s: float, now: float, plan: Plan
) -> None:
    """The pending actions to import; a callbackId seen twice is imported once."""
    tally, seen = plan.tallies["action_executions"], set()
    for row in rows:
        ref = str(row["callback_id"])
        action = _action(row, expiry_s, now)
        if isinstance(action, str):
            tally.skip(action, ref)
        elif action.callback_id in seen:
            tally.skip("duplicate callback_id", ref)
        else:
            seen.add(action.callback_id)
            plan.actions.append(action)
