"""API keys of the inference service: stored as SHA-256 digests in the shared database, with roles; the service
verifies them from an in-memory copy of the digests (:class:`KeyCache`)."""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

from sqlalchemy import delete, insert, select

from voxelflow.core.db import Database, api_keys, now

#: what each role may do; admin may do everything
ROLES = {
    "viewer": {"model", "metrics"},
    "predictor": {"model", "metrics", "segment"},
    "operator": {"model", "metrics", "reload"},
    "admin": {"model", "metrics", "segment", "reload", "keys"},
}
LEGACY_ROLES = {"predict": "predictor"}  # keys made before the four roles


@dataclass(frozen=True)
class Principal:
    name: str
    roles: tuple[str, ...]


class KeyStore:
    """API keys in the shared database, stored as SHA-256 digests; the key itself is shown once."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.generation = 0  # bumped by every change made through this store: a KeyCache on it reloads at once

    @staticmethod
    def _digest(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    @staticmethod
    def normalise(roles: list[str]) -> list[str]:
        roles = [LEGACY_ROLES.get(r, r) for r in roles]
        bad = sorted(set(roles) - set(ROLES))
        if bad or not roles:
            raise ValueError(f"unknown role(s) {bad or roles}: choose from {', '.join(ROLES)}")
        return sorted(set(roles))

    def create(self, name: str, roles: list[str], expires_days: float | None = None) -> str:
        """A new random key for ``name``; only its digest is stored."""
        from datetime import timedelta

        roles = self.normalise(roles)
        if expires_days is not None and expires_days <= 0:
            raise ValueError("expires_days must be positive")
        key = "vf_" + secrets.token_urlsafe(32)
        created = now()
        expires = created + timedelta(days=expires_days) if expires_days is not None else None
        with self.db.transaction() as conn:
            conn.execute(insert(api_keys).values(digest=self._digest(key), name=name, roles=json.dumps(roles),
                                                 created=created, expires=expires))
        self.generation += 1
        return key

    def revoke(self, key: str) -> bool:
        """Remove a key; True if it existed."""
        with self.db.transaction() as conn:
            removed = conn.execute(delete(api_keys).where(api_keys.c.digest == self._digest(key))).rowcount > 0
        self.generation += 1
        return removed

    def revoke_name(self, name: str) -> int:
        """Remove every key of ``name``; how many there were."""
        with self.db.transaction() as conn:
            removed = conn.execute(delete(api_keys).where(api_keys.c.name == name)).rowcount
        self.generation += 1
        return removed

    def list(self) -> list[dict[str, Any]]:
        """Every key's name, roles, creation and expiry (never the key or its digest)."""
        with self.db.transaction() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.name, api_keys.c.created)).all()
        return [{"name": r.name, "roles": json.loads(r.roles), "created": _aware(r.created).isoformat(),
                 "expires": _aware(r.expires).isoformat() if r.expires else None,
                 "expired": r.expires is not None and _aware(r.expires) <= now()} for r in rows]

    def lookup(self, key: str | None) -> Principal | None:
        if not key:
            return None
        with self.db.transaction() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.digest == self._digest(key))).first()
        if row is None or (row.expires is not None and _aware(row.expires) <= now()):
            return None
        return _principal(row)

    def digests(self) -> dict[str, tuple[Principal, datetime | None]]:
        """Every key's digest with its principal and expiry (UTC, or None): what a :class:`KeyCache` holds."""
        with self.db.transaction() as conn:
            rows = conn.execute(select(api_keys.c.digest, api_keys.c.name, api_keys.c.roles,
                                       api_keys.c.expires)).all()
        return {r.digest: (_principal(r), _aware(r.expires) if r.expires is not None else None) for r in rows}


class KeyCache:
    """The service's view of the keys: every key's digest, principal and expiry, read from the database in one
    query and kept in memory, so verifying a key costs a SHA-256 and a dict lookup, not a database round trip.

    - An expired key is refused at once: its expiry is held and compared with the clock on every request.
    - A revoked key (deleted by ``voxelflow keys revoke`` in any process) is refused within ``ttl_s`` seconds: a
      copy older than that is read again before it answers; a change made through the same :class:`KeyStore`
      (its ``generation``) is seen on the next request.
    - An unknown key is never remembered: each request with it is checked against the copy, which is read
      again first when it is older than ``miss_s``, so a key created in another process is accepted within
      ``miss_s``, and a flood of unknown keys costs at most one database query per ``miss_s``, however many
      requests or distinct keys it sends.

    The copy is read under a lock: concurrent requests that need a fresh one wait for one query, not one each.
    A failed read raises (the request fails); the stale copy is not used beyond ``ttl_s``.
    """

    def __init__(self, store: KeyStore, ttl_s: float = 5.0, miss_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0 or miss_s <= 0:
            raise ValueError("ttl_s and miss_s must be positive")
        self.store, self.ttl_s, self.miss_s, self.clock = store, ttl_s, min(miss_s, ttl_s), clock
        self._keys: dict[str, tuple[Principal, datetime | None]] = {}
        self._loaded_at = -float("inf")  # clock() when the copy was read
        self._generation = -1
        self._lock = threading.Lock()
        self.reads = 0  # database queries made

    def _stale(self, found: bool, at: float) -> bool:
        age = at - self._loaded_at
        return self._generation != self.store.generation or age >= self.ttl_s or (not found and age >= self.miss_s)

    def _reload(self, found: bool) -> None:
        with self._lock:
            started = self.clock()
            if not self._stale(found, started):  # another request read it meanwhile
                return
            generation = self.store.generation
            keys = self.store.digests()
            self.reads += 1
            self._keys, self._loaded_at, self._generation = keys, started, generation

    def cached(self, key: str | None) -> tuple[bool, Principal | None]:
        """``(True, principal or None)`` when the copy answers for ``key`` now; ``(False, None)`` when the copy must
        be read again first (:meth:`lookup` does that): never touches the database."""
        if not key:
            return True, None
        entry = self._keys.get(KeyStore._digest(key))
        if self._stale(entry is not None, self.clock()):
            return False, None
        return True, _valid(entry)

    def lookup(self, key: str | None) -> Principal | None:
        """The principal of a valid key, or None (unknown, revoked or expired); reads the database only when the
        copy is too old to answer (see the class)."""
        known, who = self.cached(key)
        if known:
            return who
        entry = self._keys.get(KeyStore._digest(key))
        self._reload(entry is not None)
        return _valid(self._keys.get(KeyStore._digest(key)))


def _valid(entry: tuple[Principal, datetime | None] | None) -> Principal | None:
    if entry is None:
        return None
    principal, expires = entry
    return None if expires is not None and expires <= now() else principal


def _principal(row) -> Principal:
    return Principal(row.name, tuple(sorted({LEGACY_ROLES.get(r, r) for r in json.loads(row.roles)})))


def _aware(when):
    """SQLite hands datetimes back without their zone; they were written in UTC."""
    from datetime import timezone

    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
