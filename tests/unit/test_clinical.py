"""Received series routed (voxelflow.serving.clinical) against a real Orthanc and the tiny registered model: a
labelled series is ingested de-identified, an unlabelled one segmented from the spool, its SEG and SR stored in
Orthanc referencing the original instances, and the series deleted from the spool once they are acknowledged;
data.accept skips with the reason; retention keeps a done series for its hours; nothing outside the spool
holds an identifying value."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from tests.unit.test_dicom_results import seg_mask
from tests.unit.test_predict import MODEL, spec_data, tiny_registry
from voxelflow.core.db import audit_log, connect, predictions, sends
from voxelflow.core.storage import Layout, Store
from voxelflow.data import synthetic
from voxelflow.data.spool import Spool
from voxelflow.serving import clinical
from voxelflow.serving.predict import ModelRef
from voxelflow.spec.config import Settings, validate_spec


def received(tmp_path: Path, n: int, labelled: int, seed: int = 7) -> tuple[Path, list[Path], dict[str, str]]:
    """``n`` CT series with a fictitious patient made for this test; ``labelled`` of them named by labels.json."""
    token = "".join(random.Random().choices("BCDFGHJKLMNPQRSTVWXZ", k=8))
    identity = {k: f"{v}{token}" for k, v in synthetic.FICTITIOUS_IDENTITY.items()}
    identity["PatientName"] = f"Z{token}^Aster"
    identity["PatientBirthDate"] = f"19{random.randint(20, 89)}0{random.randint(1, 9)}1{random.randint(0, 9)}"
    identity["PatientID"] = f"P{token}"
    src = synthetic.make_dicom(tmp_path / "source", n_cases=n, size=24, seed=seed, identity=identity,
                               private_note=f"Note-{token}")
    manifest = json.loads((src / "labels.json").read_text())
    (src / "labels.json").write_text(json.dumps({"labels": manifest["labels"][:labelled]}))
    folders = sorted(p for p in src.iterdir() if p.is_dir() and p.name != "labels")
    return src, folders, identity


def spool_in(spool: Spool, folder: Path, association: str) -> str:
    """Stage and commit a series' files as the receiver does; returns its series key."""
    spool.prepare()
    staged = []
    for f in sorted(folder.glob("*.dcm")):
        copy = spool.tmp / f.name
        copy.write_bytes(f.read_bytes())
        staged.append(spool.stage(copy, association))
    spool.commit(staged)
    spool.release_staging(association)
    return spool.series_key(staged[0].study, staged[0].series)


@pytest.fixture
def world(tmp_path_factory, tmp_path, orthanc):
    uri = tiny_registry(tmp_path_factory)
    src, folders, identity = received(tmp_path, 3, 1)
    settings = Settings(home=tmp_path / "home", mlflow_tracking_uri=uri, dicom_destination=orthanc.dicom_url,
                        deid_key=f"key-{random.random()}")
    data = spec_data("rx", src)
    data["data"]["layout"] = "dicom"
    spec = validate_spec(data, "rx")
    spool = clinical.spool_of(settings, "rx")
    db = connect(settings.database)
    return settings, spec, spool, db, folders, identity, Layout(Store(settings.store_url), "rx")


def test_labelled_is_ingested_unlabelled_is_segmented_sent_and_deleted(world, orthanc):
    import highdicom as hd

    from voxelflow.data import dicom
    from voxelflow.release import registry

    settings, spec, spool, db, folders, identity, layout = world
    keys = [spool_in(spool, f, f"a{i}") for i, f in enumerate(folders)]
    spec = validate_spec({**spec.model_dump(mode="json"), "data": {
        **spec.data.model_dump(mode="json"), "accept": {"modalities": ["CT"], "max_slices": 30}}}, "rx")
    report = clinical.route(db, settings, layout, spool, spec.data, ModelRef.parse(MODEL), keys)
    routes = [o.route for o in report.outcomes]
    assert routes == ["ingested", "predicted", "predicted"], report.outcomes
    assert report.sent == {"destination": orthanc.dicom_url, "sent": 4, "skipped": 0, "pending": 0, "refused": 0}
    assert all(o.deleted for o in report.outcomes) and spool.series() == []  # acknowledged: gone from the spool
    assert report.ingest.ingested and report.outcomes[0].case == report.ingest.ingested[0]

    series_uid = pydicom.dcmread(sorted(folders[1].glob("*.dcm"))[0]).SeriesInstanceUID
    stored = [pydicom.dcmread(io.BytesIO(orthanc.file(i["MainDicomTags"]["SOPInstanceUID"])))
              for i in orthanc.instances()]
    mine = [d for d in stored if d.Modality in ("SEG", "SR") and series_uid in str(d)]  # they reference it
    assert {d.Modality for d in mine} == {"SEG", "SR"}
    seg = hd.seg.segread(io.BytesIO(orthanc.file(next(d for d in mine if d.Modality == "SEG").SOPInstanceUID)))
    originals = [pydicom.dcmread(f) for f in sorted(folders[1].glob("*.dcm"))]
    assert {str(i.SOPInstanceUID) for i in originals} == {str(uid) for _, _, uid in
                                                          seg.get_source_image_uids()}
    # the masks equal the segmentation of the same instances by the same model version
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        segmenter = registry.load_version(settings.tracking_uri, MODEL, "1", Path(tmp))
    volume = dicom.stack([dicom.parse(f.read_bytes(), f.name) for f in sorted(folders[1].glob("*.dcm"))], 10**9)
    expected = segmenter.segment(volume.array, volume.affine)
    assert expected.any() and not expected.all()  # a mask with something in it
    assert np.array_equal(seg_mask(seg, originals), expected)

    # recorded outside the spool: hashes and de-identified ids only
    with db.transaction() as conn:
        rows = [r._asdict() for t in (predictions, sends, audit_log) for r in conn.execute(select(t))]
    blob = json.dumps(rows, default=str)
    for value in [*identity.values(), series_uid, originals[0].StudyInstanceUID, originals[0].SOPInstanceUID]:
        assert value not in blob
    for path in settings.root.rglob("*"):
        if path.is_file():
            assert not [v for v in identity.values() if v.encode() in path.read_bytes()], path

    # a rerun of the same series (announced again) does nothing twice
    again = clinical.route(db, settings, layout, spool, spec.data, ModelRef.parse(MODEL), keys[1:2])
    assert again.outcomes[0].route == "failed" and "no longer in the spool" in again.outcomes[0].reason


def test_accept_skips_with_the_reason_and_retention_keeps_a_done_series(world):
    settings, spec, spool, db, folders, identity, layout = world
    settings = settings.model_copy(update={"spool_retention_h": 2.0, "dicom_destination": None})
    key = spool_in(spool, folders[2], "b0")
    from voxelflow.spec.sections import Accept

    data = spec.data.model_copy(update={"accept": Accept(modalities=["MR"])})
    report = clinical.route(db, settings, layout, spool, data, ModelRef.parse(MODEL), [key])
    (out,) = report.outcomes
    assert (out.route, out.reason) == ("skipped", "modality CT is not in data.accept.modalities (MR)")
    assert spool.series() == [key] and clinical.pending(spool) == []  # done, kept for its retention
    import time

    assert clinical.sweep(db, spool, 2.0, at=time.time() + 3600) == []
    assert clinical.sweep(db, spool, 2.0, at=time.time() + 2 * 3600 + 1) == [out.series]
    assert spool.series() == []

    # without a destination, a segmented series stays (nothing acknowledged it), with its results
    key = spool_in(spool, folders[1], "b1")
    report = clinical.route(db, settings, layout, spool, spec.data, ModelRef.parse(MODEL), [key])
    assert [(o.route, o.acknowledged, o.deleted) for o in report.outcomes] == [("predicted", False, False)]
    assert spool.series() == [key] and clinical.pending(spool) == [key]
