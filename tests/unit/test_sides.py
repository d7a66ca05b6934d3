"""The three fixed sides: train, validation (checkpoint selection) and test (promotion), and a
promotion decided on the test side alone, against a real store and a real MLflow registry."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import pytest

from voxelflow.learn import evaluate
from voxelflow.spec.config import SpecError, load_spec


def ids(n: int, start: int = 0) -> list[str]:
    return [f"case-{hashlib.sha256(str(i).encode()).hexdigest()[:16]}" for i in range(start, start + n)]


# ---------------------------------------------------------------- the sides


def test_sides_are_disjoint_and_cover_every_case():
    cases = ids(120)
    train, val, test = evaluate.sides(cases, 0.2, 0.2)
    assert sorted(train + val + test) == sorted(cases)
    assert len(set(train) | set(val) | set(test)) == len(cases)


def test_no_case_changes_side_as_data_grows():
    old = ids(40)
    before = evaluate.sides(old, 0.25, 0.25)
    after = evaluate.sides(old + ids(200, start=40), 0.25, 0.25)
    for side_before, side_after in zip(before, after):
        assert set(side_before) <= set(side_after)
        assert set(side_before) == set(side_after) & set(old)  # an old case is where it was, and only there
    assert all(len(a) > len(b) for a, b in zip(after, before))  # new cases reached every side


def test_the_test_side_lies_within_the_cases_held_out_before_it_existed():
    """Before, a case was held out when its position was below val_fraction: with test_fraction at most
    that, every test case was held out then too, so no earlier model trained on one."""
    cases = ids(300)
    held_out_before = {c for c in cases if evaluate.split_position(c) < 0.2}
    for test_fraction in (0.1, 0.2):
        _, _, test = evaluate.sides(cases, test_fraction, 0.2)
        assert test and set(test) <= held_out_before


@pytest.mark.parametrize("sets, message", [
    (["evaluate.test_fraction=0.3", "evaluate.val_fraction=0.2"],
     r"evaluate.test_fraction \(0.3\) is above evaluate.val_fraction \(0.2\)"),
    (["evaluate.test_fraction=0.5", "evaluate.val_fraction=0.5"], "leave no training side"),
    (["evaluate.test_fraction=0"], "test_fraction"),
])
def test_a_spec_that_would_test_on_cases_a_champion_trained_on_is_refused_naming_the_keys(demo_spec_path, sets,
                                                                                           message):
    with pytest.raises(SpecError, match=message):
        load_spec(demo_spec_path, sets=sets)


def test_the_split_stage_and_its_defaults(demo_spec_path):
    from voxelflow.pipeline import split_stage
    from voxelflow.spec.config import EvaluateSpec

    assert (EvaluateSpec().test_fraction, EvaluateSpec().val_fraction) == (0.2, 0.2)
    spec = load_spec(demo_spec_path)
    cases = ids(60)
    split = split_stage(spec.evaluate, cases)
    assert (split.train, split.val, split.test) == evaluate.sides(cases, 0.25, 0.25)
    assert "test: p < 0.25" in evaluate.sides_rule(0.25, 0.25) and "0.25 <= p < 0.5" in evaluate.sides_rule(0.25, 0.25)


# ---------------------------------------------------------------- promotion decided on the test side alone


@pytest.fixture
def lifecycle_home(tmp_path, tiny_spec):
    """Twelve small synthetic cases ingested and preprocessed, and the tiny spec's three sides of them."""
    from voxelflow.data import preprocess, synthetic
    from voxelflow.pipeline import Context, ingest_stage, split_stage
    from voxelflow.spec.config import Settings

    home = tmp_path / "home"
    synthetic.make_decathlon(home / "incoming", n_cases=12, size=16)
    ctx = Context(Settings(home=home), tiny_spec.name)
    ingested = ingest_stage(tiny_spec.data, ctx)
    out = ctx.layout.preprocessed(preprocess.transform_digest(tiny_spec.preprocess))
    preprocess.preprocess_shard(ctx.layout.raw, out, ingested.case_ids, tiny_spec.preprocess.transforms)
    split = split_stage(tiny_spec.evaluate, ingested.case_ids)
    assert split.train and split.val and split.test
    return ctx, ingested, split


def _register_as_before(ctx, spec, model_config, weights: bytes, split) -> str:
    """A champion registered the way versions were before the test side: a run whose split.json has
    train and val only, scores tagged as val_*, no per-case scores anywhere."""
    from voxelflow.release import registry

    uri, name = ctx.tracking_uri, spec.promote.model_name
    run_id = registry.start_run(uri, ctx.settings.artifact_root, spec, {"dataset_digest": "d" * 16})
    registry.log_bytes(uri, run_id, "split.json", json.dumps(
        {"rule": f"sha256(salt + case id) < {spec.evaluate.val_fraction}",
         "train": split.train, "val": sorted(split.val + split.test)}).encode())
    model_uri = registry.log_model(uri, run_id, model_config, weights)
    version = registry.register(uri, model_uri, name, run_id, {"val_dice": "0.5000", "pipeline": spec.name})
    registry.promote(uri, name, version)
    return version


def test_promotion_is_decided_on_test_cases_only(lifecycle_home, tiny_spec, tiny_model_config, tiny_weights,
                                                 monkeypatch):
    from voxelflow.pipeline import TrainOutcome, evaluate_stage, lineage, register_stage, score_version, start_run
    from voxelflow.release import registry

    ctx, ingested, split = lifecycle_home
    uri, name = ctx.tracking_uri, tiny_spec.promote.model_name
    old = _register_as_before(ctx, tiny_spec, tiny_model_config, tiny_weights[0], split)

    run_id = start_run(tiny_spec, ctx, ingested.dataset_digest, split)
    with tempfile.TemporaryDirectory() as tmp:  # the run keeps all three sides
        kept = json.loads(Path(registry.client(uri).download_artifacts(run_id, "split.json", tmp)).read_text())
    assert (kept["train"], kept["val"], kept["test"]) == (split.train, split.val, split.test)
    assert (kept["test_fraction"], kept["val_fraction"]) == (0.25, 0.25) and "test: p < 0.25" in kept["rule"]

    loaded: list[str] = []
    real = evaluate.load_case
    monkeypatch.setattr(evaluate, "load_case", lambda raw, cid: loaded.append(cid) or real(raw, cid))
    ctx.store.write_bytes("models/w.safetensors", tiny_weights[0])  # the champion's weights: a tie, case by case
    outcome = TrainOutcome("models/w.safetensors", tiny_model_config, [], 0, 0.0, None, "")
    evaluation = evaluate_stage(tiny_spec.evaluate, name, ctx, outcome, split.test, run_id)

    assert loaded == split.test * 2  # the candidate, then the champion of before: each on the test cases
    assert not set(loaded) & set(split.val + split.train)
    assert evaluation.champion_version == old and evaluation.test_ids == split.test
    assert set(evaluation.candidate_cases["dice"]) == set(evaluation.champion_cases["dice"]) == set(split.test)
    assert evaluation.candidate_cases == evaluation.champion_cases  # same weights, same cases
    assert evaluation.candidate["dice"] == pytest.approx(sum(evaluation.candidate_cases["dice"].values())
                                                         / len(split.test))
    metrics = registry.client(uri).get_run(run_id).data.metrics
    assert "test_dice" in metrics and "champion_test_dice" in metrics and "val_dice" not in metrics
    with tempfile.TemporaryDirectory() as tmp:
        scores = json.loads(Path(registry.client(uri).download_artifacts(run_id, "test-scores.json", tmp)).read_text())
    assert scores["candidate"]["dice"].keys() == set(split.test) and scores["champion_version"] == old

    # a version registered before the change is re-scored on the test side too (a champion that appeared meanwhile)
    loaded.clear()
    rescored = score_version(ctx, name, old, evaluation)
    assert rescored == evaluation.champion_cases and loaded == split.test

    gates = tiny_spec.promote.gates.model_copy(update={"min_dice": 0.0, "min_test_cases": len(split.test)})
    promote = tiny_spec.promote.model_copy(update={"gates": gates, "approval": "auto"})
    loaded.clear()
    promotion = register_stage(promote, ctx, run_id, outcome, evaluation, lineage(tiny_spec, ingested.dataset_digest))
    assert not set(loaded) & set(split.val)  # deciding scored no validation case
    relative = {g["gate"]: g for g in promotion.gates}["vs_champion_dice"]
    assert relative["passed"] and f"on {len(split.test)} test cases" in relative["detail"], relative
    assert promotion.promoted and registry.alias_version(uri, name) == promotion.version


def test_too_few_test_cases_fail_the_relative_gate_in_the_lifecycle(lifecycle_home, tiny_spec, tiny_model_config,
                                                                    tiny_weights):
    """With the default min_test_cases (5), the few test cases of a small data set cannot unseat a champion."""
    from voxelflow.pipeline import TrainOutcome, evaluate_stage, lineage, register_stage, start_run
    from voxelflow.release import registry

    ctx, ingested, split = lifecycle_home
    assert len(split.test) < 5
    uri, name = ctx.tracking_uri, tiny_spec.promote.model_name
    old = _register_as_before(ctx, tiny_spec, tiny_model_config, tiny_weights[0], split)
    run_id = start_run(tiny_spec, ctx, ingested.dataset_digest, split)
    ctx.store.write_bytes("models/w.safetensors", tiny_weights[0])
    outcome = TrainOutcome("models/w.safetensors", tiny_model_config, [], 0, 0.0, None, "")
    evaluation = evaluate_stage(tiny_spec.evaluate, name, ctx, outcome, split.test, run_id)
    gates = tiny_spec.promote.gates.model_copy(update={"min_dice": 0.0, "min_test_cases": 5})
    promote = tiny_spec.promote.model_copy(update={"gates": gates, "approval": "auto"})
    promotion = register_stage(promote, ctx, run_id, outcome, evaluation, lineage(tiny_spec, ingested.dataset_digest))
    assert not promotion.promoted and registry.alias_version(uri, name) == old
    assert promotion.reasons == [f"dice compared on {len(split.test)} paired test cases: the relative gate needs at "
                                 "least 5 (promote.gates.min_test_cases)"]
