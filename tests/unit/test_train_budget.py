"""train.max_seconds: a time budget that ends training at an epoch's end, once one more epoch (and the
validation after it) would pass it; the last epoch is validated, the best weights returned, the run
says it stopped for time and is never an incomplete training.

The budget tests run on a clock of their own: the network advances it by one second a training
forward and half a second a validation forward, so what the budget allows does not depend on how
fast the machine is."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from voxelflow import pipeline
from voxelflow.core.storage import Store
from voxelflow.data import preprocess
from voxelflow.learn.train import ArrayCases, Checkpoints, Validation, load_network, train
from voxelflow.spec.config import Settings, SpecError, TrainSpec, load_spec, validate_spec

LOSS = {"DiceCELoss": {"to_onehot_y": True, "softmax": True}}
TICKING = {"tests.unit.test_train_budget:TickingNet": {}}
STEP_S, WINDOW_S = 1.0, 0.5


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


CLOCK = Clock()


class TickingNet(torch.nn.Module):
    """A small segmentation network whose forward passes advance :data:`CLOCK`."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv3d(4, 2, 1))

    def forward(self, x):
        CLOCK.now += STEP_S if self.training else WINDOW_S
        return self.body(x)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def ticking(monkeypatch) -> Clock:
    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,torch,voxelflow,tests")
    CLOCK.now = 0.0
    return CLOCK


@pytest.fixture(scope="module")
def data() -> tuple[ArrayCases, Validation]:
    rng = np.random.default_rng(0)
    images = rng.random((5, 1, 16, 16, 16), dtype=np.float32)
    labels = (images > 0.6).astype(np.uint8)
    # one validation case of the window's size: one forward, half a second, a validation
    return ArrayCases(images[:4], labels[:4]), Validation(ArrayCases(images[4:], labels[4:]), roi_size=(16, 16, 16),
                                                          every=2)


def spec(**over) -> TrainSpec:
    values = dict(network=copy.deepcopy(TICKING), loss=copy.deepcopy(LOSS), epochs=10, batch_size=2,
                  learning_rate=0.01, precision="fp32", checkpoint_every_steps=50, seed=3)
    values.update(over)
    return TrainSpec(**values)


def test_a_budget_stops_at_an_epoch_end_validates_the_last_epoch_and_keeps_the_best(ticking, data, tmp_path):
    cases, validation = data
    seen, checkpoints = [], Checkpoints(Store(tmp_path), "ck")
    # 4 cases, batch 2: an epoch is 2 steps (2 s), a validation 0.5 s, every second epoch. Epoch ends:
    # 2.0 (2 + 2 + an unmeasured validation taken as an epoch, 2 = 6 <= 8.5: on), 4.0 + 0.5 validated
    # (4.5 + 2 + 0.5 = 7 <= 8.5: on), 6.5 (6.5 + 2 + 0.5 = 9 > 8.5: stop, and validate epoch 2 off schedule)
    result = train(spec(max_seconds=8.5), cases, checkpoints, validation,
                   on_validation=lambda epoch, scores, sample: seen.append(epoch), clock=ticking)
    assert result.stopped_for_time and not result.stopped_early
    assert result.steps == 3 * 2 and result.planned_steps == 10 * 2
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert seen == [1, 2]  # the last epoch was validated although its turn (every 2) had not come
    assert "val_epoch_dice" not in result.history[0] and "val_epoch_dice" in result.history[2]
    dice = {h["epoch"]: h["val_epoch_dice"] for h in result.history if "val_epoch_dice" in h}
    assert result.best_metric == max(dice.values()) and dice[result.best_epoch] == result.best_metric
    assert ticking.now == pytest.approx(7.0) and ticking.now <= 8.5  # the estimate held: within the budget
    # the returned weights are the best validation's
    again, _ = validation.run(load_network(TICKING, result.weights, "cpu"), torch.device("cpu"), "fp32")
    assert again["val_epoch_dice"] == pytest.approx(result.best_metric, abs=1e-9)
    # the stopping step is checkpointed with the time used, and a retry of the run does not train on
    state = checkpoints.load_latest("cpu")
    assert state["step"] == 6 and state["budget"]["stopped"] and state["budget"]["used"] == pytest.approx(7.0)
    before = ticking.now
    retry = train(spec(max_seconds=8.5), cases, checkpoints, validation, clock=ticking)
    assert retry.stopped_for_time and retry.steps == 6 and retry.weights == result.weights
    assert ticking.now == before  # no forward pass: nothing trained or validated


def test_a_resumed_run_counts_the_time_its_checkpoint_had_used(ticking, data, tmp_path):
    cases, validation = data
    checkpoints = Checkpoints(Store(tmp_path), "ck")
    first = train(spec(epochs=2, max_seconds=100.0), cases, checkpoints, validation, clock=ticking)
    assert not first.stopped_for_time and first.steps == 4  # 2 epochs, then 4.5 s used (a validation at epoch 1)
    # the same run with more epochs resumes there: 4.5 s used, 2 s an epoch, 0.5 a validation, budget 9:
    # epoch 2 ends at 6.5 (6.5 + 2.5 = 9 <= 9: on), epoch 3 at 8.5 + 0.5 (> 9 after one more: stop)
    ticking.now = 1000.0  # the clock of another process: only the time since it began counts
    resumed = train(spec(epochs=10, max_seconds=9.0), cases, checkpoints, validation, clock=ticking)
    assert resumed.resumed_from == 4 and resumed.stopped_for_time
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3] and resumed.steps == 8


def test_without_a_budget_or_within_it_every_epoch_is_trained(ticking, data, tmp_path):
    cases, validation = data
    plain = train(spec(epochs=4), cases, Checkpoints(Store(tmp_path), "plain"), validation, clock=ticking)
    assert plain.steps == plain.planned_steps == 8 and not plain.stopped_for_time
    ticking.now = 0.0
    roomy = train(spec(epochs=4, max_seconds=4 * 2 + 2 * 0.5 + 0.01), cases, Checkpoints(Store(tmp_path), "roomy"),
                  validation, clock=ticking)
    assert roomy.steps == roomy.planned_steps == 8 and not roomy.stopped_for_time
    assert roomy.weights == plain.weights  # the budget changes when training stops, never what it trains


def test_at_least_one_epoch_and_without_validation_the_last_epochs_weights(ticking, data, tmp_path):
    cases, _ = data
    result = train(spec(max_seconds=0.5), cases, Checkpoints(Store(tmp_path), "ck"), clock=ticking)
    assert result.stopped_for_time and result.steps == 2 and result.best_epoch is None
    assert ticking.now == pytest.approx(2.0)


@pytest.mark.parametrize("value", [0, -3, "inf", "nan"])
def test_a_budget_that_is_not_a_positive_number_is_refused_at_load(value):
    data = load_spec("deployments/specs/demo.yaml").model_dump(mode="json")
    data["train"]["max_seconds"] = value
    with pytest.raises(SpecError, match=r"train\.max_seconds must be a positive number of seconds"):
        validate_spec(data, "demo")
    assert load_spec("deployments/specs/demo.yaml", sets=["train.max_seconds=90"]).train.max_seconds == 90.0
    assert load_spec("deployments/specs/demo.yaml").train.max_seconds is None


def test_the_stage_passes_on_a_stop_for_time_as_a_finished_training(tmp_path):
    """The train stage on the real clock: a budget of a millisecond ends training after its first epoch
    (any epoch takes longer), and the stage keeps the model instead of refusing an incomplete training."""
    from tests.unit.test_train_stage import SPLEEN, TINY, ct_case

    spec_ = load_spec(SPLEEN, sets=TINY + ["train.epochs=5", "train.max_seconds=0.001", "name=budget"])
    ctx = pipeline.Context(Settings(home=tmp_path / "home"), spec_.name)
    out = ctx.layout.preprocessed(preprocess.transform_digest(spec_.preprocess))
    for i, cid in enumerate(["ct-0", "ct-1", "ct-val"]):
        out.write(cid, preprocess.case_dataset(ct_case((20, 20, 16), i), {}, "test"))
    run_id = pipeline.start_run(spec_, ctx, "d" * 64)
    outcome = pipeline.train_stage(spec_, ctx, ["ct-0", "ct-1"], run_id, ["ct-val"])
    assert outcome.stopped_for_time and not outcome.stopped_early
    assert outcome.steps == 1 and outcome.planned_steps == 5  # 2 cases, batch 2: one step an epoch
    assert outcome.best_epoch == 0 and ctx.store.exists(outcome.weights_key)


def test_two_gloo_processes_stop_together_on_rank_0s_decision(data, tmp_path):
    cases, validation = data
    net = {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
                    "num_res_units": 0}}
    # a millisecond: rank 0 stops after the first epoch, and so must rank 1, or its next step's collective waits
    result = train(spec(network=net, epochs=4, devices=2, max_seconds=0.001, collective_timeout_s=60), cases,
                   Checkpoints(Store(tmp_path), "ck"), validation)
    assert result.stopped_for_time and result.steps == 2 and [h["epoch"] for h in result.history] == [0]
    assert "val_epoch_dice" in result.history[0]
