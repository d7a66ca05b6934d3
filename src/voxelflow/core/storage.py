"""Bytes in an object store: one fsspec URL (a folder, ``s3://bucket/prefix``) under which every stage writes.

:class:`Store` reads and writes objects by key; :class:`Layout` names the keys each stage uses;
:class:`CaseStore` keeps one Zarr v3 store per case with a commit marker written last, so a
reader never sees a half-written case on any filesystem (object stores have no rename).
Single objects are atomic on both kinds: a local file is written aside and renamed; an object
store's PUT of one object is all-or-nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from voxelflow.core import redact

COMMITTED = "_committed"


class Store:
    """Objects under one fsspec URL, addressed by ``/``-separated keys."""

    def __init__(self, url: str | Path) -> None:
        url = str(url)
        if "://" not in url or url.startswith("file://"):
            url = str(Path(url.removeprefix("file://")).expanduser().resolve())
        self.url = url.rstrip("/") or "/"
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except Exception as exc:  # the URL may carry credentials: say what failed without them
            redact.scrub(exc)
            raise
        self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"Store({redact.redact(self.url)!r})"

    def __reduce__(self):  # pickles as its URL (Dask tasks, Prefect parameters)
        return (Store, (self.url,))

    @property
    def local(self) -> bool:
        protocol = self.fs.protocol
        return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))

    def path(self, key: str) -> str:
        """The filesystem path of a key (for ``self.fs`` calls)."""
        key = key.strip("/")
        if not key:
            return self.root
        if ".." in key.split("/"):
            raise ValueError(f"store key {key!r} leaves the store")
        return posixpath.join(self.root, key)

    def url_of(self, key: str) -> str:
        """The full URL of a key: what Zarr, xarray and MLflow are given."""
        return self.path(key) if self.local else f"{self.url}/{key.strip('/')}"

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write one object atomically: readers see the old content or the new, never a torn one."""
        path = self.path(key)
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, json.dumps(obj, sort_keys=True, default=str).encode())

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def exists(self, key: str) -> bool:
        self.fs.invalidate_cache(self.path(key))
        return self.fs.exists(self.path(key))

    def list(self, prefix: str) -> list[str]:
        """Names (not paths) directly under ``prefix``; empty when there is nothing."""
        path = self.path(prefix)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def remove(self, key: str) -> None:
        """Delete an object or everything under a prefix; absent keys are fine."""
        path = self.path(key)
        self.fs.invalidate_cache(path)
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def modified(self, key: str) -> float | None:
        """When an object was last written (seconds since the epoch); ``None`` when it does not exist."""
        path = self.path(key)
        self.fs.invalidate_cache(path)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        when = info.get("mtime", info.get("LastModified", info.get("created")))
        return when.timestamp() if hasattr(when, "timestamp") else (float(when) if when is not None else None)

    def files(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (recursive), relative to the store."""
        path = self.path(prefix)
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path)
        except FileNotFoundError:
            return []
        return sorted(p[len(self.root) + 1:] if p.startswith(self.root + "/") else p for p in found)


class CaseStore:
    """One Zarr v3 store per case under a prefix; a case exists once its commit marker does.

    Each write goes to a fresh attempt (``CASE.ATTEMPT.zarr``) and the marker ``_committed/CASE``,
    one object written last, names the attempt to read. Two writers of one case never touch each
    other's objects, a crash before the marker leaves the previous commit in force, and readers
    always see one complete attempt.
    """

    def __init__(self, store: Store, prefix: str) -> None:
        self.store, self.prefix = store, prefix.strip("/")

    def __reduce__(self):
        return (CaseStore, (self.store, self.prefix))

    def _marker(self, case_id: str) -> str:
        return f"{self.prefix}/{COMMITTED}/{case_id}"

    def key(self, case_id: str) -> str:
        """The committed attempt's key (``KeyError`` when the case is not committed)."""
        try:
            attempt = self.store.read_bytes(self._marker(case_id)).decode()
        except FileNotFoundError:
            raise KeyError(f"case {case_id} is not committed under {self.prefix}") from None
        return f"{self.prefix}/{case_id}.{attempt}.zarr"

    def url(self, case_id: str) -> str:
        return self.store.url_of(self.key(case_id))

    def committed(self) -> list[str]:
        return [n for n in self.store.list(f"{self.prefix}/{COMMITTED}") if not n.startswith(".")]  # not temp files

    def is_committed(self, case_id: str) -> bool:
        return self.store.exists(self._marker(case_id))

    def write(self, case_id: str, ds, chunks: tuple[int, ...] | None = None) -> None:
        """Write an xarray Dataset as a new attempt of the case, then commit it by writing the marker.

        A variable's own ``compressors`` encoding is kept (ingestion asks for Blosc); zarr's default otherwise.
        """
        attempt = uuid.uuid4().hex[:12]
        encoding = {v: {"chunks": chunks or ds[v].shape,
                        **({"compressors": ds[v].encoding["compressors"]} if "compressors" in ds[v].encoding else {})}
                    for v in ds.data_vars}
        url = self.store.url_of(f"{self.prefix}/{case_id}.{attempt}.zarr")
        ds.to_zarr(url, mode="w-", zarr_format=3, consolidated=False, encoding=encoding)
        self.store.write_bytes(self._marker(case_id), attempt.encode())

    def open(self, case_id: str):
        import xarray as xr

        # numpy-backed (chunks=None): read inside a Dask task, lazy arrays would become tasks of their own
        return xr.open_zarr(self.url(case_id), zarr_format=3, consolidated=False, chunks=None)

    def attempts(self) -> dict[str, list[str]]:
        """Every attempt present under the prefix, by case id (committed or not)."""
        found: dict[str, list[str]] = {}
        for name in self.store.list(self.prefix):
            parts = name.rsplit(".", 2)
            if len(parts) == 3 and parts[2] == "zarr":
                found.setdefault(parts[0], []).append(parts[1])
        return found

    def sweep(self, grace_s: float = 3600.0, now: float | None = None) -> list[str]:
        """Delete attempts no marker names (left by a writer that crashed or lost a race).

        Only attempts older than ``grace_s`` go: a younger one may belong to a writer that is about
        to commit, and a reader that resolved an old marker a moment ago may still be reading it.
        Returns the keys deleted.
        """
        import time

        now = time.time() if now is None else now
        removed = []
        for case_id, attempts in self.attempts().items():
            try:
                live = self.key(case_id)
            except KeyError:
                live = None
            for attempt in attempts:
                key = f"{self.prefix}/{case_id}.{attempt}.zarr"
                if key == live:
                    continue
                # zarr.json is written first and once: the attempt's age; an attempt without one is as old as its files
                stamps = [self.store.modified(f"{key}/zarr.json")]
                if stamps[0] is None:
                    stamps = [self.store.modified(f) for f in self.store.files(key)] or [None]
                if all(s is not None and now - s > grace_s for s in stamps):
                    self.store.remove(key)
                    removed.append(key)
        return removed

    def remove(self, case_id: str) -> None:
        """Uncommit the case and delete every attempt of it."""
        self.store.remove(self._marker(case_id))
        for name in self.store.list(self.prefix):
            if name.startswith(f"{case_id}.") and name.endswith(".zarr"):
                self.store.remove(f"{self.prefix}/{name}")


@dataclass(frozen=True)
class Layout:
    """Where one pipeline's bytes live in the store; names follow the stage they serve."""

    store: Store
    pipeline: str

    @property
    def dataset(self) -> str:
        return f"datasets/{self.pipeline}"

    @property
    def raw(self) -> CaseStore:
        return CaseStore(self.store, f"{self.dataset}/raw")

    def preprocessed(self, transform_digest: str) -> CaseStore:
        return CaseStore(self.store, f"{self.dataset}/preprocessed/{transform_digest}")

    def quarantine(self, object_sha: str) -> str:
        return f"{self.dataset}/quarantine/{object_sha}"

    def checkpoints(self, run_key: str) -> str:
        return f"checkpoints/{self.pipeline}/{run_key}"

    def model_files(self, run_id: str) -> str:
        return f"models/{self.pipeline}/{run_id}"

    def report(self, run_id: str, name: str) -> str:
        return f"reports/{self.pipeline}/{run_id}/{name}"

    def stage_output(self, lifecycle_id: str, stage: str) -> str:
        return f"runs/{self.pipeline}/{lifecycle_id}/{stage}.json"


def sha256_bytes(*blobs: bytes) -> str:
    h = hashlib.sha256()
    for blob in blobs:
        h.update(hashlib.sha256(blob).digest())
    return h.hexdigest()


def digest_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
