"""Reuse of finished work in whole lifecycles with no orchestrator, on the demo's synthetic data made small:
an unchanged rerun computes nothing and registers nothing, a changed train key retrains and re-evaluates on the
preprocessing it reuses, ``resume`` after a failure in evaluation finishes without training again, and ``fresh``
computes everything. The stages are counted where the executor calls them (their modules' attributes). Real store,
database and MLflow (SQLite)."""

from __future__ import annotations

import collections
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
COUNTED = {"ingest": "ingest_stage", "preprocess": "preprocess_stage", "train": "train_stage",
           "evaluate": "evaluate_stage", "promote": "register_stage", "deploy": "deploy_stage"}


def demo_spec(source: Path, name: str) -> dict:
    """The small demo spec of the candidates' tests (16^3 cases, a tiny UNet, 2 epochs), without candidates."""
    from tests.e2e.test_candidates import demo_spec as small

    data = small(source, name, None)
    del data["candidates"]
    return data


@pytest.fixture
def home(tmp_path):
    from voxelflow.spec.config import Settings

    return Settings(home=tmp_path / "home", store=None, database_url=None, mlflow_tracking_uri=None, dask_workers=1)


@pytest.fixture
def calls(monkeypatch) -> collections.Counter:
    """How many times each built-in stage ran: each wrapped in its module, where the executor calls it."""
    import importlib

    counted: collections.Counter = collections.Counter()
    for sid, name in COUNTED.items():
        module = importlib.import_module(f"voxelflow.stages.{sid}")
        real = getattr(module, name)

        def wrapped(*args, _real=real, _sid=sid, **kwargs):
            counted[_sid] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)
    return counted


def versions(home, model: str) -> list[str]:
    from voxelflow.release import registry

    return sorted(str(v.version) for v in registry.client(home.tracking_uri).search_model_versions(f"name = '{model}'"))


def champion(home, model: str) -> str | None:
    from voxelflow.release import registry

    return registry.alias_version(home.tracking_uri, model)


def test_an_unchanged_rerun_reuses_everything_a_train_key_retrains_and_fresh_computes_all(home, calls):
    from voxelflow import pipeline
    from voxelflow.data.synthetic import make_decathlon
    from voxelflow.spec.config import load_spec

    source = make_decathlon(home.home / "incoming", n_cases=12, size=24)
    path = home.home / "reuse.yaml"
    path.write_text(yaml.safe_dump(demo_spec(source, "reuse")))
    spec = load_spec(path)
    model = spec.promote.model_name
    first = pipeline.run(spec, home)
    assert first.reused == [] and first.promotion["promoted"]
    assert dict(calls) == {"ingest": 1, "preprocess": 1, "train": 1, "evaluate": 1, "promote": 1, "deploy": 1}
    assert versions(home, model) == ["1"] and champion(home, model) == "1"

    # (a) nothing changed: every result reused, nothing new registered, the champion as it was, and said so
    again = pipeline.run(spec, home)
    assert again.reused == ["preprocess", "train", "evaluate"]
    assert dict(calls) == {"ingest": 2, "preprocess": 1, "train": 1, "evaluate": 1, "promote": 2, "deploy": 2}
    assert again.run_id == first.run_id and again.metrics == first.metrics
    assert versions(home, model) == ["1"] and champion(home, model) == "1"
    assert again.champion_before == "1" and again.registered_before and again.promotion["version"] == "1"
    assert again.preprocess["processed"] == 0 and again.preprocess["skipped"] == first.preprocess["processed"]
    md = pipeline.markdown(again, spec.name)
    assert "| reused | preprocess, train, evaluate:" in md
    assert "already registered and champion: nothing new registered, the champion unchanged" in md
    assert "| reused |" not in pipeline.markdown(first, spec.name)

    # (b) one train key changed (as `voxelflow run --set` changes it): trained and evaluated again, on the
    # preprocessing reused
    changed = load_spec(path, sets=["train.learning_rate=0.003"])
    other = pipeline.run(changed, home)
    assert other.reused == ["preprocess"]
    assert dict(calls) == {"ingest": 3, "preprocess": 1, "train": 2, "evaluate": 2, "promote": 3, "deploy": 3}
    assert other.run_id != first.run_id and not other.registered_before
    assert other.champion_metrics is not None  # compared against the champion of the first lifecycle
    assert versions(home, model) == ["1", "2"]

    # (d) fresh: everything computed again, reuse or not
    fresh = pipeline.run(changed, home, fresh=True)
    assert fresh.reused == []
    assert dict(calls) == {"ingest": 4, "preprocess": 2, "train": 3, "evaluate": 3, "promote": 4, "deploy": 4}
    assert fresh.run_id not in (first.run_id, other.run_id) and versions(home, model) == ["1", "2", "3"]
    # and what fresh computed is recorded: the next plain rerun reuses it
    after = pipeline.run(changed, home)
    assert after.reused == ["preprocess", "train", "evaluate"] and after.run_id == fresh.run_id
    assert calls["train"] == 3 and versions(home, model) == ["1", "2", "3"]


FLAKY = '''
from pathlib import Path

from monai.losses import DiceCELoss

FAIL_ONCE = Path(__file__).with_name("fail-once")
FAIL_TRAINING_AT = Path(__file__).with_name("fail-training-at")  # holds the training step that fails, once


class FlakyLoss(DiceCELoss):
    """MONAI's DiceCELoss; its Nth call raises, once, while FAIL_TRAINING_AT holds N."""

    calls = 0

    def forward(self, input, target):
        FlakyLoss.calls += 1
        if FAIL_TRAINING_AT.exists() and FlakyLoss.calls >= int(FAIL_TRAINING_AT.read_text()):
            FAIL_TRAINING_AT.unlink()
            raise RuntimeError("the loss failed in training, once, as the test asked")
        return super().forward(input, target)


def voxels(y_pred, y, include_background=True, spacing=None):
    """Predicted voxels per class; raises the first time it is called after FAIL_ONCE is made."""
    if FAIL_ONCE.exists():
        FAIL_ONCE.unlink()
        raise RuntimeError("the voxels metric failed, once, as the test asked")
    counts = y_pred.sum(dim=(2, 3, 4)).float()
    return counts if include_background else counts[:, 1:]
'''


@pytest.fixture
def flaky(tmp_path, monkeypatch) -> Iterator[Path]:
    """A user's module of a metric and a loss, allowed, that fail once when told to; the module's folder."""
    pkg = tmp_path / "pkgs"
    pkg.mkdir()
    (pkg / "vf_flaky.py").write_text(textwrap.dedent(FLAKY))
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,torch,voxelflow,vf_flaky")
    sys.modules.pop("vf_flaky", None)  # this test's module, not another test's (its flags are beside it)
    yield pkg
    sys.modules.pop("vf_flaky", None)


def test_resume_after_a_failure_in_evaluation_finishes_without_training_again(home, calls, flaky):
    from sqlalchemy import select

    from voxelflow import pipeline
    from voxelflow.core import db as vdb
    from voxelflow.data.synthetic import make_decathlon
    from voxelflow.spec.config import validate_spec
    from voxelflow.stages.reuse import NothingToResume

    source = make_decathlon(home.home / "incoming", n_cases=12, size=24)
    data = demo_spec(source, "resumed")
    data["evaluate"]["metrics"] = ["dice", "voxels"]
    data["evaluate"]["custom_metrics"] = {"voxels": {"function": "vf_flaky:voxels", "higher_is_better": True}}
    spec = validate_spec(data)
    (flaky / "fail-once").write_text("")
    with pytest.raises(RuntimeError, match="metric failed, once"):
        pipeline.run(spec, home)
    assert not (flaky / "fail-once").exists()  # the metric did fail, in evaluation
    assert (calls["train"], calls["evaluate"], calls["promote"]) == (1, 1, 0)

    ctx = pipeline.Context(home, spec.name)
    with ctx.db.transaction() as conn:
        [failed] = conn.execute(select(vdb.lifecycles)).mappings().all()
    assert failed["status"] == "failed" and failed["failed_step"] == "evaluate" and failed["run_id"]

    result = pipeline.run(spec, home, resume=True)
    assert result.reused == ["preprocess", "train"]
    assert dict(calls) == {"ingest": 2, "preprocess": 1, "train": 1, "evaluate": 2, "promote": 1, "deploy": 1}
    assert result.run_id == failed["run_id"]  # in the failed lifecycle's MLflow run, with its training
    assert "voxels" in result.metrics and result.promotion["version"] == "1"
    with ctx.db.transaction() as conn:
        rows = {r["id"]: dict(r) for r in conn.execute(select(vdb.lifecycles)).mappings()}
    assert rows[failed["id"]]["status"] == "resumed"
    [now] = [r for r in rows.values() if r["id"] != failed["id"]]
    assert now["status"] == "finished" and now["resumes"] == failed["id"]

    with pytest.raises(NothingToResume, match="is finished"):  # the latest lifecycle did not fail
        pipeline.run(spec, home, resume=True)


def test_resume_after_a_failure_in_training_goes_on_from_its_newest_checkpoint(home, calls, flaky, monkeypatch):
    from voxelflow import pipeline
    from voxelflow.data.synthetic import make_decathlon
    from voxelflow.spec.config import validate_spec
    from voxelflow.stages import train

    outcomes = []
    counted = train.train_stage
    monkeypatch.setattr(train, "train_stage", lambda *a, **k: outcomes.append(counted(*a, **k)) or outcomes[-1])
    source = make_decathlon(home.home / "incoming", n_cases=12, size=24)
    data = demo_spec(source, "resumed-training")
    # a checkpoint every 2 steps; the 5th step fails: training goes on from step 4
    data["train"].update(loss={"vf_flaky:FlakyLoss": {"to_onehot_y": True, "softmax": True}},
                         checkpoint_every_steps=2)
    spec = validate_spec(data)
    (flaky / "fail-training-at").write_text("5")
    with pytest.raises(RuntimeError, match="loss failed in training, once"):
        pipeline.run(spec, home)
    assert (calls["train"], calls["evaluate"]) == (1, 0) and outcomes == []

    result = pipeline.run(spec, home, resume=True)
    assert result.reused == ["preprocess"] and calls["preprocess"] == 1 and calls["train"] == 2
    [outcome] = outcomes
    assert outcome.resumed_from == 4 and outcome.steps == outcome.planned_steps > 4
    assert result.promotion["version"] == "1"
