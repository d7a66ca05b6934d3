"""The hash-chained audit log: appends verify, any edit, deletion or reordering is caught."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from voxelflow import audit


@pytest.fixture
def log(tmp_path) -> Path:
    path = tmp_path / "sub" / "audit.log"
    audit.append(path, "model.promoted", "alice", model="demo", version="1")
    audit.append(path, "access.denied", "anonymous", endpoint="/v1/segment", status=401)
    audit.append(path, "service.reloaded", "bob", model_version="2")
    audit.append(path, "model.promoted", "carol", model="demo", version="2")
    return path


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_appended_events_verify(log):
    verdict = audit.verify(log)
    assert verdict.ok, verdict.problem
    assert verdict.entries == 4
    entries = [json.loads(line) for line in lines(log)]
    assert [e["seq"] for e in entries] == [0, 1, 2, 3]
    assert entries[0]["prev"] == audit.GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(entries, entries[1:]))
    assert entries[1]["details"] == {"endpoint": "/v1/segment", "status": 401}
    assert entries[2]["actor"] == "bob" and entries[2]["event"] == "service.reloaded"


def test_append_returns_the_written_entry(tmp_path):
    path = tmp_path / "audit.log"
    entry = audit.append(path, "x", "me", n=1)
    assert json.loads(path.read_text()) == entry
    assert audit.append(path, "y", "me")["prev"] == entry["hash"]


def test_missing_log_is_empty_and_ok(tmp_path):
    verdict = audit.verify(tmp_path / "absent.log")
    assert verdict.ok and verdict.entries == 0


def test_edited_line_fails_naming_the_line(log):
    text = lines(log)
    entry = json.loads(text[1])
    entry["actor"] = "mallory"
    text[1] = json.dumps(entry, sort_keys=True) + "\n"
    log.write_text("".join(text))
    verdict = audit.verify(log)
    assert not verdict.ok
    assert "line 2" in verdict.problem
    assert "changed" in verdict.problem
    assert verdict.entries == 1


def test_edit_with_recomputed_hash_breaks_the_next_link(log):
    text = lines(log)
    entry = json.loads(text[1])
    entry["details"]["status"] = 200
    entry["hash"] = audit._entry_hash(entry)
    text[1] = json.dumps(entry, sort_keys=True) + "\n"
    log.write_text("".join(text))
    verdict = audit.verify(log)
    assert not verdict.ok
    assert "line 3" in verdict.problem


def test_raw_text_edit_fails(log):
    log.write_text(log.read_text().replace('"bob"', '"eve"'))
    verdict = audit.verify(log)
    assert not verdict.ok and "line 3" in verdict.problem


def test_deleted_line_fails(log):
    text = lines(log)
    del text[1]
    log.write_text("".join(text))
    verdict = audit.verify(log)
    assert not verdict.ok
    assert "line 2" in verdict.problem


def test_deleted_first_line_fails(log):
    log.write_text("".join(lines(log)[1:]))
    verdict = audit.verify(log)
    assert not verdict.ok and "line 1" in verdict.problem


def test_reordered_lines_fail(log):
    text = lines(log)
    text[1], text[2] = text[2], text[1]
    log.write_text("".join(text))
    verdict = audit.verify(log)
    assert not verdict.ok
    assert "line 2" in verdict.problem


def test_garbage_line_fails(log):
    with open(log, "a") as fh:
        fh.write("not json\n")
    verdict = audit.verify(log)
    assert not verdict.ok
    assert "line 5" in verdict.problem and verdict.entries == 4


def test_appending_after_tampering_does_not_heal_the_chain(log):
    text = lines(log)
    del text[2]
    log.write_text("".join(text))
    audit.append(log, "late", "someone")
    assert not audit.verify(log).ok


def test_concurrent_appends_keep_one_chain(tmp_path):
    path = tmp_path / "audit.log"

    def writer(i: int) -> None:
        for j in range(5):
            audit.append(path, "event", f"w{i}", j=j)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    verdict = audit.verify(path)
    assert verdict.ok, verdict.problem
    assert verdict.entries == 20
