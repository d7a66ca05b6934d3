"""Reuse of finished work (voxelflow.stages.reuse): what a step's key is made of, when a recorded result is reused
(only while what it points at exists; never with ``fresh``, which still records) and what ``resume`` continues.
Real database (SQLite), store and MLflow; the keys of stages computed on hand-made references."""

from __future__ import annotations

import copy
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from tests.unit.conftest import DEMO_SPEC, TINY_NETWORK, TINY_SIZE
from voxelflow.stages import reuse

CASES = ["case-a", "case-b", "case-c", "case-d"]


def tiny_data() -> dict:
    data = yaml.safe_load(DEMO_SPEC.read_text())
    for item in data["preprocess"]["transforms"]:
        for kwargs in item.values():
            if "spatial_size" in kwargs:
                kwargs["spatial_size"] = [TINY_SIZE] * 3
    data["train"].update(network=copy.deepcopy(TINY_NETWORK), precision="fp32")
    return data


def spec_of(data: dict):
    from voxelflow.spec.config import validate_spec

    return validate_spec(data, "reuse")


def transform(data: dict, name: str) -> dict:
    [kwargs] = [kw for item in data["preprocess"]["transforms"] for t, kw in item.items() if t == name]
    return kwargs


def state_of(spec, cases=CASES, shape=(16, 16, 16), weights="runs/r1/weights.safetensors", run_id="r1",
             test=("case-d",)):
    """The references a lifecycle holds when the stage ``sid`` is keyed, made by hand."""
    from voxelflow.data.ingest import IngestReport
    from voxelflow.data.preprocess import PreprocessReport
    from voxelflow.stages.split import Split
    from voxelflow.stages.train import TrainOutcome, model_config

    cases = list(cases)
    return SimpleNamespace(
        ingested=IngestReport(ingested=cases, dataset_digest=f"digest-of-{'-'.join(cases)}", case_ids=cases),
        prep=PreprocessReport(store="file:///somewhere", processed=len(cases), skipped=0, shards=1,
                              shapes={c: list(shape) for c in cases}, seconds={"read": 0.5}),
        split=Split(train=cases[:2], val=cases[2:3], test=list(test)),
        outcome=TrainOutcome(weights_key=weights, model_config=model_config(spec), history=[{"train_loss": 0.5}],
                             steps=4, seconds=1.0, resumed_from=None, curve_key="runs/r1/curve.png"),
        run_id=run_id)


def keys(spec, state) -> dict[str, str]:
    return {sid: reuse.stage_key(sid, spec, state) for sid in reuse.REUSABLE}


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {sid for sid in before if before[sid] != after[sid]}


# ---------------------------------------------------------------- keys


def test_a_key_is_the_same_for_the_same_inputs_and_each_stage_has_its_own():
    spec = spec_of(tiny_data())
    first = keys(spec, state_of(spec))
    assert keys(spec_of(tiny_data()), state_of(spec)) == first  # a spec validated again, the same references
    assert len(set(first.values())) == 3


def test_a_key_changes_with_its_own_section_and_with_what_it_reads():
    data = tiny_data()
    spec = spec_of(data)
    base = keys(spec, state_of(spec))
    lr = copy.deepcopy(data)
    lr["train"]["learning_rate"] = 0.003
    assert changed(base, keys(spec_of(lr), state_of(spec))) == {"train"}
    pixdim = copy.deepcopy(data)
    transform(pixdim, "Spacingd")["pixdim"] = [2.0, 2.0, 2.0]
    # the transforms are preprocessing's section and part of the model's config, which training makes
    assert changed(base, keys(spec_of(pixdim), state_of(spec))) == {"preprocess", "train"}
    metrics = copy.deepcopy(data)
    metrics["evaluate"]["metrics"] = ["dice"]
    assert changed(base, keys(spec_of(metrics), state_of(spec))) == {"evaluate"}
    # evaluation compares under the model's name: another name, another comparison
    named = copy.deepcopy(data)
    named["promote"]["model_name"] = "another"
    assert changed(base, keys(spec_of(named), state_of(spec))) == {"evaluate"}

    # the references each reads: the dataset, the preprocessed shapes, the candidate, the test side
    assert changed(base, keys(spec, state_of(spec, cases=[*CASES, "case-e"]))) == {"preprocess", "train"}
    assert changed(base, keys(spec, state_of(spec, shape=(16, 16, 12)))) == {"train"}
    assert changed(base, keys(spec, state_of(spec, weights="runs/r2/weights.safetensors"))) == {"evaluate"}
    # the test side is part of the split training is given, and what evaluation scores
    assert changed(base, keys(spec, state_of(spec, test=("case-c",)))) == {"train", "evaluate"}


def test_a_key_is_made_of_what_a_result_holds_not_how_it_was_made():
    spec = spec_of(tiny_data())
    state = state_of(spec)
    base = keys(spec, state)
    # preprocessing reused reports nothing processed, nor how long it took; an ingest that found nothing new
    state.prep = replace(state.prep, processed=0, skipped=len(CASES), bytes_written=0, seconds={})
    state.run_id = "another-run"  # the lifecycle's run: its candidate (its weights' key) is what evaluation reads
    state.ingested = replace(state.ingested, ingested=[], seen=8, recorded=True)
    assert keys(spec, state) == base


def test_a_key_does_not_change_with_where_a_stage_runs():
    data = tiny_data()
    spec = spec_of(data)
    base = keys(spec, state_of(spec))
    placed = copy.deepcopy(data)
    placed["work_pool"] = "cpu"
    for section in ("preprocess", "train", "evaluate"):
        placed[section]["work_pool"] = "gpu"
    other = spec_of(placed)
    assert other.train.work_pool == "gpu"
    assert keys(other, state_of(other)) == base


def test_a_key_changes_with_the_code_version(monkeypatch, tmp_path):
    import voxelflow

    spec = spec_of(tiny_data())
    base = keys(spec, state_of(spec))
    monkeypatch.setattr(voxelflow, "__version__", f"{voxelflow.__version__}.later")
    assert changed(base, keys(spec, state_of(spec))) == set(reuse.REUSABLE)
    monkeypatch.undo()

    # a user's metric: its source is part of evaluation's key, and of no other
    (tmp_path / "vf_reuse_metric.py").write_text("def count(y_pred, y):\n    return y_pred.sum(dim=(2, 3, 4))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,torch,voxelflow,vf_reuse_metric")
    data = tiny_data()
    data["evaluate"]["metrics"] = ["dice", "count"]
    data["evaluate"]["custom_metrics"] = {"count": {"function": "vf_reuse_metric:count", "higher_is_better": True}}
    user = spec_of(data)
    before = keys(user, state_of(user))
    (tmp_path / "vf_reuse_metric.py").write_text("def count(y_pred, y):\n    return 2 * y_pred.sum(dim=(2, 3, 4))\n")
    assert changed(before, keys(user, state_of(user))) == {"evaluate"}


def test_a_user_steps_key_leaves_out_which_lifecycle_asks(monkeypatch):
    from voxelflow.steps.api import StepInputs

    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,torch,voxelflow,tests")
    data = tiny_data()
    data["steps"] = [{"id": "count", "uses": "tests.unit.step_fns:count_cases", "after": "preprocess"}]
    [step] = spec_of(data).steps
    inputs = StepInputs(pipeline="p", step_id="count", lifecycle_id="one", case_ids=CASES)
    key = reuse.step_key(step, inputs)
    assert reuse.step_key(step, inputs.model_copy(update={"lifecycle_id": "two"})) == key
    assert reuse.step_key(step, inputs.model_copy(update={"case_ids": CASES[:3]})) != key


# ---------------------------------------------------------------- recorded results


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    """One home (database, store, MLflow) for the module's tests; each test is a pipeline of its own there."""
    from voxelflow.core.db import connect
    from voxelflow.spec.config import Settings

    home = Settings(home=tmp_path_factory.mktemp("reuse") / "home", store=None, database_url=None,
                    mlflow_tracking_uri=None)
    yield home
    connect(home.database).dispose()


@pytest.fixture
def ctx(settings, request):
    from voxelflow.stages.context import Context

    return Context(settings, request.node.name.removeprefix("test_")[:60].replace("_", "-"))


def spec_in(ctx, data: dict | None = None):
    """The tiny spec as the pipeline of ``ctx``."""
    return spec_of({**(data or tiny_data()), "name": ctx.pipeline})


def mlflow_run(ctx) -> str:
    from voxelflow.release import registry

    mc = registry.client(ctx.tracking_uri)
    found = mc.get_experiment_by_name("reuse")
    exp = found.experiment_id if found else mc.create_experiment("reuse")
    return mc.create_run(exp).info.run_id


def trained(ctx, spec, memo: reuse.Memo):
    """A training recorded by ``memo``: its weights in the store, its MLflow run; the state that keys it."""
    run_id = mlflow_run(ctx)
    state = state_of(spec, weights=f"runs/{run_id}/weights.safetensors", run_id=run_id)
    ctx.store.write_bytes(state.outcome.weights_key, b"weights")
    memo.keep("train", spec, state, state.outcome)
    return state


def test_a_recorded_training_is_reused_while_its_weights_and_run_exist(ctx):
    from voxelflow.release import registry

    spec = spec_in(ctx)
    state = trained(ctx, spec, reuse.Memo(ctx, spec))
    later = reuse.Memo(ctx, spec)
    found = later.stage("train", spec, state)
    assert found is not None and found.run_id == state.run_id and found.result == state.outcome
    assert later.reused == ["train"]

    ctx.store.remove(state.outcome.weights_key)  # the weights are gone: trained again
    gone = reuse.Memo(ctx, spec)
    assert gone.stage("train", spec, state) is None and gone.reused == []

    state = trained(ctx, spec, reuse.Memo(ctx, spec))
    assert reuse.Memo(ctx, spec).stage("train", spec, state) is not None
    registry.client(ctx.tracking_uri).delete_run(state.run_id)  # its MLflow run is gone: trained again
    assert reuse.Memo(ctx, spec).stage("train", spec, state) is None


def test_recorded_preprocessing_is_reused_while_every_case_is_committed(ctx):
    from voxelflow.data.ingest import Volume, write_case
    from voxelflow.data.preprocess import PreprocessReport, transform_digest

    spec = spec_in(ctx)
    out = ctx.layout.preprocessed(transform_digest(spec.preprocess))
    for case in CASES:
        image = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4), (1.0, 1.0, 1.0))
        write_case(out, case, image, np.zeros((4, 4, 4), np.uint8), {"spacing": [1.0, 1.0, 1.0]})
    state = state_of(spec)
    report = PreprocessReport(store=ctx.store.url_of(out.prefix), processed=4, skipped=0, shards=1,
                              bytes_written=100, shapes={c: [4, 4, 4] for c in CASES}, seconds={"read": 1.0})
    reuse.Memo(ctx, spec).keep("preprocess", spec, state, report)

    found = reuse.Memo(ctx, spec).stage("preprocess", spec, state)
    assert found is not None  # reused: nothing processed this time, every case reused
    assert (found.result.processed, found.result.skipped, found.result.bytes_written) == (0, 4, 0)
    assert found.result.shapes == report.shapes and found.result.store == report.store

    out.remove("case-c")
    assert reuse.Memo(ctx, spec).stage("preprocess", spec, state) is None

    # recorded in another store (the store setting changed): not this one's
    reuse.Memo(ctx, spec).keep("preprocess", spec, state, replace(report, store="s3://elsewhere/p"))
    assert reuse.Memo(ctx, spec).stage("preprocess", spec, state) is None


def replace_run(state, run_id: str):
    return SimpleNamespace(**{**vars(state), "run_id": run_id})


def test_fresh_ignores_recorded_results_and_still_records_its_own(ctx):
    from sqlalchemy import select

    from voxelflow.core import db as vdb

    spec = spec_in(ctx)
    state = trained(ctx, spec, reuse.Memo(ctx, spec))
    fresh = reuse.Memo(ctx, spec, fresh=True)
    assert fresh.stage("train", spec, state) is None and fresh.reused == []
    # fresh trains again (here: a new outcome in a new run) and records it; a later plain lifecycle reuses it
    run_id = mlflow_run(ctx)
    fresh.keep("train", spec, replace_run(state, run_id), replace(state.outcome, seconds=2.0))
    with ctx.db.transaction() as conn:
        t = vdb.step_results
        rows = conn.execute(select(t).where(t.c.pipeline == spec.name, t.c.step == "train")
                            .order_by(t.c.id)).mappings().all()
    assert [r["lifecycle"] == fresh.id for r in rows] == [False, True]
    found = reuse.Memo(ctx, spec).stage("train", spec, state)
    assert found is not None and found.run_id == run_id and found.result.seconds == 2.0  # the newest


def test_an_evaluation_is_reused_only_against_the_champion_it_compared_with(ctx):
    from voxelflow.stages.evaluate import Evaluation

    spec = spec_in(ctx)
    state = trained(ctx, spec, reuse.Memo(ctx, spec))
    ctx.store.write_bytes("runs/overlay.png", b"png")
    evaluation = Evaluation(candidate={"dice": 0.9}, champion={"dice": 0.8}, champion_version="3",
                            overlay_key="runs/overlay.png")
    reuse.Memo(ctx, spec).keep("evaluate", spec, state, evaluation)
    # the registry has no champion now: an evaluation against version 3 is not this lifecycle's
    assert reuse.Memo(ctx, spec).stage("evaluate", spec, state) is None
    reuse.Memo(ctx, spec).keep("evaluate", spec, state, replace(evaluation, champion=None, champion_version=None))
    found = reuse.Memo(ctx, spec).stage("evaluate", spec, state)
    assert found is not None and found.result.champion_version is None
    ctx.store.remove("runs/overlay.png")
    assert reuse.Memo(ctx, spec).stage("evaluate", spec, state) is None


# ---------------------------------------------------------------- resume


def lifecycle_rows(ctx) -> dict[str, dict]:
    from sqlalchemy import select

    from voxelflow.core import db as vdb

    t = vdb.lifecycles
    with ctx.db.transaction() as conn:
        return {r["id"]: dict(r) for r in conn.execute(select(t).where(t.c.pipeline == ctx.pipeline)).mappings()}


def test_resume_needs_a_latest_lifecycle_that_failed(ctx):
    spec = spec_in(ctx)
    with pytest.raises(reuse.NothingToResume, match="it has none"):
        reuse.Memo(ctx, spec, resume=True)
    done = reuse.Memo(ctx, spec)
    done.finished()
    with pytest.raises(reuse.NothingToResume, match=f"latest one \\({done.id}\\) is finished"):
        reuse.Memo(ctx, spec, resume=True)
    running = reuse.Memo(ctx, spec)
    with pytest.raises(reuse.NothingToResume, match="is running"):
        reuse.Memo(ctx, spec, resume=True)
    with pytest.raises(ValueError, match="contradict"):
        reuse.Memo(ctx, spec, fresh=True, resume=True)

    run_id = mlflow_run(ctx)
    running.opened(run_id)
    running.failed("train", RuntimeError("out of memory"))
    resumed = reuse.Memo(ctx, spec, resume=True)
    assert resumed.resumed["id"] == running.id and resumed.resumed["failed_step"] == "train"
    assert resumed.resume_run() == run_id  # training goes on in its run, from its checkpoints
    rows = lifecycle_rows(ctx)
    assert rows[running.id]["status"] == "resumed" and rows[running.id]["reason"] == "RuntimeError: out of memory"
    assert rows[resumed.id]["status"] == "running" and rows[resumed.id]["resumes"] == running.id
    # it is resumed once: the latest lifecycle is now the one resuming it
    with pytest.raises(reuse.NothingToResume, match="is running"):
        reuse.Memo(ctx, spec, resume=True)
    # another pipeline's lifecycles are not this one's
    other = spec_of({**tiny_data(), "name": "another"})
    with pytest.raises(reuse.NothingToResume, match="it has none"):
        reuse.Memo(ctx, other, resume=True)


def test_resume_goes_on_in_the_failed_run_only_while_it_exists(ctx):
    from voxelflow.release import registry

    spec = spec_in(ctx)
    failed = reuse.Memo(ctx, spec)
    run_id = mlflow_run(ctx)
    failed.opened(run_id)
    failed.failed("train", RuntimeError("killed"))
    registry.client(ctx.tracking_uri).delete_run(run_id)
    assert reuse.Memo(ctx, spec, resume=True).resume_run() is None


def test_resume_goes_on_in_the_failed_run_only_with_the_spec_it_ran(ctx):
    spec = spec_in(ctx)
    failed = reuse.Memo(ctx, spec)
    failed.opened(mlflow_run(ctx))
    failed.failed("train", RuntimeError("killed"))
    data = tiny_data()
    data["train"]["network"]["UNet"]["channels"] = [8, 16]  # its checkpoints would not even load
    changed = reuse.Memo(ctx, spec_in(ctx, data), resume=True)
    assert changed.resumed["id"] == failed.id and changed.resume_run() is None
