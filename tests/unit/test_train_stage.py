"""The train stage with the shipped spleen spec (tiny overrides): CT-like cases shallower than the
patch train every planned step; labels the network cannot predict are refused before a step, named
with their values in the error and the audit log, never clamped."""

from __future__ import annotations

import numpy as np
import pytest

from voxelflow import pipeline
from voxelflow.core import audit
from voxelflow.data import preprocess
from voxelflow.learn.train import LabelValuesError
from voxelflow.spec.config import Settings, load_spec

SPLEEN = "deployments/specs/spleen.yaml"
TINY = ["train.network.UNet.channels=[4, 8]", "train.network.UNet.strides=[2]", "train.network.UNet.num_res_units=0",
        "train.augment.RandCropByPosNegLabeld.spatial_size=[16, 16, 16]", "train.augment.RandCropByPosNegLabeld.num_samples=2",
        "evaluate.sliding_window.roi_size=[16, 16, 16]", "train.epochs=2", "train.val_every=1",
        "train.precision=fp32", "train.cache_mb=16", "train.workers=0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def ct_case(shape: tuple[int, ...], seed: int, label_value: int = 1) -> dict[str, np.ndarray]:
    """An abdomen-like case as the spleen spec's preprocessing leaves it: intensities windowed to [0, 1]
    (air at 0 around a body at ~0.5), an organ of ``label_value`` inside."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).astype(np.float32)
    centre = np.array([s / 2 for s in shape], dtype=np.float32)[:, None, None, None]
    r = np.sqrt((((grid - centre) / centre) ** 2)[:2].sum(0))
    body = r < 0.9
    organ = np.sqrt(((grid - centre - np.array([3, 2, 0])[:, None, None, None]) ** 2).sum(0)) < 4
    image = np.where(body, 0.5 + 0.05 * rng.standard_normal(shape), 0.0) + 0.3 * organ
    return {"image": np.clip(image, 0, 1).astype(np.float32)[None], "label": (organ * label_value).astype(np.uint8)[None],
            "affine": np.diag([1.5, 1.5, 2.0, 1.0])}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One home for the module's lifecycles (each its own pipeline name): MLflow's schema is made once."""
    return tmp_path_factory.mktemp("stage") / "home"


def stage(home, name: str, shapes: dict[str, tuple[tuple[int, ...], int]], sets: list[str]):
    spec = load_spec(SPLEEN, sets=TINY + sets + [f"name={name}"])
    ctx = pipeline.Context(Settings(home=home), spec.name)
    out = ctx.layout.preprocessed(preprocess.transform_digest(spec.preprocess))
    for i, (cid, (shape, value)) in enumerate(shapes.items()):
        out.write(cid, preprocess.case_dataset(ct_case(shape, i, value), {}, "test"))
    run_id = pipeline.start_run(spec, ctx, "d" * 64)
    return spec, ctx, run_id


@pytest.mark.parametrize("workers", [0, 2], ids=["thread", "worker-processes"])
def test_the_spleen_spec_trains_every_planned_step_on_cases_shallower_than_its_patch(home, workers):
    cases = {"ct-0": ((24, 22, 20), 1), "ct-shallow": ((26, 24, 7), 1), "ct-2": ((22, 26, 18), 1),
             "ct-val": ((24, 24, 10), 1)}
    spec, ctx, run_id = stage(home, f"shallow-{workers}", cases, [f"train.workers={workers}"])
    assert spec.train.patch_size == (16, 16, 16)
    outcome = pipeline.train_stage(spec, ctx, ["ct-0", "ct-shallow", "ct-2"], run_id, ["ct-val"])
    assert outcome.steps == outcome.planned_steps == 2 * 2  # 3 cases, batch 2: 2 steps an epoch, 2 epochs
    assert [h["epoch"] for h in outcome.history] == [0, 1]
    assert ctx.store.exists(outcome.weights_key)


def test_label_values_the_network_cannot_predict_are_refused_naming_cases_and_values(home):
    cases = {"ct-0": ((20, 20, 20), 1), "ct-bad": ((20, 20, 20), 3), "ct-val-bad": ((20, 20, 18), 2)}
    spec, ctx, run_id = stage(home, "labels", cases, [])
    with pytest.raises(LabelValuesError, match=r"label-values.*0\.\.1.*ct-bad: \[3\]; ct-val-bad: \[2\]") as err:
        pipeline.train_stage(spec, ctx, ["ct-0", "ct-bad"], run_id, ["ct-val-bad"])
    assert err.value.cases == {"ct-bad": [3], "ct-val-bad": [2]}
    refused = [e for e in audit.entries(ctx.db) if e["event"] == "data.refused" and e["details"]["pipeline"] == "labels"]
    assert len(refused) == 1
    assert refused[0]["details"]["reason"] == "label-values"
    assert refused[0]["details"]["cases"] == {"ct-bad": [3], "ct-val-bad": [2]}
    assert not ctx.store.list(ctx.layout.checkpoints(run_id))  # refused before a step was trained
    assert not ctx.store.list(ctx.layout.model_files(run_id))
    # the same cases with a network of four classes train
    spec4, ctx4, run4 = stage(home, "labels-four", cases, ["train.network.UNet.out_channels=4"])
    assert pipeline.train_stage(spec4, ctx4, ["ct-0", "ct-bad"], run4, ["ct-val-bad"]).steps == 2
