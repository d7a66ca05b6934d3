"""Patch-based training from the preprocessed store: cases in their own shapes, a cache budget,
augmentation by name, sliding-window validation, the best checkpoint, patience."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load

from voxelflow.core.storage import CaseStore, Store
from voxelflow.data.preprocess import case_dataset
from voxelflow.learn.train import (
    ArrayCases,
    Checkpoints,
    StoreCases,
    TrainingSet,
    Validation,
    build_network,
    load_network,
    train,
)
from voxelflow.spec.config import SpecError, TrainSpec, load_spec, validate_spec

NETWORK = {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                    "channels": [4, 8], "strides": [2], "num_res_units": 0}}
PATCHES = [{"RandCropByPosNegLabeld": {"keys": ["image", "label"], "label_key": "label",
                                       "spatial_size": [16, 16, 16], "pos": 1, "neg": 1, "num_samples": 2}},
           {"RandFlipd": {"keys": ["image", "label"], "prob": 0.5, "spatial_axis": 0}}]
SHAPES = [(20, 24, 28), (28, 20, 24), (24, 28, 20), (22, 22, 22), (26, 24, 18)]


class TinyNet(torch.nn.Module):
    """A user's own network, named in a spec by its import path."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv3d(1, channels, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv3d(channels, 2, 1))

    def forward(self, x):
        return self.body(x)


pytestmark = pytest.mark.usefixtures("one_thread")


def sphere_case(shape: tuple[int, ...], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = np.array([s // 2 for s in shape])[:, None, None, None] + rng.integers(-3, 4, size=(3, 1, 1, 1))
    label = (np.sqrt(((grid - centre) ** 2).sum(0)) < 6).astype(np.uint8)
    image = (label + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    return {"image": image[None], "label": label[None], "affine": np.eye(4)}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> CaseStore:
    """Preprocessed cases of different shapes, written as preprocessing writes them."""
    out = CaseStore(Store(tmp_path_factory.mktemp("patches") / "store"), "pre/abc")
    for i, shape in enumerate(SHAPES):
        out.write(f"case-{i}", case_dataset(sphere_case(shape, i), {}, "abc"))
    return out


def spec(**over) -> TrainSpec:
    values = dict(network=copy.deepcopy(NETWORK), epochs=3, batch_size=2, learning_rate=0.01, precision="fp32",
                  checkpoint_every_steps=50, seed=3, augment=copy.deepcopy(PATCHES))
    values.update(over)
    return TrainSpec(**values)


def test_cache_budget_holds_what_fits_and_streams_the_rest(store):
    one = 20 * 24 * 28 * 5  # float32 image + uint8 label of the first case
    cases = StoreCases(store, ["case-0", "case-1", "case-2"], cache_bytes=2 * one)
    assert cases.cached == 2 and cases.cached_bytes == 2 * one
    assert cases.shapes() == [(1, *s) for s in SHAPES[:3]]
    streamed = cases[2]  # beyond the budget: read from the store on each access
    assert isinstance(streamed["image"], np.ndarray) and streamed["image"].shape == (1, *SHAPES[2])
    assert np.array_equal(np.asarray(cases[0]["label"]), sphere_case(SHAPES[0], 0)["label"])
    assert StoreCases(store, ["case-0"], cache_bytes=0).cached == 0


def test_augmentation_is_a_pure_function_of_seed_epoch_and_case(store):
    drawn = TrainingSet(StoreCases(store, ["case-0", "case-1"]), PATCHES, seed=7)
    a, b = drawn[(0, 1)], drawn[(0, 1)]
    assert len(a) == 2 and tuple(a[0]["image"].shape) == (1, 16, 16, 16)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    other = drawn[(1, 1)]
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a, other))


def test_patches_of_cases_in_their_own_shapes_train_validate_and_keep_the_best(store, tmp_path):
    cases = StoreCases(store, ["case-0", "case-1", "case-2"], cache_bytes=10**6)
    validation = Validation(StoreCases(store, ["case-3", "case-4"]), roi_size=(16, 16, 16), every=1)
    seen = []
    result = train(spec(epochs=3), cases, Checkpoints(Store(tmp_path), "ck"), validation,
                   on_validation=lambda epoch, scores, sample: seen.append((epoch, scores, sample)))
    assert result.steps == 3 * 2  # 3 cases, batch 2 -> 2 steps an epoch; each step sees 2 x 2 patches
    dice = [h["val_epoch_dice"] for h in result.history]
    assert len(dice) == 3 and all(0 <= d <= 1 for d in dice)
    assert result.best_metric == max(dice) and result.best_epoch == dice.index(max(dice))
    assert [e for e, _, _ in seen] == [0, 1, 2]
    sample = seen[0][2]
    assert sample["pred"].shape == sample["label"].shape == SHAPES[3]  # the whole volume, window by window
    # the returned weights are the best validation's: scoring them again gives its dice
    net = load_network(NETWORK, result.weights, "cpu")
    again, _ = validation.run(net, torch.device("cpu"), "fp32")
    assert again["val_epoch_dice"] == pytest.approx(result.best_metric, abs=1e-9)


def test_patience_stops_a_run_that_no_longer_improves(store, tmp_path):
    cases = StoreCases(store, ["case-0", "case-1"])
    validation = Validation(StoreCases(store, ["case-3"]), roi_size=(16, 16, 16), every=1, patience=2)
    frozen = spec(epochs=10, optimizer={"SGD": {}}, learning_rate=1e-12)  # nothing can improve
    checkpoints = Checkpoints(Store(tmp_path), "ck")
    result = train(frozen, cases, checkpoints, validation)
    assert result.stopped_early and result.steps == 3  # the first validation, then 2 without improvement
    assert [h["epoch"] for h in result.history] == [0, 1, 2] and result.best_epoch == 0
    again = train(frozen, cases, checkpoints, validation)  # a retry of a stopped run does not train on
    assert again.steps == 3 and again.stopped_early and again.weights == result.weights


def test_worker_processes_draw_the_same_batches(store, tmp_path):
    cases = StoreCases(store, ["case-0", "case-1", "case-2"], cache_bytes=10**6)
    here = train(spec(epochs=1), cases, Checkpoints(Store(tmp_path), "here"))
    forked = train(spec(epochs=1, workers=2), cases, Checkpoints(Store(tmp_path), "forked"))
    assert forked.history == here.history and forked.weights == here.weights


def test_cases_of_different_shapes_without_patches_are_refused_with_a_way_out(store, tmp_path):
    cases = StoreCases(store, ["case-0", "case-1"])
    with pytest.raises(ValueError, match="differ in shape.*RandCropByPosNegLabeld"):
        train(spec(augment=[]), cases, Checkpoints(Store(tmp_path), "ck"))
    one = train(spec(augment=[], batch_size=1, epochs=1), cases, Checkpoints(Store(tmp_path), "one"))
    assert one.steps == 2


def test_augment_and_preprocessing_lists_are_checked_at_load():
    with pytest.raises(ValueError, match="deterministic: put it in preprocess.transforms"):
        spec(augment=[{"Orientationd": {"keys": ["image"], "axcodes": "RAS"}}])
    with pytest.raises(ValueError, match="RandFlip.*dictionary"):
        spec(augment=[{"RandFlip": {"prob": 0.5}}])
    with pytest.raises(ValueError, match="'prob'.*does not fit"):
        spec(augment=[{"RandFlipd": {"keys": ["image"], "prob": "often"}}])
    base = load_spec("deployments/specs/demo.yaml").model_dump(mode="json")
    base["preprocess"]["transforms"].append({"RandFlipd": {"keys": ["image"], "prob": 0.5}})
    with pytest.raises(SpecError, match="random.*belong in train.augment"):
        validate_spec(base, "demo")


def test_user_components_by_import_path(tmp_path, monkeypatch):
    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,torch,voxelflow,tests,no_such_package")
    s = spec(network={"tests.unit.test_train_patches:TinyNet": {"channels": 3}}, augment=[])
    assert isinstance(build_network(s.network), TinyNet)
    with pytest.raises(ValueError, match="'channels'.*does not fit"):
        spec(network={"tests.unit.test_train_patches:TinyNet": {"channels": "abc"}})
    with pytest.raises(ValueError, match="cannot import"):
        spec(network={"no_such_package.nets:Net": {}})
    rng = np.random.default_rng(0)
    images = rng.random((2, 1, 8, 8, 8), dtype=np.float32)
    result = train(s.model_copy(update={"epochs": 1}), ArrayCases(images, (images > 0.5).astype(np.uint8)),
                   Checkpoints(Store(tmp_path), "ck"))
    assert set(load(result.weights)) == set(TinyNet(3).state_dict())


def test_a_patch_spec_loads_with_its_window_and_refuses_batches_of_own_shapes():
    spleen = load_spec("deployments/specs/spleen.yaml")
    assert spleen.train.patch_size == (96, 96, 96) and spleen.roi_size() == (160, 160, 160)
    assert spleen.preprocess.spatial_size is None  # cases keep their own shapes
    data = spleen.model_dump(mode="json")
    data["train"]["augment"] = []
    with pytest.raises(SpecError, match="keep their own shapes.*patch sampler"):
        validate_spec(data, "spleen")


def test_an_overlay_changes_one_list_element_by_name_or_index():
    spec_ = load_spec("deployments/specs/demo.yaml", sets=["preprocess.transforms.Spacingd.pixdim=[2, 2, 2]",
                                                           "preprocess.transforms.0.Orientationd.axcodes=LPS"])
    names = [next(iter(t)) for t in spec_.preprocess.transforms]
    assert names == ["Orientationd", "Spacingd", "ScaleIntensityRanged", "ResizeWithPadOrCropd"]
    assert spec_.preprocess.transforms[1]["Spacingd"]["pixdim"] == [2, 2, 2]
    assert spec_.preprocess.transforms[1]["Spacingd"]["mode"] == ["bilinear", "nearest"]  # the rest is kept
    assert spec_.preprocess.transforms[0]["Orientationd"]["axcodes"] == "LPS"
    with pytest.raises(SpecError, match="no single element named 'Cropd'"):
        load_spec("deployments/specs/demo.yaml", sets=["preprocess.transforms.Cropd.x=1"])
    with pytest.raises(SpecError, match=r"\[9\]: the list has 4"):
        load_spec("deployments/specs/demo.yaml", sets=["preprocess.transforms.9.Spacingd.pixdim=1"])


def test_two_gloo_processes_follow_the_trajectory_of_one(store, tmp_path):
    """DistributedDataParallel on the CPU: each step's batch split between two processes, gradients
    averaged, gives the losses of one process with the whole batch (float summation order aside)."""
    ids = ["case-0", "case-1", "case-2", "case-4"]
    validation = Validation(StoreCases(store, ["case-3"]), roi_size=(16, 16, 16))
    one = train(spec(epochs=2, devices="cpu"), StoreCases(store, ids, 10**6), Checkpoints(Store(tmp_path), "one"),
                validation)
    two = train(spec(epochs=2, devices=2), StoreCases(store, ids, 10**6), Checkpoints(Store(tmp_path), "two"),
                validation)
    assert two.steps == one.steps == 4
    for a, b in zip(one.history, two.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)  # the stated tolerance
        assert b["val_epoch_dice"] == pytest.approx(a["val_epoch_dice"], abs=1e-3)
    # the same function (parameters an instance norm cancels, like the conv biases before it, get no
    # gradient, and Adam turns their rounding noise into steps of any size: compare outputs, not those)
    x = torch.as_tensor(sphere_case(SHAPES[3], 3)["image"][None, :, :16, :16, :16])
    with torch.no_grad():
        out_one, out_two = load_network(NETWORK, one.weights, "cpu")(x), load_network(NETWORK, two.weights, "cpu")(x)
    assert torch.allclose(out_one, out_two, atol=1e-4)


def test_devices_must_split_the_batch():
    with pytest.raises(ValueError, match="batch_size 3 does not split between 2 devices"):
        spec(devices=2, batch_size=3)
