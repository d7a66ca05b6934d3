"""A user's own steps in the pipeline: ``fn(ctx: StepContext, **with) -> StepResult | Mapping[str, float] | None``.

A spec names a step function by import path in ``steps[].uses`` (``voxelflow.steps:label_volume_check``,
``mypackage.checks:bias_field``); its ``with`` mapping is checked against the function's signature
when the spec loads. The step runs as its own Prefect task (or flow run on ``work_pool``) and gets a
:class:`StepContext`: the outputs of the steps before it, the cases read lazily from the store, the
lifecycle's MLflow run, a logger, and the settings without secret values.
"""

from __future__ import annotations

from voxelflow.steps.api import Case, StepContext, StepInputs, StepResult, normalise, outputs, step
from voxelflow.steps.shipped import intensity_stats, label_volume_check, notify_webhook

__all__ = ["Case", "StepContext", "StepInputs", "StepResult", "intensity_stats", "label_volume_check",
           "normalise", "notify_webhook", "outputs", "step"]
