"""Progress of long steps: a Prefect progress artifact, plus any in-process listener (the CLI's bars)."""

from __future__ import annotations

from collections.abc import Callable

from prefect.artifacts import create_progress_artifact, update_progress_artifact

Listener = Callable[[str, int, int], None]
listeners: list[Listener] = []


def reporter(stage: str, description: str) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback that updates a progress artifact in steps of at least 10 %."""
    artifact = create_progress_artifact(progress=0.0, description=description)
    last = [-1.0]

    def report(done: int, total: int) -> None:
        pct = 100.0 * done / max(total, 1)
        if pct >= 100 or pct - last[0] >= 10:
            update_progress_artifact(artifact, pct)
            last[0] = pct
        for listener in listeners:
            listener(stage, done, total)

    return report
