"""The promotion policy: each gate against hand-computed expectations, and the spec keys that drive it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml

from voxelflow import policy
from voxelflow.config import Gates, SpecError, load_spec

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


def test_superiority_needs_the_delta_in_the_better_direction():
    # dice: 0.75 + 0.05 = 0.80 is the bar
    assert policy.relative_gate({"dice": 0.80}, {"dice": 0.75}, "dice", 0.05).passed
    gate = policy.relative_gate({"dice": 0.79}, {"dice": 0.75}, "dice", 0.05)
    assert not gate.passed and gate.threshold == pytest.approx(0.80) and "does not beat" in gate.detail
    # hausdorff95: lower is better, 10 - 1 = 9 mm is the bar
    assert policy.relative_gate({"hausdorff95": 9.0}, {"hausdorff95": 10.0}, "hausdorff95", 1.0).passed
    assert not policy.relative_gate({"hausdorff95": 9.5}, {"hausdorff95": 10.0}, "hausdorff95", 1.0).passed


def test_non_inferiority_allows_a_margin_and_no_more():
    # margin 0.02 on dice: bar 0.70 - 0.02 = 0.68
    assert policy.relative_gate({"dice": 0.68}, {"dice": 0.70}, "dice", -0.02).passed
    gate = policy.relative_gate({"dice": 0.67}, {"dice": 0.70}, "dice", -0.02)
    assert not gate.passed and "within the margin" in gate.detail
    # margin 2 mm on hausdorff95: bar 10 + 2 = 12
    assert policy.relative_gate({"hausdorff95": 12.0}, {"hausdorff95": 10.0}, "hausdorff95", -2.0).passed
    assert not policy.relative_gate({"hausdorff95": 12.1}, {"hausdorff95": 10.0}, "hausdorff95", -2.0).passed


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


def test_decide_applies_every_configured_gate_and_records_each():
    gates = Gates(min_dice=0.6, beat_champion_by=-0.01, absolute={"hausdorff95": 10.0}, flip_tolerance=0.05)
    behaviour = {"flip_disagreement": 0.02, "empty_volume_foreground": 0, "nonfinite_outputs": 0}
    cand, champ = {"dice": 0.70, "hausdorff95": 8.0}, {"dice": 0.705, "hausdorff95": 9.0}
    decision = policy.decide(cand, champ, gates, behaviour, LINEAGE)
    assert decision.promote and decision.reasons == ["all gates passed"]
    assert by_gate(decision) == {"min_dice": True, "max_hausdorff95": True, "vs_champion_dice": True,
                                 "flip_consistency": True, "empty_volume": True, "finite_output": True,
                                 "lineage": True}
    tags = decision.tags()
    assert tags["voxelflow.gate.vs_champion_dice"].startswith("pass: dice 0.7000 does stay within the margin")
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
    decision = policy.decide({"hausdorff95": 8.0}, {"hausdorff95": 9.0}, gates, None, LINEAGE)
    assert decision.promote and set(by_gate(decision)) == {"max_hausdorff95", "vs_champion_hausdorff95", "lineage"}


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
    from voxelflow.model import Segmenter

    model = Segmenter(tiny_model_config, tiny_weights[0])
    rng = np.random.default_rng(0)
    volume = rng.random((20, 18, 14), dtype=np.float32)
    measured = policy.measure_behaviour(model.segment, volume)
    assert set(measured) == {"flip_disagreement", "empty_volume_foreground", "nonfinite_outputs"}
    assert 0.0 <= measured["flip_disagreement"] <= 1.0 and measured["nonfinite_outputs"] == 0.0
    mask, mirrored = model.segment(volume), np.flip(model.segment(np.ascontiguousarray(volume[::-1])), 0)
    assert measured["flip_disagreement"] == pytest.approx(float(np.mean(mask != mirrored)))
    assert measured["empty_volume_foreground"] == float(np.count_nonzero(model.segment(np.zeros_like(volume))))
