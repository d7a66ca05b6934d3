"""Promotion gates (a pure function) and the MLflow registry on a real SQLite store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from voxelflow.release import registry
from voxelflow.spec.config import Gates, Settings

# ---------------------------------------------------------------- should_promote


def test_below_min_dice_is_rejected():
    decision = registry.should_promote({"dice": 0.55}, None, Gates(min_dice=0.6))
    assert not decision.promote
    assert len(decision.reasons) == 1 and "below the gate" in decision.reasons[0]


def test_first_model_above_min_dice_passes():
    decision = registry.should_promote({"dice": 0.61}, None, Gates(min_dice=0.6))
    assert decision.promote
    assert decision.reasons == ["all gates passed"]


def test_exactly_min_dice_passes():
    assert registry.should_promote({"dice": 0.5}, None, Gates(min_dice=0.5)).promote


def vs_champion(candidate: float, champion: float, gates: Gates, n: int = 6):
    """The gates on ``n`` test cases where the candidate scores ``candidate`` and the champion ``champion``
    (each case a little apart, the same offset for both: a paired comparison)."""
    offsets = [0.01 * (i - n / 2) for i in range(n)]
    cand = {"dice": {f"c{i}": candidate + o for i, o in enumerate(offsets)}}
    champ = {"dice": {f"c{i}": champion + o for i, o in enumerate(offsets)}}
    return registry.should_promote({"dice": candidate}, {"dice": champion}, gates, cand, champ)


def test_beating_the_champion_by_the_margin_passes():
    gates = Gates(min_dice=0.5, beat_champion_by=0.02)
    assert vs_champion(0.80, 0.70, gates).promote


def test_not_beating_the_champion_by_the_margin_is_rejected():
    gates = Gates(min_dice=0.5, beat_champion_by=0.05)
    decision = vs_champion(0.72, 0.70, gates)
    assert not decision.promote
    assert len(decision.reasons) == 1
    assert "champion" in decision.reasons[0]


def test_worse_than_champion_with_zero_margin_is_rejected():
    decision = registry.should_promote({"dice": 0.69}, {"dice": 0.70}, Gates(min_dice=0.5, beat_champion_by=0.0))
    assert not decision.promote


def test_both_gates_failing_give_two_reasons():
    decision = registry.should_promote({"dice": 0.3}, {"dice": 0.9}, Gates(min_dice=0.5))
    assert not decision.promote and len(decision.reasons) == 2


@pytest.mark.parametrize("candidate", [{"dice": float("nan")}, {}, {"hausdorff95": 1.0}])
def test_nan_or_missing_dice_is_rejected(candidate):
    decision = registry.should_promote(candidate, None, Gates(min_dice=0.0))
    assert not decision.promote
    decision = registry.should_promote(candidate, {"dice": 0.1}, Gates(min_dice=0.0, beat_champion_by=-1.0))
    assert not decision.promote


def test_negative_margin_allows_a_slightly_worse_candidate():
    gates = Gates(min_dice=0.5, beat_champion_by=-0.05)
    assert vs_champion(0.68, 0.70, gates).promote


def test_flatten():
    out = registry.flatten("", {"a": {"b": 1, "c": [1, 2]}, "d": "x" * 600}, {})
    assert out == {"a.b": "1", "a.c": "[1, 2]", "d": "x" * 500}


# ---------------------------------------------------------------- MLflow on SQLite


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory, tiny_spec, tiny_model_config, tiny_weights):
    """Two versions of the tiny model registered under one run."""
    settings = Settings(home=tmp_path_factory.mktemp("mlflow-home"), mlflow_tracking_uri=None)
    uri = settings.tracking_uri
    assert uri.startswith("sqlite:////")
    versions = []
    for weights in tiny_weights:
        run_id = registry.start_run(uri, settings.artifact_root, tiny_spec, {"dataset_digest": "0123456789abcdef"})
        model_uri = registry.log_model(uri, run_id, tiny_model_config, weights)
        versions.append(registry.register(uri, model_uri, tiny_spec.promote.model_name, run_id,
                                          {"dataset_digest": "0123456789abcdef"}))
    return settings, run_id, versions


def test_run_has_spec_params_and_lineage_tags(mlflow_store, tiny_spec):
    settings, run_id, _ = mlflow_store
    run = registry.client(settings.tracking_uri).get_run(run_id)
    assert run.data.params["train.epochs"] == str(tiny_spec.train.epochs)
    assert run.data.params["train.precision"] == "fp32"
    assert "preprocess.shard_size" in run.data.params
    assert not any(k.startswith(("promote.", "deploy.", "data.")) for k in run.data.params)
    assert run.data.tags["voxelflow.dataset_digest"] == "0123456789abcdef"
    assert run.data.tags["voxelflow.code_version"].startswith("0.1.0")


def test_log_metrics_skips_non_finite(mlflow_store):
    settings, run_id, _ = mlflow_store
    registry.log_metrics(settings.tracking_uri, run_id, {"val_dice": 0.5, "val_hd95": float("nan")}, step=1)
    metrics = registry.client(settings.tracking_uri).get_run(run_id).data.metrics
    assert metrics["val_dice"] == pytest.approx(0.5)
    assert "val_hd95" not in metrics


def test_log_bytes_stores_a_picture_as_a_run_artifact(mlflow_store, tmp_path):
    import mlflow

    from voxelflow.learn import report

    settings, run_id, _ = mlflow_store
    rng = np.random.default_rng(0)
    image = rng.random((12, 12, 8), dtype=np.float32)
    label = (image > 0.7).astype(np.uint8)
    pictures = {
        "overlay.png": report.overlay_png(image, label, label, title="case-1"),
        "curve.png": report.curve_png([{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.5}]),
    }
    for name, data in pictures.items():
        assert isinstance(data, bytes) and data[:8] == b"\x89PNG\r\n\x1a\n"
        registry.log_bytes(settings.tracking_uri, run_id, name, data)
    listed = {a.path for a in registry.client(settings.tracking_uri).list_artifacts(run_id)}
    assert set(pictures) <= listed
    mlflow.set_tracking_uri(settings.tracking_uri)
    for name, data in pictures.items():
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=str(tmp_path))
        assert Path(local).read_bytes() == data
    # the artifacts live under the settings' artifact root
    assert settings.artifact_root.startswith("file://")
    assert (Path(settings.artifact_root.removeprefix("file://"))).is_dir()


def test_artifacts_go_to_the_store_when_it_is_s3(mlflow_store, tiny_spec, s3_store_url):
    """With VOXELFLOW_STORE on S3 the artifact root is a prefix there: every machine reads the same files."""
    from voxelflow.core.storage import Store

    local, _, _ = mlflow_store
    settings = Settings(home=local.home, store=f"{s3_store_url}/registry")
    assert settings.artifact_root == f"{s3_store_url}/registry/mlflow-artifacts"
    spec = tiny_spec.model_copy(update={"name": "tiny-on-s3"})
    run_id = registry.start_run(settings.tracking_uri, settings.artifact_root, spec, {"dataset_digest": "ab" * 8})
    registry.log_bytes(settings.tracking_uri, run_id, "report.md", b"# a report")
    store = Store(settings.artifact_root)
    assert [f for f in store.files() if f.endswith("/report.md")] == [f"tiny-on-s3/{run_id}/artifacts/report.md"]
    assert store.read_bytes(f"tiny-on-s3/{run_id}/artifacts/report.md") == b"# a report"


def test_versions_are_numbered(mlflow_store, tiny_spec):
    settings, _, versions = mlflow_store
    assert versions == ["1", "2"]
    mv = registry.client(settings.tracking_uri).get_model_version(tiny_spec.promote.model_name, "2")
    assert mv.tags["voxelflow.dataset_digest"] == "0123456789abcdef"


def test_promote_moves_champion_and_keeps_previous(mlflow_store, tiny_spec, tiny_weights, tmp_path):
    from safetensors.torch import load

    settings, _, versions = mlflow_store
    uri, name = settings.tracking_uri, tiny_spec.promote.model_name
    assert registry.alias_version(uri, name) is None
    with pytest.raises(LookupError, match="champion"):
        registry.load_segmenter(uri, name, tmp_path / "cache0")

    assert registry.promote(uri, name, versions[0]) is None
    assert registry.alias_version(uri, name, registry.CHAMPION) == "1"
    assert registry.alias_version(uri, name, registry.PREVIOUS) is None

    assert registry.promote(uri, name, versions[1]) == "1"
    assert registry.alias_version(uri, name, registry.CHAMPION) == "2"
    assert registry.alias_version(uri, name, registry.PREVIOUS) == "1"

    # promoting the champion again leaves 'previous' alone
    assert registry.promote(uri, name, versions[1]) == "2"
    assert registry.alias_version(uri, name, registry.PREVIOUS) == "1"

    segmenter, version = registry.load_segmenter(uri, name, tmp_path / "cache")
    assert version == "2"
    expected = load(tiny_weights[1])
    state = segmenter.net.state_dict()
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        assert np.array_equal(state[key].cpu().numpy(), tensor.numpy()), key

    previous, pversion = registry.load_segmenter(uri, name, tmp_path / "cache", alias=registry.PREVIOUS)
    assert pversion == "1"
    key = next(iter(expected))
    assert np.array_equal(previous.net.state_dict()[key].cpu().numpy(), load(tiny_weights[0])[key].numpy())

    volume = np.random.default_rng(0).random((20, 18, 22), dtype=np.float32)
    mask = segmenter.segment(volume, np.diag([1.2, 1.0, 1.5, 1.0]))
    assert mask.shape == volume.shape
    assert mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}


def test_logged_model_is_a_pyfunc_without_pickles(mlflow_store, tiny_spec, tmp_path):
    settings, _, _ = mlflow_store
    local = registry.download_model(settings.tracking_uri, f"models:/{tiny_spec.promote.model_name}/1", tmp_path)
    files = {p.name for p in local.rglob("*") if p.is_file()}
    assert {"MLmodel", "model.json", "weights.safetensors"} <= files
    assert not any(f.endswith((".pkl", ".pickle")) for f in files)


# ---------------------------------------------------------------- register_stage leaves an audit anchor


def test_each_decision_anchors_the_audit_chain_in_the_version_tags(tmp_path, tiny_spec, tiny_model_config,
                                                                   tiny_weights):
    from sqlalchemy import delete

    from voxelflow.core import audit
    from voxelflow.core.db import audit_log
    from voxelflow.pipeline import Context, Evaluation, TrainOutcome, register_stage

    ctx = Context(Settings(home=tmp_path / "home"), tiny_spec.name)
    uri, name = ctx.tracking_uri, tiny_spec.promote.model_name
    ctx.store.write_bytes("models/w.safetensors", tiny_weights[0])
    outcome = TrainOutcome("models/w.safetensors", tiny_model_config, [], 0, 0.0, None, "")
    promote = tiny_spec.promote.model_copy(update={"approval": "auto"})
    results = []
    for dice in (0.95, 0.10):  # the first is promoted, the second rejected: both decisions are anchored
        run_id = registry.start_run(uri, ctx.settings.artifact_root, tiny_spec, {"dataset_digest": "d" * 16})
        evaluation = Evaluation({"dice": dice}, None, registry.alias_version(uri, name), "", [], ["dice"], 2)
        tags = {"pipeline": tiny_spec.name, "dataset_digest": "d" * 16, "spec_digest": tiny_spec.digest()}
        results.append(register_stage(promote, ctx, run_id, outcome, evaluation, tags))
    assert [r.promoted for r in results] == [True, False]
    gates = {g["gate"]: g["passed"] for g in results[1].gates}
    assert gates == {"min_dice": False, "lineage": True}  # compared with no scores: the absolute gate decides
    tagged = registry.client(uri).get_model_version(name, results[1].version).tags
    assert tagged["voxelflow.gate.min_dice"].startswith("fail: dice 0.1000 is below the gate")
    assert tagged["voxelflow.gate.lineage"] == "pass: lineage complete: dataset_digest, spec_digest, run_id"
    entries = list(audit.entries(ctx.db))
    assert [e["event"] for e in entries] == ["model.promoted", "model.rejected"]
    anchors = audit.mlflow_anchors(uri)
    assert sorted((a.seq, a.hash) for a in anchors) == [(e["seq"], e["hash"]) for e in entries]
    verdict = audit.verify(ctx.db, anchors)
    assert verdict.ok and verdict.anchor.where == f"MLflow tags of {name} version {results[1].version}"
    with ctx.db.transaction() as conn:  # someone with database access drops the newest record
        conn.execute(delete(audit_log).where(audit_log.c.seq == 1))
    assert audit.verify(ctx.db).ok
    assert not audit.verify(ctx.db, audit.mlflow_anchors(uri)).ok


# ---------------------------------------------------------------- rollback


def test_rollback_restores_previous_records_it_and_refuses_a_second_time(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from voxelflow.core import audit
    from voxelflow.core.db import connect

    settings = Settings(home=tmp_path)
    uri, mc = settings.tracking_uri, registry.client(settings.tracking_uri)
    mc.create_registered_model("m")
    for _ in range(2):
        mc.create_model_version("m", str(tmp_path))
    runner, env = CliRunner(), {"VOXELFLOW_HOME": str(tmp_path)}

    def rollback(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, ["rollback", "m", *args], env=env)
        return result.exit_code, " ".join(result.output.split())

    code, out = rollback()
    assert code == 1 and "model 'm' has no 'previous' version to roll back to (and no champion)" in out
    registry.promote(uri, "m", "1")
    registry.promote(uri, "m", "2")
    assert (registry.alias_version(uri, "m"), registry.alias_version(uri, "m", registry.PREVIOUS)) == ("2", "1")
    code, out = rollback("--reason", "dice fell on new scanners")
    assert code == 0 and "champion is version 1 again (was 2)" in out
    assert registry.alias_version(uri, "m") == "1"
    assert registry.alias_version(uri, "m", registry.PREVIOUS) is None
    assert mc.get_model_version("m", "2").tags["voxelflow.rolled_back"] == "replaced by 1: dice fell on new scanners"
    db = connect(settings.database)
    (entry,) = [e for e in audit.entries(db) if e["event"] == "model.rolled_back"]
    operation = entry["details"].pop("operation")  # the id a retry of this rollback would carry
    assert entry["details"] == {"model": "m", "version": "1", "replaced": "2", "reason": "dice fell on new scanners"}
    assert mc.get_model_version("m", "2").tags[registry.ROLLED_BACK_OPERATION] == operation
    assert f"rollback {operation}" in out
    verdict = audit.verify(db, audit.mlflow_anchors(uri))
    assert verdict.ok and verdict.anchor.seq == entry["seq"] and verdict.anchor.where.endswith("m version 1")
    code, out = rollback()
    assert code == 1 and "no 'previous' version to roll back to (champion is version 1)" in out
    assert registry.alias_version(uri, "m") == "1"
    db.dispose()


def test_a_person_approves_a_challenger_with_a_reason(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from voxelflow.core import audit
    from voxelflow.core.db import connect

    settings = Settings(home=tmp_path)
    uri, mc = settings.tracking_uri, registry.client(settings.tracking_uri)
    mc.create_registered_model("m")
    for _ in range(3):
        mc.create_model_version("m", str(tmp_path))
    registry.promote(uri, "m", "1")
    registry.tag_version(uri, "m", "2", {  # what the lifecycle leaves on a candidate that passed its gates
        "voxelflow.gate.min_dice": "pass: dice 0.9000 meets the gate 0.8000", "voxelflow.compared_with": "1",
        "voxelflow.reasons": "all gates passed", "voxelflow.decision": "awaiting_approval"})
    mc.set_registered_model_alias("m", registry.CHALLENGER, "2")
    runner, env = CliRunner(), {"VOXELFLOW_HOME": str(tmp_path), "USER": "dr-reviewer"}

    def approve(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, ["approve", "m", *args], env=env)
        return result.exit_code, " ".join(result.output.split())

    code, out = approve("2", "--reason", " ")
    assert code == 1 and "needs a reason" in out and registry.alias_version(uri, "m") == "1"
    code, out = approve("3", "--reason", "never evaluated")  # an ungated version is refused
    assert code == 1 and "version 3 of m cannot be approved" in out and registry.alias_version(uri, "m") == "1"
    code, out = approve("2", "--reason", "reviewed the overlays of 20 cases")
    assert code == 0 and "champion is version 2 (previous: 1)" in out
    assert (registry.alias_version(uri, "m"), registry.alias_version(uri, "m", registry.PREVIOUS)) == ("2", "1")
    tags = mc.get_model_version("m", "2").tags
    assert tags["voxelflow.approval"] == "approved" and tags["voxelflow.approval_reason"].startswith("reviewed")
    assert tags["voxelflow.approved_by"]
    db = connect(settings.database)
    (entry,) = [e for e in audit.entries(db) if e["event"] == "model.approved"]
    assert entry["details"]["version"] == "2" and entry["details"]["previous"] == "1"
    assert audit.verify(db, audit.mlflow_anchors(uri)).anchor.seq == entry["seq"]
    registry.rollback(uri, db, "m", "ops", audit.Sink(db, uri), "bad on scanner B")  # 2 is rolled back: it cannot be approved again
    code, out = approve("2", "--reason", "again")
    assert code == 1 and "was rolled back" in out and registry.alias_version(uri, "m") == "1"
    code, out = approve("9", "--reason", "no such version")
    assert code == 1 and registry.alias_version(uri, "m") == "1"
    db.dispose()


# ---------------------------------------------------------------- lineage


def test_lineage_follows_every_link_back_to_the_ledger_and_notices_a_broken_one(tmp_path, tiny_spec,
                                                                                  tiny_model_config, tiny_weights):
    import json

    from sqlalchemy import delete
    from typer.testing import CliRunner

    from flows.cli import app
    from voxelflow.core.db import ledger
    from voxelflow.data import ingest, preprocess, synthetic
    from voxelflow.pipeline import Context, Evaluation, TrainOutcome, ingest_stage, register_stage, split_stage
    from voxelflow.pipeline import lineage as lineage_tags
    from voxelflow.pipeline import start_run as open_run
    from voxelflow.release import lineage

    home = tmp_path / "home"
    synthetic.make_decathlon(home / "incoming", n_cases=5, size=16)
    ctx = Context(Settings(home=home), tiny_spec.name)
    ingested = ingest_stage(tiny_spec.data, ctx)
    split = split_stage(tiny_spec.evaluate.model_copy(update={"test_fraction": 0.4, "val_fraction": 0.4}),
                        ingested.case_ids)
    out = ctx.layout.preprocessed(preprocess.transform_digest(tiny_spec.preprocess))
    preprocess.preprocess_shard(ctx.layout.raw, out, ingested.case_ids, tiny_spec.preprocess.transforms)
    run_id = open_run(tiny_spec, ctx, ingested.dataset_digest, split)
    ctx.store.write_bytes("models/w.safetensors", tiny_weights[0])
    outcome = TrainOutcome("models/w.safetensors", tiny_model_config, [], 0, 0.0, None, "")
    promote = tiny_spec.promote.model_copy(update={"gates": tiny_spec.promote.gates.model_copy(
        update={"min_dice": 0.1})})
    evaluation = Evaluation({"dice": 0.9}, None, None, "", split.test, ["dice"], 2)
    promotion = register_stage(promote, ctx, run_id, outcome, evaluation,
                               lineage_tags(tiny_spec, ingested.dataset_digest))
    assert promotion.promoted

    name = tiny_spec.promote.model_name
    trace = lineage.trace(ctx.tracking_uri, ctx.db, ctx.settings.store_url, name)
    assert trace["problems"] == [] and trace["version"] == promotion.version and "champion" in trace["aliases"]
    assert trace["run"]["id"] == run_id and trace["dataset_digest"] == ingested.dataset_digest
    assert trace["preprocess_digest"] == preprocess.transform_digest(tiny_spec.preprocess)
    assert trace["gates"]["min_dice"].startswith("pass:")
    rows = ingest.read_ledger(ctx.db, tiny_spec.name, state="ingested")
    assert {c["case"] for c in trace["cases"]} == set(ingested.case_ids)
    for case in trace["cases"]:
        assert case["preprocessed"] is True and case["held_out"] == (case["case"] in split.val + split.test)
        assert sorted((s["object"], s["sha256"]) for s in case["sources"]) == sorted(
            (r["object"], r["sha256"]) for r in rows if r["case_id"] == case["case"])
        assert len(case["sources"]) == 2  # image and label
    by_version = lineage.trace(ctx.tracking_uri, ctx.db, ctx.settings.store_url, f"{name}/{promotion.version}")
    assert by_version == {**trace, "alias": None}

    from voxelflow.core import audit

    audit.append(ctx.db, "service.deployed", "voxelflow", model=name, version=promotion.version,
                 endpoint="http://127.0.0.1:8123")
    audit.append(ctx.db, "service.deployed", "voxelflow", model=name, version="99", endpoint="http://127.0.0.1:1")
    assert lineage.trace(ctx.tracking_uri, ctx.db, ctx.settings.store_url, name)["endpoints"] == [
        "http://127.0.0.1:8123"]
    runner, env = CliRunner(), {"VOXELFLOW_HOME": str(home)}
    result = runner.invoke(app, ["lineage", f"{name}@champion", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["cases"] == trace["cases"]
    text = runner.invoke(app, ["lineage", name], env=env)
    assert text.exit_code == 0 and rows[0]["sha256"] in text.output and run_id in text.output

    gone = trace["cases"][0]["case"]
    with ctx.db.transaction() as conn:  # a case whose ledger rows vanished is a broken link, not a shorter list
        conn.execute(delete(ledger).where(ledger.c.case_id == gone))
    broken = runner.invoke(app, ["lineage", name], env=env)
    assert broken.exit_code == 1
    assert f"case {gone} has no ingested source object in the ledger" in " ".join(broken.output.split())
    with pytest.raises(ValueError, match="not a model reference"):
        lineage.parse_ref("a b")
