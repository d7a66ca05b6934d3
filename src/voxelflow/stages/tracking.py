"""The lifecycle's MLflow run: its lineage tags, opening it (with the split), ending it with how the
lifecycle ended."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Iterator

from voxelflow.core import redact
from voxelflow.data import preprocess
from voxelflow.learn import evaluate
from voxelflow.release import registry
from voxelflow.spec.config import PipelineSpec
from voxelflow.stages.context import Context
from voxelflow.stages.split import Split


def lineage(spec: PipelineSpec, dataset_digest: str) -> dict[str, str]:
    """What ties a model version back to its data and its spec."""
    from voxelflow.core import user_code

    return {"dataset_digest": dataset_digest, "spec_digest": spec.digest(), "pipeline": spec.name,
            "preprocess_digest": preprocess.transform_digest(spec.preprocess), **user_code.lineage(spec)}


def start_run(spec: PipelineSpec, ctx: Context, dataset_digest: str, split: Split | None = None) -> str:
    """Open the MLflow run; the split, when given, is kept in it as ``split.json`` (all three sides)."""
    ensure_tracking(ctx)
    run_id = registry.start_run(ctx.tracking_uri, ctx.settings.artifact_root, spec, lineage(spec, dataset_digest))
    if split is not None:
        ev = spec.evaluate
        registry.log_bytes(ctx.tracking_uri, run_id, "split.json", json.dumps(
            {"rule": evaluate.sides_rule(ev.test_fraction, ev.val_fraction), "test_fraction": ev.test_fraction,
             "val_fraction": ev.val_fraction, "train": split.train, "val": split.val, "test": split.test},
            indent=1).encode())
    return run_id


_tracking_ready: set[str] = set()


def ensure_tracking(ctx: Context) -> None:
    """Let one process at a time create MLflow's schema: two lifecycles starting together on a fresh
    tracking database would otherwise both run MLflow's migrations and one would fail."""
    if ctx.tracking_uri in _tracking_ready:
        return
    with ctx.db.locked("mlflow-schema"):
        registry.client(ctx.tracking_uri).search_experiments(max_results=1)
    _tracking_ready.add(ctx.tracking_uri)


@contextlib.contextmanager
def closing_run(ctx: Context, run_id: str) -> Iterator[None]:
    """End the lifecycle's MLflow run with how the lifecycle ended: ``FINISHED`` only when the block completes,
    ``FAILED`` when it raises (``KILLED`` when interrupted or cancelled); the error leaves with its credentials
    masked. A failure to record the status is logged and never hides the lifecycle's own error."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except Exception as exc:
        redact.scrub(exc)
        raise
    except BaseException:
        status = "KILLED"
        raise
    finally:
        try:
            registry.end_run(ctx.tracking_uri, run_id, status)
        except Exception as exc:  # noqa: BLE001 - the lifecycle's outcome stands; the run's status is secondary
            logging.getLogger(__name__).warning("could not mark MLflow run %s %s: %s", run_id, status,
                                                redact.redact_exc(exc))


def mark_candidate(ctx: Context, run_id: str, parent_run_id: str, index: int, overrides: dict[str, object]) -> None:
    """A candidate's run: a child of the lifecycle's run (MLflow's parent tag), named by the candidate, with its
    overrides as params (``candidate.train.learning_rate``)."""
    from mlflow.entities import Param, RunTag

    tags = [RunTag("mlflow.parentRunId", parent_run_id), RunTag("mlflow.runName", f"{ctx.pipeline}-candidate-{index}"),
            RunTag("voxelflow.candidate", str(index))]
    params = [Param(f"candidate.{k}", str(v)[:500]) for k, v in overrides.items()]
    registry.client(ctx.tracking_uri).log_batch(run_id, params=params, tags=tags)
