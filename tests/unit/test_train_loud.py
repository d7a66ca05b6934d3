"""Training that fails loudly: a case that cannot be drawn fails the training with its id and the
transform that raised, in the loader's thread and in worker processes alike; a training that made
fewer steps than planned is an error; cases smaller than the patch are padded before ``train.augment``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from voxelflow.core.storage import CaseStore, Store
from voxelflow.data.preprocess import case_dataset
from voxelflow.learn import train as training
from voxelflow.learn.train import (
    Checkpoints,
    DrawError,
    IncompleteTraining,
    StoreCases,
    TrainingSet,
    pad_to_patch,
    train,
)
from voxelflow.spec.config import TrainSpec

NETWORK = {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                    "channels": [4, 8], "strides": [2], "num_res_units": 0}}
PATCH = [16, 16, 16]
# image_key with image_threshold: sampling centres only where the image is above 0, as the spleen spec does
SAMPLER = [{"RandCropByPosNegLabeld": {"keys": ["image", "label"], "label_key": "label", "spatial_size": PATCH,
                                       "pos": 1, "neg": 1, "num_samples": 2, "image_key": "image",
                                       "image_threshold": 0}},
           {"RandFlipd": {"keys": ["image", "label"], "prob": 0.5, "spatial_axis": 0}}]
LOADERS = pytest.mark.parametrize("workers", [0, 2], ids=["thread", "worker-processes"])

pytestmark = pytest.mark.usefixtures("one_thread")


def ball_case(shape: tuple[int, ...], seed: int, dark: bool = False) -> dict[str, np.ndarray]:
    """A ball of label 1 in a noisy image in [0.1, 1]; ``dark``: an empty scan, image and label 0 everywhere,
    where the sampler finds no centre (no foreground, and no background above ``image_threshold``)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = np.array([s // 2 for s in shape])[:, None, None, None]
    label = (np.sqrt(((grid - centre) ** 2).sum(0)) < min(shape) // 3).astype(np.uint8)
    image = np.clip(0.5 * label + 0.3 + 0.1 * rng.standard_normal(shape), 0.1, 1.0).astype(np.float32)
    if dark:
        image[:], label[:] = 0.0, 0
    return {"image": image[None], "label": label[None], "affine": np.eye(4)}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> CaseStore:
    out = CaseStore(Store(tmp_path_factory.mktemp("loud") / "store"), "pre/abc")
    for name, shape, dark in [("case-a", (20, 24, 28), False), ("case-b", (24, 20, 22), False),
                              ("case-shallow", (24, 26, 9), False), ("case-dark", (20, 20, 20), True)]:
        out.write(name, case_dataset(ball_case(shape, len(name), dark), {}, "abc"))
    return out


def spec(**over) -> TrainSpec:
    values = dict(network=copy.deepcopy(NETWORK), epochs=2, batch_size=2, learning_rate=0.01, precision="fp32",
                  checkpoint_every_steps=50, seed=3, augment=copy.deepcopy(SAMPLER))
    values.update(over)
    return TrainSpec(**values)


def test_padding_brings_a_case_to_the_patch_size_centred_image_at_its_minimum_label_background():
    image = torch.full((1, 20, 6, 30), 0.5)
    image[0, 0, 0, 0] = 0.2
    label = torch.ones((1, 20, 6, 30), dtype=torch.uint8)
    out = pad_to_patch({"image": image, "label": label}, (16, 16, 16))
    assert tuple(out["image"].shape) == tuple(out["label"].shape) == (1, 20, 16, 30)  # larger sides untouched
    assert torch.equal(out["image"][:, :, 5:11], image) and torch.equal(out["label"][:, :, 5:11], label)
    assert torch.all(out["image"][:, :, :5] == 0.2) and torch.all(out["image"][:, :, 11:] == 0.2)
    assert torch.all(out["label"][:, :, :5] == 0) and torch.all(out["label"][:, :, 11:] == 0)
    same = {"image": image[:, :16, :, :16].contiguous(), "label": label}
    assert pad_to_patch(same, (16, 6, 16))["image"] is same["image"]  # nothing to pad: the case as it was


def test_a_case_shallower_than_the_patch_is_padded_before_augment(store):
    drawn = TrainingSet(StoreCases(store, ["case-a", "case-shallow"]), SAMPLER, seed=7, patch_size=tuple(PATCH))
    patches = drawn[(0, 1)]
    assert len(patches) == 2 and all(tuple(p["image"].shape) == (1, 16, 16, 16) for p in patches)
    assert all(set(torch.unique(torch.as_tensor(p["label"])).tolist()) <= {0, 1} for p in patches)


@LOADERS
def test_a_case_shallower_than_the_patch_trains_every_planned_step(store, tmp_path, workers):
    cases = StoreCases(store, ["case-a", "case-shallow", "case-b"], cache_bytes=10**6)
    result = train(spec(workers=workers), cases, Checkpoints(Store(tmp_path), "ck"))
    assert result.steps == result.planned_steps == 2 * 2  # 3 cases, batch 2: 2 steps an epoch
    assert [h["epoch"] for h in result.history] == [0, 1]


@LOADERS
def test_a_case_that_cannot_be_drawn_fails_training_naming_it_and_the_transform(store, tmp_path, workers):
    cases = StoreCases(store, ["case-a", "case-dark", "case-b"], cache_bytes=10**6)
    checkpoints = Checkpoints(Store(tmp_path), "ck")
    with pytest.raises(DrawError, match=r"(?s)case-dark.*RandCropByPosNegLabeld.*No sampling location"):
        train(spec(workers=workers), cases, checkpoints)
    assert checkpoints.load_best() is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # MONAI's thread dies loudly
def test_a_loader_that_ends_early_in_silence_is_refused_by_the_step_count(store, tmp_path, monkeypatch):
    """MONAI's ThreadDataLoader loses an exception of its thread and ends the epoch early: the step count
    against the plan still refuses the training."""
    from monai.data import ThreadDataLoader

    def silent(dataset, batches, workers, device):
        return ThreadDataLoader(dataset, batch_sampler=batches, num_workers=0, collate_fn=training.collate)

    monkeypatch.setattr(training, "make_loader", silent)
    cases = StoreCases(store, ["case-a", "case-b", "case-dark"], cache_bytes=10**6)
    with pytest.raises(IncompleteTraining, match=r"after \d of its 4 planned steps"):
        train(spec(), cases, Checkpoints(Store(tmp_path), "ck"))
