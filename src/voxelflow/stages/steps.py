"""Running one of the user's steps: its function, its retries (transient errors only), its timeout, its record."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from voxelflow.core import transient
from voxelflow.release import registry
from voxelflow.steps.api import StepContext, StepInputs, normalise

Status = Literal["passed", "warning", "failed", "skipped"]


@dataclass
class StepRecord:
    """How a step went: ``passed``; ``warning`` (did not pass, not a gate); ``failed`` (a gate that did not pass);
    ``skipped`` (its condition was false, or what it needs did not run)."""

    id: str
    status: Status
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    artifacts: list[str] = field(default_factory=list)  # store keys
    gate: bool = False
    attempts: int = 0


class StepTimeout(TimeoutError):
    """A step ran past its ``timeout_s``."""


def _call(fn: Callable[[], Any], timeout_s: float | None, step_id: str) -> Any:
    if timeout_s is None:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"voxelflow-step-{step_id}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():  # a Python thread cannot be killed: it is left to finish on its own, its result unused
        raise StepTimeout(f"step {step_id} ran past its timeout_s ({timeout_s:g} s)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_step(step: Any, ctx: Any, inputs: StepInputs, logger: logging.Logger | None = None,
             sleep: Callable[[float], None] = time.sleep) -> StepRecord:
    """Call the step's function with its context and ``with`` arguments; retry transient errors up to
    ``retries`` times (a bad-data error fails at once, with the step named); log its metrics to the MLflow run
    as ``<id>.<name>`` and keep its artifacts in the store and the run."""
    log = logger or logging.getLogger(f"voxelflow.steps.{step.id}")
    fn = step.function()
    context = StepContext(inputs, ctx.store, ctx.settings, log, ctx.layout)
    start = time.perf_counter()
    attempt = 0
    while True:
        attempt += 1
        try:
            value = _call(lambda: fn(context, **step.with_), step.timeout_s, step.id)
            break
        except Exception as exc:
            if attempt <= step.retries and transient.is_transient(exc):
                wait = min(2.0 ** (attempt - 1), 30.0)
                log.warning("step %s attempt %d failed (%s), transient: retrying in %.0f s", step.id, attempt,
                            transient.reason(exc), wait)
                sleep(wait)
                continue
            exc.add_note(f"in step {step.id} ({step.uses}), attempt {attempt} of {step.retries + 1}")
            raise
    result = normalise(value, step.id)
    seconds = time.perf_counter() - start
    keys = _keep_artifacts(step.id, ctx, inputs, result.artifacts)
    if result.metrics and inputs.run_id:
        registry.log_metrics(ctx.tracking_uri, inputs.run_id, {f"{step.id}.{k}": v for k, v in result.metrics.items()})
    status: Status = "passed" if result.passed else "failed" if step.gate else "warning"
    return StepRecord(step.id, status, result.reason, result.metrics, round(seconds, 3), keys, step.gate, attempt)


def _keep_artifacts(step_id: str, ctx: Any, inputs: StepInputs, artifacts: dict[str, Path]) -> list[str]:
    keys = []
    for name, path in artifacts.items():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"step {step_id}: artifact {name!r} is not a file: {path}")
        fname = name if Path(name).suffix else name + path.suffix
        if "/" in fname or fname.startswith("."):
            raise ValueError(f"step {step_id}: artifact name {name!r} must be a plain file name")
        data = path.read_bytes()
        key = ctx.layout.report(inputs.run_id or f"lifecycle-{inputs.lifecycle_id or 'local'}",
                                f"steps/{step_id}/{fname}")
        ctx.store.write_bytes(key, data)
        if inputs.run_id:
            registry.log_bytes(ctx.tracking_uri, inputs.run_id, f"steps/{step_id}/{fname}", data)
        keys.append(key)
    return keys
