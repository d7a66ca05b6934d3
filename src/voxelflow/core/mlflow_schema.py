"""MLflow's schema for a new SQLite tracking database, copied from one made once per MLflow release.

MLflow builds a new SQLite database by running its Alembic migrations one after another: about 0.7 s in a warm
process on a two-core machine, more in a cold one, for every new home (a test's, a benchmark run's, a demo in a new
folder). What those migrations leave is the same every time for one release, so it is made once, kept in this
user's cache (``VOXELFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/voxelflow``, else ``~/.cache/voxelflow``; a folder only
this user may use) under MLflow's version and its newest schema revision, and copied into place. The copy holds
MLflow's tables and nothing else: MLflow makes its default experiment, with this store's artifact root, when it
first opens the database, as it does after its own migrations.

A database file that exists, even empty, is never touched, and one that another process creates at the same moment
wins (the copy is linked in, never moved over a file). A template that does not read as the revision it is named for
is made again. Whatever else goes wrong here (a cache that cannot be written or that others may use, a file system
without hard links) leaves the new database to MLflow's own migrations, as before, and is logged.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
from pathlib import Path

from voxelflow.core.private import private_folder

log = logging.getLogger(__name__)

_checked: set[str] = set()  # tracking URIs already looked at in this process
_lock = threading.Lock()


def cache_folder() -> Path:
    """``VOXELFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/voxelflow``, else ``~/.cache/voxelflow``: made 0700, and refused
    unless only this user can use it (a template from it becomes every new database)."""
    named = os.environ.get("VOXELFLOW_CACHE_DIR")
    return private_folder(Path(named) if named else
                          Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "voxelflow")


def sqlite_path(tracking_uri: str) -> Path | None:
    """The file of a ``sqlite://`` tracking URI; None for any other database, or an in-memory one."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(tracking_uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def revision_of(path: Path) -> str | None:
    """The MLflow schema revision recorded in the SQLite file at ``path`` (None when it has none)."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def template(folder: Path) -> Path:
    """The schema of this MLflow release in ``folder``, made there first if it is missing or does not read as its
    revision."""
    import mlflow
    from mlflow.store.db.utils import _get_latest_schema_revision, _initialize_tables
    from sqlalchemy import create_engine

    revision = _get_latest_schema_revision()
    made = folder / f"mlflow-{mlflow.__version__}-{revision}.db"
    if revision_of(made) == revision:
        return made
    part = folder / f".{made.name}.{os.getpid()}.{threading.get_ident()}.part"
    part.unlink(missing_ok=True)
    try:
        engine = create_engine(f"sqlite:///{part}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        if revision_of(part) != revision:
            raise RuntimeError(f"MLflow's migrations left {part} at revision {revision_of(part)}, not {revision}")
        os.replace(part, made)  # whole or not at all; two makers at once both leave a whole one
    finally:
        part.unlink(missing_ok=True)
    return made


def forget(tracking_uri: str) -> None:
    """Look at ``tracking_uri`` again on its next :func:`seed` (its file was deleted since)."""
    with _lock:
        _checked.discard(tracking_uri)


def seed(tracking_uri: str) -> bool:
    """Put MLflow's schema in place for a ``sqlite://`` tracking URI whose file does not exist yet; True when this call
    put it there. Every other URI, an existing file and any failure (logged) leave it to MLflow."""
    with _lock:
        if tracking_uri in _checked:
            return False
        _checked.add(tracking_uri)
    path = sqlite_path(tracking_uri)
    if path is None or path.exists():
        return False
    part = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        made = template(cache_folder())
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(made, part)  # of a template just read as its revision (replaced whole, never in place)
        os.link(part, path)  # never over a database another process made meanwhile
        return True
    except FileExistsError:
        return False
    except Exception as exc:  # noqa: BLE001 - MLflow's own migrations make the database instead
        log.info("MLflow's schema was not copied for %s (%s: %s); MLflow's migrations make it", path,
                 type(exc).__name__, exc)
        return False
    finally:
        part.unlink(missing_ok=True)
