"""The lifecycle's MLflow run ends FAILED when the lifecycle fails, at any stage, and FINISHED only when it
completes; the local deploy records that its smoke-test endpoint was temporary. Real MLflow on SQLite."""

from __future__ import annotations

import pytest

from voxelflow import pipeline
from voxelflow.core import audit
from voxelflow.release import registry
from voxelflow.spec.config import Settings


def status(settings: Settings, run_id: str) -> str:
    return registry.client(settings.tracking_uri).get_run(run_id).info.status


@pytest.fixture
def run(tiny_spec, tmp_path):
    """A lifecycle run opened in a fresh home: (settings, context, run id)."""
    settings = Settings(home=tmp_path / "home", store=None, database_url=None, mlflow_tracking_uri=None)
    ctx = pipeline.Context(settings, tiny_spec.name)
    run_id = pipeline.start_run(tiny_spec, ctx, "0" * 64)
    return settings, ctx, run_id


def test_logging_the_model_leaves_the_run_open(run, tiny_model_config, tiny_weights):
    settings, _, run_id = run
    registry.log_model(settings.tracking_uri, run_id, tiny_model_config, tiny_weights[0])
    assert status(settings, run_id) == "RUNNING"  # not FINISHED: the lifecycle has not completed


def test_a_completed_lifecycle_finishes_its_run(run):
    settings, ctx, run_id = run
    with pipeline.closing_run(ctx, run_id):
        pass
    assert status(settings, run_id) == "FINISHED"


def test_a_failed_lifecycle_fails_its_run_and_masks_the_error(run):
    settings, ctx, run_id = run
    with pytest.raises(ConnectionError) as caught, pipeline.closing_run(ctx, run_id):
        raise ConnectionError("cannot reach postgresql://vf:hunter2@db.example/vf")
    assert status(settings, run_id) == "FAILED"
    assert "hunter2" not in str(caught.value) and "vf:***@db.example" in str(caught.value)


def test_an_interrupted_lifecycle_kills_its_run(run):
    settings, ctx, run_id = run
    with pytest.raises(KeyboardInterrupt), pipeline.closing_run(ctx, run_id):
        raise KeyboardInterrupt
    assert status(settings, run_id) == "KILLED"


@pytest.mark.slow
def test_whole_lifecycle_finished_then_failed_at_deploy(tiny_spec, tmp_path, monkeypatch):
    """A whole run completes (FINISHED, temporary smoke endpoint recorded); the next, whose deploy stage fails
    after its model was logged and registered (no Kubernetes cluster), leaves its run FAILED."""
    from voxelflow.data.synthetic import make_decathlon
    from voxelflow.spec.config import validate_spec

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    home = tmp_path / "home"
    source = make_decathlon(home / "incoming", n_cases=12, size=24)
    data = tiny_spec.model_dump(mode="json", exclude_none=True)
    data["data"]["source"] = str(source)
    data["train"].update(epochs=2, val_every=1)
    data["evaluate"].update(test_fraction=0.3, val_fraction=0.3)
    data["promote"]["gates"].update(min_dice=0.0, min_test_cases=1)
    settings = Settings(home=home, store=None, database_url=None, mlflow_tracking_uri=None)

    done = pipeline.run(validate_spec(data, "tiny"), settings)
    assert status(settings, done.run_id) == "FINISHED"
    assert done.deployment is not None and done.deployment["temporary"] is True
    assert "temporary smoke-test endpoint" in pipeline.markdown(done, tiny_spec.name)
    ctx = pipeline.Context(settings, tiny_spec.name)
    deployed = [e for e in audit.entries(ctx.db) if e["event"] == "service.deployed"]
    assert deployed[-1]["details"]["temporary"] is True

    make_decathlon(home / "incoming", n_cases=13, size=24)  # one case more: a new dataset, a new run
    data["deploy"] = {"target": "kubernetes"}
    with pytest.raises(RuntimeError, match="no Kubernetes cluster is configured"):
        pipeline.run(validate_spec(data, "tiny"), settings)
    runs = registry.client(settings.tracking_uri).search_runs(
        [registry.client(settings.tracking_uri).get_run(done.run_id).info.experiment_id],
        order_by=["attributes.start_time DESC"])
    assert runs[0].info.run_id != done.run_id and runs[0].info.status == "FAILED"
