"""The object store: a local folder and S3 (moto on loopback) behave alike; cases are committed last."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from voxelflow.core.storage import COMMITTED, CaseStore, Layout, Store, digest_json, sha256_bytes


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    """The same tests on a local folder and on an S3 prefix."""
    if request.param == "local":
        return Store(tmp_path / "store")
    return request.getfixturevalue("s3_store")


def case(seed: int = 0, shape=(6, 5, 4)) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    return xr.Dataset(
        {
            "image": (("x", "y", "z"), rng.random(shape, dtype=np.float32)),
            "label": (("x", "y", "z"), (rng.random(shape) > 0.5).astype(np.uint8)),
        },
        attrs={"source": f"case-{seed}"},
    )


# ---------------------------------------------------------------- Store, on both kinds


def test_bytes_and_json_round_trip(store):
    store.write_bytes("a/b/c.bin", b"\x00\x01payload")
    assert store.read_bytes("a/b/c.bin") == b"\x00\x01payload"
    store.write_bytes("a/b/c.bin", b"replaced")
    assert store.read_bytes("a/b/c.bin") == b"replaced"
    store.write_json("meta.json", {"b": [1, 2], "a": {"z": None}})
    assert store.read_json("meta.json") == {"a": {"z": None}, "b": [1, 2]}
    assert store.read_bytes("meta.json") == b'{"a": {"z": null}, "b": [1, 2]}'  # sorted keys: stable bytes


def test_exists_list_files_remove(store):
    for key in ("d/one", "d/two", "d/sub/three", "top"):
        store.write_bytes(key, key.encode())
    assert store.exists("d/one") and store.exists("top")
    assert not store.exists("d/nothing")
    assert store.list("d") == ["one", "sub", "two"]
    assert store.list("d/sub") == ["three"]
    assert store.files("d") == ["d/one", "d/sub/three", "d/two"]
    assert store.files() == ["d/one", "d/sub/three", "d/two", "top"]
    store.remove("d/one")
    assert not store.exists("d/one")
    assert store.list("d") == ["sub", "two"]
    store.remove("d")  # a prefix: everything under it
    assert store.list("d") == [] and store.files("d") == []
    assert store.files() == ["top"]
    store.remove("d/never-written")  # absent keys are fine


def test_missing_things(store):
    assert store.list("no/such/prefix") == []
    assert store.files("no/such/prefix") == []
    assert not store.exists("no/such/key")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("no/such/key")


@pytest.mark.parametrize("key", ["../outside", "a/../../outside", "a/..", ".."])
def test_keys_that_leave_the_store_are_refused(store, key):
    with pytest.raises(ValueError, match="leaves the store"):
        store.write_bytes(key, b"x")
    with pytest.raises(ValueError, match="leaves the store"):
        store.read_bytes(key)
    with pytest.raises(ValueError, match="leaves the store"):
        store.remove(key)


def test_slashes_around_a_key_stay_inside_the_store(store):
    store.write_bytes("/x/y/", b"1")
    assert store.read_bytes("x/y") == b"1"
    assert store.files() == ["x/y"]


def test_store_pickles_as_its_url(store):
    copy = pickle.loads(pickle.dumps(store))
    assert isinstance(copy, Store) and copy.url == store.url
    store.write_bytes("k", b"v")
    assert copy.read_bytes("k") == b"v"
    cases = pickle.loads(pickle.dumps(CaseStore(store, "/cases/")))
    assert cases.store.url == store.url and cases.prefix == "cases"


# ---------------------------------------------------------------- CaseStore, on both kinds


def test_case_write_commit_open_remove(store):
    cases = CaseStore(store, "datasets/p/raw")
    assert cases.committed() == []
    ds = case(1)
    cases.write("case-b", ds, chunks=(3, 5, 4))
    cases.write("case-a", case(2))
    assert cases.committed() == ["case-a", "case-b"]
    assert cases.is_committed("case-b") and not cases.is_committed("case-c")
    opened = cases.open("case-b")
    np.testing.assert_array_equal(opened["image"].values, ds["image"].values)
    np.testing.assert_array_equal(opened["label"].values, ds["label"].values)
    assert opened["label"].dtype == np.uint8
    assert opened.attrs["source"] == "case-1"
    opened.close()
    zarr_json = store.read_json(f"{cases.key('case-b')}/image/zarr.json")
    assert zarr_json["zarr_format"] == 3
    assert zarr_json["chunk_grid"]["configuration"]["chunk_shape"] == [3, 5, 4]
    # rewriting a case replaces it
    old_key = cases.key("case-b")
    cases.write("case-b", case(3))
    assert cases.key("case-b") != old_key  # a new attempt, committed by the marker
    np.testing.assert_array_equal(cases.open("case-b")["image"].values, case(3)["image"].values)
    cases.remove("case-b")
    assert cases.committed() == ["case-a"]
    assert not [n for n in store.list("datasets/p/raw") if n.startswith("case-b.")]  # every attempt is gone
    cases.remove("case-never")  # absent is fine


def test_a_write_that_crashes_before_the_marker_is_not_committed(store, monkeypatch):
    cases = CaseStore(store, "raw")
    real = store.write_bytes

    def crash_on_marker(key: str, data: bytes) -> None:
        if f"/{COMMITTED}/" in key:
            raise OSError("machine lost before the commit marker")
        real(key, data)

    monkeypatch.setattr(store, "write_bytes", crash_on_marker)
    with pytest.raises(OSError, match="commit marker"):
        cases.write("case-x", case(4))
    assert [n for n in store.list("raw") if n.startswith("case-x.")]  # the data is there...
    assert not cases.is_committed("case-x")  # ...but the case is not
    with pytest.raises(KeyError, match="not committed"):
        cases.open("case-x")
    assert cases.committed() == []
    monkeypatch.undo()
    cases.write("case-x", case(4))  # the retry replaces the crashed attempt and commits it
    assert cases.committed() == ["case-x"]
    np.testing.assert_array_equal(cases.open("case-x")["image"].values, case(4)["image"].values)


def test_a_rewrite_that_crashes_leaves_the_old_case_in_force(store, monkeypatch):
    cases = CaseStore(store, "raw")
    cases.write("case-y", case(5))
    assert cases.is_committed("case-y")
    real = xr.Dataset.to_zarr

    def torn(self, *args, **kwargs):
        real(self.isel(x=slice(0, 1)), *args, **kwargs)  # part of the new data, then the crash
        raise OSError("killed while writing")

    monkeypatch.setattr(xr.Dataset, "to_zarr", torn)
    with pytest.raises(OSError, match="killed"):
        cases.write("case-y", case(6))
    assert cases.committed() == ["case-y"]  # readers keep the complete old attempt, never the torn one
    np.testing.assert_array_equal(cases.open("case-y")["image"].values, case(5)["image"].values)


def test_two_writers_of_one_case_do_not_clobber_each_other(store):
    """Both finish: each wrote its own attempt, and the marker names one complete attempt."""
    import threading

    cases = CaseStore(store, "raw")
    errors = []

    def write(seed: int) -> None:
        try:
            cases.write("case-z", case(seed))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(7,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    np.testing.assert_array_equal(cases.open("case-z")["image"].values, case(7)["image"].values)


def test_sweep_deletes_only_old_attempts_no_marker_names(store, monkeypatch):
    import time

    cases = CaseStore(store, "raw")
    cases.write("case-s", case(1))
    live = cases.key("case-s")
    real = store.write_bytes

    def crash_on_marker(key: str, data: bytes) -> None:
        if f"/{COMMITTED}/" in key:
            raise OSError("lost before the commit marker")
        real(key, data)

    monkeypatch.setattr(store, "write_bytes", crash_on_marker)
    for seed in (2, 3):  # a crashed rewrite, and a crashed first write of another case
        with pytest.raises(OSError):
            cases.write("case-s" if seed == 2 else "case-t", case(seed))
    monkeypatch.undo()
    assert sum(len(a) for a in cases.attempts().values()) == 3
    assert cases.sweep(grace_s=3600) == []  # young orphans may still belong to a writer about to commit
    removed = cases.sweep(grace_s=3600, now=time.time() + 7200)
    assert len(removed) == 2 and live not in removed
    assert cases.attempts() == {"case-s": [live.rsplit(".", 2)[1]]}
    np.testing.assert_array_equal(cases.open("case-s")["image"].values, case(1)["image"].values)


def test_modified_is_recent_for_a_new_object_and_none_for_a_missing_one(store):
    import time

    store.write_bytes("a/b", b"x")
    assert abs(store.modified("a/b") - time.time()) < 120
    assert store.modified("a/missing") is None


def test_case_urls(store):
    cases = CaseStore(store, "raw")
    cases.write("c1", case(1))
    attempt = store.read_bytes("raw/_committed/c1").decode()
    assert cases.key("c1") == f"raw/c1.{attempt}.zarr"
    assert cases.url("c1") == store.url_of(f"raw/c1.{attempt}.zarr")
    if store.local:
        assert cases.url("c1") == os.path.join(store.url, "raw", f"c1.{attempt}.zarr")
    else:
        assert cases.url("c1") == f"{store.url}/raw/c1.{attempt}.zarr"


# ---------------------------------------------------------------- local specifics


def test_local_urls_are_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url in ("rel", "rel/", "./rel", f"file://{tmp_path}/rel", tmp_path / "rel"):
        store = Store(url)
        assert store.url == str(tmp_path.resolve() / "rel"), url
        assert store.local
    assert repr(Store("rel")) == f"Store({str(tmp_path.resolve() / 'rel')!r})"
    assert Store("rel").url_of("a/b") == str(tmp_path.resolve() / "rel" / "a" / "b")


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    store = Store(tmp_path / "s")
    for i in range(3):
        store.write_bytes("dir/obj", bytes([i]) * 1000)
    assert sorted(os.listdir(tmp_path / "s" / "dir")) == ["obj"]
    assert store.read_bytes("dir/obj") == b"\x02" * 1000


def test_failed_write_keeps_the_old_content_and_no_temporary_file(tmp_path, monkeypatch):
    store = Store(tmp_path / "s")
    store.write_bytes("dir/obj", b"old")

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        store.write_bytes("dir/obj", b"new")
    monkeypatch.undo()
    assert store.read_bytes("dir/obj") == b"old"
    assert sorted(os.listdir(tmp_path / "s" / "dir")) == ["obj"]
    assert store.list("dir") == ["obj"]


def test_key_with_dotdot_cannot_reach_a_sibling_folder(tmp_path):
    store = Store(tmp_path / "s")
    (tmp_path / "secret").write_text("keep out")
    with pytest.raises(ValueError):
        store.read_bytes("../secret")
    with pytest.raises(ValueError):
        store.remove("..")
    assert (tmp_path / "secret").read_text() == "keep out"


# ---------------------------------------------------------------- S3 specifics


def test_s3_store_is_not_local_and_names_full_urls(s3_store, s3_store_url):
    assert not s3_store.local
    assert s3_store.url.startswith(s3_store_url + "/")
    assert s3_store.url_of("/a/b.zarr") == f"{s3_store.url}/a/b.zarr"


def test_s3_endpoint_comes_from_the_environment(s3_store):
    import boto3

    s3_store.write_bytes("probe.txt", b"on the loopback server")
    bucket, _, prefix = s3_store.url.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    body = client.get_object(Bucket=bucket, Key=f"{prefix}/probe.txt")["Body"].read()
    assert body == b"on the loopback server"


def test_s3_objects_are_visible_to_a_second_store(s3_store):
    s3_store.write_bytes("shared/obj", b"from one machine")
    other = Store(s3_store.url)  # another process or machine opening the same URL
    assert other.read_bytes("shared/obj") == b"from one machine"
    assert other.list("shared") == ["obj"]
    other.remove("shared/obj")
    assert not s3_store.exists("shared/obj")
    assert s3_store.list("shared") == []


# ---------------------------------------------------------------- Layout and digests


def test_layout_names_the_keys(tmp_path):
    layout = Layout(Store(tmp_path), "demo")
    assert layout.raw.prefix == "datasets/demo/raw"
    assert layout.preprocessed("abc").prefix == "datasets/demo/preprocessed/abc"
    assert layout.quarantine("f00") == "datasets/demo/quarantine/f00"
    assert layout.checkpoints("run1") == "checkpoints/demo/run1"
    assert layout.model_files("r") == "models/demo/r"
    assert layout.report("r", "curve.png") == "reports/demo/r/curve.png"
    assert layout.stage_output("l1", "train") == "runs/demo/l1/train.json"
    assert layout.raw.store is layout.store
    copy = pickle.loads(pickle.dumps(layout))
    assert copy.store.url == layout.store.url and copy.pipeline == "demo"


def test_digests_are_stable():
    assert sha256_bytes(b"a", b"b") == sha256_bytes(b"a", b"b")
    assert sha256_bytes(b"a", b"b") != sha256_bytes(b"ab")  # each blob is hashed on its own
    assert digest_json({"a": 1, "b": 2}) == digest_json({"b": 2, "a": 1})
    assert len(digest_json({})) == 16


def test_local_store_is_a_plain_folder(tmp_path):
    store = Store(tmp_path / "s")
    store.write_bytes("x/y.txt", b"hello")
    assert (Path(store.url) / "x" / "y.txt").read_bytes() == b"hello"


def test_keys_that_share_a_beginning_are_separate(store):
    """On S3 a key is a string prefix of its neighbours: removing case-1 must leave case-10 alone."""
    for key in ("m/case-1", "m/case-10", "m/case-1x/deep", "n/case-1.zarr/zarr.json", "n/case-10.zarr/zarr.json"):
        store.write_bytes(key, key.encode())
    assert store.list("m") == ["case-1", "case-10", "case-1x"]
    assert store.files("m/case-1") == ["m/case-1"]
    store.remove("m/case-1")
    assert store.files("m") == ["m/case-10", "m/case-1x/deep"]
    store.remove("n/case-1.zarr")
    assert store.files("n") == ["n/case-10.zarr/zarr.json"]
    cases = CaseStore(store, "raw")
    cases.write("c1", case(1))
    cases.write("c10", case(2))
    cases.remove("c1")
    assert cases.committed() == ["c10"]
    np.testing.assert_array_equal(cases.open("c10")["image"].values, case(2)["image"].values)
