"""Shared state in a database: the ingestion ledger, the audit log, API keys, cursors and locks.

Any SQLAlchemy URL works: SQLite in the home folder by default, PostgreSQL at scale. The schema
is created and migrated with Alembic (``voxelflow/migrations``) the first time a process opens a
database. :meth:`Database.locked` serialises writers by a row lock on the ``locks`` table:
``UPDATE ... WHERE name = ?`` holds that row on PostgreSQL until the transaction ends, and holds
the database's write lock on SQLite (one writer at a time).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    update,
)
from sqlalchemy.engine import Connection, Engine

from voxelflow.core import redact

log = logging.getLogger(__name__)

metadata = MetaData()

ledger = Table(
    "ledger",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pipeline", String(200), nullable=False),
    Column("object", String(1024), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", Integer, nullable=True),
    Column("case_id", String(64), nullable=True),
    Column("state", String(16), nullable=False),
    Column("reason", String(64), nullable=True),
    Column("detail", Text, nullable=True),
    Column("at", DateTime(timezone=True), nullable=False),
    # the later case that holds every object of this row's case (migration 0003): out of the dataset
    Column("superseded_by", String(64), nullable=True),
    UniqueConstraint("pipeline", "object", "sha256", name="uq_ledger_object"),
    Index("ix_ledger_pipeline_case", "pipeline", "case_id"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("at", String(32), nullable=False),
    Column("event", String(100), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("details", Text, nullable=False),
    Column("prev", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("digest", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("roles", Text, nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("expires", DateTime(timezone=True), nullable=True),
)

cursors = Table(
    "cursors",
    metadata,
    Column("name", String(300), primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
)

locks = Table(
    "locks",
    metadata,
    Column("name", String(300), primary_key=True),
    Column("holder", String(200), nullable=True),
    Column("at", DateTime(timezone=True), nullable=True),
)

# Which registered model version produced each mask of batch inference (voxelflow.serving.predict): one row per
# mask written, its full URL and sha256, and each label's volume in mL (JSON) for the volumes table.
predictions = Table(
    "predictions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pipeline", String(200), nullable=False),
    Column("case_id", String(64), nullable=False),
    Column("model", String(200), nullable=False),
    Column("version", String(32), nullable=False),
    Column("output", String(1024), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("volumes", Text, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("pipeline", "case_id", "model", "version", "output", name="uq_predictions_mask"),
    Index("ix_predictions_model", "model", "version"),
)

# Each DICOM result (a case's SEG or SR by one model version) and where it went (voxelflow.serving.dicom_send,
# migration 0004): the destination without credentials, the hashed SOP Instance UID, and its state: sent,
# pending (its send failed on a transient error: sent again by a resend) or refused by the destination.
sends = Table(
    "sends",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pipeline", String(200), nullable=False),
    Column("case_id", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("model", String(200), nullable=False),
    Column("version", String(32), nullable=False),
    Column("destination", String(1024), nullable=False),
    Column("object", String(1024), nullable=False),
    Column("sop_instance", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("reason", Text, nullable=True),
    Column("at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("pipeline", "case_id", "kind", "model", "version", "destination", name="uq_sends_result"),
    Index("ix_sends_state", "state"),
)

# Each step's result under a key of its inputs (voxelflow.stages.reuse, migration 0005): found again by a later
# lifecycle whose inputs are the same; evaluation's rows also name the champion version it compared against.
step_results = Table(
    "step_results",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pipeline", String(200), nullable=False),
    Column("step", String(200), nullable=False),
    Column("key", String(64), nullable=False),
    Column("champion", String(32), nullable=True),
    Column("lifecycle", String(64), nullable=False),
    Column("run_id", String(64), nullable=True),
    Column("result", Text, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Index("ix_step_results_key", "pipeline", "step", "key"),
)

# Each lifecycle of a pipeline and how it ended (migration 0005): `voxelflow run --resume` continues the latest
# failed one from its failed step, in its MLflow run.
lifecycles = Table(
    "lifecycles",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("pipeline", String(200), nullable=False),
    Column("spec_digest", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # running, failed, finished, resumed (by a later one)
    Column("failed_step", String(200), nullable=True),
    Column("reason", Text, nullable=True),
    Column("run_id", String(64), nullable=True),
    Column("resumes", String(64), nullable=True),
    Column("started", DateTime(timezone=True), nullable=False),
    Column("ended", DateTime(timezone=True), nullable=True),
    Index("ix_lifecycles_pipeline", "pipeline", "started"),
)


def now() -> datetime:
    return datetime.now(timezone.utc)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.close()


class Database:
    """One database URL; the schema is brought to the newest revision on first use."""

    _migrated: set[str] = set()
    _migrate_lock = threading.Lock()

    def __init__(self, url: str) -> None:
        if url.startswith(("postgresql://", "postgres://")):  # the driver voxelflow ships with
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        self.url = url
        self.sqlite = url.startswith("sqlite")
        path = url.split("///", 1)[1].split("?", 1)[0] if self.sqlite and "///" in url else ""
        self.path: Path | None = Path(path) if path and path != ":memory:" else None  # a SQLite file
        try:
            if self.sqlite:
                if self.path:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                self.engine: Engine = create_engine(url, connect_args={"timeout": 60})
                event.listen(self.engine, "connect", _sqlite_pragmas)
            else:
                self.engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
            self.migrate()
            self.file = self.file_identity()
        except Exception as exc:  # the URL carries the password: no error text repeats it
            redact.scrub(exc)
            raise

    def __repr__(self) -> str:
        return f"Database({self.engine.url.render_as_string(hide_password=True)!r})"

    def __reduce__(self):
        return (Database, (self.url,))

    def migrate(self) -> None:
        """Create or upgrade the schema with Alembic (once per process and URL)."""
        with self._migrate_lock:
            if self.url in self._migrated:
                return
            from alembic import command
            from alembic.config import Config

            cfg = Config()
            cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
            with self.engine.begin() as conn:
                # Two processes migrating at once: one waits for the other, then finds the schema at head.
                # SQLite's driver runs DDL outside any transaction unless one is begun explicitly;
                # BEGIN IMMEDIATE takes the file's write lock (waiting up to busy_timeout).
                if self.sqlite:
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                else:
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7265846)")
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
            self._migrated.add(self.url)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[Connection]:
        """A transaction that holds the lock ``name`` until it ends (row lock; see the module doc)."""
        with self.engine.begin() as conn:
            self._claim(conn, name)
            yield conn

    @contextlib.contextmanager
    def locked_in(self, conn: Connection, name: str) -> Iterator[Connection]:
        """Take the lock ``name`` inside a transaction that is already open (it ends with that one)."""
        self._claim(conn, name)
        yield conn

    def _claim(self, conn: Connection, name: str) -> None:
        if self.sqlite:
            from sqlalchemy.dialects.sqlite import insert as upsert
        else:
            from sqlalchemy.dialects.postgresql import insert as upsert
        conn.execute(upsert(locks).values(name=name).on_conflict_do_nothing())
        conn.execute(update(locks).where(locks.c.name == name).values(holder=f"pid {os.getpid()}", at=now()))

    def file_identity(self) -> tuple[int, int] | None:
        """The SQLite file's device and inode (None for a server, or while no file is there)."""
        return None if self.path is None else file_identity(self.path)

    def dispose(self) -> None:
        self.engine.dispose()


def file_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """The device and inode of the file at ``path`` (None while no file is there): another file once it was
    deleted and made again, or replaced."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


_open: dict[str, Database] = {}
_open_lock = threading.Lock()


def connect(url: str) -> Database:
    """The process-wide :class:`Database` for ``url`` (engines are pooled; open each once). A SQLite file that was
    deleted or replaced since is opened again, migrated first: pooled connections would still read the old one."""
    with _open_lock:
        db = _open.get(url)
        if db is not None and db.path is not None and db.file_identity() != db.file:
            log.warning("the database file %s was deleted or replaced: opening it again", db.path)
            db.dispose()
            with Database._migrate_lock:
                Database._migrated.discard(db.url)
            db = None
        if db is None:
            db = _open[url] = Database(url)
        return db
