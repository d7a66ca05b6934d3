"""Sides and metrics, each against expectations computed by hand."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from voxelflow.learn import evaluate


def ids(n: int, start: int = 0) -> list[str]:
    return [f"case-{hashlib.sha256(str(i).encode()).hexdigest()[:16]}" for i in range(start, start + n)]


# ---------------------------------------------------------------- split


def test_split_position_is_the_salted_hash_read_as_a_fraction():
    cid = "case-0123456789abcdef"
    digest = hashlib.sha256(b"voxelflow-split-v1:" + cid.encode()).digest()
    assert evaluate.split_position(cid) == int.from_bytes(digest[:8], "big") / 2**64


def test_each_side_is_the_range_of_positions_its_fractions_name():
    cases = ids(300)
    train, val, test = evaluate.sides(cases, 0.2, 0.25)
    assert sorted(train + val + test) == sorted(cases)
    assert not set(train) & set(val) and not set(val) & set(test) and not set(train) & set(test)
    assert all(evaluate.split_position(c) < 0.2 for c in test)
    assert all(0.2 <= evaluate.split_position(c) < 0.45 for c in val)
    assert all(evaluate.split_position(c) >= 0.45 for c in train)
    assert 30 <= len(test) <= 90 and 40 <= len(val) <= 110  # about a fifth and a quarter of 300


def test_sides_ignore_the_order_of_their_input():
    cases = ids(30)
    assert evaluate.sides(cases, 0.2, 0.3) == evaluate.sides(list(reversed(cases)), 0.2, 0.3)


def test_an_empty_side_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="no case falls on the .* side.*evaluate"):
        evaluate.sides(ids(2), 0.3, 0.3)
    with pytest.raises(ValueError, match="between 0 and 1"):
        evaluate.sides(ids(10), 0.2, 1.0)


# ---------------------------------------------------------------- Dice


def test_dice_by_hand_binary():
    pred = np.zeros((4, 4, 4), np.uint8)
    truth = np.zeros((4, 4, 4), np.uint8)
    pred[0, 0, :4] = 1  # 4 voxels
    truth[0, 0, 2:4] = 1  # 2 voxels, both inside pred
    assert evaluate.dice(pred, truth) == pytest.approx(2 * 2 / (4 + 2))


def test_dice_per_class_counts_each_class_on_its_own():
    truth = np.zeros((2, 2, 2), np.uint8)
    pred = np.zeros((2, 2, 2), np.uint8)
    truth[0] = 1  # class 1: 4 voxels
    truth[1, 0] = 2  # class 2: 2 voxels
    pred[0] = 1
    pred[1] = 2  # class 2: 4 voxels, 2 of them right
    assert evaluate.dice_per_class(pred, truth, 3) == pytest.approx([1.0, 2 * 2 / (4 + 2)])
    # a label 2 predicted as "foreground" would score 1.0 under pred > 0; by class it does not
    assert evaluate.dice(pred, truth, 3) == pytest.approx((1.0 + 2 / 3) / 2)


def test_a_missed_structure_scores_zero_and_one_absent_from_both_scores_one():
    truth = np.zeros((3, 3, 3), np.uint8)
    truth[1, 1, 1] = 1
    empty = np.zeros_like(truth)
    assert evaluate.dice(empty, truth) == 0.0
    assert evaluate.dice(empty, empty) == 1.0
    assert evaluate.dice(truth, empty) == 0.0


# ---------------------------------------------------------------- HD95


def test_hd95_by_hand_for_a_shifted_plane():
    """Two parallel planes 2 voxels apart along an axis of 1.5 mm spacing: every surface distance is 3 mm."""
    pred = np.zeros((8, 8, 8), np.uint8)
    truth = np.zeros((8, 8, 8), np.uint8)
    pred[2] = 1
    truth[4] = 1
    assert evaluate.hausdorff95(pred, truth, (1.5, 1.0, 1.0)) == pytest.approx(3.0)


def test_hd95_of_identical_masks_is_zero():
    m = np.zeros((6, 6, 6), np.uint8)
    m[2:4, 2:4, 2:4] = 1
    assert evaluate.hausdorff95(m, m, (1.0, 1.0, 1.0)) == 0.0


def test_hd95_of_a_missed_structure_is_the_diagonal_never_nan():
    truth = np.zeros((10, 20, 30), np.uint8)
    truth[5, 5, 5] = 1
    empty = np.zeros_like(truth)
    diagonal = math.sqrt((10 * 2.0) ** 2 + (20 * 1.0) ** 2 + (30 * 0.5) ** 2)
    assert evaluate.hausdorff95(empty, truth, (2.0, 1.0, 0.5)) == pytest.approx(diagonal)
    assert evaluate.hausdorff95(truth, empty, (2.0, 1.0, 0.5)) == pytest.approx(diagonal)  # a false structure too
    assert evaluate.hausdorff95(empty, empty, (2.0, 1.0, 0.5)) == 0.0


# ---------------------------------------------------------------- names and directions


def test_metric_names_and_directions():
    assert evaluate.metric_names(["dice", "hausdorff95"], 3) == [
        "dice", "dice_1", "dice_2", "hausdorff95", "hausdorff95_1", "hausdorff95_2"]
    assert evaluate.direction("dice") and evaluate.direction("dice_2")
    assert not evaluate.direction("hausdorff95") and not evaluate.direction("hausdorff95_1")
    with pytest.raises(KeyError, match="unknown metric"):
        evaluate.direction("accuracy")


def test_a_spec_states_the_metric_names_it_computes(demo_data):
    from voxelflow.spec.config import PipelineSpec

    demo_data["train"]["network"]["UNet"]["out_channels"] = 3
    demo_data["evaluate"]["metrics"] = ["dice", "hausdorff95"]
    spec = PipelineSpec.model_validate(demo_data)
    assert spec.computed_metrics() == ["dice", "dice_1", "dice_2", "hausdorff95", "hausdorff95_1", "hausdorff95_2"]
    assert spec.computed_metrics() == evaluate.metric_names(spec.evaluate.metrics, 3)


@pytest.mark.parametrize("gates, named", [
    ({"absolute": {"dice_2": 0.5}}, "absolute.dice_2"),  # two classes: background and class 1 only
    ({"relative_metric": "dice_7"}, "relative_metric"),
    ({"absolute": {"hausdorff95_0": 10.0}}, "absolute.hausdorff95_0"),  # background is not scored
])
def test_gates_naming_a_metric_the_spec_does_not_compute_are_refused_at_load(demo_data, tmp_path, gates, named):
    import yaml

    from voxelflow.spec.config import SpecError, load_spec

    demo_data["evaluate"]["metrics"] = ["dice", "hausdorff95"]
    demo_data["promote"]["gates"].update(gates)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(demo_data))
    with pytest.raises(SpecError, match=rf"promote.gates.{named} names the metric .*computed: \['dice', 'dice_1'"):
        load_spec(path)


def test_gates_on_a_computed_class_metric_load(demo_data):
    from voxelflow.spec.config import PipelineSpec

    demo_data["evaluate"]["metrics"] = ["dice", "hausdorff95"]
    demo_data["promote"]["gates"].update({"absolute": {"dice_1": 0.5, "hausdorff95_1": 20.0},
                                          "relative_metric": "hausdorff95_1"})
    spec = PipelineSpec.model_validate(demo_data)
    assert spec.promote.gates.absolute == {"dice_1": 0.5, "hausdorff95_1": 20.0}


# ---------------------------------------------------------------- score over cases


def test_score_counts_every_case_and_reports_per_class(tmp_path):
    from voxelflow.core.storage import CaseStore, Store
    from voxelflow.data.ingest import Volume, write_case

    raw = CaseStore(Store(tmp_path), "raw")
    truth = np.zeros((6, 6, 6), np.uint8)
    truth[1:3, 1:3, 1:3] = 1
    truth[4:6, 4:6, 4:6] = 2

    image = Volume(np.zeros((6, 6, 6), np.float32), np.eye(4), (1.0, 1.0, 1.0))
    for cid in ("case-a", "case-b"):
        write_case(raw, cid, image, truth, {"spacing": [1.0, 1.0, 1.0], "affine": np.eye(4).tolist()})

    def segment(image, affine):  # right on class 1, misses class 2, on both cases
        out = truth.copy()
        out[out == 2] = 0
        return out

    scores = evaluate.score(segment, raw, ["case-a", "case-b"], ["dice", "hausdorff95"], n_classes=3)
    assert scores["dice_1"] == 1.0 and scores["dice_2"] == 0.0 and scores["dice"] == 0.5
    cases = evaluate.score_cases(segment, raw, ["case-a", "case-b"], ["dice", "hausdorff95"], n_classes=3)
    assert cases["dice"] == {"case-a": 0.5, "case-b": 0.5} and cases["dice_2"] == {"case-a": 0.0, "case-b": 0.0}
    assert evaluate.means(cases) == scores
    assert scores["hausdorff95_1"] == 0.0
    assert scores["hausdorff95_2"] == pytest.approx(math.sqrt(3 * 36))  # the 6x6x6 mm diagonal
    assert set(scores) == set(evaluate.metric_names(["dice", "hausdorff95"], 3))


# ---------------------------------------------------------------- user metrics by import path

USER_METRICS = '''
import torch

def volume_error(y_pred, y, include_background=True, spacing=None, scale=1.0):
    """|predicted - true| volume per class, in ml: lower is better."""
    voxel_ml = float(torch.tensor(spacing).prod()) / 1000.0
    err = (y_pred.sum(dim=(2, 3, 4)) - y.sum(dim=(2, 3, 4))).abs() * voxel_ml * scale
    return err if include_background else err[:, 1:]

def no_pair(y_pred):
    return y_pred

def total(y_pred, y):
    return y_pred.sum()
'''


@pytest.fixture
def user_metrics(tmp_path, monkeypatch):
    (tmp_path / "vf_user_metrics.py").write_text(USER_METRICS)
    monkeypatch.syspath_prepend(str(tmp_path))
    # the user's package is allowed, and so is one that does not exist, so that its absence is what is refused
    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,torch,voxelflow,vf_user_metrics,nosuchpackage")
    yield "vf_user_metrics"


def _scored_cases(tmp_path):
    from voxelflow.core.storage import CaseStore, Store
    from voxelflow.data.ingest import Volume, write_case

    raw = CaseStore(Store(tmp_path / "store"), "raw")
    truth = np.zeros((6, 6, 6), np.uint8)
    truth[1:3, 1:3, 1:3] = 1  # 8 voxels
    truth[3:6, 3:6, 3:6] = 2  # 27 voxels
    image = Volume(np.zeros((6, 6, 6), np.float32), np.eye(4) * [2, 2, 2, 1], (2.0, 2.0, 2.0))
    write_case(raw, "case-a", image, truth, {"spacing": [2.0, 2.0, 2.0], "affine": image.affine.tolist()})

    def segment(image, affine):  # class 1 right; class 2 grown by one slab of 9 voxels
        out = truth.copy()
        out[2, 3:6, 3:6] = 2
        return out
    return raw, segment


def test_custom_metrics_by_import_path_are_scored_per_class(tmp_path, user_metrics, demo_data):
    from voxelflow.spec.config import EvaluateSpec

    spec = EvaluateSpec.model_validate({
        "metrics": ["dice", "iou", "miou", "volume_error"],
        "custom_metrics": {
            "iou": {"function": "monai.metrics:compute_iou", "higher_is_better": True},
            "miou": {"function": "monai.metrics:MeanIoU", "higher_is_better": True},
            "volume_error": {"function": f"{user_metrics}:volume_error", "higher_is_better": False,
                             "args": {"scale": 2.0}},
        }})
    raw, segment = _scored_cases(tmp_path)
    custom = {k: v.model_dump() for k, v in spec.custom_metrics.items()}
    scores = evaluate.score(segment, raw, ["case-a"], spec.metrics, 3, custom)
    # class 2: 27 true voxels, 36 predicted, 27 shared
    assert scores["dice_1"] == 1.0 and scores["dice_2"] == pytest.approx(2 * 27 / (27 + 36))
    assert scores["iou_1"] == 1.0 and scores["iou_2"] == pytest.approx(27 / 36)
    assert scores["miou_2"] == pytest.approx(scores["iou_2"]) and scores["miou"] == pytest.approx(scores["iou"])
    # the spacing reached the user's function (8 ml voxels) and so did its argument (x2)
    assert scores["volume_error_1"] == 0.0 and scores["volume_error_2"] == pytest.approx(9 * 8 / 1000 * 2)
    assert spec.directions() == {"dice": True, "iou": True, "miou": True, "volume_error": False}


def test_a_custom_metrics_direction_drives_its_gates(user_metrics):
    from voxelflow.release import policy
    from voxelflow.spec.config import Gates

    directions = {"volume_error": False}
    gates = Gates(min_dice=None, absolute={"volume_error": 5.0}, relative_metric="volume_error",
                  require_lineage=[])
    champion = {"volume_error": {f"c{i}": 4.5 + 0.01 * i for i in range(6)}}

    def cases(shift: float) -> dict:
        return {"volume_error": {c: v + shift for c, v in champion["volume_error"].items()}}

    good = policy.decide({"volume_error": 4.0}, {"volume_error": 4.5}, gates, directions=directions,
                         candidate_cases=cases(-0.5), champion_cases=champion)
    assert good.promote, good.reasons
    assert [g.gate for g in good.gates] == ["max_volume_error", "vs_champion_volume_error"]
    worse = policy.decide({"volume_error": 4.8}, {"volume_error": 4.5}, gates, directions=directions,
                          candidate_cases=cases(0.3), champion_cases=champion)
    assert not worse.promote and "does not beat" in worse.reasons[0]
    with pytest.raises(KeyError, match="unknown metric"):
        policy.decide({"volume_error": 4.0}, None, gates)  # no direction known: never guessed


def test_a_spec_gating_on_a_custom_metric_loads(demo_data, user_metrics):
    from voxelflow.spec.config import PipelineSpec

    demo_data["evaluate"]["metrics"] = ["dice", "volume_error"]
    demo_data["evaluate"]["custom_metrics"] = {
        "volume_error": {"function": f"{user_metrics}:volume_error", "higher_is_better": False}}
    demo_data["promote"]["gates"].update({"absolute": {"volume_error_1": 3.0}, "relative_metric": "volume_error"})
    spec = PipelineSpec.model_validate(demo_data)
    assert "volume_error_1" in spec.computed_metrics()


@pytest.mark.parametrize("evaluate_spec, message", [
    ({"metrics": ["dice", "accuracy"]}, "unknown metric 'accuracy'"),
    ({"metrics": ["dice"], "custom_metrics": {"iou": {"function": "monai.metrics:compute_iou",
                                                      "higher_is_better": True}}},
     "defines 'iou', which evaluate.metrics does not list"),
    ({"metrics": ["dice"], "custom_metrics": {"dice": {"function": "monai.metrics:compute_iou",
                                                       "higher_is_better": True}}}, "built-in metric"),
    ({"metrics": ["iou_2"], "custom_metrics": {"iou_2": {"function": "monai.metrics:compute_iou",
                                                         "higher_is_better": True}}}, "not a usable metric name"),
    ({"metrics": ["iou"], "custom_metrics": {"iou": {"function": "nosuchpackage.metrics:iou",
                                                     "higher_is_better": True}}}, "cannot import 'nosuchpackage"),
    ({"metrics": ["iou"], "custom_metrics": {"iou": {"function": "monai.metrics:no_such_metric",
                                                     "higher_is_better": True}}}, "no function or class"),
    ({"metrics": ["iou"], "custom_metrics": {"iou": {"function": "monai.metrics:compute_iou",
                                                     "higher_is_better": True, "args": {"smooth": 1}}}},
     "has no argument smooth"),
    ({"metrics": ["iou"], "custom_metrics": {"iou": {"function": "monai.metrics:compute_iou",
                                                     "higher_is_better": True,
                                                     "args": {"include_background": "abc"}}}}, "does not fit"),
    ({"metrics": ["iou"], "custom_metrics": {"iou": {"function": "monai.metrics:compute_iou"}}},
     "higher_is_better"),
    ({"metrics": ["p"], "custom_metrics": {"p": {"function": "vf_user_metrics:no_pair", "higher_is_better": True}}},
     r"must take \(y_pred, y\)"),
])
def test_bad_custom_metrics_are_refused_at_load(evaluate_spec, message, user_metrics):
    from pydantic import ValidationError

    from voxelflow.spec.config import EvaluateSpec

    with pytest.raises(ValidationError, match=message):
        EvaluateSpec.model_validate(evaluate_spec)


def test_a_custom_metric_returning_the_wrong_shape_is_a_clear_error(tmp_path, user_metrics):
    from voxelflow.spec.config import CustomMetric

    raw, segment = _scored_cases(tmp_path)
    metric = CustomMetric(function=f"{user_metrics}:total", higher_is_better=True)  # one number, not one per class
    with pytest.raises(ValueError, match="returned 1 values for 3 classes"):
        evaluate.score(segment, raw, ["case-a"], ["s"], 3, {"s": metric})
