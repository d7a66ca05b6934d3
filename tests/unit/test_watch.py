"""The watcher: settles before announcing, announces each object once, survives restarts, lists S3."""

from __future__ import annotations

import threading
import time

import pytest

from voxelflow.data.watch import Arrival, Watcher


@pytest.fixture
def heard():
    return []


def watcher(source, db, heard, settle_s=1.0) -> Watcher:
    return Watcher(str(source), db, "demo", heard.append, settle_s=settle_s, poll_s=0.2)


def test_a_batch_is_announced_once_after_it_settles(tmp_path, db, heard):
    src = tmp_path / "incoming"
    src.mkdir()
    w = watcher(src, db, heard)
    (src / "a.nii.gz").write_bytes(b"x" * 10)
    assert w.step(at=0.0) is None  # just seen: not settled
    (src / "b.nii.gz").write_bytes(b"y" * 5)  # still arriving
    assert w.step(at=0.9) is None
    assert w.step(at=1.5) is None  # b changed the batch at 0.9: the clock restarted
    arrival = w.step(at=2.0)
    assert isinstance(arrival, Arrival) and [o["key"] for o in arrival.objects] == [str(src / "a.nii.gz"),
                                                                                   str(src / "b.nii.gz")]
    assert arrival.payload()["bytes"] == 15 and arrival.payload()["count"] == 2
    assert w.step(at=10.0) is None and w.step(at=20.0) is None  # nothing new: nothing announced
    assert len(heard) == 1


def test_hidden_temporary_files_are_not_announced(tmp_path, db, heard):
    src = tmp_path / "incoming"
    (src / ".partial").mkdir(parents=True)
    (src / ".partial" / "c.nii.gz").write_bytes(b"z")
    (src / ".c.nii.gz.tmp").write_bytes(b"z")
    w = watcher(src, db, heard)
    assert w.step(at=0.0) is None and w.step(at=5.0) is None and heard == []


def test_a_restart_neither_repeats_nor_misses(tmp_path, db, heard):
    src = tmp_path / "incoming"
    src.mkdir()
    (src / "a").write_bytes(b"1")
    w = watcher(src, db, heard)
    w.step(at=0.0)
    w.step(at=2.0)
    assert len(heard) == 1
    # down: one file lands, one is rewritten
    (src / "b").write_bytes(b"2")
    time.sleep(0.01)
    (src / "a").write_bytes(b"11")
    again = watcher(src, db, heard)  # a new process, the same database
    again.step(at=100.0)
    arrival = again.step(at=102.0)
    assert sorted(o["key"].rsplit("/", 1)[1] for o in arrival.objects) == ["a", "b"]
    third = watcher(src, db, heard)
    assert third.step(at=0.0) is None and third.step(at=5.0) is None
    assert len(heard) == 2


def test_an_emit_that_fails_is_retried_next_time(tmp_path, db):
    src = tmp_path / "incoming"
    src.mkdir()
    (src / "a").write_bytes(b"1")
    calls = []

    def flaky(arrival):
        calls.append(arrival)
        if len(calls) == 1:
            raise ConnectionError("the Prefect API is away")

    w = Watcher(str(src), db, "demo", flaky, settle_s=1.0)
    w.step(at=0.0)
    with pytest.raises(ConnectionError):
        w.step(at=2.0)
    w.step(at=3.0)
    w.step(at=5.0)
    assert len(calls) == 2 and calls[0].objects == calls[1].objects


def test_s3_is_listed(s3_store, db, heard):
    s3_store.write_bytes("incoming/case1/image.nii.gz", b"abc")
    s3_store.write_bytes("incoming/case1/label.nii.gz", b"de")
    w = Watcher(s3_store.url_of("incoming"), db, "demo", heard.append, settle_s=0.5)
    w.step(at=0.0)
    arrival = w.step(at=1.0)
    assert [o["key"].rsplit("/", 1)[1] for o in arrival.objects] == ["image.nii.gz", "label.nii.gz"]
    assert all(o["key"].startswith("s3://") and o["version"] for o in arrival.objects)
    s3_store.write_bytes("incoming/case2/image.nii.gz", b"f")
    w.step(at=2.0)
    assert [o["key"].rsplit("/", 2)[1] for o in w.step(at=3.0).objects] == ["case2"]


def test_run_wakes_on_local_changes(tmp_path, db, heard):
    src = tmp_path / "incoming"
    src.mkdir()
    w = Watcher(str(src), db, "demo", heard.append, settle_s=0.5, poll_s=30)  # polling alone would be too slow
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        (src / "a.nii.gz").write_bytes(b"x")
        deadline = time.monotonic() + 15
        while not heard and time.monotonic() < deadline:
            time.sleep(0.1)
        assert heard and heard[0].objects[0]["key"].endswith("a.nii.gz")
    finally:
        stop.set()
        thread.join(timeout=10)


def test_the_dataset_is_announced_when_enough_cases_are_new_by_id(db):
    from voxelflow.data.watch import dataset_update

    sent = []

    def update(pipeline, cases, threshold):
        return dataset_update(db, pipeline, cases, threshold, lambda event_id, new: sent.append((event_id, new)))

    assert update("p", ["a", "b"], 2) == 2
    assert update("p", ["a", "b"], 1) is None  # nothing new
    assert update("p", ["a", "b", "c"], 2) is None  # one new case, the threshold is two
    assert update("p", ["a", "c", "d"], 2) == 2  # c and d; b was replaced: no growth, new cases
    assert update("p", ["a", "c", "e"], 1) == 1  # d corrected into e: same size, one new case
    assert update("p", ["a", "b"], 1) == 1  # back to the first dataset: announced again, under another id
    assert update("other", ["a"], 1) == 1  # per pipeline
    assert [new for _, new in sent] == [2, 2, 1, 1, 1]
    assert len({event_id for event_id, _ in sent}) == 5


def test_an_announcement_that_fails_is_not_recorded_and_is_repeated_under_the_same_id(db):
    from voxelflow.data.watch import DATASET_UPDATED, announcement_id, dataset_update

    tried = []

    def lost(event_id, new):
        tried.append(event_id)
        raise ConnectionError("the Prefect API is away")

    with pytest.raises(ConnectionError):
        dataset_update(db, "p", ["b", "a"], 1, lost)
    sent = []
    assert dataset_update(db, "p", ["a", "b"], 1, lambda event_id, new: sent.append(event_id)) == 2
    assert sent == tried == [announcement_id(DATASET_UPDATED, "p", ["a", "b"], None)]  # the same event again
    assert dataset_update(db, "p", ["a", "b"], 1, lost) is None and len(tried) == 1  # recorded once delivered


def test_unlabelled_cases_are_announced_once_each_and_again_when_the_announcement_failed(db):
    from voxelflow.data.watch import unlabelled_update

    sent = []
    assert unlabelled_update(db, "p", ["u2", "u1"], lambda i, cases: sent.append((i, cases))) == ["u1", "u2"]

    def lost(event_id, cases):
        sent.append((event_id, cases))
        raise ConnectionError("the Prefect API is away")

    with pytest.raises(ConnectionError):
        unlabelled_update(db, "p", ["u1", "u2", "u3"], lost)
    assert unlabelled_update(db, "p", ["u1", "u2", "u3"], lambda i, cases: sent.append((i, cases))) == ["u3"]
    assert unlabelled_update(db, "p", ["u1", "u2", "u3"], lost) == []
    assert [cases for _, cases in sent] == [["u1", "u2"], ["u3"], ["u3"]]
    assert sent[1][0] == sent[2][0] != sent[0][0]


def test_a_batch_announced_again_after_a_crash_keeps_its_event_id(tmp_path, db, heard):
    src = tmp_path / "incoming"
    src.mkdir()
    (src / "a").write_bytes(b"1")
    first = watcher(src, db, heard)
    first.step(at=0.0)
    first.step(at=2.0)
    db_cursor = first.cursor
    from voxelflow.data.watch import set_cursor

    set_cursor(db, db_cursor, {})  # the crash: sent, not recorded
    again = watcher(src, db, heard)
    again.step(at=0.0)
    again.step(at=2.0)
    assert len(heard) == 2 and heard[0].id == heard[1].id and heard[0].id.version == 5
    (src / "b").write_bytes(b"2")
    again.step(at=3.0)
    assert again.step(at=5.0).id != heard[0].id


def test_run_reports_a_failed_step_and_announces_the_batch_later(tmp_path, db):
    src = tmp_path / "incoming"
    src.mkdir()
    (src / "a").write_bytes(b"1")
    calls, errors = [], []

    def flaky(arrival):
        calls.append(arrival)
        if len(calls) == 1:
            raise ConnectionError("the Prefect API is away")

    w = Watcher(str(src), db, "demo", flaky, settle_s=0.2, poll_s=0.2)
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop, errors.append), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert [type(e) for e in errors] == [ConnectionError] and len(calls) == 2 and calls[0].id == calls[1].id


def announcement(**overrides):
    return {"id": "e1", "event": "voxelflow.data.arrived", "resource": "voxelflow.dataset.p",
            "keys": ["source", "objects", "count", "bytes", "sizes", "versions"], **overrides}


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"keys": ["source", "spec"]}, "payload names spec"),
    ({"keys": ["source", "overlays", "sets"]}, "payload names overlays, sets"),
    ({"resource": "voxelflow.dataset.other"}, "concerns 'voxelflow.dataset.other'"),
    ({"event": "voxelflow.dataset.updated"}, "this run acts on 'voxelflow.data.arrived'"),
    ({"keys": "source"}, "is not the event's id, event, resource and payload keys"),
])
def test_an_announcement_with_more_than_data_references_or_for_another_pipeline_is_refused_and_audited(
        db, overrides, reason):
    from voxelflow.core import audit
    from voxelflow.data.watch import AnnouncementRefused, accept_announcement

    accept_announcement(db, "p", announcement(), "voxelflow.data.arrived")  # data references only: accepted
    assert list(audit.entries(db)) == []
    with pytest.raises(AnnouncementRefused, match=reason):
        accept_announcement(db, "p", announcement(**overrides), "voxelflow.data.arrived")
    (entry,) = audit.entries(db)
    assert entry["event"] == "announcement.refused" and reason in entry["details"]["reason"]
    assert entry["details"]["pipeline"] == "p" and entry["details"]["event_id"] == "e1"
    assert audit.verify(db).ok
