"""Promotion gates (a pure function) and the MLflow registry on a real SQLite store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from voxelflow import registry
from voxelflow.config import Gates, Settings

# ---------------------------------------------------------------- should_promote


def test_below_min_dice_is_rejected():
    decision = registry.should_promote({"dice": 0.55}, None, Gates(min_dice=0.6))
    assert not decision.promote
    assert len(decision.reasons) == 1 and "below the gate" in decision.reasons[0]


def test_first_model_above_min_dice_passes():
    decision = registry.should_promote({"dice": 0.61}, None, Gates(min_dice=0.6))
    assert decision.promote
    assert decision.reasons == ["all gates passed"]


def test_exactly_min_dice_passes():
    assert registry.should_promote({"dice": 0.5}, None, Gates(min_dice=0.5)).promote


def test_beating_the_champion_by_the_margin_passes():
    gates = Gates(min_dice=0.5, beat_champion_by=0.02)
    assert registry.should_promote({"dice": 0.80}, {"dice": 0.70}, gates).promote


def test_not_beating_the_champion_by_the_margin_is_rejected():
    gates = Gates(min_dice=0.5, beat_champion_by=0.05)
    decision = registry.should_promote({"dice": 0.72}, {"dice": 0.70}, gates)
    assert not decision.promote
    assert len(decision.reasons) == 1
    assert "champion" in decision.reasons[0]


def test_worse_than_champion_with_zero_margin_is_rejected():
    decision = registry.should_promote({"dice": 0.69}, {"dice": 0.70}, Gates(min_dice=0.5, beat_champion_by=0.0))
    assert not decision.promote


def test_both_gates_failing_give_two_reasons():
    decision = registry.should_promote({"dice": 0.3}, {"dice": 0.9}, Gates(min_dice=0.5))
    assert not decision.promote and len(decision.reasons) == 2


@pytest.mark.parametrize("candidate", [{"dice": float("nan")}, {}, {"hausdorff95": 1.0}])
def test_nan_or_missing_dice_is_rejected(candidate):
    decision = registry.should_promote(candidate, None, Gates(min_dice=0.0))
    assert not decision.promote
    decision = registry.should_promote(candidate, {"dice": 0.1}, Gates(min_dice=0.0, beat_champion_by=-1.0))
    assert not decision.promote


def test_negative_margin_allows_a_slightly_worse_candidate():
    gates = Gates(min_dice=0.5, beat_champion_by=-0.05)
    assert registry.should_promote({"dice": 0.68}, {"dice": 0.70}, gates).promote


def test_flatten():
    out = registry.flatten("", {"a": {"b": 1, "c": [1, 2]}, "d": "x" * 600}, {})
    assert out == {"a.b": "1", "a.c": "[1, 2]", "d": "x" * 500}


# ---------------------------------------------------------------- MLflow on SQLite


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory, tiny_spec, tiny_model_config, tiny_weights):
    """Two versions of the tiny model registered under one run."""
    settings = Settings(home=tmp_path_factory.mktemp("mlflow-home"), mlflow_tracking_uri=None)
    uri = settings.tracking_uri
    assert uri.startswith("sqlite:////")
    versions = []
    for weights in tiny_weights:
        run_id = registry.start_run(uri, settings.artifact_root, tiny_spec, {"dataset_digest": "0123456789abcdef"})
        model_uri = registry.log_model(uri, run_id, tiny_model_config, weights)
        versions.append(registry.register(uri, model_uri, tiny_spec.promote.model_name, run_id,
                                          {"dataset_digest": "0123456789abcdef"}))
    return settings, run_id, versions


def test_run_has_spec_params_and_lineage_tags(mlflow_store, tiny_spec):
    settings, run_id, _ = mlflow_store
    run = registry.client(settings.tracking_uri).get_run(run_id)
    assert run.data.params["train.epochs"] == str(tiny_spec.train.epochs)
    assert run.data.params["train.precision"] == "fp32"
    assert "preprocess.shard_size" in run.data.params
    assert not any(k.startswith(("promote.", "deploy.", "data.")) for k in run.data.params)
    assert run.data.tags["voxelflow.dataset_digest"] == "0123456789abcdef"
    assert run.data.tags["voxelflow.code_version"].startswith("0.1.0")


def test_log_metrics_skips_non_finite(mlflow_store):
    settings, run_id, _ = mlflow_store
    registry.log_metrics(settings.tracking_uri, run_id, {"val_dice": 0.5, "val_hd95": float("nan")}, step=1)
    metrics = registry.client(settings.tracking_uri).get_run(run_id).data.metrics
    assert metrics["val_dice"] == pytest.approx(0.5)
    assert "val_hd95" not in metrics


def test_log_bytes_stores_a_picture_as_a_run_artifact(mlflow_store, tmp_path):
    import mlflow

    from voxelflow import report

    settings, run_id, _ = mlflow_store
    rng = np.random.default_rng(0)
    image = rng.random((12, 12, 8), dtype=np.float32)
    label = (image > 0.7).astype(np.uint8)
    pictures = {
        "overlay.png": report.overlay_png(image, label, label, title="case-1"),
        "curve.png": report.curve_png([{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.5}]),
    }
    for name, data in pictures.items():
        assert isinstance(data, bytes) and data[:8] == b"\x89PNG\r\n\x1a\n"
        registry.log_bytes(settings.tracking_uri, run_id, name, data)
    listed = {a.path for a in registry.client(settings.tracking_uri).list_artifacts(run_id)}
    assert set(pictures) <= listed
    mlflow.set_tracking_uri(settings.tracking_uri)
    for name, data in pictures.items():
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=str(tmp_path))
        assert Path(local).read_bytes() == data
    # the artifacts live under the settings' artifact root
    assert settings.artifact_root.startswith("file://")
    assert (Path(settings.artifact_root.removeprefix("file://"))).is_dir()


def test_artifacts_go_to_the_store_when_it_is_s3(mlflow_store, tiny_spec, s3_store_url):
    """With VOXELFLOW_STORE on S3 the artifact root is a prefix there: every machine reads the same files."""
    from voxelflow.storage import Store

    local, _, _ = mlflow_store
    settings = Settings(home=local.home, store=f"{s3_store_url}/registry")
    assert settings.artifact_root == f"{s3_store_url}/registry/mlflow-artifacts"
    spec = tiny_spec.model_copy(update={"name": "tiny-on-s3"})
    run_id = registry.start_run(settings.tracking_uri, settings.artifact_root, spec, {"dataset_digest": "ab" * 8})
    registry.log_bytes(settings.tracking_uri, run_id, "report.md", b"# a report")
    store = Store(settings.artifact_root)
    assert [f for f in store.files() if f.endswith("/report.md")] == [f"tiny-on-s3/{run_id}/artifacts/report.md"]
    assert store.read_bytes(f"tiny-on-s3/{run_id}/artifacts/report.md") == b"# a report"


def test_versions_are_numbered(mlflow_store, tiny_spec):
    settings, _, versions = mlflow_store
    assert versions == ["1", "2"]
    mv = registry.client(settings.tracking_uri).get_model_version(tiny_spec.promote.model_name, "2")
    assert mv.tags["voxelflow.dataset_digest"] == "0123456789abcdef"


def test_promote_moves_champion_and_keeps_previous(mlflow_store, tiny_spec, tiny_weights, tmp_path):
    from safetensors.torch import load

    settings, _, versions = mlflow_store
    uri, name = settings.tracking_uri, tiny_spec.promote.model_name
    assert registry.alias_version(uri, name) is None
    with pytest.raises(LookupError, match="champion"):
        registry.load_segmenter(uri, name, tmp_path / "cache0")

    assert registry.promote(uri, name, versions[0]) is None
    assert registry.alias_version(uri, name, registry.CHAMPION) == "1"
    assert registry.alias_version(uri, name, registry.PREVIOUS) is None

    assert registry.promote(uri, name, versions[1]) == "1"
    assert registry.alias_version(uri, name, registry.CHAMPION) == "2"
    assert registry.alias_version(uri, name, registry.PREVIOUS) == "1"

    # promoting the champion again leaves 'previous' alone
    assert registry.promote(uri, name, versions[1]) == "2"
    assert registry.alias_version(uri, name, registry.PREVIOUS) == "1"

    segmenter, version = registry.load_segmenter(uri, name, tmp_path / "cache")
    assert version == "2"
    expected = load(tiny_weights[1])
    state = segmenter.net.state_dict()
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        assert np.array_equal(state[key].cpu().numpy(), tensor.numpy()), key

    previous, pversion = registry.load_segmenter(uri, name, tmp_path / "cache", alias=registry.PREVIOUS)
    assert pversion == "1"
    key = next(iter(expected))
    assert np.array_equal(previous.net.state_dict()[key].cpu().numpy(), load(tiny_weights[0])[key].numpy())

    volume = np.random.default_rng(0).random((20, 18, 22), dtype=np.float32)
    mask = segmenter.segment(volume, np.diag([1.2, 1.0, 1.5, 1.0]))
    assert mask.shape == volume.shape
    assert mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}


def test_logged_model_is_a_pyfunc_without_pickles(mlflow_store, tiny_spec, tmp_path):
    settings, _, _ = mlflow_store
    local = registry.download_model(settings.tracking_uri, f"models:/{tiny_spec.promote.model_name}/1", tmp_path)
    files = {p.name for p in local.rglob("*") if p.is_file()}
    assert {"MLmodel", "model.json", "weights.safetensors"} <= files
    assert not any(f.endswith((".pkl", ".pickle")) for f in files)
