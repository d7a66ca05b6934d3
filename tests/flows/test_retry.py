"""Retries for what a retry can fix, on the real Prefect server: every retried task of ``tasks/`` uses the
shared classifier, a transient error is retried, and bad data, a spec error or running out of memory
fails the task at its first attempt with its message."""

from __future__ import annotations

import importlib
import pkgutil
import socket

import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import Task

import tasks
from tasks.retry import transient_only


def test_every_retried_task_retries_transient_errors_only():
    found = {}
    for info in pkgutil.iter_modules(tasks.__path__):
        module = importlib.import_module(f"tasks.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, Task) and obj.fn.__module__ == module.__name__:
                found[obj.name] = obj
    assert {"ingest", "ingest-arrived", "preprocess", "train", "start-mlflow-run", "evaluate", "predict",
            "register-and-promote", "rollback", "approval-answer"} <= set(found)
    for name, t in found.items():
        if t.retries:
            assert t.retry_condition_fn is transient_only, f"task {name} retries every error"


ATTEMPTS: dict[str, int] = {}


def refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    socket.create_connection(("127.0.0.1", port), timeout=2)


FAILURES = {
    "network": refused,
    "bad-data": lambda: (_ for _ in ()).throw(ValueError("case c1: label values [0, 1, 7] outside 0..1")),
    "out-of-memory": lambda: (_ for _ in ()).throw(MemoryError("Unable to allocate 96.0 GiB")),
}


@task(retries=2, retry_delay_seconds=0, retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def flaky(kind: str, key: str) -> str:
    ATTEMPTS[key] = ATTEMPTS.get(key, 0) + 1
    if ATTEMPTS[key] == 1 or kind != "network":  # the network comes back for the second attempt
        FAILURES[kind]()
    return "done"


@flow(name="retry-under-test")
def retry_flow(kind: str, key: str) -> str:
    return flaky(kind, key)


@pytest.mark.parametrize("kind, attempts", [("network", 2), ("bad-data", 1), ("out-of-memory", 1)])
def test_a_task_is_retried_for_a_transient_error_only(prefect_here, kind, attempts, caplog):
    key = f"{kind}-{id(caplog)}"
    if kind == "network":
        assert retry_flow(kind, key) == "done"
    else:
        with pytest.raises((ValueError, MemoryError)) as failed:
            retry_flow(kind, key)
        assert str(failed.value) in {"case c1: label values [0, 1, 7] outside 0..1", "Unable to allocate 96.0 GiB"}
    assert ATTEMPTS[key] == attempts
