"""The step graph: built from the spec, the same with no orchestrator as in the flow; gates, conditions,
branches, retries and timeouts of the user's steps. Real store, database and MLflow (SQLite)."""

from __future__ import annotations

import pytest

from voxelflow import pipeline
from voxelflow.core import audit
from voxelflow.release import registry
from voxelflow.spec.config import Settings, SpecError, validate_spec
from voxelflow.spec.graph import build
from voxelflow.stages.execute import GateFailed
from voxelflow.stages.steps import StepTimeout, run_step
from voxelflow.steps.api import StepInputs

FNS = "tests.unit.step_fns"


@pytest.fixture(autouse=True)
def tests_allowed(monkeypatch):
    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,torch,voxelflow,tests")


def spec_with(demo_data, steps, **sections):
    data = {**demo_data, "steps": steps}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return validate_spec(data, "test")


def test_without_steps_the_graph_is_the_lifecycle(demo_data):
    graph = build(validate_spec(demo_data))
    assert graph.order == ["ingest", "preprocess", "train", "evaluate", "promote", "deploy"]
    assert [n.deps for n in graph.nodes][1:] == [("ingest",), ("preprocess",), ("train",), ("evaluate",),
                                                 ("promote",)]


def test_after_inserts_into_the_chain_and_needs_branches_off(demo_data):
    steps = [
        {"id": "qc", "uses": f"{FNS}:noop", "after": "preprocess"},
        {"id": "qc2", "uses": f"{FNS}:noop", "after": "preprocess"},  # after qc: listed order is kept
        {"id": "deep", "uses": f"{FNS}:noop", "after": "qc"},  # right after qc, before qc2
        {"id": "side", "uses": f"{FNS}:noop", "needs": ["train"]},
        {"id": "side2", "uses": f"{FNS}:noop", "after": "side"},
        {"id": "tell", "uses": f"{FNS}:noop", "after": "deploy"},
    ]
    graph = build(spec_with(demo_data, steps))
    main = [n.id for n in graph.nodes if n.branch == 0]
    assert main == ["ingest", "preprocess", "qc", "deep", "qc2", "train", "evaluate", "promote", "deploy", "tell"]
    assert graph["train"].deps == ("qc2",)  # what followed preprocess now follows the steps after it
    assert graph["side"].deps == ("train",) and graph["side2"].deps == ("side",)
    assert graph.after_promote("tell") and not graph.after_promote("side")
    assert graph.ancestors["side2"] >= {"side", "train", "qc", "ingest"}
    tree = graph.tree()
    assert "side (tests.unit.step_fns:noop)" in tree and "needs train" in tree


@pytest.mark.parametrize("steps, key, message", [
    ([{"id": "a", "uses": f"{FNS}:noop", "after": "nowhere"}], "steps.0.after", "unknown step 'nowhere'"),
    ([{"id": "a", "uses": f"{FNS}:noop", "after": "b"}, {"id": "b", "uses": f"{FNS}:noop", "after": "a"}],
     "steps.0", "wait for each other"),
    ([{"id": "a", "uses": f"{FNS}:noop", "needs": ["a"]}], "steps.0.needs", "cannot run after itself"),
    ([{"id": "a", "uses": f"{FNS}:noop", "after": "ingest", "when": "train.steps > 0"}], "steps.0.when",
     "train"),
    ([{"id": "a", "uses": f"{FNS}:noop", "after": "evaluate", "when": "evaluate.dicee > 0.5"}], "steps.0.when",
     "dicee"),
    ([{"id": "a", "uses": f"{FNS}:noop", "after": "evaluate", "when": "__import__('os').system('id')"}],
     "steps.0.when", ""),
    ([{"id": "a", "uses": f"{FNS}:count_cases", "needs": ["ingest"]},
      {"id": "b", "uses": f"{FNS}:noop", "after": "train", "when": "a.n > 1"}], "steps.1.when", "a"),
])
def test_a_graph_that_cannot_run_is_refused_at_load(demo_data, steps, key, message):
    with pytest.raises(SpecError) as caught:
        spec_with(demo_data, steps)
    assert key in str(caught.value) and message in str(caught.value)


def test_conditions_may_read_declared_outputs_of_steps_before(demo_data):
    steps = [{"id": "count", "uses": f"{FNS}:count_cases", "after": "ingest"},
             {"id": "big", "uses": f"{FNS}:noop", "after": "count", "when": "count.n > 3 and ingest.new_cases >= 0"},
             {"id": "after_eval", "uses": f"{FNS}:noop", "after": "evaluate",
              "when": "evaluate.dice > 0.5 or not evaluate.has_champion"}]
    graph = build(spec_with(demo_data, steps))
    assert graph["big"].condition.names == {("count", "n"), ("ingest", "new_cases")}


def test_a_gate_on_a_step_metric_needs_its_direction_and_its_place(demo_data):
    gate = {"gates": {**demo_data["promote"]["gates"], "absolute": {"qc.refusals": 0}}}
    ok = [{"id": "qc", "uses": f"{FNS}:refuse", "after": "train", "higher_is_better": {"refusals": False}}]
    spec_with(demo_data, ok, promote=gate)
    beside = [{"id": "qc", "uses": f"{FNS}:refuse", "needs": ["train"], "higher_is_better": {"refusals": False}}]
    with pytest.raises(SpecError, match="does not run before promote"):
        spec_with(demo_data, beside, promote=gate)


@pytest.fixture
def home(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", store=None, database_url=None, mlflow_tracking_uri=None)


def one_step(demo_data, **entry):
    return spec_with(demo_data, [{"id": "s", "after": "ingest", **entry}]).steps[0]


def test_a_transient_error_is_retried_and_bad_data_is_not(demo_data, home, tmp_path):
    ctx = pipeline.Context(home, "demo-spheres")
    inputs = StepInputs(pipeline="demo-spheres", step_id="s")
    waits = []
    flaky = one_step(demo_data, uses=f"{FNS}:flaky", retries=2, **{"with": {"marker": str(tmp_path / "f")}})
    record = run_step(flaky, ctx, inputs, sleep=waits.append)
    assert record.status == "passed" and record.attempts == 2 and record.metrics == {"attempts_seen": 2.0}
    assert waits == [1.0]
    bad = one_step(demo_data, uses=f"{FNS}:bad_data", retries=3, **{"with": {"marker": str(tmp_path / "b")}})
    with pytest.raises(ValueError, match="no label: bad data") as caught:
        run_step(bad, ctx, inputs, sleep=waits.append)
    assert (tmp_path / "b").read_text() == "1"  # one attempt: a bad-data error is never retried
    assert any("in step s" in note for note in caught.value.__notes__)
    exhausted = one_step(demo_data, uses=f"{FNS}:flaky", retries=1,
                         **{"with": {"marker": str(tmp_path / "g"), "fail_times": 5}})
    with pytest.raises(ConnectionResetError):
        run_step(exhausted, ctx, inputs, sleep=waits.append)
    assert (tmp_path / "g").read_text() == "2"


def test_a_step_past_its_timeout_fails_and_a_wrong_return_is_named(demo_data, home):
    ctx = pipeline.Context(home, "demo-spheres")
    inputs = StepInputs(pipeline="demo-spheres", step_id="s")
    with pytest.raises(StepTimeout, match="timeout_s"):
        run_step(one_step(demo_data, uses=f"{FNS}:slow", timeout_s=0.2, **{"with": {"seconds": 3}}), ctx, inputs)
    with pytest.raises(TypeError, match="returned str"):
        run_step(one_step(demo_data, uses=f"{FNS}:wrong_return"), ctx, inputs)


def test_a_step_keeps_its_artifacts_and_logs_its_metrics_to_the_run(demo_data, home, tmp_path, tiny_spec):
    ctx = pipeline.Context(home, "demo-spheres")
    run_id = pipeline.start_run(tiny_spec, ctx, "0" * 16)
    step = one_step(demo_data, uses=f"{FNS}:with_artifact", **{"with": {"out": str(tmp_path)}})
    record = run_step(step, ctx, StepInputs(pipeline="demo-spheres", step_id="s", run_id=run_id))
    assert record.artifacts == [f"reports/demo-spheres/{run_id}/steps/s/report.json"]
    assert ctx.store.read_bytes(record.artifacts[0]) == b'{"ok": true}'
    run = registry.client(home.tracking_uri).get_run(run_id)
    assert run.data.metrics["s.outliers"] == 0.0
    names = [a.path for a in registry.client(home.tracking_uri).list_artifacts(run_id, "steps/s")]
    assert names == ["steps/s/report.json"]


def small(demo_data, source, steps, **sections):
    data = {**demo_data, "steps": steps}
    data["data"] = {**data["data"], "source": str(source)}
    data["train"] = {**data["train"], "epochs": 2, "val_every": 1,
                     "network": {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
                                          "strides": [2], "num_res_units": 0}}}
    data["promote"] = {**data["promote"], "gates": {"min_dice": 0.0, "min_test_cases": 1}}
    for key, value in sections.items():
        data[key] = {**data[key], **value}
    return validate_spec(data, "small")


def test_a_failing_gate_stops_the_lifecycle_before_training(demo_data, home):
    from voxelflow.data.synthetic import make_decathlon

    source = make_decathlon(home.home / "incoming", n_cases=12, size=24)
    steps = [{"id": "qc", "uses": "voxelflow.steps:label_volume_check", "after": "preprocess", "gate": True,
              "with": {"min_ml": 1.0e6}}]
    spec = small(demo_data, source, steps)
    with pytest.raises(GateFailed, match="gate qc did not pass") as caught:
        pipeline.run(spec, home)
    ctx = pipeline.Context(home, spec.name)
    assert caught.value.records["qc"]["status"] == "failed"
    [entry] = [e for e in audit.entries(ctx.db) if e["event"] == "step.gate_failed"]
    assert entry["details"]["step"] == "qc" and entry["details"]["reason"] == caught.value.reason
    run_id = entry["details"]["run_id"]
    assert not ctx.store.exists(f"{ctx.layout.model_files(run_id)}/weights.safetensors")
    run = registry.client(home.tracking_uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["voxelflow.gate_failed"].startswith("qc: ")
    assert "train_steps" not in run.data.metrics  # training never started


@pytest.mark.slow
def test_steps_in_a_whole_lifecycle_and_a_late_gate_reverts_the_promotion(demo_data, home, tmp_path):
    """One lifecycle with no orchestrator: a step whose `when` is false is skipped and so is what needs it; a
    branch runs beside training; a transient error is retried; a step that does not pass and is no gate is a
    warning; its metrics reach the run; a gate after promote that fails puts champion back."""
    from voxelflow.data.synthetic import make_decathlon

    source = make_decathlon(home.home / "incoming", n_cases=12, size=24)
    steps = [
        {"id": "count", "uses": f"{FNS}:count_cases", "after": "ingest"},
        {"id": "never", "uses": f"{FNS}:noop", "after": "count", "when": "count.n > 1000"},
        {"id": "needs_never", "uses": f"{FNS}:noop", "needs": ["never"]},
        {"id": "after_never", "uses": f"{FNS}:noop", "after": "never"},
        {"id": "beside", "uses": f"{FNS}:count_cases", "needs": ["train"]},
        {"id": "flaky", "uses": f"{FNS}:flaky", "after": "evaluate", "retries": 1,
         "with": {"marker": str(tmp_path / "flaky")}},
        {"id": "warn", "uses": f"{FNS}:refuse", "after": "flaky", "with": {"why": "just a warning"}},
        {"id": "late", "uses": f"{FNS}:refuse", "after": "promote", "gate": True, "when": "promote.promoted",
         "with": {"why": "the late gate says no"}},
    ]
    spec = small(demo_data, source, steps)
    with pytest.raises(GateFailed, match="the late gate says no") as caught:
        pipeline.run(spec, home)
    records = caught.value.records
    assert records["count"]["status"] == "passed" and records["count"]["metrics"] == {"n": 12.0}
    assert records["never"]["status"] == "skipped" and "is false" in records["never"]["reason"]
    assert records["needs_never"]["status"] == "skipped" and "needs never" in records["needs_never"]["reason"]
    assert records["after_never"]["status"] == "passed"  # chained after a skipped step: runs as if it were absent
    assert records["beside"]["status"] == "passed"
    assert records["flaky"]["attempts"] == 2 and records["warn"]["status"] == "warning"
    assert records["late"]["status"] == "failed" and "deploy" not in records  # nothing after the gate started
    ctx = pipeline.Context(home, spec.name)
    assert registry.alias_version(home.tracking_uri, spec.promote.model_name) is None  # the promotion reverted
    events = [e["event"] for e in audit.entries(ctx.db)]
    assert "model.promotion_reverted" in events and "step.warning" in events and "step.gate_failed" in events
    run_id = [e for e in audit.entries(ctx.db) if e["event"] == "step.gate_failed"][0]["details"]["run_id"]
    metrics = registry.client(home.tracking_uri).get_run(run_id).data.metrics
    assert metrics["count.n"] == 12.0 and metrics["flaky.attempts_seen"] == 2.0 and metrics["warn.refusals"] == 1.0
