"""Label values outside ``0..out_channels-1`` are refused by evaluation too, naming the case and the
values: they were clamped into the last class, so a label of 3 scored as class 1."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from voxelflow.core.storage import CaseStore, Store
from voxelflow.learn.evaluate import dice_per_class, hausdorff95_per_class, score_cases
from voxelflow.learn.train import label_problems, present_values


def ball(value: int) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(12)] * 3, indexing="ij"))
    return ((np.sqrt(((grid - 6) ** 2).sum(0)) < 4) * value).astype(np.uint8)


def test_metrics_refuse_label_values_the_classes_do_not_hold():
    pred = ball(1)
    assert dice_per_class(pred, ball(1), 2) == [1.0]
    with pytest.raises(ValueError, match=r"label-values: \[3\] outside 0\.\.1"):
        dice_per_class(pred, ball(3), 2)  # was clamped to class 1: dice 1.0
    with pytest.raises(ValueError, match=r"label-values: \[3\] outside 0\.\.1"):
        hausdorff95_per_class(pred, ball(3), (1.0, 1.0, 1.0), 2)
    assert dice_per_class(ball(3), ball(3), 4)[2] == 1.0  # four classes hold 3


def test_evaluation_names_the_case_whose_label_holds_values_outside_the_classes(tmp_path):
    raw = CaseStore(Store(tmp_path / "store"), "raw")
    dims = ("x", "y", "z")
    for cid, label in [("good", ball(1)), ("bad", ball(3))]:
        raw.write(cid, xr.Dataset({"image": (dims, label.astype(np.float32)), "label": (dims, label)},
                                  attrs={"affine": np.eye(4).tolist(), "spacing": [1.0, 1.0, 1.0]}))
    segmented = []

    def segment(image, affine):
        segmented.append(image.shape)
        return (image > 0).astype(np.uint8)

    assert score_cases(segment, raw, ["good"], ["dice"], 2)["dice"] == {"good": 1.0}
    with pytest.raises(ValueError, match=r"label-values: case bad holds label values \[3\] outside 0\.\.1"):
        score_cases(segment, raw, ["bad"], ["dice"], 2)
    assert len(segmented) == 1  # refused before it was segmented


def test_label_values_present_and_outside():
    label = ball(2)
    assert present_values(label) == [0, 2]
    assert present_values(label.astype(np.int16)) == [0, 2]
    assert label_problems({"a": [0, 1], "b": [0, 2, 5]}, 2) == {"b": [2, 5]}
