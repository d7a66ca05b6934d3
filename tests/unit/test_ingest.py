"""Ingestion: NIfTI decoding, Zarr v3 raw store, idempotence, quarantine with reason codes."""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from voxelflow.core.db import Database
from voxelflow.core.storage import Layout, Store
from voxelflow.data.formats import scrub_nifti
from voxelflow.data.ingest import (
    QuarantineError,
    decode_nifti,
    discover,
    ingest,
    load_case,
    read_ledger,
)
from voxelflow.spec.config import DataSpec

AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 1.25, 0, 4.0], [0, 0, 2.0, 7.5], [0, 0, 0, 1]])


def nifti_bytes(array: np.ndarray, affine: np.ndarray = AFFINE, gz: bool = True) -> bytes:
    raw = nib.Nifti1Image(array, affine).to_bytes()
    return gzip.compress(raw) if gz else raw


def sphere(shape=(12, 12, 12), seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    centre = np.array(shape, dtype=np.float32)[:, None, None, None] / 2
    label = (np.sqrt(((grid - centre) ** 2).sum(0)) < min(shape) / 4).astype(np.uint8)
    image = (label + rng.normal(0, 0.1, shape)).astype(np.float32)
    return image, label


def write_decathlon(root: Path, cases: dict[str, tuple[str, bytes | None, str | None, bytes | None]]) -> Path:
    """cases: name -> (image relpath, image bytes or None for missing, label relpath or None, label bytes)."""
    training = []
    for image_rel, image_blob, label_rel, label_blob in cases.values():
        if image_blob is not None:
            (root / image_rel).parent.mkdir(parents=True, exist_ok=True)
            (root / image_rel).write_bytes(image_blob)
        item = {"image": f"./{image_rel}"}
        if label_rel is not None:
            item["label"] = f"./{label_rel}"
            if label_blob is not None:
                (root / label_rel).parent.mkdir(parents=True, exist_ok=True)
                (root / label_rel).write_bytes(label_blob)
        training.append(item)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"name": "t", "training": training}))
    return root


def singular_affine_bytes() -> bytes:
    """A NIfTI whose sform (the affine nibabel uses) has a zero row: nibabel will not write one directly."""
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    raw = bytearray(img.to_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)))
    hdr.set_qform(None, code=0)
    hdr["sform_code"] = 1
    hdr["srow_x"] = [1, 0, 0, 0]
    hdr["srow_y"] = [0, 1, 0, 0]
    hdr["srow_z"] = [0, 0, 0, 0]
    raw[:348] = hdr.binaryblock
    check = nib.Nifti1Image.from_bytes(bytes(raw))
    assert not np.linalg.det(check.affine[:3, :3]) and np.isfinite(np.asanyarray(check.dataobj)).all()
    return gzip.compress(bytes(raw))


def home(tmp_path: Path) -> tuple[Layout, Database]:
    """A store and a database in a fresh home folder."""
    root = tmp_path / "home"
    return Layout(Store(root), "p"), Database(f"sqlite:///{root / 'voxelflow.db'}")


def case_of(db: Database, tail: str) -> str:
    """The case id the ledger gives the object whose key ends in ``tail`` (the ledger alone maps names to hashes)."""
    (record,) = [r for r in read_ledger(db, "p") if r["object"].endswith("/" + tail)]
    return record["case_id"]


def states_by_object(db: Database) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for record in read_ledger(db, "p"):
        out.setdefault(Path(record["object"]).name, []).append(record)
    return out


@pytest.fixture(scope="module")
def ingested(synth_source, tmp_path_factory):
    """The synthetic cases ingested into a raw store; returns (layout, db, report)."""
    layout, db = home(tmp_path_factory.mktemp("ingested"))
    report = ingest(DataSpec(source=str(synth_source), layout="decathlon"), layout, db, str(synth_source))
    assert len(report.ingested) == 3, report.summary()
    return layout, db, report


# ---------------------------------------------------------------- the synthetic dataset


def test_ingest_writes_one_committed_zarr_v3_store_per_case(ingested):
    layout, _, report = ingested
    assert sorted(report.case_ids) == sorted(report.ingested)
    assert len(set(report.case_ids)) == 3
    assert all(c.startswith("case-") for c in report.case_ids)
    assert layout.raw.committed() == sorted(report.case_ids)
    root = Path(layout.store.url)
    for case_id in report.case_ids:
        case_dir = root / layout.raw.key(case_id)
        meta = json.loads((case_dir / "zarr.json").read_text())
        assert meta["zarr_format"] == 3 and meta["node_type"] == "group"
        for var in ("image", "label"):
            arr = json.loads((case_dir / var / "zarr.json").read_text())
            assert arr["zarr_format"] == 3 and arr["node_type"] == "array"
            assert arr["shape"] == [24, 24, 24]


def test_load_case_round_trips_exactly(ingested, synth_source):
    layout, db, report = ingested
    seen = set()
    for name in ("synth_000", "synth_001", "synth_002"):
        case_id = case_of(db, f"imagesTr/{name}.nii.gz")
        case = load_case(layout.raw, case_id)
        assert "case_name" not in case["attrs"]  # source names never reach the store
        seen.add(case_id)
        img = nib.load(synth_source / "imagesTr" / f"{name}.nii.gz")
        lab = nib.load(synth_source / "labelsTr" / f"{name}.nii.gz")
        expected_image = np.asanyarray(img.dataobj)
        assert case["image"].dtype == expected_image.dtype == np.float32
        np.testing.assert_array_equal(case["image"], expected_image)
        assert case["label"].dtype == np.uint8
        np.testing.assert_array_equal(case["label"], np.asanyarray(lab.dataobj))
        assert case["affine"].dtype == np.float64
        np.testing.assert_array_equal(case["affine"], img.affine)
        assert case["attrs"]["spacing"] == [1.0, 1.0, 1.0]
        assert len(case["attrs"]["source_sha256"]) == 64
        assert case_id == f"case-{case['attrs']['source_sha256'][:16]}"
    assert seen == set(report.case_ids)


def test_ledger_after_first_ingest(ingested):
    _, db, report = ingested
    records = read_ledger(db, "p")
    assert len(records) == 6  # one per object: 3 images + 3 labels
    assert {r["state"] for r in records} == {"ingested"}
    assert {r["case_id"] for r in records} == set(report.case_ids)
    assert not any(r["reason"] for r in records)
    assert all(len(r["sha256"]) == 64 and r["size"] > 0 for r in records)


def test_second_ingest_of_the_same_objects_records_nothing_new(synth_source, tmp_path):
    layout, db = home(tmp_path)
    data = DataSpec(source=str(synth_source), layout="decathlon")
    first = ingest(data, layout, db, str(synth_source))
    store_files = layout.store.files(layout.dataset)
    second = ingest(data, layout, db, str(synth_source))
    assert len(first.ingested) == 3 and not first.duplicate
    assert not second.ingested and not second.quarantined and not second.duplicate
    assert second.seen == 6 and second.objects == {}
    assert second.dataset_digest == first.dataset_digest
    assert second.case_ids == first.case_ids
    assert layout.store.files(layout.dataset) == store_files
    assert [r["state"] for r in read_ledger(db, "p")] == ["ingested"] * 6


def test_same_bytes_under_other_names_are_duplicates(synth_source, tmp_path):
    import shutil

    layout, db = home(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(synth_source, copy)
    for sub in ("imagesTr", "labelsTr"):
        for f in (copy / sub).iterdir():
            f.rename(f.with_name("renamed_" + f.name))
    meta = json.loads((copy / "dataset.json").read_text())
    for item in meta["training"]:
        for key in ("image", "label"):
            head, _, tail = item[key].rpartition("/")
            item[key] = f"{head}/renamed_{tail}"
    (copy / "dataset.json").write_text(json.dumps(meta))

    first = ingest(DataSpec(source=str(synth_source)), layout, db, str(synth_source))
    second = ingest(DataSpec(source=str(copy)), layout, db, str(copy))
    assert sorted(second.duplicate) == sorted(first.ingested) and not second.ingested
    assert second.objects == {"duplicate": 6}
    records = read_ledger(db, "p")
    assert len(records) == 12  # arrived = ingested + duplicate + quarantined, in objects
    assert sorted(r["state"] for r in records) == ["duplicate"] * 6 + ["ingested"] * 6


def test_new_case_changes_the_digest(tmp_path):
    from voxelflow.data.synthetic import make_decathlon

    source = make_decathlon(tmp_path / "src", n_cases=2, size=12)
    layout, db = home(tmp_path)
    data = DataSpec(source=str(source), layout="decathlon")
    first = ingest(data, layout, db, str(source))
    make_decathlon(source, n_cases=3, size=12)
    second = ingest(data, layout, db, str(source))
    assert len(second.ingested) == 1 and not second.duplicate and second.seen == 4
    assert len(second.case_ids) == 3
    assert second.dataset_digest != first.dataset_digest


# ---------------------------------------------------------------- quarantine


@pytest.fixture
def bad_source(tmp_path):
    """One good case and one case per kind of defect, each file named after its case."""
    image, label = sphere()
    good_img, good_lab = nifti_bytes(image), nifti_bytes(label)
    full = nifti_bytes(image)
    raw = nifti_bytes(image, gz=False)
    cases = {
        "good": ("img/good.nii.gz", good_img, "lab/good_seg.nii.gz", good_lab),
        "truncated_gz": ("img/truncated_gz.nii.gz", full[: len(full) // 2], "lab/truncated_gz_seg.nii.gz",
                         nifti_bytes(label, affine=np.eye(4))),
        "truncated_nii": ("img/truncated_nii.nii", raw[: len(raw) // 2], None, None),
        "nan": ("img/nan.nii.gz", nifti_bytes(np.full((12, 12, 12), np.nan, np.float32)),
                "lab/nan_seg.nii.gz", nifti_bytes(label.copy(order="F"))),
        "flat": ("img/flat.nii.gz", nifti_bytes(image[:, :, 0].copy()), None, None),
        "mismatch": ("img/mismatch.nii.gz", nifti_bytes(image * 2), "lab/mismatch_seg.nii.gz",
                     nifti_bytes(label[:10].copy())),
        "notnifti.txt": ("img/notnifti.txt", b"this is not a volume\n", None, None),
        "missing_image": ("img/missing_image.nii.gz", None, None, None),
        "missing_label": ("img/missing_label.nii.gz", nifti_bytes(image * 3), "lab/missing_label_seg.nii.gz", None),
    }
    root = write_decathlon(tmp_path / "incoming", cases)
    return root, cases


EXPECTED_REASONS = {
    "truncated_gz": {"truncated", "unreadable"},  # the gzip stream itself is cut: decompression fails first
    "truncated_nii": {"truncated"},
    "nan": {"non-finite"},
    "flat": {"bad-shape"},
    "mismatch": {"label-mismatch"},
    "notnifti.txt": {"unsupported-format"},
    "missing_image": {"missing-file"},
    "missing_label": {"missing-file"},
}


def test_quarantine_reason_codes(bad_source, tmp_path):
    root, cases = bad_source
    layout, db = home(tmp_path)
    report = ingest(DataSpec(source=str(root), layout="decathlon"), layout, db, str(root))

    assert len(report.ingested) == 1  # the good case is not held back by its neighbours
    ledger = states_by_object(db)
    assert ledger["good.nii.gz"][0]["case_id"] == report.ingested[0]
    assert len(report.quarantined) == len(EXPECTED_REASONS)
    reasons = {name: ledger[Path(cases[name][0]).name][0]["reason"] for name in EXPECTED_REASONS}
    for name, allowed in EXPECTED_REASONS.items():
        assert reasons[name] in allowed, (name, reasons[name])

    ledger = states_by_object(db)
    for name, (image_rel, _, label_rel, _) in cases.items():
        for rel in filter(None, (image_rel, label_rel)):
            (record,) = ledger[Path(rel).name]
            if name == "good":
                assert record["state"] == "ingested"
                assert record["case_id"] == report.ingested[0]
            else:
                assert record["state"] == "quarantined", (name, record)
                assert record["reason"] == reasons[name]
                assert record["case_id"] is None
                assert record["detail"]
    # every object of every case has exactly one ledger record
    n_objects = sum(1 + (label_rel is not None) for _, _, label_rel, _ in cases.values())
    assert len(read_ledger(db, "p")) == n_objects


def test_quarantined_bytes_are_kept_under_their_hash(bad_source, tmp_path):
    import hashlib

    root, cases = bad_source
    layout, db = home(tmp_path)
    ingest(DataSpec(source=str(root), layout="decathlon"), layout, db, str(root))
    qdir = Path(layout.store.url) / layout.dataset / "quarantine"
    kept = {p.name: p.read_bytes() for p in qdir.iterdir()}
    assert not any(name.endswith(".tmp") for name in kept)
    for name, (_, image_blob, _, label_blob) in cases.items():
        if name == "good":  # (its label's bytes are shared with a bad case)
            assert hashlib.sha256(image_blob).hexdigest() not in kept
            continue
        for blob in (image_blob, label_blob):
            if blob is None:
                continue
            # named by the hash of what arrived; kept without free text and extensions, or, when the header
            # does not parse, not at all (it stays where it arrived)
            clean = scrub_nifti(blob, name, 1 << 30)
            assert kept.get(hashlib.sha256(blob).hexdigest()) == clean, name


def test_quarantine_is_not_recorded_twice(bad_source, tmp_path):
    root, _ = bad_source
    layout, db = home(tmp_path)
    data = DataSpec(source=str(root), layout="decathlon")
    first = ingest(data, layout, db, str(root))
    n = len(read_ledger(db, "p"))
    second = ingest(data, layout, db, str(root))
    assert not second.ingested and not second.quarantined and not second.duplicate
    assert len(read_ledger(db, "p")) == n
    assert second.case_ids == first.case_ids


def test_quarantine_keeps_image_and_label_with_the_same_name(tmp_path):
    image, label = sphere()
    image_blob, label_blob = nifti_bytes(image), nifti_bytes(label[:10].copy())
    root = write_decathlon(tmp_path / "incoming", {
        "case": ("imagesTr/case_001.nii.gz", image_blob, "labelsTr/case_001.nii.gz", label_blob),
    })
    layout, db = home(tmp_path)
    report = ingest(DataSpec(source=str(root), layout="decathlon"), layout, db, str(root))
    assert report.quarantined[0]["reason"] == "label-mismatch"
    import hashlib

    qdir = Path(layout.store.url) / layout.dataset / "quarantine"
    for blob, array in ((image_blob, image), (label_blob, label[:10])):
        kept = (qdir / hashlib.sha256(blob).hexdigest()).read_bytes()
        assert np.array_equal(np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(kept)).dataobj), array)


def test_too_many_voxels_is_quarantined(tmp_path):
    image, label = sphere()
    root = write_decathlon(tmp_path / "incoming", {"big": ("img/big.nii.gz", nifti_bytes(image), None, None)})
    layout, db = home(tmp_path)
    report = ingest(DataSpec(source=str(root), layout="decathlon", max_voxels=1000), layout, db, str(root))
    assert [q["reason"] for q in report.quarantined] == ["too-large"]
    assert not report.case_ids


# ---------------------------------------------------------------- decode_nifti


def test_decode_real_nibabel_file():
    path = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")
    with open(path, "rb") as fh:
        volume = decode_nifti(fh.read(), "anatomical.nii", 512**3)
    reference = nib.load(path)
    assert volume.array.shape == reference.shape[:3]
    assert volume.array.ndim == 3
    np.testing.assert_array_equal(volume.array, np.asanyarray(reference.dataobj).reshape(volume.array.shape))
    np.testing.assert_array_equal(volume.affine, reference.affine)
    assert volume.spacing == tuple(float(z) for z in reference.header.get_zooms()[:3])


def test_decode_gzip_and_plain_agree():
    image, _ = sphere()
    a = decode_nifti(nifti_bytes(image, gz=True), "a.nii.gz", 10**6)
    b = decode_nifti(nifti_bytes(image, gz=False), "a.nii", 10**6)
    np.testing.assert_array_equal(a.array, image)
    np.testing.assert_array_equal(b.array, image)
    np.testing.assert_array_equal(a.affine, AFFINE)
    assert a.spacing == (1.5, 1.25, 2.0)


def test_decode_squeezes_a_trailing_singleton_axis():
    image, _ = sphere()
    volume = decode_nifti(nifti_bytes(image[..., None]), "a.nii.gz", 10**6)
    assert volume.array.shape == image.shape


@pytest.mark.parametrize("blob, name, reason", [
    (nifti_bytes(np.zeros((4, 4, 4, 3), np.float32)), "four.nii.gz", "bad-shape"),
    (nifti_bytes(np.zeros((4, 4, 1), np.float32)), "thin.nii.gz", "bad-shape"),
    (singular_affine_bytes(), "sing.nii.gz", "bad-affine"),
    (nifti_bytes(np.array([[[np.inf, 0], [0, 0]], [[0, 0], [0, 0]]], np.float32)), "inf.nii.gz", "non-finite"),
    (b"\x1f\x8b not really gzip", "junk.nii.gz", "unreadable"),
    (b"\x00" * 400, "zeros.nii", "unreadable"),
    (nifti_bytes(np.zeros((4, 4, 4), np.float32)), "volume.mha", "unsupported-format"),
], ids=["4-d", "thin", "singular-affine", "inf", "bad-gzip", "bad-header", "not-nifti-name"])
def test_decode_rejects(blob, name, reason):
    with pytest.raises(QuarantineError) as info:
        decode_nifti(blob, name, 10**6)
    assert info.value.reason == reason
    assert name in info.value.detail


def test_decode_rejects_too_large():
    with pytest.raises(QuarantineError) as info:
        decode_nifti(nifti_bytes(np.zeros((8, 8, 8), np.float32)), "a.nii.gz", 511)
    assert info.value.reason == "too-large"
    decode_nifti(nifti_bytes(np.zeros((8, 8, 8), np.float32)), "a.nii.gz", 512)


# ---------------------------------------------------------------- folder layout


def test_folder_layout_is_discovered_and_ingested(tmp_path):
    root = tmp_path / "folders"
    a_img, a_lab = sphere(seed=1)
    b_img, _ = sphere(seed=2)
    (root / "patient_b").mkdir(parents=True)
    (root / "patient_a").mkdir()
    (root / "patient_a" / "image.nii.gz").write_bytes(nifti_bytes(a_img))
    (root / "patient_a" / "label.nii.gz").write_bytes(nifti_bytes(a_lab))
    (root / "patient_b" / "image.nii").write_bytes(nifti_bytes(b_img, gz=False))
    (root / "README.txt").write_text("not a case")

    cases = discover(str(root), "folder")
    assert [c.name for c in cases] == ["patient_a", "patient_b"]
    assert cases[0].image.endswith("patient_a/image.nii.gz")
    assert cases[0].label.endswith("patient_a/label.nii.gz")
    assert cases[1].image.endswith("patient_b/image.nii") and cases[1].label is None

    layout, db = home(tmp_path)
    report = ingest(DataSpec(source=str(root), layout="folder"), layout, db, str(root))
    assert len(report.ingested) == 2 and not report.quarantined
    by_name = {name: load_case(layout.raw, case_of(db, f"{name}/image.nii{'' if name == 'patient_b' else '.gz'}"))
               for name in ("patient_a", "patient_b")}
    np.testing.assert_array_equal(by_name["patient_a"]["image"], a_img)
    np.testing.assert_array_equal(by_name["patient_a"]["label"], a_lab)
    np.testing.assert_array_equal(by_name["patient_b"]["image"], b_img)
    assert "label" not in by_name["patient_b"]


def test_folder_with_only_a_label_does_not_use_it_as_image(tmp_path):
    _, lab = sphere()
    (tmp_path / "folders" / "p1").mkdir(parents=True)
    (tmp_path / "folders" / "p1" / "label.nii.gz").write_bytes(nifti_bytes(lab))
    cases = discover(str(tmp_path / "folders"), "folder")
    assert all(not c.image.endswith("label.nii.gz") for c in cases)


def test_discover_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        discover(str(tmp_path / "absent"), "decathlon")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        discover(str(tmp_path / "empty"), "decathlon")


def test_a_write_that_died_before_its_commit_is_redone(tmp_path):
    """Zarr objects without a commit marker and without ledger rows: the next ingest writes the case again."""
    from sqlalchemy import delete

    from voxelflow.core.db import ledger
    from voxelflow.data.synthetic import make_decathlon

    src = make_decathlon(tmp_path / "incoming", n_cases=2, size=16)
    layout, db = home(tmp_path)
    data = DataSpec(source=str(src), layout="decathlon")
    first = ingest(data, layout, db, str(src))
    victim = first.case_ids[0]
    layout.store.remove(f"{layout.raw.prefix}/_committed/{victim}")
    with db.transaction() as conn:
        conn.execute(delete(ledger).where(ledger.c.case_id == victim))
    assert layout.raw.committed() == first.case_ids[1:]
    again = ingest(data, layout, db, str(src))
    assert again.ingested == [victim] and again.case_ids == first.case_ids
    assert layout.raw.committed() == first.case_ids


def test_a_commit_without_ledger_rows_is_recorded_not_rewritten(tmp_path):
    """Killed after the commit marker, before the ledger rows: the case is there, so it is recorded as ingested."""
    from sqlalchemy import delete

    from voxelflow.core.db import ledger
    from voxelflow.data.synthetic import make_decathlon

    src = make_decathlon(tmp_path / "incoming", n_cases=2, size=16)
    layout, db = home(tmp_path)
    data = DataSpec(source=str(src), layout="decathlon")
    first = ingest(data, layout, db, str(src))
    victim = first.case_ids[0]
    zarr_json = Path(layout.store.url) / layout.raw.key(victim) / "zarr.json"
    before = zarr_json.stat().st_mtime_ns
    with db.transaction() as conn:
        conn.execute(delete(ledger).where(ledger.c.case_id == victim))
    again = ingest(data, layout, db, str(src))
    assert again.ingested == [victim] and again.objects == {"ingested": 2}
    assert zarr_json.stat().st_mtime_ns == before
    assert len(read_ledger(db, "p")) == 4


# ---------------------------------------------------------------- exactly once, after kill -9

KILL_SCRIPT = r"""
import sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/src"]
from voxelflow.spec.config import DataSpec
from voxelflow.core.db import Database
from voxelflow.data.ingest import ingest
from voxelflow.core.storage import Layout, Store
root = sys.argv[3]
layout, db = Layout(Store(root), "p"), Database(f"sqlite:///{root}/voxelflow.db")
ingest(DataSpec(source=sys.argv[2]), layout, db, sys.argv[2], progress=lambda i, n: time.sleep(0.3))
"""


def test_kill_9_mid_ingest_then_rerun_accounts_for_every_object_once(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    image, label = sphere()
    cases = {f"c{i}": (f"imagesTr/c{i}.nii.gz", nifti_bytes(image + i), f"labelsTr/c{i}.nii.gz", nifti_bytes(label))
             for i in range(8)}
    cases["bad"] = ("imagesTr/bad.nii.gz", b"not a volume", None, None)
    cases["again"] = ("imagesTr/again.nii.gz", nifti_bytes(image + 3), "labelsTr/again.nii.gz", nifti_bytes(label))
    src = write_decathlon(tmp_path / "src", cases)
    layout, db = home(tmp_path)
    read_ledger(db, "p")  # the schema exists before the child starts
    repo = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(repo), str(src), str(tmp_path / "home")])
    try:
        deadline = time.monotonic() + 120
        while len(read_ledger(db, "p")) < 4 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    partial = len(read_ledger(db, "p"))
    assert 4 <= partial < 20, partial  # killed in the middle
    report = ingest(DataSpec(source=str(src)), layout, db, str(src))
    rows = read_ledger(db, "p")
    arrived = 8 * 2 + 1 + 2
    assert report.arrived == arrived == sum(report.objects.values()) + report.seen
    assert len(rows) == arrived and len({r["object"] for r in rows}) == arrived  # each object exactly once
    by_state = {s: sum(r["state"] == s for r in rows) for s in ("ingested", "duplicate", "quarantined")}
    assert sum(by_state.values()) == arrived and by_state["quarantined"] == 1
    assert by_state["duplicate"] == 2  # c3 under another name
    assert len(report.case_ids) == 8 and layout.raw.committed() == sorted(report.case_ids)


def test_decathlon_test_entries_are_unlabelled_cases(tmp_path):
    image, label = sphere()
    other, _ = sphere(seed=3)
    src = write_decathlon(tmp_path / "src", {"c": ("imagesTr/c.nii.gz", nifti_bytes(image),
                                                   "labelsTr/c.nii.gz", nifti_bytes(label))})
    (src / "imagesTs").mkdir()
    (src / "imagesTs" / "t.nii.gz").write_bytes(nifti_bytes(other))
    meta = json.loads((src / "dataset.json").read_text())
    meta["test"] = ["./imagesTs/t.nii.gz", "./imagesTr/c.nii.gz"]  # c is also a training case: one case
    (src / "dataset.json").write_text(json.dumps(meta))
    layout, db = home(tmp_path)
    report = ingest(DataSpec(source=str(src), layout="decathlon"), layout, db, str(src))
    assert len(report.case_ids) == 1 and len(report.unlabelled) == 1
    assert {r["state"] for r in read_ledger(db, "p")} == {"ingested"} and len(read_ledger(db, "p")) == 3


@pytest.mark.parametrize("manifest, message", [
    ("{not json", "not valid JSON"),
    ('["a.nii.gz"]', "must be an object"),
    ('{"training": {"image": "a.nii.gz"}}', "must be an object whose training and test are lists"),
    ('{"training": [{"label": "a.nii.gz"}]}', r"training\[0\] needs an image path"),
    ('{"training": [], "test": [{"image": 3}]}', r"test\[0\] needs an image path"),
    ('{"training": [{"image": "a.nii.gz", "label": ["x", "y"]}]}', "at most one label path"),
])
def test_a_malformed_dataset_json_is_a_clear_error_and_records_nothing(tmp_path, manifest, message):
    src = tmp_path / "src"
    src.mkdir()
    (src / "dataset.json").write_text(manifest)
    layout, db = home(tmp_path)
    with pytest.raises(ValueError, match=message):
        ingest(DataSpec(source=str(src), layout="decathlon"), layout, db, str(src))
    assert read_ledger(db, "p") == []


def test_a_lifecycle_given_the_announced_dataset_takes_it_as_recorded_and_reads_no_source(tmp_path):
    """What a voxelflow.dataset.updated trigger passes (the dataset's digest) is taken from the ledger as it is;
    once the ledger holds another dataset, the source is ingested as usual."""
    import shutil

    from voxelflow.core import audit
    from voxelflow.data.synthetic import make_decathlon
    from voxelflow.spec.config import Settings
    from voxelflow.stages.context import Context
    from voxelflow.stages.ingest import ingest_stage

    source = make_decathlon(tmp_path / "src", n_cases=2, size=12)
    ctx = Context(Settings(home=tmp_path / "home", store=str(tmp_path / "store")), "p")
    data = DataSpec(source=str(source), layout="decathlon")
    first = ingest_stage(data, ctx)
    moved = shutil.move(source, tmp_path / "away")  # a source that is not there cannot have been read
    taken = ingest_stage(data, ctx, dataset=first.dataset_digest)
    assert taken.recorded and not first.recorded
    assert (taken.case_ids, taken.dataset_digest) == (first.case_ids, first.dataset_digest)
    assert taken.arrived == 0 and not taken.ingested and taken.summary()["recorded"] is True
    assert [e["event"] for e in audit.entries(ctx.db)][-1] == "data.recorded"

    shutil.move(moved, source)
    make_decathlon(source, n_cases=3, size=12)
    ingest_stage(data, ctx)  # another ingest grew the dataset since the announcement
    again = ingest_stage(data, ctx, dataset=first.dataset_digest)
    assert not again.recorded and again.arrived == 6 and len(again.case_ids) == 3


def test_a_dataset_that_is_not_a_digest_is_refused(tmp_path):
    from voxelflow.spec.config import Settings
    from voxelflow.stages.context import Context
    from voxelflow.stages.ingest import ingest_stage

    ctx = Context(Settings(home=tmp_path / "home", store=str(tmp_path / "store")), "p")
    with pytest.raises(ValueError, match="dataset digest"):
        ingest_stage(DataSpec(source=str(tmp_path), layout="decathlon"), ctx, dataset="{{ event.payload }}")
