"""The pictures: overlays show the masks where they are, curves draw whatever history they are given."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from voxelflow.learn import report


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_an_overlay_shows_the_label_in_its_panel_and_not_in_the_image_panel():
    image = np.zeros((64, 64, 16), np.float32)
    image[:, :, :] = np.linspace(0, 1, 64)[:, None, None]
    label = np.zeros(image.shape, np.uint8)
    label[40:60, 5:20, 8] = 1  # high x, low y: right side, bottom of the picture
    picture = decode(report.overlay_png(image, label, None, title="case 1"))
    assert picture.shape[1] > 2 * 256  # two panels of 256 px (64 scaled by 4)

    def reddish(a):
        return (a[..., 0].astype(int) - a[..., 2].astype(int)) > 60

    height = picture.shape[0]
    left, right = picture[:, :picture.shape[1] // 2], picture[:, picture.shape[1] // 2:]
    assert not reddish(left).any()
    rows, cols = np.nonzero(reddish(right))
    assert rows.min() > height // 2  # low y is drawn at the bottom
    assert cols.mean() > right.shape[1] * 0.5  # high x to the right


@pytest.mark.parametrize("image", [np.zeros((8, 8, 3)), np.full((8, 8, 3), np.nan), np.random.rand(300, 20, 4)])
def test_an_overlay_of_a_flat_empty_or_odd_shaped_volume_is_still_a_picture(image):
    assert decode(report.overlay_png(image.astype(np.float32), np.zeros(image.shape, np.uint8), None)).size


@pytest.mark.parametrize("history", [[], [{"epoch": 0, "train_loss": 0.5}], [{"epoch": 0, "train_loss": float("nan")}],
                                     [{"epoch": e, "train_loss": 2.0} for e in range(3)],
                                     [{"epoch": e, "train_loss": 1 / (e + 1)} for e in range(200)]])
def test_a_curve_is_drawn_for_any_history(history):
    assert decode(report.curve_png(history)).shape == (320, 480, 3)


def test_ticks_are_round_and_cover_the_values():
    ticks = report._ticks(0.0512, 0.77)
    assert ticks[0] <= 0.0512 and ticks[-1] >= 0.77 and 3 <= len(ticks) <= 9
