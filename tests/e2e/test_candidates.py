"""Candidates in a whole lifecycle on the demo's synthetic data: a 2 x 2 grid with no orchestrator and in the
Prefect lifecycle flow (the session's real server) ends with four child runs of the lifecycle's run, one registered
challenger and the table; candidates that share preprocessing preprocess once, and a failed candidate is recorded
while the others go on. Real store, database and MLflow (SQLite)."""

from __future__ import annotations

import copy
import json
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.flows.conftest import prefect_here  # noqa: F401 - the fixture, for the flow's test

pytestmark = pytest.mark.slow
NETWORK = {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
                    "num_res_units": 0}}
GRID = {"train.learning_rate": [0.01, 0.003], "train.network.UNet.channels": [[4, 8], [8, 16]]}


def demo_spec(source: Path, name: str, candidates: dict) -> dict:
    """The demo spec, small: 16^3 cases, a tiny UNet, 2 epochs validated each, gates any candidate passes."""
    data = yaml.safe_load((REPO / "deployments/specs/demo.yaml").read_text())
    data["name"] = name
    data["data"]["source"] = str(source)
    for item in data["preprocess"]["transforms"]:
        for kwargs in item.values():
            if "spatial_size" in kwargs:
                kwargs["spatial_size"] = [16, 16, 16]
    data["train"].update(network=copy.deepcopy(NETWORK), epochs=2, val_every=1, precision="fp32")
    data["promote"]["gates"] = {"min_dice": 0.0, "min_test_cases": 1}
    data["candidates"] = candidates
    return data


@pytest.fixture
def home(tmp_path):
    from voxelflow.spec.config import Settings

    return Settings(home=tmp_path / "home", store=None, database_url=None, mlflow_tracking_uri=None)


def check_children(uri: str, result: dict, model: str, n: int) -> None:
    """``n`` child runs under the lifecycle's run, each with its overrides as params and its validation scores;
    the chosen one registered as the model's version and the best by validation dice."""
    from voxelflow.release import registry

    mc = registry.client(uri)
    parent = mc.get_run(result["parent_run"])
    children = mc.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == n
    rows = result["candidates"]
    assert [r["candidate"] for r in rows] == list(range(n)) and sum(r["chosen"] for r in rows) == 1
    [chosen] = [r for r in rows if r["chosen"]]
    trained = [r for r in rows if r["status"] == "trained"]
    assert chosen["validation dice"] == max(r["validation dice"] for r in trained)
    assert chosen["why"].startswith("best validation dice")
    by_id = {c.info.run_id: c for c in children}
    assert set(by_id) == {r["run"] for r in rows}
    for r in trained:
        child = by_id[r["run"]]
        assert child.data.params["candidate.train.learning_rate"] in ("0.01", "0.003")
        assert "candidate.train.network.UNet.channels" in child.data.params
        assert child.data.metrics["val_dice"] == pytest.approx(r["validation dice"], abs=1e-4)
        assert child.info.status == "FINISHED"
    # one registered version: the challenger's, from its child run; evaluation on the test cases is its alone
    [version] = mc.search_model_versions(f"name = '{model}'")
    assert version.run_id == chosen["run"] == result["run_id"]
    assert "test_dice" in by_id[chosen["run"]].data.metrics
    assert not any("test_dice" in by_id[r["run"]].data.metrics for r in rows if not r["chosen"])
    # the table and the picture on the lifecycle's run
    names = {a.path for a in mc.list_artifacts(parent.info.run_id)}
    assert {"candidates.json", "candidates.md", "candidate-curves.png", "split.json"} <= names
    with tempfile.TemporaryDirectory() as tmp:
        table = json.loads(Path(mc.download_artifacts(parent.info.run_id, "candidates.json", tmp)).read_text())
    assert [t["overrides"] for t in table] == [r["overrides"] for r in rows]


def test_a_grid_with_no_orchestrator_trains_each_candidate_and_registers_the_best(home, monkeypatch):
    from voxelflow import pipeline
    from voxelflow.data.preprocess import transform_digest
    from voxelflow.data.synthetic import make_decathlon
    from voxelflow.release import lineage
    from voxelflow.spec.config import validate_spec
    from voxelflow.stages import preprocess

    source = make_decathlon(home.home / "incoming", n_cases=12, size=24)
    spec = validate_spec(demo_spec(source, "cands", {"grid": GRID, "select": {"metric": "dice"}, "max_parallel": 2}))
    calls = []
    real = preprocess.preprocess_stage
    monkeypatch.setattr(preprocess, "preprocess_stage", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    result = pipeline.run(spec, home)
    assert len(calls) == 1  # four candidates, one preprocessing: they share it
    assert {r["preprocessing"] for r in result.candidates} == {transform_digest(spec.preprocess)}
    check_children(home.tracking_uri, asdict(result), spec.promote.model_name, 4)
    assert result.promotion["promoted"] and "| candidate | overrides |" in pipeline.markdown(result, spec.name)
    # lineage of the challenger follows its child run to the lifecycle's run: split, dataset, spec
    trace = lineage.trace(home.tracking_uri, pipeline.Context(home, spec.name).db, home.store_url,
                          f"{spec.promote.model_name}/{result.promotion['version']}")
    assert trace["problems"] == [], trace["problems"]
    assert trace["parent_run"]["id"] == result.parent_run and trace["parent_run"]["spec_digest"] == spec.digest()
    assert len(trace["cases"]) == 12 and trace["preprocess_digest"] == transform_digest(spec.preprocess)

    # run again with nothing changed: every candidate's training is reused, nothing new is registered
    from voxelflow.release import registry
    from voxelflow.stages import train

    trained = []
    real_train = train.train_stage
    monkeypatch.setattr(train, "train_stage", lambda *a, **k: trained.append(a) or real_train(*a, **k))
    again = pipeline.run(spec, home)
    assert trained == [] and "train" in again.reused and "evaluate" in again.reused
    assert [r["reused"] for r in again.candidates] == [True] * 4
    assert [r["run"] for r in again.candidates] == [r["run"] for r in result.candidates]
    assert [r["chosen"] for r in again.candidates] == [r["chosen"] for r in result.candidates]
    mc = registry.client(home.tracking_uri)
    assert len(mc.search_model_versions(f"name = '{spec.promote.model_name}'")) == 1
    assert registry.alias_version(home.tracking_uri, spec.promote.model_name) == result.promotion["version"]


def test_candidates_that_differ_in_preprocessing_each_get_theirs_and_a_failed_one_is_recorded(home, monkeypatch):
    from voxelflow import pipeline
    from voxelflow.data.synthetic import make_decathlon
    from voxelflow.spec.config import validate_spec
    from voxelflow.stages import preprocess

    source = make_decathlon(home.home / "incoming", n_cases=12, size=24)
    candidates = {"list": [{"preprocess.transforms.Spacingd.pixdim": [2.0, 2.0, 2.0]},
                           {"train.learning_rate": 0.003},
                           {"train.loss": {"DiceLoss": {"to_onehot_y": True, "softmax": True}}}],
                  "select": {"metric": "hausdorff95"}, "max_parallel": 2}
    spec = validate_spec(demo_spec(source, "cands2", candidates))
    digests = []
    real = preprocess.preprocess_stage
    monkeypatch.setattr(preprocess, "preprocess_stage",
                        lambda *a, **k: digests.append(a[0].model_dump_json()) or real(*a, **k))
    from voxelflow.stages import train

    real_train = train.train_stage

    def train_stage(spec, ctx, *args, **kwargs):  # the DiceLoss candidate's training breaks: the others go on
        if "DiceLoss" in spec.train.loss:
            raise RuntimeError("this candidate's device went away")
        return real_train(spec, ctx, *args, **kwargs)

    monkeypatch.setattr(train, "train_stage", train_stage)
    result = pipeline.run(spec, home)
    assert len(digests) == len(set(digests)) == 2  # the changed spacing, and the spec's own for the others
    rows = result.candidates
    assert rows[0]["preprocessing"] != rows[1]["preprocessing"] == rows[2]["preprocessing"]
    assert rows[2]["status"] == "failed" and "device went away" in rows[2]["why"] and not rows[2]["chosen"]
    chosen = next(r for r in rows if r["chosen"])
    assert chosen["why"].startswith("best validation hausdorff95") and "lower is better" in chosen["why"]
    from voxelflow.release import registry

    assert registry.client(home.tracking_uri).get_run(rows[2]["run"]).info.status == "FAILED"
    [version] = registry.client(home.tracking_uri).search_model_versions(f"name = '{spec.promote.model_name}'")
    tags = version.tags
    assert tags["voxelflow.preprocess_digest"] == chosen["preprocessing"]  # the challenger's own preprocessing


def test_a_grid_in_the_lifecycle_flow(prefect_here, tmp_path, monkeypatch):  # noqa: F811 - the fixture
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    from flows.lifecycle import lifecycle
    from voxelflow.data.synthetic import make_decathlon
    from voxelflow.spec.config import Settings

    monkeypatch.setenv("VOXELFLOW_HOME", str(tmp_path / "home"))
    source = make_decathlon(tmp_path / "incoming", n_cases=12, size=24)
    name = f"cands-{uuid.uuid4().hex[:8]}"
    data = demo_spec(source, name, {"grid": GRID, "select": {"metric": "dice"}, "max_parallel": 2})
    data["promote"]["model_name"] = name
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    state = lifecycle(str(path), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    check_children(Settings().tracking_uri, result, name, 4)
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[state.state_details.flow_run_id])))
        names = [t.name for t in tasks]
        assert sum(n.startswith("train-") for n in names) == 4, names
        assert sum(n.startswith("preprocess-") for n in names) == 1, names
        assert sum(n.startswith("evaluate-") for n in names) == 1, names
        [table] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"candidates-{name}"])))
        rows = json.loads(table.data) if isinstance(table.data, str) else table.data
        assert [r["candidate"] for r in rows] == [0, 1, 2, 3] and sum(r["chosen"] for r in rows) == 1
