"""Progress of long steps: a Prefect progress artifact, plus any in-process listener (the CLI's bars).

An artifact update is an API call (about 20 ms here, plus the server's work), so the artifact is created and
updated from the background sender of ``tasks.artifacts`` (the flow waits for it at its end), at most every
``MIN_INTERVAL_S`` seconds, always in order, the final 100 % included. A lost update is logged, never fails the
step. Listeners are called on every step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tasks import artifacts

Listener = Callable[[str, int, int], None]
listeners: list[Listener] = []

MIN_INTERVAL_S = 2.0


def _update(created: Future, pct: float) -> None:
    update_progress_artifact(created.result(), pct)  # the sender runs in order: created has finished


def reporter(stage: str, description: str) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback that moves a progress artifact as the step advances."""
    what = f"progress artifact of {stage}"
    created = artifacts.send(what, create_progress_artifact, progress=0.0, description=description, strict=False)
    last = {"at": time.monotonic(), "pct": 0.0}

    def report(done: int, total: int) -> None:
        pct = 100.0 * done / max(total, 1)
        now = time.monotonic()
        if pct >= 100 or (pct > last["pct"] and now - last["at"] >= MIN_INTERVAL_S):
            artifacts.send(what, _update, created, min(pct, 100.0), strict=False)
            last.update(at=now, pct=pct)
        for listener in listeners:
            listener(stage, done, total)

    return report
