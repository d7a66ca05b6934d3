"""Label maps and Dice at elementwise cost give exactly what torch.argmax and MONAI's compute_dice give."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice

from voxelflow.learn.evaluate import dice_per_class
from voxelflow.learn.labels import argmax_channels, confusion


@pytest.mark.parametrize("classes", [2, 3, 5])
@pytest.mark.parametrize("dim", [0, 1])
def test_argmax_channels_equals_torch_argmax_ties_included(classes, dim):
    g = torch.Generator().manual_seed(classes)
    shape = [4, 9, 7, 6]
    shape.insert(dim, classes)
    logits = torch.randint(-2, 3, shape, generator=g).float()  # small integers: many ties
    expected = torch.argmax(logits, dim=dim)
    got = argmax_channels(logits, dim=dim)
    assert got.dtype == torch.uint8 and got.shape == expected.shape
    assert torch.equal(got.long(), expected)


def test_argmax_channels_leaves_its_input_as_it_was():
    logits = torch.randn(3, 8, 8, 8)
    kept = logits.clone()
    argmax_channels(logits)
    assert torch.equal(logits, kept)


def monai_dice(pred, truth, n):
    def one_hot(a):
        return torch.nn.functional.one_hot(torch.as_tensor(a, dtype=torch.int64), n).movedim(-1, 0)[None]

    return [float(v) for v in compute_dice(one_hot(pred), one_hot(truth), include_background=False,
                                           ignore_empty=False)[0]]


@pytest.mark.parametrize("seed", range(6))
def test_dice_per_class_equals_monai_compute_dice_empty_classes_included(seed):
    rng = np.random.default_rng(seed)
    n = 4
    truth = rng.integers(0, n, (12, 10, 8)).astype(np.uint8)
    pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, n, truth.shape)).astype(np.uint8)
    if seed % 3 == 1:  # class 2 absent from both, class 3 from the truth only
        pred[pred == 2] = 0
        truth[truth == 2] = 0
        truth[truth == 3] = 1
    if seed % 3 == 2:  # class 1 absent from the prediction only
        pred[pred == 1] = 0
    assert dice_per_class(pred, truth, n) == pytest.approx(monai_dice(pred, truth, n), abs=1e-6)


def test_values_outside_the_classes_are_refused_never_counted():
    with pytest.raises(ValueError, match=r"label-values: \[3\] outside 0\.\.1 .* in the label"):
        confusion(np.zeros((2, 2), np.uint8), np.full((2, 2), 3, np.uint8), 2)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion(np.zeros((2, 2)), np.zeros((2, 3)), 2)


@pytest.mark.parametrize("n", [2, 15, 16, 17])
def test_confusion_counts_every_pair_alike_in_uint8_and_wider_labels(n):
    """uint8 labels of up to 16 classes are counted from one uint8 code a voxel (16 x 16 codes fill it): the
    counts are those of the int64 codes, every (truth, prediction) pair included, and 17 classes take the wide path."""
    rng = np.random.default_rng(n)
    truth = rng.integers(0, n, (9, 8, 7)).astype(np.uint8)
    pred = rng.integers(0, n, truth.shape).astype(np.uint8)
    truth.flat[: n * n], pred.flat[: n * n] = np.repeat(np.arange(n), n), np.tile(np.arange(n), n)  # every pair
    expected = np.zeros((n, n), np.int64)
    np.add.at(expected, (truth.ravel().astype(np.int64), pred.ravel().astype(np.int64)), 1)
    for a, b in ((pred, truth), (pred.astype(np.int32), truth), (pred, truth.astype(np.int64))):
        counts = confusion(a, b, n)
        assert counts.shape == (n, n) and (counts == expected).all() and counts.min() >= 1
