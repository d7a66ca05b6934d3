"""The served model: loaded aside and swapped in one step, failed loads counted and explained."""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from voxelflow.core.redact import redact

log = logging.getLogger("voxelflow.serving.serve")


def failure_summary(exc: BaseException) -> str:
    """What failed, for an unauthenticated answer: a kind, never the exception's text (which may name hosts)."""
    if isinstance(exc, LookupError):
        return "no model version holds the alias yet"
    return (f"the model could not be loaded ({type(exc).__name__}); the reason is in GET /v1/model (any key) "
            "and the service log")


class ModelHolder:
    """The loaded model and its version; ``reload`` swaps it in without dropping requests.

    A failed load leaves the model loaded before serving; it is counted (``swap_failures``) and
    kept in ``failure``: the version wanted, when it failed, and why (credentials in URLs masked)
    until a load succeeds. With ``replicate`` (on GPUs: :meth:`voxelflow.serving.serve_gpu.Plan.replicate`), each load
    also makes the model's replicas (``replicas``: device -> replica), swapped in with it.
    """

    def __init__(self, loader: Callable[[], tuple[Any, str]],
                 replicate: Callable[[Any], dict[str, Any]] | None = None) -> None:
        self.loader = loader
        self.replicate = replicate
        self.segmenter: Any = None
        self.replicas: dict[str, Any] = {}
        self.version: str | None = None
        self.failure: dict[str, Any] | None = None
        self.summary: str | None = None  # failure_summary of the last failed load, for /health/ready
        self.swaps = 0  # models swapped in after the first
        self.swap_failures = 0  # loads that failed
        self.current: Callable[[], str | None] | None = None  # the alias's version, once watch() reads it
        self.lock = threading.Lock()
        self._nudged = threading.Event()  # someone said the alias moved: look now, not at the next poll

    @property
    def error(self) -> str | None:
        """The last failed load's reason (redacted), or None."""
        return self.failure["error"] if self.failure else None

    def reload(self, wanted: str | None = None, cause: str | None = None) -> str | None:
        """Load the alias's model and swap it in; ``wanted`` is the version expected (for the record of a failure),
        ``cause`` what made the watch look (``notice`` or ``poll``), logged with the swap."""
        started = time.perf_counter()
        try:
            segmenter, version = self.loader()
            replicas = self.replicate(segmenter) if self.replicate is not None else {}
        except Exception as exc:  # noqa: BLE001 - recorded, then raised to the caller
            self._failed(wanted, exc)
            raise
        with self.lock:  # loaded aside, swapped in one step: requests see the old model or the new one
            before = self.version
            if self.segmenter is not None and version != before:
                self.swaps += 1
            self.segmenter, self.version, self.failure, self.summary = segmenter, version, None, None
            self.replicas = replicas
        log.info(json.dumps({"event": "model.loaded" if before is None else "model.swapped" if version != before
                             else "model.reloaded", "version": version,
                             "serving_before": before, "load_s": round(time.perf_counter() - started, 3),
                             **({"cause": cause} if cause else {})}))
        return version

    def _failed(self, wanted: str | None, exc: BaseException) -> None:
        if wanted is None and self.current is not None:
            try:
                wanted = self.current()
            except Exception:  # noqa: BLE001 - the registry is away too: the version stays unknown
                wanted = None
        reason = redact(f"{type(exc).__name__}: {exc}")[:500]
        with self.lock:
            repeated = self.failure is not None and (self.failure["version"], self.failure["error"]) == (wanted, reason)
            self.swap_failures += 1
            self.summary = failure_summary(exc)
            self.failure = {"version": wanted, "error": reason, "at": datetime.now(timezone.utc).isoformat(),
                            "serving": self.version}
        if not repeated:  # a watch retrying the same broken version logs it once
            log.warning(json.dumps({"event": "model.load_failed", "version": wanted, "serving": self.version,
                                    "error": reason}))

    def nudge(self) -> None:
        """The alias may have moved (a pushed notice, e.g. the event of a promotion): :meth:`watch` looks at
        once instead of at its next poll."""
        self._nudged.set()

    def watch(self, current: Callable[[], str | None], interval: float) -> threading.Event:
        """Poll ``current()`` (the alias's version) every ``interval`` seconds, and at once when
        :meth:`nudge` is called; reload when it differs. Set the returned event to stop."""
        nudged = self._nudged

        class Stop(threading.Event):
            def set(self) -> None:  # the loop wakes to see it
                super().set()
                nudged.set()

        stop = Stop()
        self.current = current

        def loop() -> None:
            lookup_error = None
            while True:
                cause = "notice" if self._nudged.wait(interval) else "poll"
                self._nudged.clear()
                if stop.is_set():
                    return
                try:
                    wanted = current()
                except Exception as exc:  # noqa: BLE001 - the registry is away: logged once, tried again
                    reason = redact(f"{type(exc).__name__}: {exc}")[:500]
                    if reason != lookup_error:
                        log.warning(json.dumps({"event": "model.alias_lookup_failed", "error": reason}))
                    lookup_error = reason
                    continue
                lookup_error = None
                if wanted is not None and wanted != self.version:
                    try:
                        self.reload(wanted, cause)
                    except Exception:  # noqa: BLE001 - counted, kept in self.failure and logged by reload
                        continue

        threading.Thread(target=loop, name="voxelflow-model-watch", daemon=True).start()
        return stop
