"""Retries for what a retry can fix: every retried task passes ``retry_condition_fn=transient_only``.

The decision is the library's (:func:`voxelflow.core.transient.is_transient`); this says it in the task's log,
so a run that was not retried shows why.
"""

from __future__ import annotations

from prefect.logging import get_logger

from voxelflow.core.transient import is_transient, reason

logger = get_logger("voxelflow.retry")


def transient_only(task, task_run, state) -> bool:
    """Retry the failed ``task_run`` only when its error is transient (network, storage, 5xx, database
    serialisation and lock timeouts); bad data, spec errors, out-of-memory and a missing key fail at once."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - classified, never swallowed: the state stays failed
        if is_transient(exc):
            logger.warning("%s failed with a transient error, retrying: %s", task_run.name, reason(exc))
            return True
        logger.error("%s failed and is not retried (a retry would meet the same error): %s", task_run.name,
                     reason(exc))
        return False
    return False
