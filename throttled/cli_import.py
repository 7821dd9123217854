"""`throttled import-throttle`: the original Throttle's portals, configs and pending actions.

legacy_source reads the original's database into a Plan; this writes it, in one
transaction. Nothing throttled holds already is overwritten (a portal, a (portal, action)
config, a callbackId), so a second run imports nothing. The statements that write actions
and queues are here rather than in db/queries.py: they set columns intake never writes
(attempts, failures, not_before, received_at), for this command alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from throttled.cli import _Fatal

if TYPE_CHECKING:
    from throttled import rates
    from throttled.config import Config
    from throttled.crypto import KeyRing
    from throttled.db.repository import Repository
    from throttled.legacy_source import ActionImport, Plan

KEY_ENV = "THROTTLE_ENCRYPTION_KEY"
BATCH = 1000  # actions per statement
DESCRIPTION = """\
import the original Throttle's portals (OAuth tokens, re-encrypted), throttle configs and
pending actions into throttled's database, in one transaction. What throttled holds already
is skipped, never overwritten: running it again imports nothing more. A running daemon
takes the import up at once (it is announced to it), and the daemon may as well be down.

example:
  export THROTTLE_ENCRYPTION_KEY=...   # the original's ENCRYPTION_KEY (or a key file)
  throttled import-throttle --from postgresql://throttle@old-db/throttle_prod --dry-run
  throttled import-throttle --from postgresql://throttle@old-db/throttle_prod --json

Put the source's password in PGPASSWORD or ~/.pgpass rather than in the URL: `ps` shows
arguments. It is never printed nor logged (nor is a token or a key)."""


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Register `import-throttle` on the top-level subparsers."""
    p = sub.add_parser(
        "import-throttle",
        help="import the original Throttle's tokens, configs and pending actions",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--from",
        dest="source_url",
        metavar="URL",
        required=True,
        help="the original's PostgreSQL URL",
    )
    key = p.add_mutually_exclusive_group()
    key.add_argument(
        "--old-encryption-key-file",
        metavar="PATH",
        help=f"file holding the original's ENCRYPTION_KEY (default: ${KEY_ENV})",
    )
    key.add_argument(
        "--old-encryption-key",
        metavar="KEY",
        help=f"the original's ENCRYPTION_KEY (visible in ps: prefer ${KEY_ENV})",
    )
    p.add_argument(
        "--accept-plaintext-tokens",
        action="store_true",
        help="import a token stored unencrypted (old versions allowed it)",
    )
    p.add_argument("--dry-run", action="store_true", help="read and report; write nothing")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.add_argument(
        "--config",
        help="config file (default ./throttled.toml, then /etc/throttled/throttled.toml)",
    )
    p.set_defaults(func=_import, command="import-throttle")


# --- writing ---------------------------------------------------------------------------------

# Where the schema records what a queue's policy was resolved from (migration 0005), an
# imported queue records it too, so that a config change re-resolves it as any other.
_RECORDED = """
SELECT count(*) = 2 AS recorded FROM information_schema.columns
WHERE table_schema = current_schema() AND table_name = 'queues'
  AND column_name IN ('action_id', 'inputs')
"""


def _add_queues(recorded: bool) -> str:
    """New queues only (one that exists keeps its policy: throttled's is newer)."""
    columns, types = ("key, portal_id, policy", "$1::text[], $2::bigint[], $3::jsonb[]")
    if recorded:
        columns, types = columns + ", action_id, inputs", types + ", $4::bigint[], $5::jsonb[]"
    return f"""
WITH created AS (
    INSERT INTO queues ({columns}) SELECT * FROM unnest({types})
    ON CONFLICT (key) DO NOTHING
    RETURNING id, key
)
SELECT id, key FROM created UNION ALL SELECT id, key FROM queues WHERE key = ANY($1::text[])
"""


_ADD_ACTIONS = """
INSERT INTO actions (callback_id, queue_id, portal_id, received_at, deadline, not_before,
                     attempts, failures, last_error, workflow_id, input_fields)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::timestamptz[],
                     $5::timestamptz[], $6::timestamptz[], $7::int[], $8::int[], $9::text[],
                     $10::bigint[], $11::jsonb[])
ON CONFLICT (callback_id) DO NOTHING
RETURNING callback_id
"""


async def write(
    repo: Repository, plan: Plan, keyring: KeyRing, cfg: Config, *, dry_run: bool, target: str
) -> None:
    """Import the plan in one transaction (in a dry run, only look at what exists)."""
    from throttled.cli import cli_actor
    from throttled.db.repository import Repository, translate_errors

    with translate_errors():
        async with repo.pool.acquire() as conn, conn.transaction():
            held = Repository(repo.pool, conn)
            await _write_tokens(held, plan, keyring, dry_run)
            admin = await _write_configs(held, plan, dry_run)
            await _write_actions(held, conn, plan, admin, cfg.default_policy_spec(), dry_run)
            if not dry_run and any(t.imported for t in plan.tallies.values()):
                await held.add_audit(cli_actor(), "import.throttle", target, None, plan.counts())
                await held.announce({"all": True})  # a running daemon takes it all up


async def _write_tokens(repo: Repository, plan: Plan, keyring: KeyRing, dry_run: bool) -> None:
    from throttled.tokens import encrypt_tokens

    tally = plan.tallies["oauth_tokens"]
    for t in plan.tokens:
        if await repo.get_portal(t.portal_id) is not None:  # (disconnected ones too)
            tally.skip("already in throttled", f"portal {t.portal_id}")
            continue
        tally.imported += 1
        if dry_run:
            continue
        refresh, access = encrypt_tokens(keyring, t.portal_id, t.refresh, t.access)
        if access is None or t.expires_at is None:
            await repo.set_refresh_token(t.portal_id, refresh)
        else:
            await repo.connect_portal(
                t.portal_id,
                refresh=refresh,
                access=access,
                expires_at=t.expires_at,
                scopes=(),
                hub_domain=None,
            )


async def _write_configs(
    repo: Repository, plan: Plan, dry_run: bool
) -> dict[tuple[int, int], rates.PolicySpec]:
    """Store the new configs; return every readable config, as intake will use them."""
    from throttled import rates

    tally = plan.tallies["throttle_configs"]
    stored = await repo.action_configs()
    for portal, action, policy in plan.configs:
        if (portal, action) in stored:
            tally.skip("already configured", f"portal {portal} action {action}")
            continue
        tally.imported += 1
        stored[portal, action] = policy
        if not dry_run:
            await repo.set_action_config(portal, action, policy)
    specs = {}
    for key, policy in stored.items():
        try:
            specs[key] = rates.spec_from_mapping(policy, where="action_config")
        except Exception:  # a stored row (edited by hand?): intake leaves it out too
            continue
    return specs


async def _write_actions(
    repo: Repository,
    conn: Any,
    plan: Plan,
    admin: Mapping[tuple[int, int], rates.PolicySpec],
    defaults: rates.PolicySpec,
    dry_run: bool,
) -> None:
    from throttled import rates

    tally, fresh = plan.tallies["action_executions"], []
    for start in range(0, len(plan.actions), BATCH):
        chunk = plan.actions[start : start + BATCH]
        stored = await repo.stored_callbacks([a.callback_id for a in chunk])
        for a in chunk:
            if a.callback_id in stored:
                tally.skip("already in throttled", a.callback_id)
            else:
                fresh.append(a)
    latest = {a.queue_key: a for a in fresh}  # (by arrival: the last one's rate, as intake)
    policies = {}
    for key, a in latest.items():
        spec, problems = rates.parse_input_fields(a.fields)
        if problems:
            tally.notes["queues whose rate fields are invalid (config or defaults used)"] += 1
        config = admin.get((a.portal_id, a.action_id))
        policies[key] = rates.resolve([spec, *([config] if config else []), defaults]).to_json()
    if dry_run:
        tally.imported += len(fresh)
        return
    keys = list(latest)
    values = [keys, [latest[k].portal_id for k in keys], [policies[k] for k in keys]]
    recorded = bool(await conn.fetchval(_RECORDED))
    if recorded:
        values += [[latest[k].action_id for k in keys], [latest[k].fields for k in keys]]
    rows = await conn.fetch(_add_queues(recorded), *values)
    queue_ids = {r["key"]: r["id"] for r in rows}
    for start in range(0, len(fresh), BATCH):
        added = await _add_actions(conn, fresh[start : start + BATCH], queue_ids)
        tally.imported += len(added)
        for a in fresh[start : start + BATCH]:
            if a.callback_id not in added:  # (stored meanwhile, by a running daemon)
                tally.skip("already in throttled", a.callback_id)


async def _add_actions(conn: Any, chunk: list[ActionImport], queue_ids: dict[str, int]) -> set[str]:
    """Insert one batch; return the callbackIds stored (the others existed)."""
    rows = await conn.fetch(
        _ADD_ACTIONS,
        [a.callback_id for a in chunk],
        [queue_ids[a.queue_key] for a in chunk],
        [a.portal_id for a in chunk],
        [a.received_at for a in chunk],
        [a.deadline for a in chunk],
        [a.not_before for a in chunk],
        [a.attempts for a in chunk],
        [a.failures for a in chunk],
        [a.last_error for a in chunk],
        [a.workflow_id for a in chunk],
        [a.fields for a in chunk],
    )
    return {r["callback_id"] for r in rows}


# --- the command -----------------------------------------------------------------------------


def _old_keys(args: argparse.Namespace) -> tuple[bytes, ...] | None:
    """The original's key candidates: from the file, the flag, or the environment."""
    from throttled.legacy_crypto import MAX_KEY_TEXT, KeyFormatError, parse_old_key

    if args.old_encryption_key_file is not None:
        where, path = "--old-encryption-key-file", args.old_encryption_key_file
        try:
            with open(path, "rb") as file:
                text = file.read(MAX_KEY_TEXT + 1).decode("utf-8")
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise _Fatal(f"{where}: cannot read {path}: {reason}") from None
    elif args.old_encryption_key is not None:
        where, text = "--old-encryption-key", args.old_encryption_key
    else:
        where, text = KEY_ENV, os.environ.get(KEY_ENV, "")
        if not text:
            return None
    try:
        return parse_old_key(text)
    except KeyFormatError as exc:
        raise _Fatal(f"{where}: {exc}") from None


def _import(args: argparse.Namespace) -> int:
    from throttled import legacy_source as source
    from throttled.cli_portals import _database, _load
    from throttled.daemon import keyring_for

    cfg = _load(args)
    keys = _old_keys(args)
    keyring = keyring_for(cfg)  # (a key problem is reported before any database work)

    async def run() -> Plan:
        rows = await source.read(args.source_url, cfg.database.connect_timeout_s)
        if keys is None and rows["oauth_tokens"]:
            raise _Fatal(
                f"oauth_tokens holds {len(rows['oauth_tokens'])} row(s): the original's "
                f"ENCRYPTION_KEY is needed (${KEY_ENV} or --old-encryption-key-file)"
            )
        plan = source.Plan()
        source.plan_tokens(rows["oauth_tokens"], keys or (), args.accept_plaintext_tokens, plan)
        source.plan_configs(rows["throttle_configs"], plan)
        expiry_s = cfg.block_expiration_s()
        source.plan_actions(rows["action_executions"], expiry_s, time.time(), plan)
        async with _database(cfg) as repo:
            await write(repo, plan, keyring, cfg, dry_run=args.dry_run, target=target)
        return plan

    try:
        target = source.audit_target(args.source_url)
        plan = asyncio.run(run())
    except source.SourceError as exc:
        raise _Fatal(str(exc)) from None
    _report(plan, target, args.dry_run, args.json)
    return 0


def _report(plan: Plan, target: str, dry_run: bool, as_json: bool) -> None:
    from throttled.cli_portals import _dump, _text

    if as_json:
        body = {"source": target, "dry_run": dry_run, **plan.counts()}
        for name, tally in plan.tallies.items():
            body["tables"][name]["examples"] = tally.examples
        _dump(body)
        return
    print(f"{_text(target)}{' (dry run: nothing was written)' if dry_run else ''}")
    for name, tally in plan.tallies.items():
        counts = tally.counts()
        reasons = ", ".join(f"{n} {r}" for r, n in counts["skip_reasons"].items())
        verb = "to import" if dry_run else "imported"
        print(
            f"{name:<18} {counts['imported']} {verb}, {counts['skipped']} skipped"
            + (f" ({_text(reasons, 400)})" if reasons else "")
        )
        for reason, refs in tally.examples.items():
            more = ", …" if tally.skipped[reason] > len(refs) else ""
            print(f"  {_text(reason)}: {', '.join(_text(r, 100) for r in refs)}{more}")
        for note, n in counts["notes"].items():
            print(f"  note: {n} {_text(note)}")
    if plan.plaintext:
        shown = ", ".join(map(str, plan.plaintext))
        print(f"tokens stored unencrypted in the original: portal(s) {shown}", file=sys.stderr)
