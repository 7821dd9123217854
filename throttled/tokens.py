"""Per-portal OAuth access tokens: cached in memory, encrypted at rest, refreshed early."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from throttled.crypto import CryptoError, KeyRing
from throttled.db.repository import Repository
from throttled.hubspot.client import HubSpotClient, TokenError

log = structlog.get_logger(__name__)


class PortalNotConnected(Exception):
    """No refresh token is stored for this portal."""


@dataclass(slots=True)
class _Cached:
    token: str
    expires_at: float


def _aad(portal_id: int, kind: str) -> bytes:
    """Bind each ciphertext to its portal and purpose, so rows cannot be swapped."""
    return f"portal:{portal_id}:{kind}".encode()


class Tokens:
    """Hands out a valid access token per portal; one refresh at a time per portal."""

    def __init__(
        self,
        repo: Repository,
        client: HubSpotClient,
        keyring: KeyRing,
        *,
        margin_s: float = 300.0,
        clock: Callable[[], float],
        mock_refresh_token: Callable[[int], str] | None = None,
    ) -> None:
        self._repo = repo
        self._client = client
        self._keyring = keyring
        self._margin_s = margin_s
        self._clock = clock
        self._mock_refresh = mock_refresh_token
        self._cache: dict[int, _Cached] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._stale: set[int] = set()
        self.refreshes = 0

    async def connect(self, portal_id: int, refresh_token: str) -> None:
        """Store a portal's refresh token, encrypted."""
        encrypted = self._keyring.encrypt(refresh_token, aad=_aad(portal_id, "refresh"))
        await self._repo.set_refresh_token(portal_id, encrypted)
        self._cache.pop(portal_id, None)

    def invalidate(self, portal_id: int) -> None:
        """Distrust the current token (HubSpot said 401): the next call refreshes."""
        self._cache.pop(portal_id, None)
        self._stale.add(portal_id)

    async def access_token(self, portal_id: int) -> str:
        """A token valid for at least the margin; refreshes when needed."""
        cached = self._cache.get(portal_id)
        if cached is not None and cached.expires_at - self._margin_s > self._clock():
            return cached.token
        lock = self._locks.setdefault(portal_id, asyncio.Lock())
        async with lock:
            cached = self._cache.get(portal_id)
            if cached is not None and cached.expires_at - self._margin_s > self._clock():
                return cached.token
            return await self._load_or_refresh(portal_id)

    async def _load_or_refresh(self, portal_id: int) -> str:
        row = await self._repo.get_portal(portal_id)
        if (row is None or row.refresh_token is None) and self._mock_refresh is not None:
            await self.connect(portal_id, self._mock_refresh(portal_id))
            row = await self._repo.get_portal(portal_id)
        if row is None or row.refresh_token is None:
            raise PortalNotConnected(f"portal {portal_id} has no stored refresh token")
        if row.access_token and row.access_expires_at and portal_id not in self._stale:
            expires = row.access_expires_at.timestamp()
            if expires - self._margin_s > self._clock():
                try:
                    token = self._keyring.decrypt(row.access_token, aad=_aad(portal_id, "access"))
                except CryptoError as exc:  # a stored row: unreadable means "refresh it"
                    log.warning("access_token_unreadable", portal_id=portal_id, error=str(exc))
                else:
                    self._cache[portal_id] = _Cached(token, expires)
                    return token
        refresh = self._keyring.decrypt(row.refresh_token, aad=_aad(portal_id, "refresh"))
        return await self._refresh(portal_id, refresh)

    async def _refresh(self, portal_id: int, refresh_token: str) -> str:
        try:
            granted = await self._client.refresh(refresh_token)
        except TokenError as exc:
            log.warning("token_refresh_failed", portal_id=portal_id, error=str(exc))
            raise
        self.refreshes += 1
        self._stale.discard(portal_id)
        expires = self._clock() + granted.expires_in
        await self._repo.save_tokens(
            portal_id,
            self._keyring.encrypt(granted.refresh_token, aad=_aad(portal_id, "refresh")),
            self._keyring.encrypt(granted.access_token, aad=_aad(portal_id, "access")),
            datetime.fromtimestamp(expires, UTC),
        )
        self._cache[portal_id] = _Cached(granted.access_token, expires)
        log.info("token_refreshed", portal_id=portal_id, expires_in=granted.expires_in)
        return granted.access_token
