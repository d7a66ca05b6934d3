"""The promotion policy: each gate against hand-computed expectations, and the spec keys that drive it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml

from voxelflow.release import policy
from voxelflow.spec.config import Gates, SpecError, load_spec

LINEAGE = {"dataset_digest": "d" * 16, "spec_digest": "s" * 16, "run_id": "r" * 32}


def by_gate(decision: policy.Decision) -> dict[str, bool]:
    return {g.gate: g.passed for g in decision.gates}


# ---------------------------------------------------------------- absolute gates, by direction


def test_higher_is_better_metric_must_reach_its_bound():
    assert policy.absolute_gate({"dice": 0.80}, "dice", 0.80).passed  # the bound itself passes
    low = policy.absolute_gate({"dice": 0.7999}, "dice", 0.80)
    assert not low.passed and low.gate == "min_dice" and "0.7999 is below the gate 0.8000" in low.detail


def test_lower_is_better_metric_must_stay_under_its_bound():
    assert policy.absolute_gate({"hausdorff95": 12.0}, "hausdorff95", 12.0).passed
    high = policy.absolute_gate({"hausdorff95": 12.5}, "hausdorff95", 12.0)
    assert not high.passed and high.gate == "max_hausdorff95" and "is above the gate" in high.detail
    assert policy.absolute_gate({"hausdorff95_1": 3.0}, "hausdorff95_1", 5.0).passed  # per class, same direction


@pytest.mark.parametrize("scores", [{}, {"dice": float("nan")}, {"dice": None}])
def test_a_missing_or_nan_metric_never_passes(scores):
    gate = policy.absolute_gate(scores, "dice", 0.0)
    assert not gate.passed and "not computed" in gate.detail


def test_an_unknown_metric_is_an_error():
    with pytest.raises(KeyError, match="unknown metric 'recall'"):
        policy.absolute_gate({"recall": 1.0}, "recall", 0.5)


# ---------------------------------------------------------------- relative gate


def shifted(champion: dict[str, float], by: float, metric: str = "dice") -> tuple[dict, dict]:
    """Per-case scores of a candidate ``by`` better or worse on every case than ``champion`` (case -> value)."""
    return {metric: {c: v + by for c, v in champion.items()}}, {metric: dict(champion)}


CHAMP = {f"case-{i}": 0.70 + 0.02 * (i % 3) for i in range(6)}
HD = {f"case-{i}": 10.0 + i for i in range(6)}


def test_superiority_needs_the_delta_in_the_better_direction():
    # dice, higher is better: beaten by 0.05 on every case reaches the delta 0.05; by 0.04 does not
    assert policy.relative_gate(*shifted(CHAMP, 0.05), "dice", 0.05).passed
    gate = policy.relative_gate(*shifted(CHAMP, 0.04), "dice", 0.05)
    assert not gate.passed and gate.threshold == pytest.approx(0.05) and "does not beat" in gate.detail
    # hausdorff95: lower is better, 1 mm lower on every case beats it by 1
    assert policy.relative_gate(*shifted(HD, -1.0, "hausdorff95"), "hausdorff95", 1.0).passed
    assert not policy.relative_gate(*shifted(HD, -0.5, "hausdorff95"), "hausdorff95", 1.0).passed


def test_non_inferiority_allows_a_margin_and_no_more():
    # margin 0.02 on dice
    assert policy.relative_gate(*shifted(CHAMP, -0.02), "dice", -0.02).passed
    gate = policy.relative_gate(*shifted(CHAMP, -0.03), "dice", -0.02)
    assert not gate.passed and "within the margin" in gate.detail
    # margin 2 mm on hausdorff95
    assert policy.relative_gate(*shifted(HD, 2.0, "hausdorff95"), "hausdorff95", -2.0).passed
    assert not policy.relative_gate(*shifted(HD, 2.1, "hausdorff95"), "hausdorff95", -2.0).passed


# ---------------------------------------------------------------- behaviour and lineage


def test_behaviour_gates_read_the_measurements():
    ok = policy.behaviour_gates({"flip_disagreement": 0.01, "empty_volume_foreground": 0, "nonfinite_outputs": 0},
                                0.02)
    assert [(g.gate, g.passed) for g in ok] == [("flip_consistency", True), ("empty_volume", True),
                                                ("finite_output", True)]
    bad = policy.behaviour_gates({"flip_disagreement": 0.03, "empty_volume_foreground": 7, "nonfinite_outputs": 2},
                                 0.02)
    assert not any(g.passed for g in bad)
    assert "an empty volume gives 7 foreground voxels" in bad[1].detail and "2 non-finite" in bad[2].detail


def test_lineage_gate_names_what_is_missing():
    assert policy.lineage_gate(LINEAGE).passed
    gate = policy.lineage_gate({**LINEAGE, "spec_digest": " ", "run_id": None})
    assert not gate.passed and gate.detail == "lineage lacks spec_digest, run_id"


def threshold_segmenter(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (volume > 0.5).astype(np.uint8)


def left_half_segmenter(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Marks the first half of axis 0 whatever the volume holds: neither flip-consistent nor empty on zeros."""
    mask = np.zeros(volume.shape, np.uint8)
    mask[: volume.shape[0] // 2] = 1
    return mask


def test_measure_behaviour_of_a_symmetric_rule_and_of_a_biased_one():
    volume = np.zeros((4, 3, 2), np.float32)
    volume[0, 0, 0] = 1.0  # one bright voxel, off the mirror axis
    fair = policy.measure_behaviour(threshold_segmenter, volume)
    assert fair == {"flip_disagreement": 0.0, "empty_volume_foreground": 0.0, "nonfinite_outputs": 0.0}
    biased = policy.measure_behaviour(left_half_segmenter, volume)
    # the mask marks rows 0-1, the mirrored prediction flipped back marks rows 2-3: every voxel differs
    assert biased["flip_disagreement"] == 1.0
    assert biased["empty_volume_foreground"] == 12.0  # 2 x 3 x 2 voxels of an all-zero volume


def test_the_left_right_axis_follows_the_affine():
    volume = np.zeros((4, 6, 2), np.float32)
    affine = np.array([[0, 1.5, 0, 0], [1.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])  # x runs along axis 1

    def axis1_half(v, a):
        mask = np.zeros(v.shape, np.uint8)
        mask[:, :3] = 1
        return mask

    assert policy.measure_behaviour(axis1_half, volume, affine)["flip_disagreement"] == 1.0
    assert policy.measure_behaviour(left_half_segmenter, volume, affine)["flip_disagreement"] == 0.0


def test_a_segmenter_that_changes_the_shape_is_an_error():
    with pytest.raises(ValueError, match="returned shape"):
        policy.measure_behaviour(lambda v, a: v[:2], np.zeros((4, 3, 2), np.float32))


# ---------------------------------------------------------------- decide: all gates together


def per_case(mean: float, n: int = 8, spread: float = 0.0, metric: str = "dice") -> dict[str, dict[str, float]]:
    """``n`` test cases whose values average ``mean``, alternating ``spread`` above and below it."""
    return {metric: {f"case-{i}": mean + (spread if i % 2 else -spread) for i in range(n)}}


def test_decide_applies_every_configured_gate_and_records_each():
    gates = Gates(min_dice=0.6, beat_champion_by=-0.01, absolute={"hausdorff95": 10.0}, flip_tolerance=0.05)
    behaviour = {"flip_disagreement": 0.02, "empty_volume_foreground": 0, "nonfinite_outputs": 0}
    cand, champ = {"dice": 0.70, "hausdorff95": 8.0}, {"dice": 0.705, "hausdorff95": 9.0}
    decision = policy.decide(cand, champ, gates, behaviour, LINEAGE, candidate_cases=per_case(0.70),
                             champion_cases=per_case(0.705))
    assert decision.promote and decision.reasons == ["all gates passed"]
    assert by_gate(decision) == {"min_dice": True, "max_hausdorff95": True, "vs_champion_dice": True,
                                 "flip_consistency": True, "empty_volume": True, "finite_output": True,
                                 "lineage": True}
    tags = decision.tags()
    assert tags["voxelflow.gate.vs_champion_dice"].startswith(
        "pass: dice 0.7000 vs the champion's 0.7050 on 8 test cases: improvement -0.0050")
    assert "does stay within the margin of the champion of 0.0100" in tags["voxelflow.gate.vs_champion_dice"]
    assert decision.rows()[0] == {"gate": "min_dice", "passed": True, "detail": "dice 0.7000 meets the gate 0.6000",
                                  "value": 0.70, "threshold": 0.6}


def test_decide_rejects_on_any_failing_gate_with_one_reason_each():
    gates = Gates(min_dice=0.6, absolute={"hausdorff95": 10.0}, flip_tolerance=0.05)
    behaviour = {"flip_disagreement": 0.2, "empty_volume_foreground": 0, "nonfinite_outputs": 0}
    decision = policy.decide({"dice": 0.9, "hausdorff95": 11.0}, None, gates, behaviour, {})
    assert not decision.promote
    assert [g.gate for g in decision.gates if not g.passed] == ["max_hausdorff95", "flip_consistency", "lineage"]
    assert len(decision.reasons) == 3


def test_decide_without_measured_behaviour_fails_when_the_checks_are_asked_for():
    decision = policy.decide({"dice": 0.9}, None, Gates(min_dice=0.5, flip_tolerance=0.1), None, LINEAGE)
    assert not decision.promote and by_gate(decision)["behaviour"] is False


def test_a_policy_on_hausdorff_alone_can_promote():
    gates = Gates(min_dice=None, relative_metric="hausdorff95", beat_champion_by=0.5, absolute={"hausdorff95": 20})
    decision = policy.decide({"hausdorff95": 8.0}, {"hausdorff95": 9.0}, gates, None, LINEAGE,
                             candidate_cases=per_case(8.0, metric="hausdorff95"),
                             champion_cases=per_case(9.0, metric="hausdorff95"))
    assert decision.promote and set(by_gate(decision)) == {"max_hausdorff95", "vs_champion_hausdorff95", "lineage"}


# ---------------------------------------------------------------- the relative gate: a paired bootstrap


def noisy(mean: float, n: int, seed: int, sd: float) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {f"case-{i:02d}": float(v) for i, v in enumerate(mean + rng.normal(0, sd, n))}


def test_the_bootstrap_is_seeded_by_the_case_ids_alone():
    improvement = noisy(0.01, 12, 0, 0.05)
    first = policy.paired_bootstrap(improvement)
    assert policy.paired_bootstrap(dict(reversed(list(improvement.items())))) == first  # order does not matter
    assert first.cases == 12 and first.confidence == 0.95 and first.low < first.mean < first.high
    renamed = {f"other-{k}": v for k, v in improvement.items()}  # other cases: another seed, another interval
    assert policy.bootstrap_seed(list(renamed)) != policy.bootstrap_seed(list(improvement))
    assert policy.paired_bootstrap(renamed).low != first.low
    assert policy.RESAMPLES == 2000
    # the interval is the percentile interval of 2000 resampled means drawn from that seed
    ids = sorted(improvement)
    values = np.array([improvement[c] for c in ids])
    rng = np.random.default_rng(policy.bootstrap_seed(ids))
    means = values[rng.integers(0, len(ids), size=(2000, len(ids)))].mean(axis=1)
    assert (first.low, first.high) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])), abs=1e-15)


def test_a_clearly_better_candidate_passes_the_relative_gate():
    champion = {"dice": noisy(0.70, 10, 1, 0.08)}
    candidate = {"dice": {c: v + 0.06 + 0.01 * (i % 3) for i, (c, v) in enumerate(champion["dice"].items())}}
    gate = policy.relative_gate(candidate, champion, "dice", 0.02)
    assert gate.passed, gate.detail
    assert gate.gate == "vs_champion_dice" and gate.threshold == 0.02 and gate.value > 0.02
    assert "on 10 test cases" in gate.detail and "95% interval" in gate.detail


def test_a_tiny_margin_in_the_noise_fails_though_the_mean_beats_the_champion():
    champion = {"dice": noisy(0.80, 8, 2, 0.05)}
    # the mean improvement (0.006) clears 0.005; case by case it is noise: +0.046 on half, -0.034 on the rest
    shifts = {c: 0.046 if i % 2 else -0.034 for i, c in enumerate(sorted(champion["dice"]))}
    candidate = {"dice": {c: champion["dice"][c] + shifts[c] for c in champion["dice"]}}
    mean_gain = float(np.mean([candidate["dice"][c] - champion["dice"][c] for c in champion["dice"]]))
    assert mean_gain > 0.005  # the mean comparison of before would promote
    gate = policy.relative_gate(candidate, champion, "dice", 0.005)
    assert not gate.passed and gate.value < 0.005
    assert "its lower bound does not beat the champion by 0.0050" in gate.detail


def test_a_lower_is_better_metric_is_compared_in_its_direction():
    champion = {"hausdorff95": {f"c{i}": 10.0 + i for i in range(6)}}
    better = {"hausdorff95": {c: v - 2.0 for c, v in champion["hausdorff95"].items()}}
    assert policy.relative_gate(better, champion, "hausdorff95", 1.0).passed
    assert not policy.relative_gate(champion, better, "hausdorff95", 0.0).passed


@pytest.mark.parametrize("n, passed", [(4, False), (5, True)])
def test_fewer_test_cases_than_min_test_cases_fail_with_that_reason(n, passed):
    champion = per_case(0.5, n)
    candidate = per_case(0.9, n)  # far better on every case: only the count can fail it
    decision = policy.decide({"dice": 0.9}, {"dice": 0.5}, Gates(min_dice=0.1, require_lineage=[]),
                             candidate_cases=candidate, champion_cases=champion)
    assert decision.promote is passed
    if not passed:
        assert decision.reasons == ["dice compared on 4 paired test cases: the relative gate needs at least 5 "
                                    "(promote.gates.min_test_cases)"]
        assert by_gate(decision) == {"min_dice": True, "vs_champion_dice": False}


def test_the_relative_gate_needs_per_case_scores_and_pairs_only_shared_cases():
    gates = Gates(min_dice=0.1, require_lineage=[], min_test_cases=3)
    means_only = policy.decide({"dice": 0.9}, {"dice": 0.5}, gates)  # a champion, but no cases: never by the means
    assert not means_only.promote and "compared on 0 paired test cases" in means_only.reasons[0]
    kept_as_means = policy.decide({"dice": 0.9}, {"dice": 0.5}, gates, candidate_cases=per_case(0.9),
                                  champion_cases={"dice": 0.5})
    assert not kept_as_means.promote and "compared on 0 paired" in kept_as_means.reasons[0]
    other = {"dice": {f"other-{i}": 0.5 for i in range(8)}}  # scored on other cases: nothing to pair
    assert not policy.decide({"dice": 0.9}, {"dice": 0.5}, gates, candidate_cases=per_case(0.9),
                             champion_cases=other).promote
    nan = per_case(0.9)
    nan["dice"]["case-0"] = float("nan")
    gate = policy.relative_gate(nan, per_case(0.5), "dice", 0.0)
    assert not gate.passed and "not finite" in gate.detail


def test_confidence_and_min_test_cases_are_spec_keys(demo_spec_path):
    spec = load_spec(demo_spec_path, sets=["promote.gates.confidence=0.9", "promote.gates.min_test_cases=7"])
    assert (spec.promote.gates.confidence, spec.promote.gates.min_test_cases) == (0.9, 7)
    assert (Gates().confidence, Gates().min_test_cases) == (0.95, 5)
    with pytest.raises(SpecError, match="confidence"):
        load_spec(demo_spec_path, sets=["promote.gates.confidence=1.5"])
    with pytest.raises(SpecError, match="min_test_cases"):
        load_spec(demo_spec_path, sets=["promote.gates.min_test_cases=0"])
    wide = policy.relative_gate(per_case(0.56, 8, 0.1), per_case(0.5, 8, 0.0), "dice", 0.0, confidence=0.99)
    narrow = policy.relative_gate(per_case(0.56, 8, 0.1), per_case(0.5, 8, 0.0), "dice", 0.0, confidence=0.5)
    assert wide.value < narrow.value


# ---------------------------------------------------------------- the spec keys


def test_existing_gate_keys_keep_working(demo_spec_path):
    spec = load_spec(demo_spec_path)
    assert spec.promote.gates.min_dice == pytest.approx(0.60) and spec.promote.gates.relative_metric == "dice"
    assert spec.promote.gates.absolute == {} and spec.promote.gates.flip_tolerance is None


def test_gates_on_hausdorff_need_it_computed(demo_spec_path, tmp_path):
    data = yaml.safe_load(demo_spec_path.read_text())
    ok = copy.deepcopy(data)
    ok["evaluate"]["metrics"] = ["hausdorff95"]
    ok["promote"]["gates"] = {"min_dice": None, "relative_metric": "hausdorff95", "absolute": {"hausdorff95": 15}}
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(ok))
    assert load_spec(tmp_path / "ok.yaml").promote.gates.absolute == {"hausdorff95": 15.0}
    bad = copy.deepcopy(data)
    bad["evaluate"]["metrics"] = ["dice"]
    bad["promote"]["gates"]["absolute"] = {"hausdorff95_1": 15}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(SpecError, match=r"absolute.hausdorff95_1\) need the metric 'hausdorff95'"):
        load_spec(tmp_path / "bad.yaml")


def test_measure_behaviour_of_a_real_segmenter(tiny_model_config, tiny_weights):
    from voxelflow.learn.model import Segmenter

    model = Segmenter(tiny_model_config, tiny_weights[0])
    rng = np.random.default_rng(0)
    volume = rng.random((20, 18, 14), dtype=np.float32)
    measured = policy.measure_behaviour(model.segment, volume)
    assert set(measured) == {"flip_disagreement", "empty_volume_foreground", "nonfinite_outputs"}
    assert 0.0 <= measured["flip_disagreement"] <= 1.0 and measured["nonfinite_outputs"] == 0.0
    mask, mirrored = model.segment(volume), np.flip(model.segment(np.ascontiguousarray(volume[::-1])), 0)
    assert measured["flip_disagreement"] == pytest.approx(float(np.mean(mask != mirrored)))
    assert measured["empty_volume_foreground"] == float(np.count_nonzero(model.segment(np.zeros_like(volume))))
