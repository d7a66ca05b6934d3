"""Progress of long steps: a Prefect progress artifact, plus any in-process listener (the CLI's bars).

An artifact update is an API call (about 20 ms here, plus the server's work), so updates are sent
from one background thread, at most every ``MIN_INTERVAL_S`` seconds, always in order; the final
100 % is sent before the step returns. Listeners are called on every step.
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from prefect.artifacts import create_progress_artifact, update_progress_artifact

Listener = Callable[[str, int, int], None]
listeners: list[Listener] = []
log = logging.getLogger(__name__)

MIN_INTERVAL_S = 2.0
_sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="voxelflow-progress")
atexit.register(_sender.shutdown, wait=True)


def _send(artifact, pct: float) -> Future:
    # the run's settings and client live in context variables: carry them into the sender thread
    return _sender.submit(contextvars.copy_context().run, update_progress_artifact, artifact, pct)


def reporter(stage: str, description: str) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback that moves a progress artifact as the step advances."""
    artifact = create_progress_artifact(progress=0.0, description=description)
    last = {"at": time.monotonic(), "pct": 0.0}

    def report(done: int, total: int) -> None:
        pct = 100.0 * done / max(total, 1)
        now = time.monotonic()
        if pct >= 100:
            try:
                _send(artifact, 100.0).result()  # complete before the task reports its own state
            except Exception as exc:  # noqa: BLE001 - a lost progress update must not fail the step
                log.warning("progress artifact of %s not updated: %s", stage, exc)
        elif pct > last["pct"] and now - last["at"] >= MIN_INTERVAL_S:
            _send(artifact, pct)
            last.update(at=now, pct=pct)
        for listener in listeners:
            listener(stage, done, total)

    return report
