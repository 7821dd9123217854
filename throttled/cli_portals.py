"""`throttled portals ...` and `throttled keys ...`: they work on the database directly, so
they work with the daemon down.

Health (error rate, latency, rate limits) lives in a running daemon's memory only: here it is
shown as unknown (`null` in --json; the other fields are those of `GET /api/portals`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from throttled import logs
from throttled.cli import MAX_PORTAL_ID, _config, _Fatal, _int_in, cli_actor
from throttled.hubspot.oauth import MAX_TOKEN_CHARS, valid_token

if TYPE_CHECKING:
    from throttled.config import Config
    from throttled.crypto import KeyRing
    from throttled.db.repository import Backlog, PortalRow, Repository
    from throttled.tokens import Tokens

DISCONNECT_REASON = "disconnected by an operator (CLI)"
# The fields of a portal only a running daemon knows (its memory of recent calls).
HEALTH_FIELDS = (
    "health",
    "error_rate",
    "average_latency_ms",
    "consecutive_failures",
    "rate_limit",
)
TOKEN_COLUMNS = (("refresh_token", "refresh"), ("access_token", "access"))

Parsers = Callable[..., argparse.ArgumentParser]


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Register `portals ...` and `keys ...` on the top-level subparsers."""
    portal_id = _int_in(1, MAX_PORTAL_ID)

    def group(name: str, help_text: str) -> Parsers:
        parent = sub.add_parser(name, help=help_text, description=help_text)
        children = parent.add_subparsers(required=True)

        def command(
            child: str, func: Callable[[argparse.Namespace], int], text: str, more: str = ""
        ) -> argparse.ArgumentParser:
            p: argparse.ArgumentParser = children.add_parser(
                child, help=text, description=text + more
            )
            if func is not _keys_generate:  # (the one that needs no config)
                p.add_argument(
                    "--config",
                    help="config file (default ./throttled.toml, then "
                    "/etc/throttled/throttled.toml)",
                )
            p.set_defaults(func=func, command=f"{name} {child}")
            return p

        return command

    portals = group("portals", "manage connected HubSpot portals (the daemon may be down)")
    listing = portals("list", _list, "every known portal: connection, token, backlog")
    listing.add_argument("--json", action="store_true", help='print {"portals": [...]}')
    show = portals("show", _show, "one portal in detail")
    show.add_argument("portal_id", metavar="ID", type=portal_id)
    show.add_argument("--json", action="store_true", help="print the portal as JSON")
    test = portals("test", _test, "token-info at HubSpot with a fresh token, and its latency")
    test.add_argument("portal_id", metavar="ID", type=portal_id)
    test.add_argument("--json", action="store_true", help="print the result as JSON")
    disconnect = portals(
        "disconnect",
        _disconnect,
        "revoke the refresh token at HubSpot, delete the stored tokens; actions wait",
        " until the portal is connected again. A running daemon may go on using the access "
        "token it holds in memory until that expires: DELETE /api/portals/{id}/connection "
        "disconnects through the daemon at once",
    )
    disconnect.add_argument("portal_id", metavar="ID", type=portal_id)
    disconnect.add_argument(
        "--no-revoke", action="store_true", help="do not revoke the refresh token at HubSpot"
    )
    disconnect.add_argument("--json", action="store_true", help="print the result as JSON")
    connect = portals("connect", _connect, "store a portal's OAuth refresh token (encrypted)")
    connect.add_argument("--portal-id", type=portal_id, required=True)
    connect.add_argument("--refresh-token", help="the refresh token (default: read from stdin)")

    keys = group("keys", "encryption keys of the stored tokens")
    keys("generate", _keys_generate, "print a new random 32-byte key (base64)")
    rotate = keys(
        "rotate",
        _keys_rotate,
        "re-encrypt every stored token under security.encryption_key",
        ", reading them with it and security.previous_encryption_keys, in batches, one "
        "transaction each. Run it once the daemon runs with the new key; a token no key "
        "opens is left as it is and reported (exit 1)",
    )
    rotate.add_argument(
        "--batch-size",
        type=_int_in(1, 10_000),
        default=500,
        help="portals per transaction (1..10000, default 500)",
    )
    rotate.add_argument("--json", action="store_true", help="print the counts as JSON")


# --- set-up ----------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> Config:
    """The config, and logging on stderr: at "info" (the default) only warnings and up, as
    the command prints what it did; "debug" is kept."""
    cfg = _config(args)
    logs.setup("warning" if cfg.logging.level == "info" else cfg.logging.level, cfg.logging.format)
    args.logging_ready = True
    return cfg


@contextlib.asynccontextmanager
async def _database(cfg: Config) -> AsyncIterator[Repository]:
    """The configured database, refused while migrations are pending."""
    from throttled.daemon import database_url
    from throttled.db import migrate
    from throttled.db.repository import Repository

    timeout = cfg.database.connect_timeout_s
    async with database_url(cfg) as url:
        pending = await asyncio.to_thread(migrate.pending, url, connect_timeout_s=timeout)
        if pending:
            raise _Fatal(
                f"{len(pending)} database migration(s) pending ({', '.join(pending)}); "
                f"run: throttled migrate --config {cfg.source}"
            )
        async with Repository.open(url, min_size=1, max_size=2, timeout=timeout) as repo:
            yield repo


@contextlib.asynccontextmanager
async def _tokens(cfg: Config) -> AsyncIterator[tuple[Repository, Tokens]]:
    """The repository and the daemon's token store over it (never auto-connecting)."""
    import aiohttp

    from throttled.daemon import keyring_for, make_tokens

    keyring = keyring_for(cfg)  # (a key problem is reported before any database work)
    async with _database(cfg) as repo, aiohttp.ClientSession() as session:
        yield repo, make_tokens(cfg, repo, session, keyring, cfg.hubspot.api_base_url)


async def _find(repo: Repository, portal_id: int) -> PortalRow | None:
    """The portal's row; a portal with actions but never connected is known too."""
    return await repo.find_portal(portal_id)


def _unknown(portal_id: int) -> _Fatal:
    return _Fatal(f"portal {portal_id} is not connected and has no actions")


def _view(row: PortalRow, backlog: Backlog) -> dict[str, Any]:
    """The API's view of a portal, with what only a running daemon knows as unknown."""
    from throttled.web.admin import portal_view

    view = portal_view(row, backlog, None)
    for name in HEALTH_FIELDS:
        view[name] = None
    return view


def _dump(value: Any) -> None:
    print(json.dumps(value, indent=2))  # (ASCII: stored text cannot reach the terminal raw)


# --- text for people -------------------------------------------------------------------------


def _text(value: object, limit: int = 200) -> str:
    """One line of printable text (stored values are not trusted with a terminal)."""
    text = " ".join("".join(c if c.isprintable() else " " for c in str(value)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _when(iso: str | None, now: datetime | None = None) -> str:
    """An ISO instant as 'YYYY-MM-DD HH:MM:SSZ', relative to now when given."""
    if iso is None:
        return "-"
    at = datetime.fromisoformat(iso).astimezone(UTC)
    shown = at.strftime("%Y-%m-%d %H:%M:%SZ")
    if now is None:
        return shown
    seconds = (at - now).total_seconds()
    return f"{shown} ({'in ' + _span(seconds) if seconds > 0 else 'expired'})"


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{int(seconds)}s"
    if seconds < 90 * 60:
        return f"{int(seconds // 60)}m"
    if seconds < 36 * 3600:
        return f"{int(seconds // 3600)}h"
    return f"{int(seconds // 86400)}d"


def _scopes(scopes: list[str], width: int = 40) -> str:
    """Scopes joined by commas, cut to about `width` with a count of the rest."""
    if not scopes:
        return "-"
    shown: list[str] = []
    for n, scope in enumerate(scopes):
        rest = len(scopes) - n - 1
        candidate = ",".join([*shown, _text(scope, 60)])
        if len(candidate) + (len(f",+{rest}") if rest else 0) > width and shown:
            break
        shown.append(_text(scope, 60))
    more = len(scopes) - len(shown)
    return ",".join(shown) + (f",+{more}" if more else "")


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """Aligned columns (two spaces apart); `right` holds the indexes of numeric columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  ".join(padded).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _portal_table(views: list[dict[str, Any]]) -> list[str]:
    now = datetime.now(UTC)
    headers = [
        "PORTAL",
        "CONNECTION",
        "SCOPES",
        "TOKEN EXPIRES",
        "LAST REFRESH",
        "PENDING",
        "FAILED",
        "EXPIRED",
    ]
    with_reason = any(v["disconnected_reason"] for v in views)
    if with_reason:
        headers.append("REASON")
    rows = []
    for v in views:
        backlog = v["backlog"]
        row = [
            str(v["portal_id"]),
            _text(v["connection"]),
            _scopes(v["scopes"]),
            _when(v["token_expires_at"], now),
            _when(v["last_refresh_at"]),
            str(backlog["pending"]),
            str(backlog["failed"]),
            str(backlog["expired"]),
        ]
        if with_reason:
            row.append(_text(v["disconnected_reason"] or "", 120))
        rows.append(row)
    return _table(headers, rows, right={0, 5, 6, 7})


def _portal_lines(v: dict[str, Any]) -> list[str]:
    backlog = v["backlog"]
    pairs = [
        ("portal", str(v["portal_id"])),
        ("connection", _text(v["connection"])),
        ("disconnected reason", _text(v["disconnected_reason"] or "-", 300)),
        ("disconnected at", _when(v["disconnected_at"])),
        ("hub domain", _text(v["hub_domain"] or "-")),
        ("scopes", ", ".join(_text(s) for s in v["scopes"]) or "-"),
        ("token expires", _when(v["token_expires_at"], datetime.now(UTC))),
        ("last refresh", _when(v["last_refresh_at"])),
        ("last refresh error", _text(v["last_refresh_error"] or "-", 300)),
        ("connected at", _when(v["connected_at"])),
        (
            "backlog",
            f"{backlog['pending']} pending, {backlog['failed']} failed, "
            f"{backlog['expired']} expired",
        ),
        (
            "health",
            "unknown here (a running daemon keeps it: GET /api/portals/"
            f"{v['portal_id']}, or throttled portals test {v['portal_id']})",
        ),
    ]
    width = max(len(k) for k, _ in pairs) + 2
    return [f"{(k + ':').ljust(width)}{value}" for k, value in pairs]


# --- portals ---------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    from throttled.db.repository import Backlog

    cfg = _load(args)

    async def run() -> list[dict[str, Any]]:
        async with _database(cfg) as repo:
            rows = await repo.list_portals()
            backlog = await repo.portal_backlog()
        return [_view(r, backlog.get(r.portal_id, Backlog())) for r in rows]

    views = asyncio.run(run())
    if args.json:
        _dump({"portals": views})
    elif not views:
        print(
            "no portals yet: install the app on one (/api/oauth/authorize) or run: "
            "throttled portals connect"
        )
    else:
        print("\n".join(_portal_table(views)))
    return 0


def _show(args: argparse.Namespace) -> int:
    from throttled.db.repository import Backlog

    cfg = _load(args)
    pid: int = args.portal_id

    async def run() -> dict[str, Any]:
        async with _database(cfg) as repo:
            row = await _find(repo, pid)
            if row is None:
                raise _unknown(pid)
            backlog = (await repo.portal_backlog(pid)).get(pid, Backlog())
        return _view(row, backlog)

    view = asyncio.run(run())
    if args.json:
        _dump(view)
    else:
        print("\n".join(_portal_lines(view)))
    return 0


def _test(args: argparse.Namespace) -> int:
    cfg = _load(args)
    pid: int = args.portal_id
    if cfg.hubspot.mock:
        raise _Fatal(
            "hubspot.mock is on: the mock HubSpot runs inside the daemon, so there is nothing "
            f"to test against from here; with the daemon up: POST /api/portals/{pid}/test"
        )

    async def run() -> dict[str, Any]:
        async with _tokens(cfg) as (repo, tokens):
            if await _find(repo, pid) is None:
                raise _unknown(pid)
            result = await tokens.test(pid)
        return result.as_json(pid)

    body = asyncio.run(run())
    if args.json:
        _dump(body)
    elif body["ok"]:
        print(f"portal {pid}: ok ({body['latency_ms']} ms)")
        print(f"hub id:      {body['hub_id'] if body['hub_id'] is not None else '-'}")
        print(f"hub domain:  {_text(body['hub_domain'] or '-')}")
        print(f"scopes:      {', '.join(_text(s) for s in body['scopes'] or []) or '-'}")
    else:
        print(f"portal {pid}: FAILED ({body['latency_ms']} ms): {_text(body['error'], 400)}")
    return 0 if body["ok"] else 1


def _disconnect(args: argparse.Namespace) -> int:
    cfg = _load(args)
    pid: int = args.portal_id

    async def run() -> dict[str, Any]:
        async with _tokens(cfg) as (repo, tokens):
            row = await repo.get_portal(pid)
            if row is None:
                if await _find(repo, pid) is None:
                    raise _unknown(pid)
                raise _Fatal(f"portal {pid} was never connected: there is nothing to disconnect")
            if row.status == "disconnected":  # (its reason is kept, not overwritten)
                return _disconnected(pid, False, "already_disconnected")
            if args.no_revoke:
                revocation = "not_requested"
            elif cfg.hubspot.mock:
                revocation = "mock"  # (there is no HubSpot to revoke at)
            elif row.refresh_token is None:
                revocation = "no_token"
            else:
                revocation = "requested"
            revoked = await tokens.disconnect(
                pid, DISCONNECT_REASON, revoke=revocation == "requested"
            )
            if revocation == "requested":
                revocation = "confirmed" if revoked else "failed"
            body = _disconnected(pid, revoked, revocation)
            after = {k: body[k] for k in ("connection", "revoked", "revocation")}
            await repo.add_audit(
                cli_actor(), "portal.disconnect", f"portal:{pid}", {"connection": row.status}, after
            )
            return body

    body = asyncio.run(run())
    if args.json:
        _dump(body)
        return 0
    print(_DISCONNECT_TEXT[body["revocation"]].format(pid=pid))
    if body["revocation"] != "already_disconnected":
        print(
            "note: a running daemon may use the access token it holds in memory until it "
            f"expires; DELETE /api/portals/{pid}/connection disconnects through it at once",
            file=sys.stderr,
        )
    return 0


def _disconnected(pid: int, revoked: bool, revocation: str) -> dict[str, Any]:
    return {
        "portal_id": pid,
        "connection": "disconnected",
        "revoked": revoked,
        "revocation": revocation,
    }


_DISCONNECT_TEXT = {
    "confirmed": "portal {pid} disconnected: HubSpot confirmed the revocation of its refresh "
    "token; the stored tokens are deleted, its actions wait until it is connected again",
    "failed": "portal {pid} disconnected, but HubSpot did NOT confirm the revocation (see the "
    "warning logged above): the refresh token may still be valid at HubSpot; the stored "
    "tokens are deleted, its actions wait until it is connected again",
    "not_requested": "portal {pid} disconnected (not revoked at HubSpot: --no-revoke); the "
    "stored tokens are deleted, its actions wait until it is connected again",
    "mock": "portal {pid} disconnected (not revoked: hubspot.mock is on); the stored tokens "
    "are deleted, its actions wait until it is connected again",
    "no_token": "portal {pid} disconnected (no refresh token was stored to revoke); its "
    "actions wait until it is connected again",
    "already_disconnected": "portal {pid} is already disconnected; nothing changed",
}


def _refresh_token(args: argparse.Namespace) -> str:
    """--refresh-token, or the first line of stdin; printable text of bounded length."""
    try:
        given = (
            args.refresh_token
            if args.refresh_token is not None
            else sys.stdin.readline(MAX_TOKEN_CHARS + 3)  # (a bounded first line)
        )
    except UnicodeDecodeError:
        raise _Fatal("the refresh token on stdin is not UTF-8 text") from None
    token = given.strip()
    if not token:
        raise _Fatal("no refresh token given (--refresh-token or stdin)")
    if not valid_token(token):  # what HubSpot's tokens are, and what a refresh can send
        raise _Fatal(
            f"the refresh token must be 1..{MAX_TOKEN_CHARS} printable ASCII characters "
            "without spaces"
        )
    return token


def _connect(args: argparse.Namespace) -> int:
    cfg = _load(args)
    token = _refresh_token(args)

    async def run() -> None:
        pid: int = args.portal_id
        async with _tokens(cfg) as (repo, tokens):
            row = await repo.get_portal(pid)
            await tokens.connect(pid, token)
            before = None if row is None else {"connection": row.status}
            # (never the token: what changed is that one is stored)
            await repo.add_audit(
                cli_actor(), "portal.connect", f"portal:{pid}", before, {"connection": "connected"}
            )

    asyncio.run(run())
    print(f"portal {args.portal_id} connected (refresh token stored encrypted)")
    return 0


# --- keys ------------------------------------------------------------------------------------


def _keys_generate(args: argparse.Namespace) -> int:
    from throttled.crypto import generate_key

    print(generate_key())
    print(
        "set it as security.encryption_key (or ENCRYPTION_KEY); to rotate, move the old key "
        "to security.previous_encryption_keys, restart, then run: throttled keys rotate",
        file=sys.stderr,
    )
    return 0


@dataclass
class _Rotation:
    """What `keys rotate` found, over the committed batches."""

    rotated: int = 0
    current: int = 0
    unreadable: list[dict[str, Any]] = field(default_factory=list)

    def add(self, other: _Rotation) -> None:
        self.rotated += other.rotated
        self.current += other.current
        self.unreadable += other.unreadable


def _reencrypt(
    keyring: KeyRing, row: Mapping[str, Any], found: _Rotation
) -> tuple[str | None, str | None] | None:
    """The row's ciphertexts under the current key, or None when none changes. A ciphertext
    no key opens (for this portal and column) is left as it is and reported."""
    from throttled.crypto import CryptoError
    from throttled.tokens import token_aad

    pid: int = row["portal_id"]
    new: list[str | None] = []
    errors: dict[str, str] = {}
    for column, kind in TOKEN_COLUMNS:
        sealed: str | None = row[column]
        if not sealed:  # (none stored: NULL, or an install's empty access token)
            new.append(sealed)
            continue
        aad = token_aad(pid, kind)
        try:
            plain = keyring.decrypt(sealed, aad=aad)
        except CryptoError as exc:
            errors[column] = str(exc)
            new.append(sealed)
            continue
        new.append(keyring.encrypt(plain, aad=aad) if keyring.needs_rotation(sealed) else sealed)
    changed = new != [row[column] for column, _ in TOKEN_COLUMNS]
    if errors:
        found.unreadable.append({"portal_id": pid, "columns": errors})
    if changed:
        found.rotated += 1
    elif not errors:
        found.current += 1
    return (new[0], new[1]) if changed else None


def _rotated(keyring: KeyRing, total: _Rotation) -> dict[str, Any]:
    """A rotation for the audit log: key ids (sha256 prefixes, not keys) and counts."""
    from throttled.crypto import key_id

    return {
        "key_id": keyring.primary_id,
        "previous_key_ids": [key_id(k) for k in keyring.previous],
        "rotated": total.rotated,
        "current": total.current,
        "unreadable": len(total.unreadable),
    }


def _keys_rotate(args: argparse.Namespace) -> int:
    from throttled.daemon import keyring_for
    from throttled.db.repository import DatabaseError

    cfg = _load(args)
    keyring = keyring_for(cfg)
    total = _Rotation()

    async def run() -> None:
        async with _database(cfg) as repo:
            after: int | None = None  # (from the first row, whatever its id)
            while True:
                batch = _Rotation()
                try:
                    last, _ = await repo.reencrypt_batch(
                        after, args.batch_size, functools.partial(_reencrypt, keyring, found=batch)
                    )
                except DatabaseError as exc:
                    raise _Fatal(
                        f"database error: {exc} (after {total.rotated} portal(s) re-encrypted "
                        "and committed; run it again to go on)"
                    ) from None
                total.add(batch)  # (committed)
                seen = batch.rotated + batch.current + len(batch.unreadable)
                if last is None or seen < args.batch_size:
                    break
                after = last
            await repo.add_audit(cli_actor(), "keys.rotate", "keys", None, _rotated(keyring, total))

    asyncio.run(run())
    bad = total.unreadable
    if args.json:
        _dump(
            {
                "key_id": keyring.primary_id,
                "rotated": total.rotated,
                "current": total.current,
                "unreadable": len(bad),
                "unreadable_portals": bad,
            }
        )
        return 1 if bad else 0
    print(
        f"key {keyring.primary_id}: {total.rotated} portal(s) re-encrypted, "
        f"{total.current} already under it, {len(bad)} unreadable"
    )
    for entry in bad:
        detail = "; ".join(f"{c}: {_text(e)}" for c, e in entry["columns"].items())
        print(f"unreadable, left as it is: portal {entry['portal_id']} ({detail})")
    if bad and not keyring.previous:
        print(
            "hint: no security.previous_encryption_keys are configured: add the key(s) these "
            "were encrypted with, then run it again",
            file=sys.stderr,
        )
    return 1 if bad else 0
