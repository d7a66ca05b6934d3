"""A case that arrives in parts: the later, fuller case replaces the earlier one in the dataset.

A DICOM series whose slices come in two batches, a label that comes after its image, or a label
corrected under its name would otherwise leave the earlier case (a half volume, an unlabelled copy,
the old label) in the dataset beside the new one. Every object still has exactly one ledger row.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from pydicom.uid import generate_uid

from tests.unit.test_dicom import KEY, make_slice, series_pixels
from tests.unit.test_ingest import home, nifti_bytes, sphere, write_decathlon
from voxelflow.core import audit
from voxelflow.core.db import Database
from voxelflow.data.ingest import ingest, ingested_cases, load_case, read_ledger
from voxelflow.spec.config import DataSpec


def run(src, layout, db, kind="dicom"):
    return ingest(DataSpec(source=str(src), layout=kind), layout, db, str(src), deid_key=KEY)


def one_row_per_object(db) -> list[dict]:
    rows = read_ledger(db, "p")
    assert not [k for k, n in Counter((r["object"], r["sha256"]) for r in rows).items() if n > 1]
    return rows


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_series_whose_slices_arrive_in_two_batches_ends_as_one_whole_case(tmp_path, request, kind):
    src = tmp_path / "src"
    src.mkdir()
    zs, pixels = [2.0 * i for i in range(6)], series_pixels(6)
    for i in range(3):
        (src / f"s{i}.dcm").write_bytes(make_slice(zs[i], i, pixels[i]))
    layout, db = home(tmp_path)
    if kind == "postgresql":  # the shared database of the scale-out layout: the same SQL, another dialect
        db = Database(request.getfixturevalue("pg_url"))
    first = run(src, layout, db)
    (half,) = first.unlabelled
    assert load_case(layout.raw, half)["image"].shape[2] == 3
    for i in range(3, 6):
        (src / f"s{i}.dcm").write_bytes(make_slice(zs[i], i, pixels[i]))
    second = run(src, layout, db)
    (whole,) = second.unlabelled  # the half volume is no longer a case of the dataset
    assert whole != half and ingested_cases(db, "p") == [whole]
    assert load_case(layout.raw, whole)["image"].shape[2] == 6
    rows = one_row_per_object(db)
    assert len(rows) == 6 and {(r["state"], r["case_id"]) for r in rows} == {("ingested", whole)}
    assert second.superseded == [{"case": half, "by": whole, "regrouped": 3}]
    (record,) = [e for e in audit.entries(db) if e["event"] == "data.cases_superseded"]
    assert record["details"]["superseded"] == [half] and record["details"]["case"] == whole
    assert audit.verify(db).ok


def test_a_series_quarantined_for_missing_slices_is_ingested_once_they_arrive(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    zs, pixels = [2.0 * i for i in range(4)], series_pixels(4)
    for i in (0, 1, 3):  # slice 2 is late
        (src / f"s{i}.dcm").write_bytes(make_slice(zs[i], i, pixels[i]))
    layout, db = home(tmp_path)
    first = run(src, layout, db)
    assert [q["reason"] for q in first.quarantined] == ["missing-slices"]
    (src / "s2.dcm").write_bytes(make_slice(zs[2], 2, pixels[2]))
    second = run(src, layout, db)
    (whole,) = second.ingested
    rows = one_row_per_object(db)
    assert {(r["state"], r["case_id"], r["reason"]) for r in rows} == {("ingested", whole, None)}
    assert second.superseded == [{"case": None, "by": whole, "regrouped": 3}]


def test_a_label_that_comes_after_its_series_makes_the_case_labelled(tmp_path):
    import json

    import nibabel as nib

    src = tmp_path / "src"
    uid = generate_uid()
    (src / "a").mkdir(parents=True)
    pixels = series_pixels(3)
    for i in range(3):
        (src / "a" / f"s{i}.dcm").write_bytes(make_slice(2.0 * i, i, pixels[i], series=uid))
    layout, db = home(tmp_path)
    first = run(src, layout, db)
    assert first.case_ids == [] and len(first.unlabelled) == 1
    affine = np.array([[-0.6, 0, 0, 50.0], [0, -0.8, 0, 40.0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    mask = np.zeros((5, 6, 3), np.uint8)
    mask[1:3, 2:5, 1] = 1
    nib.save(nib.Nifti1Image(mask, affine), src / "a.nii.gz")
    (src / "labels.json").write_text(json.dumps({"labels": [{"series": uid, "label": "a.nii.gz"}]}))
    second = run(src, layout, db)
    assert len(second.case_ids) == 1 and second.unlabelled == [] and ingested_cases(db, "p") == second.case_ids
    assert len(one_row_per_object(db)) == 4


def test_a_label_corrected_under_its_name_replaces_the_old_case(tmp_path):
    image, label = sphere()
    src = write_decathlon(tmp_path / "src", {"c": ("imagesTr/c.nii.gz", nifti_bytes(image),
                                                   "labelsTr/c.nii.gz", nifti_bytes(label))})
    layout, db = home(tmp_path)
    (old,) = run(src, layout, db, "decathlon").case_ids
    fixed = label.copy()
    fixed[0, 0, 0] = 1
    (src / "labelsTr" / "c.nii.gz").write_bytes(nifti_bytes(fixed))
    (new,) = run(src, layout, db, "decathlon").case_ids  # one case, not the old label and the new one
    assert new != old and np.array_equal(load_case(layout.raw, new)["label"], fixed)
    rows = one_row_per_object(db)
    assert len(rows) == 3  # image, old label bytes, new label bytes: each recorded once
    (stale,) = [r for r in rows if r["case_id"] == old]
    assert stale["superseded_by"] == new and stale["state"] == "ingested"


def test_two_raters_labels_of_one_image_stay_two_cases(tmp_path):
    image, label = sphere()
    other = label.copy()
    other[0, 0, 0] = 1
    src = write_decathlon(tmp_path / "src", {
        "r1": ("imagesTr/c.nii.gz", nifti_bytes(image), "labelsTr/c_r1.nii.gz", nifti_bytes(label)),
        "r2": ("imagesTr/c.nii.gz", nifti_bytes(image), "labelsTr/c_r2.nii.gz", nifti_bytes(other)),
    })
    layout, db = home(tmp_path)
    report = run(src, layout, db, "decathlon")
    assert len(report.case_ids) == 2 and report.superseded == []
    assert len(run(src, layout, db, "decathlon").case_ids) == 2


def test_a_label_named_before_it_existed_is_ingested_when_it_comes(tmp_path):
    image, label = sphere()
    src = write_decathlon(tmp_path / "src", {"c": ("imagesTr/c.nii.gz", nifti_bytes(image),
                                                   "labelsTr/c.nii.gz", None)})  # the label is not there yet
    layout, db = home(tmp_path)
    first = run(src, layout, db, "decathlon")
    assert [q["reason"] for q in first.quarantined] == ["missing-file"]
    (src / "labelsTr").mkdir()
    (src / "labelsTr" / "c.nii.gz").write_bytes(nifti_bytes(label))
    (case,) = run(src, layout, db, "decathlon").case_ids
    rows = one_row_per_object(db)
    image_row, *label_rows = sorted(rows, key=lambda r: "labelsTr" in r["object"])
    assert (image_row["state"], image_row["case_id"]) == ("ingested", case)  # regrouped out of quarantine
    assert sorted((r["state"], r["sha256"] == "missing", r["superseded_by"]) for r in label_rows) == [
        ("ingested", False, None), ("quarantined", True, case)]  # the old "missing" row points at the case


def test_a_file_caught_half_copied_is_ingested_when_the_copy_completes(tmp_path):
    image, label = sphere()
    whole = nifti_bytes(image)
    src = write_decathlon(tmp_path / "src", {"c": ("imagesTr/c.nii.gz", whole[: len(whole) // 2],
                                                   "labelsTr/c.nii.gz", nifti_bytes(label))})
    layout, db = home(tmp_path)
    assert [q["reason"] for q in run(src, layout, db, "decathlon").quarantined] == ["truncated"]
    (src / "imagesTr" / "c.nii.gz").write_bytes(whole)  # the copy finished
    (case,) = run(src, layout, db, "decathlon").case_ids
    rows = one_row_per_object(db)
    half = [r for r in rows if r["object"].endswith("imagesTr/c.nii.gz") and r["state"] == "quarantined"]
    assert [(r["reason"], r["superseded_by"]) for r in half] == [("truncated", case)]
    assert {(r["state"], r["case_id"]) for r in rows if r not in half} == {("ingested", case)}
