"""Prefect artifacts sent from one background thread, in order, while the next step runs.

Creating an artifact is a blocking API call (about 20-25 ms here, plus the server's work); a lifecycle makes
six or more, so a step would wait on each. They are queued instead and sent by one thread in the order they
were made, each in the run context it was made in (so it belongs to the same flow and task run). Every flow
of voxelflow's runs its body in :func:`flushing`, which waits for what is still queued and
fails the flow, naming the artifact, if one could not be sent. Progress updates are the exception: a lost one
is logged and never fails a step.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 60.0
_sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="voxelflow-artifacts")
atexit.register(_sender.shutdown, wait=True)
_lock = threading.Lock()
_pending: list[tuple[str, bool, Future]] = []  # (what, strict, future)


class ArtifactNotSent(RuntimeError):
    """An artifact of this run could not be created."""


def send(what: str, fn: Callable[..., Any], *args: Any, strict: bool = True, **kwargs: Any) -> Future:
    """Queue ``fn(*args, **kwargs)`` (a Prefect artifact call) in the caller's run context; ``what`` names it in
    an error. A ``strict`` one that fails fails the flow at :func:`flush`; others are logged."""
    future = _sender.submit(contextvars.copy_context().run, fn, *args, **kwargs)
    with _lock:
        _pending.append((what, strict, future))
    return future


def table(rows: Any, *, key: str | None = None, description: str | None = None) -> Future:
    return send(f"table artifact {key or description!r}", create_table_artifact, rows, key=key,
                description=description)


def markdown(text: str, *, key: str | None = None, description: str | None = None) -> Future:
    return send(f"markdown artifact {key or description!r}", create_markdown_artifact, text, key=key,
                description=description)


def flush(timeout: float = FLUSH_TIMEOUT_S) -> None:
    """Wait for every artifact queued so far; raise :class:`ArtifactNotSent` naming each strict one that failed
    (or did not finish within ``timeout`` seconds)."""
    with _lock:
        pending = list(_pending)
        _pending.clear()
    failed = []
    for what, strict, future in pending:
        try:
            future.result(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - collected and raised below, with what it was
            if strict:
                failed.append(f"{what}: {type(exc).__name__}: {exc}")
            else:
                log.warning("%s not sent: %s", what, exc)
    if failed:
        raise ArtifactNotSent("artifacts of this run were not created: " + "; ".join(failed))


@contextlib.contextmanager
def flushing() -> Iterator[None]:
    """A flow's body: the artifacts it queued are flushed before it ends. When the body raised, a flush failure
    is logged and the body's own error is what propagates."""
    try:
        yield
    except BaseException:
        try:
            flush()
        except ArtifactNotSent as exc:
            log.error("%s", exc)
        raise
    flush()
