"""Specs validated before: what the full check of a spec found, kept so that the next load of the same spec needs
no import of MONAI or torch.

Validating a spec in full imports every component it names to check its kind and its arguments against its
signature: ``monai.transforms`` alone takes seconds to import. A run that only ingests (``ingest-arrived``, the
watchers) needs none of it, and a deployment's spec is the same file on every run. So each fully validated spec
is kept as its validated form under ``HOME/cache/specs/``, keyed by the digest of the spec's data and of
everything its check depends on: voxelflow's sources, the installed MONAI, torch and pydantic, and
``VOXELFLOW_ALLOWED_IMPORTS``. A load that finds its key validates the kept form again with every check but the
component imports (:func:`trusted`): the allow-list of import paths is still applied, and so are the step
functions' checks (a user's step module is imported as before). A spec that names a component of another package
by import path (``mypackage.nets:MyNet``) is never kept: its source is not part of the key. A kept form that no
longer validates, or cannot be read, is dropped and the spec is checked in full.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KEPT = ("monai", "torch", "voxelflow")  # packages whose code the key covers (by version or by source digest)
MAX_ENTRIES = 256

_trusted: contextvars.ContextVar[bool] = contextvars.ContextVar("voxelflow_spec_trusted", default=False)
_seen: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("voxelflow_spec_seen", default=None)


class NotKept(Exception):
    """A spec (or a kept form) whose components the key does not cover: validate it in full."""


def is_trusted() -> bool:
    """True while a kept form is being validated again: component imports are skipped."""
    return _trusted.get()


def note(path: str) -> None:
    """Record the top package of an import path a spec names (``mypackage.nets:MyNet`` -> ``mypackage``); under
    :func:`is_trusted`, refuse one whose code the key does not cover."""
    top = path.partition(":")[0].split(".")[0]
    if _trusted.get() and top not in KEPT:
        raise NotKept(top)
    seen = _seen.get()
    if seen is not None:
        seen.add(top)


@contextlib.contextmanager
def trusted() -> Iterator[None]:
    token = _trusted.set(True)
    try:
        yield
    finally:
        _trusted.reset(token)


@contextlib.contextmanager
def watching() -> Iterator[set[str]]:
    """The top packages of the import paths named while the body validates a spec."""
    seen: set[str] = set()
    token = _seen.set(seen)
    try:
        yield seen
    finally:
        _seen.reset(token)


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """voxelflow's sources and the versions of what a spec's check reads (once per process)."""
    from importlib.metadata import PackageNotFoundError, version

    from voxelflow.core.user_code import source_digests

    h = hashlib.sha256()
    h.update(f"voxelflow={source_digests(['voxelflow'])['voxelflow']}\0".encode())
    for dist in ("monai", "torch", "pydantic"):
        try:
            h.update(f"{dist}={version(dist)}\0".encode())
        except PackageNotFoundError:
            h.update(f"{dist}=absent\0".encode())
    return h.hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return sorted(([f"{type(k).__name__}:{k}", _canonical(v)] for k, v in value.items()), key=lambda kv: kv[0])
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return [type(value).__name__, value]
    return [type(value).__name__, repr(value)]


def key(data: dict[str, Any], allowed: tuple[str, ...]) -> str:
    blob = json.dumps([_canonical(data), sorted(allowed), _code_digest()], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def folder(home: Path) -> Path:
    return home / "cache" / "specs"


def read(home: Path, digest: str) -> dict[str, Any] | None:
    path = folder(home) / f"{digest}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("a kept spec could not be read (%s): checking the spec in full", exc)
        drop(home, digest)
        return None


def drop(home: Path, digest: str) -> None:
    with contextlib.suppress(OSError):
        (folder(home) / f"{digest}.json").unlink()


def write(home: Path, digest: str, validated: dict[str, Any]) -> None:
    """Keep ``validated`` (a spec's JSON dump) under ``digest``, atomically; a home that cannot be written to
    (a read-only container) only loses the speed-up."""
    where = folder(home)
    try:
        where.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=where, prefix=".kept-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(validated, out)
            os.replace(tmp, where / f"{digest}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        entries = sorted(where.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in entries[:-MAX_ENTRIES]:
            old.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("spec not kept in %s: %s", where, exc)
