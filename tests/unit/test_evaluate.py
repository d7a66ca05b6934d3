"""Split and metrics, each against expectations computed by hand."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from voxelflow import evaluate


def ids(n: int, start: int = 0) -> list[str]:
    return [f"case-{hashlib.sha256(str(i).encode()).hexdigest()[:16]}" for i in range(start, start + n)]


# ---------------------------------------------------------------- split


def test_split_position_is_the_salted_hash_read_as_a_fraction():
    cid = "case-0123456789abcdef"
    digest = hashlib.sha256(b"voxelflow-split-v1:" + cid.encode()).digest()
    assert evaluate.split_position(cid) == int.from_bytes(digest[:8], "big") / 2**64


def test_a_case_is_held_out_exactly_when_its_position_is_below_the_fraction():
    cases = ids(200)
    train, val = evaluate.split(cases, 0.2)
    assert sorted(train + val) == sorted(cases) and not set(train) & set(val)
    assert all(evaluate.split_position(c) < 0.2 for c in val)
    assert all(evaluate.split_position(c) >= 0.2 for c in train)
    assert 20 <= len(val) <= 60  # about a fifth of 200


def test_adding_cases_never_moves_an_old_case_across():
    old = ids(40)
    train0, val0 = evaluate.split(old, 0.25)
    train1, val1 = evaluate.split(old + ids(160, start=40), 0.25)
    assert set(val0) <= set(val1) and set(train0) <= set(train1)
    assert val1 != val0  # some of the new cases were held out too


def test_split_ignores_the_order_of_its_input():
    cases = ids(30)
    assert evaluate.split(cases, 0.3) == evaluate.split(list(reversed(cases)), 0.3)


def test_an_empty_side_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="val_fraction"):
        evaluate.split(ids(1), 0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        evaluate.split(ids(10), 1.0)


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
    from voxelflow.config import PipelineSpec

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

    from voxelflow.config import SpecError, load_spec

    demo_data["evaluate"]["metrics"] = ["dice", "hausdorff95"]
    demo_data["promote"]["gates"].update(gates)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(demo_data))
    with pytest.raises(SpecError, match=rf"promote.gates.{named} names the metric .*computed: \['dice', 'dice_1'"):
        load_spec(path)


def test_gates_on_a_computed_class_metric_load(demo_data):
    from voxelflow.config import PipelineSpec

    demo_data["evaluate"]["metrics"] = ["dice", "hausdorff95"]
    demo_data["promote"]["gates"].update({"absolute": {"dice_1": 0.5, "hausdorff95_1": 20.0},
                                          "relative_metric": "hausdorff95_1"})
    spec = PipelineSpec.model_validate(demo_data)
    assert spec.promote.gates.absolute == {"dice_1": 0.5, "hausdorff95_1": 20.0}


# ---------------------------------------------------------------- score over cases


def test_score_counts_every_case_and_reports_per_class(tmp_path):
    from voxelflow.ingest import Volume, write_case
    from voxelflow.storage import CaseStore, Store

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
    assert scores["hausdorff95_1"] == 0.0
    assert scores["hausdorff95_2"] == pytest.approx(math.sqrt(3 * 36))  # the 6x6x6 mm diagonal
    assert set(scores) == set(evaluate.metric_names(["dice", "hausdorff95"], 3))
