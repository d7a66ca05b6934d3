"""Batch inference on arrival (voxelflow.serving.predict, flows/predict.py): unlabelled cases ingested from real
NIfTI files are segmented by a model registered in a real MLflow on SQLite; masks are NIfTI on the input's
grid next to volumes.csv, each recorded with the version that made it; reruns skip; a triggered flow run
on the session's real Prefect server.

Training is not what these tests are about: the registered model is a tiny untrained UNet (its masks
are not empty), registered once per session and shared with tests/e2e/test_predict_cli.py.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from voxelflow.core.storage import Store
from voxelflow.serving import predict as batch
from voxelflow.serving.predict import ModelRef

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny-predict"
SPACING = (1.5, 1.5, 2.0)  # anisotropic, so mL must come from the spacing, not from voxel counts
NETWORK = {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
                    "num_res_units": 0}}

_REGISTRY: dict[str, str] = {}


def spec_data(name: str, source: str | Path) -> dict:
    """The demo spec with a tiny UNet on 16^3, the folder layout and the tiny model's name."""
    data = yaml.safe_load((REPO / "deployments/specs/demo.yaml").read_text())
    data["name"] = name
    data["data"] = {"source": str(source), "layout": "folder"}
    for item in data["preprocess"]["transforms"]:
        for kwargs in item.values():
            if "spatial_size" in kwargs:
                kwargs["spatial_size"] = [16, 16, 16]
    data["train"].update(network=copy.deepcopy(NETWORK), precision="fp32")
    data["promote"]["model_name"] = MODEL
    return data


def tiny_registry(tmp_path_factory) -> str:
    """A tracking URI (MLflow on SQLite) holding versions 1 (champion) and 2 of the tiny model: made once
    per session (registration costs seconds), also by the CLI test, which reads it through the environment."""
    if not _REGISTRY:
        import torch

        from voxelflow.learn.train import build_network, state_dict_bytes
        from voxelflow.release import registry
        from voxelflow.spec.config import Settings, validate_spec

        settings = Settings(home=tmp_path_factory.mktemp("predict-mlflow"), mlflow_tracking_uri=None)
        spec = validate_spec(spec_data("tiny", "unused"), "tiny")
        pre = spec.preprocess
        config = {"network": copy.deepcopy(NETWORK), "transforms": copy.deepcopy(pre.transforms),
                  "spatial_size": [16, 16, 16], "precision": "fp32",
                  "sliding_window": {"roi_size": [16, 16, 16], "overlap": 0.25, "sw_batch_size": 4,
                                     "mode": "constant"}}
        uri = settings.tracking_uri
        for seed in (1, 2):
            torch.manual_seed(seed)
            run_id = registry.start_run(uri, settings.artifact_root, spec, {"dataset_digest": "0" * 16})
            model_uri = registry.log_model(uri, run_id, config, state_dict_bytes(build_network(copy.deepcopy(NETWORK))))
            version = registry.register(uri, model_uri, MODEL, run_id, {})
        registry.promote(uri, MODEL, "1")
        assert version == "2"
        _REGISTRY["uri"] = uri
    return _REGISTRY["uri"]


def make_source(dest: Path, labelled: tuple[bool, ...], seed: int = 0) -> Path:
    """Cases in the folder layout (``NAME/image.nii.gz`` and, when labelled, ``label.nii.gz``), 24^3."""
    from voxelflow.data.synthetic import make_case

    for i, has_label in enumerate(labelled):
        folder = dest / f"patient_{seed + i:02d}"
        folder.mkdir(parents=True)
        image, label = make_case(24, seed + i, spacing=SPACING)
        nib.save(image, folder / "image.nii.gz")
        if has_label:
            nib.save(label, folder / "label.nii.gz")
    return dest


def ingest_source(home: Path, pipeline: str, source: Path):
    from voxelflow.core.db import connect
    from voxelflow.core.storage import Layout, Store
    from voxelflow.data.ingest import ingest
    from voxelflow.spec.config import DataSpec

    db, layout = connect(f"sqlite:///{home / 'voxelflow.db'}"), Layout(Store(home), pipeline)
    report = ingest(DataSpec(source=str(source), layout="folder"), layout, db, str(source))
    assert not report.quarantined, report.quarantined
    return db, layout, report


def prediction_rows(db) -> list[dict]:
    from sqlalchemy import select

    from voxelflow.core.db import predictions

    with db.transaction() as conn:
        return [r._asdict() for r in conn.execute(select(predictions).order_by(predictions.c.id))]


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> str:
    return tiny_registry(tmp_path_factory)


@pytest.fixture(scope="module")
def arrived(tmp_path_factory):
    """Two unlabelled cases and one labelled case, ingested: (home, db, layout, source)."""
    root = tmp_path_factory.mktemp("predict")
    source = make_source(root / "incoming", (False, True, False))
    db, layout, report = ingest_source(root / "home", "predict-test", source)
    assert len(report.unlabelled) == 2 and len(report.case_ids) == 1
    return root / "home", db, layout, source


# ---------------------------------------------------------------- the library


def test_masks_on_the_input_grid_volumes_in_ml_and_the_version_recorded_and_reruns_skip(registered, arrived,
                                                                                          tmp_path):
    from voxelflow.core import audit
    from voxelflow.release import registry

    home, db, layout, source = arrived
    dest = tmp_path / "masks"
    report = batch.run(db, layout, registered, ModelRef(MODEL), str(dest), source=str(source))
    assert (report.version, len(report.predicted), len(report.labelled), report.failed) == ("1", 2, 1, [])
    folder = dest / f"{MODEL}-v1"
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{p['case']}.nii.gz" for p in report.predicted]
                                                              + ["volumes.csv"])  # case ids only, no file names

    # each mask is what the registered model gives for the source file, on its grid, with its affine
    from voxelflow.data.ingest import read_ledger

    case_of = {r["object"]: r["case_id"] for r in read_ledger(db, "predict-test")}  # the ledger alone maps them
    segmenter, _ = registry.load_segmenter(registered, MODEL, tmp_path / "cache")
    by_case = {p["case"]: p for p in report.predicted}
    unlabelled = [p for p in sorted(source.glob("*/image.nii.gz")) if not (p.parent / "label.nii.gz").exists()]
    assert sorted(case_of[str(p)] for p in unlabelled) == sorted(by_case)
    for image_path in unlabelled:
        img = nib.load(image_path)
        volume, affine = np.asanyarray(img.dataobj), img.affine
        written = nib.load(folder / f"{case_of[str(image_path)]}.nii.gz")
        expected = segmenter.segment(volume, affine)
        assert 0 < (expected == 1).sum() < expected.size, "an empty or full mask would hide a volume error"
        np.testing.assert_array_equal(np.asanyarray(written.dataobj), expected)
        assert written.get_data_dtype() == np.uint8 and written.header.get_intent()[0] == "label"
        np.testing.assert_allclose(written.affine, affine)

    # volumes.csv: every label's volume in mL from the spacing; the database says which version made each mask
    rows = list(csv.DictReader(io.StringIO((folder / "volumes.csv").read_text())))
    assert sorted(r["case"] for r in rows) == sorted(by_case)
    voxel_ml = float(np.prod(SPACING)) / 1000
    for row in rows:
        mask = np.asanyarray(nib.load(folder / row["mask"]).dataobj)
        assert float(row["label_1_ml"]) == pytest.approx((mask == 1).sum() * voxel_ml, abs=1e-3)
        assert float(row["voxel_ml"]) == pytest.approx(voxel_ml)
        assert row["sha256"] == hashlib.sha256((folder / row["mask"]).read_bytes()).hexdigest()
    recorded = prediction_rows(db)
    assert {(r["case_id"], r["model"], r["version"], r["output"], r["sha256"]) for r in recorded} == {
        (r["case"], MODEL, "1", str(folder / r["mask"]), r["sha256"]) for r in rows}
    assert [e["details"]["predicted"] for e in audit.entries(db) if e["event"] == "data.predicted"] == [2]

    # a rerun by the same version neither loads the model nor writes anything
    def no_load():
        raise AssertionError("the model was loaded although every mask was there")

    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.nii.gz")}
    again = batch.predict(db, layout, sorted(by_case), MODEL, "1", no_load, Store(dest))
    assert (again.predicted, sorted(again.skipped)) == ([], sorted(by_case))
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.nii.gz")} == before

    # a mask removed since is written again, the same bytes, its row updated rather than doubled
    lost = sorted(by_case)[0]
    (folder / f"{lost}.nii.gz").unlink()
    redo = batch.run(db, layout, registered, ModelRef(MODEL), str(dest), source=str(source))
    assert [p["case"] for p in redo.predicted] == [lost] and redo.skipped == [c for c in sorted(by_case) if c != lost]
    assert redo.predicted[0]["sha256"] == by_case[lost]["sha256"]
    assert len(prediction_rows(db)) == 2

    # another version writes a folder of its own; the first one's masks and table stay as they were
    other = batch.run(db, layout, registered, ModelRef.parse(f"{MODEL}/2"), str(dest), cases=sorted(by_case))
    assert other.version == "2" and len(other.predicted) == 2 and other.labelled == []
    assert sorted(p.name for p in (dest / f"{MODEL}-v2").iterdir()) == sorted(
        [f"{c}.nii.gz" for c in by_case] + ["volumes.csv"])
    assert len(list(csv.DictReader(io.StringIO((folder / "volumes.csv").read_text())))) == 2
    assert sorted((r["version"], r["case_id"]) for r in prediction_rows(db)) == sorted(
        [("1", c) for c in by_case] + [("2", c) for c in by_case])


def test_bad_requests_are_refused_before_anything_is_written(registered, arrived, tmp_path):
    home, db, layout, source = arrived
    dest = tmp_path / "masks"
    rows = len(prediction_rows(db))
    with pytest.raises(ValueError, match="not ingested cases of pipeline 'predict-test': case-0000"):
        batch.run(db, layout, registered, ModelRef(MODEL), str(dest), cases=["case-0000000000000000"])
    with pytest.raises(ValueError, match="inside the source"):
        batch.run(db, layout, registered, ModelRef(MODEL), str(source / "masks"), source=str(source))
    with pytest.raises(LookupError, match="no 'nightly' alias"):
        batch.run(db, layout, registered, ModelRef.parse(f"{MODEL}@nightly"), str(dest), source=str(source))
    with pytest.raises(LookupError, match="no version 99"):
        batch.run(db, layout, registered, ModelRef.parse(f"{MODEL}/99"), str(dest), source=str(source))
    with pytest.raises(LookupError, match="'no-such-model' has no 'champion' alias"):
        batch.run(db, layout, registered, ModelRef.parse("no-such-model"), str(dest), source=str(source))
    for bad in ("", "two words", "m@", "m@a b", "m/v1", "../m"):
        with pytest.raises(ValueError, match="expected NAME, NAME@ALIAS or NAME/VERSION"):
            ModelRef.parse(bad)
    assert (ModelRef.parse("m"), ModelRef.parse("m@challenger"), ModelRef.parse("m/3")) == (
        ModelRef("m", "champion"), ModelRef("m", "challenger"), ModelRef("m", None, "3"))
    assert not dest.exists() and not (source / "masks").exists() and len(prediction_rows(db)) == rows

    # nothing unlabelled under a source: the registry is not even asked
    labelled_only = make_source(tmp_path / "labelled", (True,), seed=40)
    ingest_source(home, "predict-test", labelled_only)
    nothing = batch.run(db, layout, registered, ModelRef.parse("no-such-model"), str(dest), source=str(labelled_only))
    assert (nothing.version, nothing.predicted, len(nothing.labelled)) == (None, [], 1)
    assert not dest.exists()


def test_a_case_that_cannot_be_read_fails_alone_and_is_done_by_the_next_run(registered, tmp_path):
    source = make_source(tmp_path / "incoming", (False, False), seed=20)
    db, layout, report = ingest_source(tmp_path / "home", "broken", source)
    broken, fine = sorted(report.unlabelled)
    chunk = tmp_path / "home" / layout.raw.key(broken) / "image" / "c" / "0" / "0" / "0"
    good = chunk.read_bytes()
    chunk.write_bytes(b"not zstd" * 8)  # the stored case is damaged: reading it fails
    dest = tmp_path / "masks"
    first = batch.run(db, layout, registered, ModelRef(MODEL), str(dest))
    assert [p["case"] for p in first.predicted] == [fine]
    assert [f["case"] for f in first.failed] == [broken] and "decompression" in first.failed[0]["reason"].lower()
    assert [r["case_id"] for r in prediction_rows(db)] == [fine]
    assert not (dest / f"{MODEL}-v1" / f"{broken}.nii.gz").exists()
    chunk.write_bytes(good)  # repaired: the next run does what is left
    second = batch.run(db, layout, registered, ModelRef(MODEL), str(dest))
    assert ([p["case"] for p in second.predicted], second.skipped, second.failed) == ([broken], [fine], [])


# ---------------------------------------------------------------- the flow, triggered by the arrival of unlabelled cases


@pytest.fixture(scope="module")
def prefect_here(prefect_api):
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield prefect_api
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)


@pytest.fixture
def predict_deployment(prefect_here, tmp_path):
    """``predict/demo-spheres`` with the trigger exactly as deployments/prefect.yaml defines it, made for this
    test's pipeline and spec (its path), on no work pool: the server's automation creates the run and this test
    executes it, as a worker would. (deployment id, pipeline, spec path)."""
    from flows.predict import predict
    from tests.triggers import trigger_deployment

    name, spec_path = f"arrival-{uuid.uuid4().hex[:6]}", tmp_path / "spec.yaml"
    with trigger_deployment(predict, "demo-spheres", name, spec_path) as deployment_id:
        yield deployment_id, name, spec_path


def test_unlabelled_arrival_triggers_a_predict_run_with_artifacts(registered, predict_deployment, tmp_path,
                                                                  monkeypatch):
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        DeploymentFilter,
        DeploymentFilterId,
    )
    from prefect.flow_engine import run_flow

    from flows.ingest import ingest
    from flows.predict import predict

    monkeypatch.setenv("VOXELFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VOXELFLOW_MLFLOW_TRACKING_URI", registered)
    predict_deployment, name, spec_path = predict_deployment
    source = make_source(tmp_path / "incoming", (False,), seed=30)  # no labelled case: no dataset.updated event
    spec_path.write_text(yaml.safe_dump(spec_data(name, source)))

    arrived = ingest(str(spec_path))  # the flow behind ingest-arrived/<pipeline>: emits voxelflow.cases.unlabelled
    assert (arrived["unlabelled"], arrived["unlabelled_announced"], arrived["announced"]) == (1, 1, 0)
    with get_client(sync_client=True) as client:
        deadline, runs = time.monotonic() + 60, []
        while not runs and time.monotonic() < deadline:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(
                any_=[predict_deployment])))
            time.sleep(0.2)
        assert len(runs) == 1, "the event did not create one predict run"
        run = runs[0]
        from voxelflow.data.ingest import ingested_cases
        from voxelflow.pipeline import Context
        from voxelflow.spec.config import Settings

        name = yaml.safe_load(spec_path.read_text())["name"]
        ctx = Context(Settings(), name)
        (case,) = ingested_cases(ctx.db, name)
        announced = run.parameters.pop("announcement")
        assert run.parameters == {"spec": str(spec_path), "cases": [case]}  # templated, the list kept a list
        assert announced["event"] == "voxelflow.cases.unlabelled" and sorted(announced["keys"]) == [
            "cases", "count", "source"]
        run.parameters["announcement"] = announced

        summary = run_flow(predict, flow_run=run, parameters=run.parameters)  # what the worker would run
        assert (summary["predicted"], summary["version"]) == (1, "1")
        assert client.read_flow_run(run.id).state.is_completed()
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run.id])))
    kinds = {a.type: a for a in artifacts}
    assert set(kinds) >= {"table", "progress"}
    assert kinds["progress"].data == 100
    assert case in str(kinds["table"].data) and "predicted" in str(kinds["table"].data)
    assert str(source) not in str(kinds["table"].data) + (kinds["table"].description or "")
    mask = Path(ctx.store.url) / "predictions" / name / f"{MODEL}-v1" / f"{case}.nii.gz"
    assert nib.load(mask).shape == (24, 24, 24)

    again = predict(str(spec_path), cases=[case])  # the same event again: nothing done twice
    assert (again["predicted"], again["skipped"]) == (0, 1)
