"""Step functions for the step-graph tests (importable as ``tests.unit.step_fns:NAME``)."""

from __future__ import annotations

import time
from pathlib import Path

from voxelflow.steps import StepContext, StepResult, step


@step(outputs=["n"])
def count_cases(ctx: StepContext) -> dict[str, float]:
    return {"n": len(list(ctx.cases("raw")))}


def noop(ctx: StepContext) -> None:
    return None


def refuse(ctx: StepContext, why: str = "refused by the test") -> StepResult:
    return StepResult(passed=False, reason=why, metrics={"refusals": 1})


def flaky(ctx: StepContext, marker: str, fail_times: int = 1) -> dict[str, float]:
    """Fails with a connection error ``fail_times`` times (counted in the file ``marker``), then passes."""
    path = Path(marker)
    seen = int(path.read_text()) if path.exists() else 0
    path.write_text(str(seen + 1))
    if seen < fail_times:
        raise ConnectionResetError("the service went away (a transient error)")
    return {"attempts_seen": seen + 1}


def bad_data(ctx: StepContext, marker: str) -> None:
    path = Path(marker)
    path.write_text(str(int(path.read_text()) + 1 if path.exists() else 1))
    raise ValueError("case 3 has no label: bad data")


def slow(ctx: StepContext, seconds: float = 2.0) -> None:
    time.sleep(seconds)


def with_artifact(ctx: StepContext, out: str) -> StepResult:
    path = Path(out) / "report.json"
    path.write_text('{"ok": true}')
    return StepResult(metrics={"outliers": 0}, artifacts={"report": path})


def wrong_return(ctx: StepContext) -> str:
    return "fine"
