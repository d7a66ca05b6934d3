"""The hash-chained audit log in the database: appends verify; editing, deleting, reordering or forging
records (straight in the table, as someone with database access would) is caught and named."""

from __future__ import annotations

import json
import multiprocessing
import threading

import pytest
from sqlalchemy import delete, select, update

from voxelflow.core import audit
from voxelflow.core.db import Database, audit_log


@pytest.fixture
def log(db) -> Database:
    """A database whose audit log holds four events (records 0-3)."""
    audit.append(db, "model.promoted", "alice", model="demo", version="1")
    audit.append(db, "access.denied", "anonymous", endpoint="/v1/segment", status=401)
    audit.append(db, "service.reloaded", "bob", model_version="2")
    audit.append(db, "model.promoted", "carol", model="demo", version="2")
    return db


def rows(db: Database) -> list[dict]:
    """The raw rows, details still as the stored text."""
    with db.transaction() as conn:
        return [r._asdict() for r in conn.execute(select(audit_log).order_by(audit_log.c.seq))]


def set_row(db: Database, seq: int, **values) -> None:
    with db.transaction() as conn:
        assert conn.execute(update(audit_log).where(audit_log.c.seq == seq).values(**values)).rowcount == 1


def test_appended_events_verify(log):
    verdict = audit.verify(log)
    assert verdict.ok, verdict.problem
    assert verdict.entries == 4
    entries = list(audit.entries(log))
    assert [e["seq"] for e in entries] == [0, 1, 2, 3]
    assert entries[0]["prev"] == audit.GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(entries, entries[1:]))
    assert verdict.head == entries[-1]["hash"]
    assert entries[1]["details"] == {"endpoint": "/v1/segment", "status": 401}
    assert entries[2]["actor"] == "bob" and entries[2]["event"] == "service.reloaded"
    assert all(e["hash"] == audit.entry_hash(e) for e in entries)


def test_append_returns_the_written_entry(db):
    entry = audit.append(db, "x", "me", n=1, when=object.__name__)
    assert list(audit.entries(db)) == [entry]
    assert entry["details"] == {"n": 1, "when": "object"}
    assert audit.append(db, "y", "me")["prev"] == entry["hash"]


def test_details_that_are_not_json_are_stored_as_text(db):
    from pathlib import Path

    entry = audit.append(db, "x", "me", path=Path("/a/b"), numbers=(1, 2))
    assert entry["details"] == {"path": "/a/b", "numbers": [1, 2]}
    assert list(audit.entries(db))[0]["details"] == entry["details"]
    assert audit.verify(db).ok


def test_empty_log_is_ok(db):
    verdict = audit.verify(db)
    assert verdict.ok and verdict.entries == 0 and verdict.head == audit.GENESIS
    assert list(audit.entries(db)) == []


# ---------------------------------------------------------------- tampering in the table


def test_edited_details_are_caught_naming_the_record(log):
    details = json.loads(rows(log)[1]["details"])
    details["status"] = 200
    set_row(log, 1, details=json.dumps(details, sort_keys=True))
    verdict = audit.verify(log)
    assert not verdict.ok
    assert "record 1" in verdict.problem and "changed" in verdict.problem
    assert verdict.entries == 1
    assert verdict.head == rows(log)[0]["hash"]  # the last good record


def test_edited_actor_is_caught(log):
    set_row(log, 2, actor="eve")
    verdict = audit.verify(log)
    assert not verdict.ok and "record 2" in verdict.problem and "changed" in verdict.problem


def test_edited_hash_is_caught(log):
    set_row(log, 3, hash="0" * 64)
    verdict = audit.verify(log)
    assert not verdict.ok and "record 3" in verdict.problem and verdict.entries == 3


def test_edited_time_is_caught(log):
    set_row(log, 0, at="1999-01-01T00:00:00Z")
    verdict = audit.verify(log)
    assert not verdict.ok and "record 0" in verdict.problem


def test_edit_with_recomputed_hash_breaks_the_next_link(log):
    entry = list(audit.entries(log))[1]
    entry["details"]["status"] = 200
    set_row(log, 1, details=json.dumps(entry["details"], sort_keys=True), hash=audit.entry_hash(entry))
    verdict = audit.verify(log)
    assert not verdict.ok
    assert "record 2" in verdict.problem and "does not follow" in verdict.problem
    assert verdict.entries == 2


def test_deleted_middle_record_is_caught(log):
    with log.transaction() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq == 1))
    verdict = audit.verify(log)
    assert not verdict.ok
    assert "record 1 is missing" in verdict.problem
    assert verdict.entries == 1


def test_deleted_first_record_is_caught(log):
    with log.transaction() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq == 0))
    verdict = audit.verify(log)
    assert not verdict.ok and "record 0 is missing" in verdict.problem and verdict.entries == 0


def test_deleted_middle_record_renumbered_is_caught(log):
    """Closing the gap left by a deletion (renumbering the later records) breaks a link instead."""
    with log.transaction() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq == 1))
        for seq in (2, 3):
            conn.execute(update(audit_log).where(audit_log.c.seq == seq).values(seq=seq - 1))
    verdict = audit.verify(log)
    assert not verdict.ok and "record 1" in verdict.problem


def test_truncated_tail_changes_the_head(log):
    """Dropping the newest records leaves a valid shorter chain: the head (kept elsewhere) tells."""
    head = audit.verify(log).head
    with log.transaction() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq == 3))
    verdict = audit.verify(log)
    assert verdict.ok and verdict.entries == 3
    assert verdict.head != head


def test_reordered_records_are_caught(log):
    with log.transaction() as conn:  # swap the sequence numbers of records 1 and 2
        conn.execute(update(audit_log).where(audit_log.c.seq == 1).values(seq=-1))
        conn.execute(update(audit_log).where(audit_log.c.seq == 2).values(seq=1))
        conn.execute(update(audit_log).where(audit_log.c.seq == -1).values(seq=2))
    verdict = audit.verify(log)
    assert not verdict.ok
    assert "record 1" in verdict.problem and "does not follow" in verdict.problem


def test_forged_prev_is_caught(log):
    set_row(log, 2, prev=rows(log)[0]["hash"])  # skip record 1 in the chain
    verdict = audit.verify(log)
    assert not verdict.ok and "record 2" in verdict.problem and "does not follow" in verdict.problem


def test_forged_prev_with_recomputed_hash_is_caught(log):
    entry = list(audit.entries(log))[2]
    entry["prev"] = audit.GENESIS
    set_row(log, 2, prev=entry["prev"], hash=audit.entry_hash(entry))
    verdict = audit.verify(log)
    assert not verdict.ok and "record 2" in verdict.problem and "does not follow" in verdict.problem


def test_inserted_record_is_caught(log):
    forged = {"seq": 4, "at": "2030-01-01T00:00:00Z", "event": "model.promoted", "actor": "mallory",
              "details": {}, "prev": "f" * 64}
    with log.transaction() as conn:
        conn.execute(audit_log.insert().values(**{**forged, "details": "{}", "hash": audit.entry_hash(forged)}))
    verdict = audit.verify(log)
    assert not verdict.ok and "record 4" in verdict.problem and verdict.entries == 4


def test_rewritten_chain_verifies_but_changes_the_head(log):
    """Someone who rewrites every record after an edit gets a valid chain; only the head gives it away."""
    head = audit.verify(log).head
    entries = list(audit.entries(log))
    entries[1]["actor"] = "mallory"
    prev = entries[0]["hash"]
    with log.transaction() as conn:
        for entry in entries[1:]:
            entry["prev"] = prev
            entry["hash"] = prev = audit.entry_hash(entry)
            conn.execute(update(audit_log).where(audit_log.c.seq == entry["seq"]).values(
                actor=entry["actor"], prev=entry["prev"], hash=entry["hash"]))
    verdict = audit.verify(log)
    assert verdict.ok and verdict.entries == 4
    assert verdict.head != head


def test_unreadable_details_are_reported_not_raised(log):
    """A record whose details are not JSON any more is a verdict naming it, not a crash of verify()."""
    set_row(log, 1, details="not json")
    verdict = audit.verify(log)
    assert not verdict.ok
    assert "record 1" in verdict.problem


def test_appending_after_tampering_does_not_heal_the_chain(log):
    with log.transaction() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq == 2))
    entry = audit.append(log, "late", "someone")
    assert entry["seq"] == 4 and entry["prev"] == rows(log)[-2]["hash"]
    verdict = audit.verify(log)
    assert not verdict.ok and "record 2 is missing" in verdict.problem


def test_append_joins_a_transaction_and_rolls_back_with_it(db):
    audit.append(db, "first", "me")
    with pytest.raises(RuntimeError):
        with db.transaction() as conn:
            audit.append(db, "never", "me", conn=conn, n=1)
            raise RuntimeError("the work this event records failed")
    with db.transaction() as conn:
        audit.append(db, "second", "me", conn=conn)
    assert [e["event"] for e in audit.entries(db)] == ["first", "second"]
    assert audit.verify(db).ok


# ---------------------------------------------------------------- concurrency


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_concurrent_appends_from_threads_keep_one_chain(request, kind):
    db = request.getfixturevalue("db") if kind == "sqlite" else Database(request.getfixturevalue("pg_url"))
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def writer(i: int) -> None:
        try:
            start.wait(10)
            for j in range(5):
                audit.append(db, "event", f"w{i}", j=j)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    verdict = audit.verify(db)
    assert verdict.ok, verdict.problem
    assert verdict.entries == 20
    entries = list(audit.entries(db))
    for i in range(4):  # each writer's events are all there, in its own order
        assert [e["details"]["j"] for e in entries if e["actor"] == f"w{i}"] == list(range(5))
    db.dispose()


def _append_many(url: str, who: str, n: int, barrier, results) -> None:
    try:
        db = Database(url)
        barrier.wait(timeout=60)
        for j in range(n):
            audit.append(db, "event", who, j=j)
        db.dispose()
        results.put("ok")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put(f"{who}: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_concurrent_appends_from_two_processes_keep_one_chain(request, kind):
    url = request.getfixturevalue("sqlite_url" if kind == "sqlite" else "pg_url")
    db = Database(url)  # migrated here, so the processes only append
    audit.append(db, "start", "parent")
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_append_many, args=(url, f"p{i}", 15, barrier, results)) for i in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert outcomes == ["ok", "ok"]
    verdict = audit.verify(db)
    assert verdict.ok, verdict.problem
    assert verdict.entries == 31
    entries = list(audit.entries(db))
    for who in ("p0", "p1"):
        assert [e["details"]["j"] for e in entries if e["actor"] == who] == list(range(15))
    db.dispose()


# ---------------------------------------------------------------- anchors: the head kept elsewhere


def anchor_of(db: Database, seq: int, where: str = "a safe place") -> audit.Anchor:
    entry = next(e for e in audit.entries(db) if e["seq"] == seq)
    return audit.Anchor(seq, entry["hash"], where)


def test_a_log_that_matches_its_newest_anchor_verifies(log):
    verdict = audit.verify(log, [anchor_of(log, 1), anchor_of(log, 3)])
    assert verdict.ok, verdict.problem
    assert verdict.anchor == anchor_of(log, 3)
    audit.append(log, "service.reloaded", "bob")  # records after the newest anchor are fine
    assert audit.verify(log, [anchor_of(log, 3)]).ok


def test_deleted_newest_records_are_caught_by_the_anchor(log):
    anchors = [anchor_of(log, 2, "tags of demo v2"), anchor_of(log, 3, "tags of demo v3")]
    with log.transaction() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq >= 2))
    assert audit.verify(log).ok  # the chain alone cannot tell
    verdict = audit.verify(log, anchors)
    assert not verdict.ok and verdict.entries == 2
    assert "ends at record 1" in verdict.problem and "tags of demo v3 anchors record 3" in verdict.problem
    assert "deleted" in verdict.problem


def test_a_rewritten_chain_is_caught_by_the_anchor(log):
    anchor = anchor_of(log, 3)
    entries = list(audit.entries(log))
    with log.transaction() as conn:  # drop record 3, write a different record 3 that links correctly
        conn.execute(delete(audit_log).where(audit_log.c.seq == 3))
    forged = {**entries[3], "actor": "mallory"}
    forged["hash"] = audit.entry_hash(forged)
    with log.transaction() as conn:
        conn.execute(audit_log.insert().values(**{**forged, "details": json.dumps(forged["details"])}))
    assert audit.verify(log).ok
    verdict = audit.verify(log, [anchor])
    assert not verdict.ok and "record 3 differs" in verdict.problem and "rewritten" in verdict.problem


def test_an_empty_log_with_an_anchor_is_caught(db):
    verdict = audit.verify(db, [audit.Anchor(0, "a" * 64, "x")])
    assert not verdict.ok and "anchors record 0" in verdict.problem


@pytest.fixture
def registry_uri(tmp_path) -> str:
    """A real MLflow registry (SQLite) holding model ``m`` with two versions."""
    from voxelflow.release.registry import client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mc = client(uri)
    mc.create_registered_model("m")
    for _ in range(2):
        mc.create_model_version("m", str(tmp_path))
    return uri


def test_anchors_written_to_mlflow_tags_catch_a_truncated_log(log, registry_uri):
    entries = list(audit.entries(log))
    assert audit.mlflow_anchors(registry_uri) == []
    audit.anchor_in_mlflow(registry_uri, "m", "1", entries[1])
    written = audit.anchor_in_mlflow(registry_uri, "m", "2", entries[3])
    found = audit.mlflow_anchors(registry_uri)
    assert sorted(a.seq for a in found) == [1, 3]
    assert written in found and written.where == "MLflow tags of m version 2"
    assert audit.verify(log, found).ok
    with log.transaction() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq == 3))
    verdict = audit.verify(log, audit.mlflow_anchors(registry_uri))
    assert not verdict.ok and "m version 2 anchors record 3" in verdict.problem


def test_a_malformed_anchor_is_an_error_not_ignored(registry_uri):
    from voxelflow.release.registry import client

    client(registry_uri).set_model_version_tag("m", "1", audit.ANCHOR_SEQ, "three")
    with pytest.raises(ValueError, match="m version 1 carries a malformed audit anchor"):
        audit.mlflow_anchors(registry_uri)


def test_anchors_cannot_be_read_from_a_registry_that_is_down(monkeypatch):
    import socket

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(Exception, match="127.0.0.1"):
        audit.mlflow_anchors(f"http://127.0.0.1:{port}")


def test_cli_verify_checks_the_newest_anchor(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from voxelflow.core.db import connect
    from voxelflow.release.registry import client
    from voxelflow.spec.config import Settings

    settings = Settings(home=tmp_path)
    db = connect(settings.database)
    audit.append(db, "model.promoted", "tester", model="m", version="1")
    audit.append(db, "model.promoted", "tester", model="m", version="1")
    mc = client(settings.tracking_uri)
    mc.create_registered_model("m")
    mc.create_model_version("m", str(tmp_path))
    env = {"VOXELFLOW_HOME": str(tmp_path)}
    runner = CliRunner()

    def verify(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, ["audit", "verify", *args], env=env)
        return result.exit_code, " ".join(result.output.split())  # rich wraps long lines

    code, out = verify()
    assert code == 0 and "no anchor to check against yet" in out
    newest = list(audit.entries(db))[-1]
    audit.anchor_in_mlflow(settings.tracking_uri, "m", "1", newest)
    code, out = verify()
    assert code == 0 and "matches the anchor at record 1" in out
    with db.transaction() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq == 1))
    code, out = verify()
    assert code == 1 and "the newest records were deleted" in out
    code, out = verify("--no-anchors")
    assert code == 0 and "anchors not checked" in out
    db.dispose()
