"""RandCropByPosNegLabeld's centres drawn from sampled voxels (voxelflow.learn.sampling): the same law as MONAI's
scan of the whole label, the same patches for the same seed, MONAI's exact path where a kind is too rare."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import RandCropByPosNegLabeld
from monai.transforms.utils import map_binary_to_indices

from voxelflow.learn import sampling
from voxelflow.learn.cases import TrainingSet, build_augment

CROP = {"keys": ["image", "label"], "label_key": "label", "spatial_size": [8, 8, 8], "pos": 1, "neg": 1,
        "num_samples": 4}


def volume(fg_box=(slice(10, 22), slice(12, 20), slice(8, 24)), shape=(32, 32, 32)):
    label = torch.zeros((1, *shape))
    label[(0, *fg_box)] = 1
    image = torch.rand((1, *shape))
    return {"image": image, "label": label}


def test_sampled_voxels_are_of_their_kind_and_cover_it_uniformly():
    data = volume()
    exact_fg, exact_bg = map_binary_to_indices(data["label"], None, 0.0)
    rng = np.random.default_rng(0)
    drawn = [sampling.sampled_indices(data["label"], None, 0.0, 1000, rng) for _ in range(20)]
    fg, bg = np.concatenate([d[0] for d in drawn]), np.concatenate([d[1] for d in drawn])
    assert len(fg) == len(bg) == 20000  # sampled (the exact scan would give each voxel once)
    assert set(fg.tolist()) <= set(exact_fg.tolist()) and set(bg.tolist()) <= set(exact_bg.tolist())
    # uniform over the foreground: every foreground voxel drawn about as often (12*8*16 = 1536 voxels, 20000 draws)
    counts = np.bincount(np.searchsorted(np.sort(exact_fg.numpy()), fg), minlength=len(exact_fg))
    assert counts.min() > 0 and counts.mean() == pytest.approx(20000 / len(exact_fg))
    assert np.std(counts) < 3 * np.sqrt(counts.mean())  # binomial spread, not a bias toward some voxels


def test_background_keeps_the_image_threshold_as_monai_defines_it():
    data = volume()
    data["image"][:, :16] = -1.0  # half the volume below the threshold: no background centre there
    fg, bg = sampling.sampled_indices(data["label"], data["image"], 0.0, 1000, np.random.default_rng(1))
    assert len(fg) == len(bg) == 1000
    exact_fg, exact_bg = map_binary_to_indices(data["label"], data["image"], 0.0)
    assert set(bg.tolist()) <= set(exact_bg.tolist()) and set(fg.tolist()) <= set(exact_fg.tolist())
    assert (np.unravel_index(bg, (32, 32, 32))[0] >= 16).all()


def test_a_kind_too_rare_for_the_probes_takes_monai_s_exact_scan():
    data = volume(fg_box=(slice(3, 4), slice(5, 6), slice(7, 8)), shape=(64, 64, 64))  # one voxel in 262144
    fg, bg = sampling.sampled_indices(data["label"], None, 0.0, 128, np.random.default_rng(2))
    exact_fg, exact_bg = map_binary_to_indices(data["label"], None, 0.0)
    assert torch.equal(torch.as_tensor(fg), torch.as_tensor(exact_fg)) and len(bg) == len(exact_bg)


def test_the_crop_draws_positive_patches_around_foreground_and_repeats_for_a_seed():
    crop = build_augment([{"RandCropByPosNegLabeld": {**CROP, "pos": 3, "neg": 1}}])
    (t,) = crop.transforms
    assert type(t) is sampling.SampledPosNegCropd
    data = volume()
    with_fg = []
    for seed in range(50):
        t.set_random_state(seed)
        patches = t(data)
        with_fg += [float(p["label"].sum() > 0) for p in patches]
        t.set_random_state(seed)
        again = t(data)
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(patches, again))
    # pos 3 : neg 1 -> three quarters of the centres on the foreground (every such patch holds some); a
    # background centre's patch may reach into the box too
    assert np.mean(with_fg) >= 0.7


def test_the_law_of_the_centres_matches_monai_s_scan():
    """Mean centre position and the share of foreground centres over many draws, sampled against exact."""
    data = volume()

    def centres(transform) -> np.ndarray:
        out = []
        for seed in range(300):
            transform.set_random_state(seed)
            transform.randomize(data["label"], None, None, None)
            out += [np.array(c, dtype=float) for c in transform.cropper.centers]
        return np.array(out)

    exact = centres(RandCropByPosNegLabeld(**CROP))
    sampled = centres(build_augment([{"RandCropByPosNegLabeld": CROP}]).transforms[0])
    assert np.abs(exact.mean(0) - sampled.mean(0)).max() < 0.6  # voxels; the centres' std is about 6
    inside = [((c[0] >= 10) & (c[0] < 22) & (c[1] >= 12) & (c[1] < 20) & (c[2] >= 8) & (c[2] < 24)).mean()
              for c in (exact.T, sampled.T)]
    assert abs(inside[0] - inside[1]) < 0.06


def test_indices_the_data_carry_are_used_as_given():
    crop = build_augment([{"RandCropByPosNegLabeld": {**CROP, "fg_indices_key": "fg", "bg_indices_key": "bg"}}])
    (t,) = crop.transforms
    assert type(t) is RandCropByPosNegLabeld  # the user's own indices: MONAI's transform unchanged


def test_a_training_set_draws_through_the_sampled_crop():
    class Cases(list):
        def shapes(self):
            return [tuple(c["image"].shape[1:]) for c in self]

    data = volume()
    cases = Cases([{"image": data["image"].numpy(), "label": data["label"].numpy()}])
    drawn = TrainingSet(cases, [{"RandCropByPosNegLabeld": CROP}], seed=3)
    first, again = drawn[(0, 0)], drawn[(0, 0)]
    assert len(first) == 4 and all(tuple(p["image"].shape) == (1, 8, 8, 8) for p in first)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))

