"""MLflow tracking and registry: runs with lineage, the model logged as a safe pyfunc, gated promotion."""

from __future__ import annotations

import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxelflow import __version__
from voxelflow.config import Gates, PipelineSpec

CHAMPION, PREVIOUS = "champion", "previous"


def client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def flatten(prefix: str, obj: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), value, out)
    else:
        out[prefix] = str(obj)[:500]
    return out


def start_run(tracking_uri: str, artifact_root: str, spec: PipelineSpec, lineage: dict[str, str]) -> str:
    """Create the lifecycle's MLflow run with the spec as params and lineage as tags."""
    mc = client(tracking_uri)
    exp = mc.get_experiment_by_name(spec.name)
    if exp is not None:
        exp_id = exp.experiment_id
    elif tracking_uri.startswith(("http://", "https://", "databricks")):
        exp_id = mc.create_experiment(spec.name)  # the tracking server decides where artifacts live
    else:
        exp_id = mc.create_experiment(spec.name, artifact_location=f"{artifact_root}/{spec.name}")
    tags = {f"voxelflow.{k}": v for k, v in lineage.items()}
    tags["voxelflow.code_version"] = code_version()
    run = mc.create_run(exp_id, tags=tags, run_name=f"{spec.name}-{lineage.get('dataset_digest', '')[:8]}")
    params = flatten("", spec.model_dump(mode="json", include={"preprocess", "train", "evaluate"}), {})
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        mc.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import math
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]
    if items:
        client(tracking_uri).log_batch(run_id, metrics=items)


def log_bytes(tracking_uri: str, run_id: str, name: str, data: bytes) -> None:
    """Log an in-memory file (a picture, a report) as a run artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        client(tracking_uri).log_artifact(run_id, str(path))


def log_model(tracking_uri: str, run_id: str, config: dict[str, Any], weights: bytes) -> str:
    """Log the segmenter as an MLflow pyfunc (weights in safetensors); returns the model URI."""
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
    )
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        files = _write_model_files(Path(tmp), config, weights)
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("mlflow_model.py")),
                artifacts=files,
                signature=signature,
                pip_requirements=[f"voxelflow=={__version__}"],
            )
    return info.model_uri


def _write_model_files(path: Path, config: dict[str, Any], weights: bytes) -> dict[str, str]:
    import json

    (path / "model.json").write_text(json.dumps(config, indent=2))
    (path / "weights.safetensors").write_bytes(weights)
    return {"model.json": str(path / "model.json"), "weights.safetensors": str(path / "weights.safetensors")}


def register(tracking_uri: str, model_uri: str, name: str, run_id: str, tags: dict[str, str]) -> str:
    mc = client(tracking_uri)
    try:
        mc.get_registered_model(name)
    except Exception:  # noqa: BLE001 - MLflow raises RestException when the model is absent
        mc.create_registered_model(name)
    mv = mc.create_model_version(name, model_uri, run_id=run_id, tags={f"voxelflow.{k}": v for k, v in tags.items()})
    return str(mv.version)


def alias_version(tracking_uri: str, name: str, alias: str = CHAMPION) -> str | None:
    try:
        return str(client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except Exception:  # noqa: BLE001 - no such model or alias
        return None


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)


def should_promote(candidate: dict[str, float], champion: dict[str, float] | None, gates: Gates) -> Decision:
    """The promotion gates, as a pure function of the scores."""
    reasons = []
    dice = candidate.get("dice", float("nan"))
    if not dice >= gates.min_dice:
        reasons.append(f"dice {dice:.4f} is below the gate {gates.min_dice:.4f}")
    if champion is not None:
        bar = champion.get("dice", float("nan")) + gates.beat_champion_by
        if not dice >= bar:
            reasons.append(f"dice {dice:.4f} does not beat the champion's {champion.get('dice', float('nan')):.4f} "
                           f"by {gates.beat_champion_by:.4f}")
    return Decision(promote=not reasons, reasons=reasons or ["all gates passed"])


def promote(tracking_uri: str, name: str, version: str) -> str | None:
    """Point ``champion`` at ``version``; the old champion stays reachable as ``previous``."""
    mc = client(tracking_uri)
    old = alias_version(tracking_uri, name, CHAMPION)
    if old is not None and old != version:
        mc.set_registered_model_alias(name, PREVIOUS, old)
    mc.set_registered_model_alias(name, CHAMPION, version)
    return old


def download_model(tracking_uri: str, model_uri: str, dest: Path) -> Path:
    """Fetch a model's artifacts (``models:/name@alias`` or a run URI) into ``dest``."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest))
    return Path(local)


def load_segmenter(tracking_uri: str, name: str, cache_dir: Path, alias: str = CHAMPION, device: str | None = None):
    """The model behind ``name@alias`` as a ready :class:`~voxelflow.model.Segmenter`, and its version."""
    from voxelflow.model import Segmenter

    version = alias_version(tracking_uri, name, alias)
    if version is None:
        raise LookupError(f"model {name!r} has no {alias!r} alias yet: run the lifecycle first")
    local = download_model(tracking_uri, f"models:/{name}/{version}", cache_dir / name / version)
    return Segmenter.from_dir(local / "artifacts", device=device), version
