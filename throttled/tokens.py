"""Per-portal OAuth tokens: cached in memory, encrypted at rest, refreshed ahead of expiry.

One refresh at a time per portal, whichever instance asks: the refresh runs while holding the
portal's row lock (SELECT ... FOR UPDATE), and whoever waited on the lock finds the new token
when it gets it. A refresh HubSpot refuses with `invalid_grant` / `BAD_REFRESH_TOKEN` (the
app was uninstalled, the token revoked) disconnects the portal: its actions wait, uncounted,
until it is connected again. Any other failure is retried with the sender's backoff.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from throttled import metrics
from throttled.crypto import CryptoError, KeyRing
from throttled.db.repository import DatabaseError, PortalRow, Repository
from throttled.health import Health
from throttled.hubspot.client import TokenError
from throttled.hubspot.oauth import Grant, OAuth, OAuthRefused, TokenInfo

log = structlog.get_logger(__name__)

# The start of `last_error` for actions that wait for their portal's connection (not failures:
# they are not counted against their attempts); a new connection wakes them.
WAITING_FOR_CONNECTION = "waiting for the portal's connection"


class PortalNotConnected(Exception):
    """The portal has no usable connection (never connected, or disconnected: `reason`)."""

    def __init__(self, portal_id: int, reason: str) -> None:
        super().__init__(f"portal {portal_id}: {reason}")
        self.portal_id = portal_id
        self.reason = reason


@dataclass(slots=True)
class _Cached:
    token: str
    refresh_at: float  # refresh from then on (the margin before expiry, or half its life)
    read_at: float  # when the stored row last agreed (see RECHECK_S)


# A cached token is taken on trust for this long, then the portal's row is read again: a
# disconnect by the CLI or another instance stops this one within it.
RECHECK_S = 30.0


def token_aad(portal_id: int, kind: str) -> bytes:
    """The associated data binding a ciphertext to its portal and purpose ('refresh' or
    'access'): a value copied into another portal's row, or column, does not decrypt."""
    return f"portal:{portal_id}:{kind}".encode()


def encrypt_tokens(
    keyring: KeyRing, portal_id: int, refresh: str, access: str | None = None
) -> tuple[str, str | None]:
    """A token pair encrypted under the current key, bound to the portal."""
    sealed_access = (
        None if access is None else keyring.encrypt(access, aad=token_aad(portal_id, "access"))
    )
    return keyring.encrypt(refresh, aad=token_aad(portal_id, "refresh")), sealed_access


@dataclass(frozen=True, kw_only=True, slots=True)
class TestResult:
    """What `POST /api/portals/{id}/test` reports."""

    ok: bool
    latency_ms: float
    error: str | None = None
    hub_id: int | None = None
    scopes: tuple[str, ...] | None = None
    hub_domain: str | None = None

    def as_json(self, portal_id: int) -> dict[str, Any]:
        """The result as the API and `portals test --json` show it."""
        return {
            "portal_id": portal_id,
            "ok": self.ok,
            "latency_ms": round(self.latency_ms, 1),
            "error": self.error,
            "hub_id": self.hub_id,
            "scopes": list(self.scopes) if self.scopes is not None else None,
            "hub_domain": self.hub_domain,
        }


class Tokens:
    """Hands out a valid access token per portal."""

    def __init__(
        self,
        repo: Repository,
        oauth: OAuth,
        keyring: KeyRing,
        *,
        margin_s: float = 300.0,
        clock: Callable[[], float],
        lock_timeout_s: float = 15.0,
        recheck_s: float = 60.0,
        max_refreshing: int = 4,
        health: Health | None = None,
        mock_refresh_token: Callable[[int], str] | None = None,
    ) -> None:
        self._repo = repo
        self.oauth = oauth
        self._keyring = keyring
        self._margin_s = margin_s
        self._clock = clock
        self._lock_timeout_s = lock_timeout_s
        self._recheck_s = recheck_s
        self.health = health or Health()
        self._mock_refresh = mock_refresh_token
        self._cache: dict[int, _Cached] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        # Each refresh holds a pooled connection across its request: a few at a time.
        self._refreshing = asyncio.Semaphore(max_refreshing)
        self._stale: dict[int, str] = {}  # portal -> the access token HubSpot refused
        self._down: dict[int, tuple[float, str]] = {}  # portal -> (re-read at, reason)
        self.on_connected: Callable[[int], Awaitable[None]] | None = None
        self.refreshes = 0

    @property
    def keyring(self) -> KeyRing:
        """The key ring tokens are encrypted with."""
        return self._keyring

    # -- connecting -------------------------------------------------------------------------

    async def connect(self, portal_id: int, refresh_token: str) -> None:
        """Connect a portal with a refresh token only (`portals connect`, mock mode)."""
        refresh, _ = encrypt_tokens(self._keyring, portal_id, refresh_token)
        await self._repo.set_refresh_token(portal_id, refresh)
        self._cache.pop(portal_id, None)
        await self._connected(portal_id)

    async def install(
        self, portal_id: int, grant: Grant, scopes: Sequence[str], hub_domain: str | None
    ) -> None:
        """Store an install's tokens (a reinstall replaces them in one statement)."""
        refresh, access = encrypt_tokens(
            self._keyring, portal_id, grant.refresh_token, grant.access_token
        )
        expires = self._clock() + grant.expires_in
        await self._repo.connect_portal(
            portal_id,
            refresh=refresh,
            access=access or "",
            expires_at=_utc(expires),
            scopes=scopes,
            hub_domain=hub_domain,
        )
        self._cache[portal_id] = self._cached(grant)
        await self._connected(portal_id)

    async def _connected(self, portal_id: int) -> None:
        self._stale.pop(portal_id, None)
        self._down.pop(portal_id, None)
        self.health.connected(portal_id)
        log.info("portal_connected", portal_id=portal_id)
        await self._announce(portal_id)
        if self.on_connected is not None:
            await self.on_connected(portal_id)

    async def _announce(self, portal_id: int) -> None:
        """Tell the other processes (the daemons, when the CLI connected or disconnected a
        portal) to read the portal's connection again now, not at their next recheck."""
        try:
            await self._repo.announce({"portals": [portal_id]})
        except DatabaseError as exc:  # (they find out at their recheck)
            log.warning("portal_change_not_announced", portal_id=portal_id, error=str(exc))

    async def reread(self, portal_id: int) -> None:
        """Another process connected or disconnected the portal: forget what is known of it
        here, so the next call reads it from the database (and a connection wakes its
        rows)."""
        self._cache.pop(portal_id, None)
        self._stale.pop(portal_id, None)
        self._down.pop(portal_id, None)
        row = await self._repo.get_portal(portal_id)
        if row is not None and row.refresh_token is not None and self.on_connected is not None:
            self.health.connected(portal_id)
            await self.on_connected(portal_id)

    async def disconnect(self, portal_id: int, reason: str, *, revoke: bool = True) -> bool:
        """Revoke the refresh token at HubSpot (when asked and stored), drop the stored
        tokens, and mark the portal disconnected; its actions wait. Returns whether HubSpot
        confirmed the revocation. A failed revocation still disconnects (and is logged)."""
        row = await self._repo.get_portal(portal_id)
        revoked = False
        if revoke and row is not None and row.refresh_token is not None:
            try:
                refresh = self._keyring.decrypt(
                    row.refresh_token, aad=token_aad(portal_id, "refresh")
                )
                await self.oauth.revoke(refresh)
                revoked = True
            except (TokenError, CryptoError) as exc:
                log.warning("token_revoke_failed", portal_id=portal_id, error=str(exc))
        await self._repo.disconnect_portal(portal_id, reason)
        self._forget(portal_id, reason)
        log.info("portal_disconnected", portal_id=portal_id, reason=reason, revoked=revoked)
        await self._announce(portal_id)
        return revoked

    def _forget(self, portal_id: int, reason: str) -> None:
        self._cache.pop(portal_id, None)
        self._stale.pop(portal_id, None)
        self._down[portal_id] = (self._clock() + self._recheck_s, reason)
        self.health.disconnected(portal_id, reason)

    # -- access tokens ----------------------------------------------------------------------

    def invalidate(self, portal_id: int) -> None:
        """Distrust the current token (HubSpot said 401): the next call refreshes."""
        cached = self._cache.pop(portal_id, None)
        if cached is not None:
            self._stale[portal_id] = cached.token

    async def access_token(self, portal_id: int) -> str:
        """A token valid for at least the margin; refreshes when needed. Raises
        PortalNotConnected, TokenError, CryptoError or DatabaseError."""
        if (token := self._fresh(portal_id)) is not None:
            return token
        down = self._down.get(portal_id)
        if down is not None and self._clock() < down[0]:
            raise PortalNotConnected(portal_id, down[1])
        lock = self._locks.setdefault(portal_id, asyncio.Lock())
        async with lock:
            if (token := self._fresh(portal_id)) is not None:
                return token
            return await self._load_or_refresh(portal_id)

    def _cached(self, grant: Grant) -> _Cached:
        """A new token in the cache: refreshed the margin before it expires, or half-way
        through its life if HubSpot grants less than twice the margin (else every send would
        refresh it)."""
        now = self._clock()
        use_for = max(grant.expires_in - self._margin_s, grant.expires_in / 2)
        return _Cached(grant.access_token, now + use_for, now)

    def _fresh(self, portal_id: int) -> str | None:
        """The cached token, while it is good for longer than the margin and recently read."""
        cached = self._cache.get(portal_id)
        now = self._clock()
        if cached is None or cached.refresh_at <= now:
            return None
        if not 0 <= now - cached.read_at < RECHECK_S:
            return None
        return cached.token

    async def _load_or_refresh(self, portal_id: int) -> str:
        row = await self._repo.get_portal(portal_id)
        if (row is None or row.refresh_token is None) and self._mock_refresh is not None:
            await self.connect(portal_id, self._mock_refresh(portal_id))
            row = await self._repo.get_portal(portal_id)
        row, _ = self._require_connected(portal_id, row)
        token = self._usable(row)
        if token is not None:
            return token
        async with self._refreshing:
            return await self._refresh_locked(portal_id)

    def _require_connected(self, portal_id: int, row: PortalRow | None) -> tuple[PortalRow, str]:
        """The row and its (encrypted) refresh token; PortalNotConnected if there is none."""
        if row is not None and row.connected and row.refresh_token is not None:
            self._down.pop(portal_id, None)
            return row, row.refresh_token
        if row is None or row.status != "disconnected":
            reason = "not connected (install the app on the portal, or: throttled portals connect)"
        else:
            reason = f"disconnected: {row.disconnected_reason or 'no reason recorded'}"
        if portal_id not in self._down:  # (once, not at every look)
            log.warning("portal_not_connected", portal_id=portal_id, reason=reason)
        self._forget(portal_id, reason)
        raise PortalNotConnected(portal_id, reason)

    def _usable(self, row: PortalRow) -> str | None:
        """The stored access token, if it is good for longer than the margin and is not the
        one HubSpot refused."""
        if not row.access_token or row.access_expires_at is None:
            return None
        expires = row.access_expires_at.timestamp()
        if expires - self._margin_s <= self._clock():
            return None
        try:
            token = self._keyring.decrypt(row.access_token, aad=token_aad(row.portal_id, "access"))
        except CryptoError as exc:  # a stored row: unreadable means "refresh it"
            log.warning("access_token_unreadable", portal_id=row.portal_id, error=str(exc))
            return None
        if self._stale.get(row.portal_id) == token:
            return None
        self._stale.pop(row.portal_id, None)
        self._cache[row.portal_id] = _Cached(token, expires - self._margin_s, self._clock())
        return token

    async def _refresh_locked(self, portal_id: int) -> str:
        """Refresh under the portal's row lock, unless whoever held it before did."""
        failure: Exception | None = None
        async with self._repo.locked_portal(portal_id, lock_timeout_s=self._lock_timeout_s) as lp:
            row, sealed = self._require_connected(portal_id, lp.row)
            token = self._usable(row)  # refreshed meanwhile (by another instance)?
            if token is not None:
                return token
            refresh = self._keyring.decrypt(sealed, aad=token_aad(portal_id, "refresh"))
            started = time.monotonic()
            try:
                grant = await self.oauth.refresh(refresh)
            except OAuthRefused as exc:
                failure = exc
                if exc.revoked:
                    await lp.disconnect(f"HubSpot refused the refresh token ({exc.code})")
                else:
                    await lp.record_error(str(exc)[:300])
            except TokenError as exc:
                failure = exc
                await lp.record_error(str(exc)[:300])
            else:
                expires = self._clock() + grant.expires_in
                sealed_refresh, sealed_access = encrypt_tokens(
                    self._keyring, portal_id, grant.refresh_token, grant.access_token
                )
                await lp.save_tokens(sealed_refresh, sealed_access or "", _utc(expires))
        latency = time.monotonic() - started
        metrics.TOKEN_REFRESHES.inc(outcome=_refresh_outcome(failure))
        if failure is None:  # (committed: the lock is released)
            self.refreshes += 1
            self._stale.pop(portal_id, None)
            self._cache[portal_id] = self._cached(grant)
            self.health.refreshed(portal_id, ok=True, latency_s=latency)
            log.info("token_refreshed", portal_id=portal_id, expires_in=grant.expires_in)
            return grant.access_token
        self.health.refreshed(portal_id, ok=False, latency_s=latency, error=str(failure))
        if isinstance(failure, OAuthRefused) and failure.revoked:
            reason = f"disconnected: HubSpot refused the refresh token ({failure.code})"
            self._forget(portal_id, reason)
            log.warning("portal_disconnected", portal_id=portal_id, reason=reason)
            raise PortalNotConnected(portal_id, reason)
        log.warning("token_refresh_failed", portal_id=portal_id, error=str(failure))
        raise failure

    # -- operator checks --------------------------------------------------------------------

    async def test(self, portal_id: int) -> TestResult:
        """Token-info for a fresh token: does HubSpot know it, for which portal and scopes."""
        started = time.monotonic()
        try:  # (a DatabaseError is the caller's: storage, not the portal, failed)
            token = await self.access_token(portal_id)
            info: TokenInfo = await self.oauth.token_info(token)
        except (PortalNotConnected, TokenError, CryptoError) as exc:
            latency = (time.monotonic() - started) * 1000
            return TestResult(ok=False, latency_ms=latency, error=str(exc)[:300])
        if not info.active:  # dead before its time (revoked?): refresh once, and ask again
            self.invalidate(portal_id)
            try:
                token = await self.access_token(portal_id)
                info = await self.oauth.token_info(token)
            except (PortalNotConnected, TokenError, CryptoError) as exc:
                latency = (time.monotonic() - started) * 1000
                return TestResult(ok=False, latency_ms=latency, error=str(exc)[:300])
        latency = (time.monotonic() - started) * 1000
        if not info.active:
            return TestResult(
                ok=False, latency_ms=latency, error="HubSpot says the token is not active"
            )
        if info.hub_id is not None and info.hub_id != portal_id:
            return TestResult(
                ok=False,
                latency_ms=latency,
                error=f"the token belongs to portal {info.hub_id}",
                hub_id=info.hub_id,
            )
        if info.scopes is not None:
            await self._repo.set_portal_details(portal_id, info.scopes, info.hub_domain)
        return TestResult(
            ok=True,
            latency_ms=latency,
            hub_id=info.hub_id,
            scopes=info.scopes,
            hub_domain=info.hub_domain,
        )


def _refresh_outcome(failure: Exception | None) -> str:
    """ok; revoked (the portal is disconnected); refused (another OAuth error); failed
    (no answer, or an unreadable one)."""
    if failure is None:
        return "ok"
    if isinstance(failure, OAuthRefused):
        return "revoked" if failure.revoked else "refused"
    return "failed"


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
