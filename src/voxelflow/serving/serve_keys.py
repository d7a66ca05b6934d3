"""API keys of the inference service: stored as SHA-256 digests in the shared database, with roles."""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

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
        return key

    def revoke(self, key: str) -> bool:
        """Remove a key; True if it existed."""
        with self.db.transaction() as conn:
            return conn.execute(delete(api_keys).where(api_keys.c.digest == self._digest(key))).rowcount > 0

    def revoke_name(self, name: str) -> int:
        """Remove every key of ``name``; how many there were."""
        with self.db.transaction() as conn:
            return conn.execute(delete(api_keys).where(api_keys.c.name == name)).rowcount

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
        return Principal(row.name, tuple(sorted({LEGACY_ROLES.get(r, r) for r in json.loads(row.roles)})))


def _aware(when):
    """SQLite hands datetimes back without their zone; they were written in UTC."""
    from datetime import timezone

    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
