"""Digests of the services a lifecycle's state lives in, so that two processes can check they agree
without either printing an address (a database URL may hold a password).

Two spellings of one place give one digest: the driver (``postgresql+psycopg`` and ``postgresql``),
credentials, a default port, a trailing slash and a relative SQLite path are not told apart.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "http": 80, "https": 443, "mssql": 1433}


def _database(url: str) -> str:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    backend = u.drivername.split("+")[0]
    if backend == "sqlite":
        return f"sqlite:{Path(u.database).expanduser().resolve() if u.database else ':memory:'}"
    port = u.port or _DEFAULT_PORTS.get(backend)
    return f"{backend}://{(u.host or '').lower()}:{port}/{u.database or ''}"


def _tracking(uri: str) -> str:
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("", "file"):
        return f"file:{Path(parts.path if scheme else uri).expanduser().resolve()}"
    if scheme in ("http", "https"):
        port = parts.port or _DEFAULT_PORTS[scheme]
        return f"{scheme}://{(parts.hostname or '').lower()}:{port}{parts.path.rstrip('/')}"
    try:
        return _database(uri)  # sqlite:///..., postgresql://...: MLflow's SQL stores
    except Exception:  # noqa: BLE001 - another scheme (databricks, ...): compared as written, less credentials
        return f"{scheme}://{parts.hostname or ''}{parts.path}"


def digest(kind: str, address: str) -> str:
    """A short digest of ``address`` (``kind`` "database" or "tracking"), equal for equal places."""
    canonical = _database(address) if kind == "database" else _tracking(address)
    return hashlib.sha256(f"{kind}\0{canonical}".encode()).hexdigest()[:16]


NAMES = {"database": "database (VOXELFLOW_DATABASE_URL)", "tracking": "MLflow tracking URI (VOXELFLOW_MLFLOW_TRACKING_URI)"}


def peers(database_url: str, tracking_uri: str) -> dict[str, str]:
    """What a placed stage is given to compare with its own settings."""
    return {"database": digest("database", database_url), "tracking": digest("tracking", tracking_uri)}


def differences(mine: dict[str, str], theirs: dict[str, str]) -> list[str]:
    """The names of the services on which ``mine`` and ``theirs`` differ (never their addresses)."""
    return [NAMES[k] for k in NAMES if mine.get(k) != theirs.get(k)]
