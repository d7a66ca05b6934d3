"""The DICOM spool: received instances, identified, kept under the store's ``spool/`` prefix until they are used.

An instance is named by the sha256 of its bytes, never by a UID or a patient value, and grouped by
its study and series, whose UIDs appear only hashed (:func:`hashed`)::

    spool/PIPELINE/STUDY_HASH/SERIES_HASH/SHA256.dcm

While an association is open its instances wait in a local staging folder of their own
(``spool/.incoming/ASSOCIATION/`` when the store is local, a folder given by the caller otherwise):
they reach the series folders only once the association was released (:meth:`Spool.commit`), and an
association that is aborted leaves nothing behind (:meth:`Spool.drop`). Instances still being
received are written by the DICOM stack into ``spool/.incoming/tmp`` (its temporary files), so no
identified byte lands outside the spool. The spool's size, staging included, is what
``VOXELFLOW_SPOOL_MAX_BYTES`` bounds (:meth:`Spool.used_bytes`).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from voxelflow.core.storage import Store
from voxelflow.data.watch import DATA_ARRIVED, Arrival, announcement_id

SPOOL = "spool"
_BLOCK = 1 << 20


def hashed(value: str) -> str:
    """A study's, series' or caller's identifier as voxelflow records it: 24 hex digits of a sha256."""
    return hashlib.sha256(b"voxelflow-spool\0" + value.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Instance:
    """One received instance in staging: its content hash, size and the hashes of its study and series."""

    sha256: str
    size: int
    study: str
    series: str
    staged: Path


class Spool:
    """One pipeline's part of the spool in ``store``; ``staging`` is where open associations' instances wait
    (default: ``spool/.incoming`` in the store, which must then be local)."""

    def __init__(self, store: Store, pipeline: str, staging: str | Path | None = None) -> None:
        if staging is None and not store.local:
            raise ValueError("a spool in an object store needs a local staging folder for instances in transit")
        self.store, self.pipeline = store, pipeline
        self.prefix = f"{SPOOL}/{pipeline}"
        self.staging = Path(staging) if staging is not None else Path(store.path(f"{SPOOL}/.incoming"))
        self.tmp = self.staging / "tmp"

    # ------------------------------------------------------------ names
    def series_key(self, study: str, series: str) -> str:
        return f"{self.prefix}/{study}/{series}"

    def instance_key(self, instance: Instance) -> str:
        return f"{self.series_key(instance.study, instance.series)}/{instance.sha256}.dcm"

    def _staged_dir(self, association: str) -> Path:
        if not association.isalnum():
            raise ValueError(f"association id {association!r} is not alphanumeric")
        return self.staging / association

    # ------------------------------------------------------------ staging
    def prepare(self) -> None:
        """Create the staging folders and empty them: what an earlier process left there belonged to
        associations that never ended with a release, and is dropped."""
        if self.staging.exists():
            for entry in self.staging.iterdir():
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def stage(self, path: str | Path, association: str) -> Instance:
        """Move a received file (a DICOM Part-10 file written by the DICOM stack) into the association's
        staging folder under its content hash. Raises ValueError, and removes the file, when it is no
        DICOM object with a study and a series."""
        import pydicom

        path = Path(path)
        try:
            digest, size = hashlib.sha256(), 0
            with path.open("rb") as fh:
                while block := fh.read(_BLOCK):
                    digest.update(block)
                    size += len(block)
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
                study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
            except Exception as exc:  # the reason names no value of the object
                raise ValueError(f"the instance is not readable DICOM ({type(exc).__name__})") from None
            if not study or not series:
                raise ValueError("the instance has no StudyInstanceUID or SeriesInstanceUID")
            folder = self._staged_dir(association)
            folder.mkdir(parents=True, exist_ok=True)
            staged = folder / f"{digest.hexdigest()}.dcm"
            os.replace(path, staged)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return Instance(digest.hexdigest(), size, hashed(study), hashed(series), staged)

    def commit(self, instances: list[Instance]) -> list[str]:
        """Move staged instances into their series folders; returns the keys that were not there before
        (an instance received twice is one file)."""
        added = []
        for inst in instances:
            key = self.instance_key(inst)
            if not inst.staged.exists():  # the same content twice in one association: moved already
                continue
            if self.store.exists(key):
                inst.staged.unlink(missing_ok=True)
                continue
            target = self.store.path(key)
            if self.store.local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(inst.staged, target)
            else:
                self.store.fs.put_file(str(inst.staged), target)
                inst.staged.unlink(missing_ok=True)
            added.append(key)
        return added

    def drop(self, association: str, partial: str | Path | tuple | None = None) -> None:
        """Delete what an association staged, and ``partial`` (the file of an instance it was sending)."""
        folder = self._staged_dir(association)
        for _ in range(10):  # an instance moved in while the folder was being removed is removed too
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                break
        if isinstance(partial, tuple):  # the DICOM stack's (path, offset) of a file it streams into
            partial = partial[0]
        if partial is not None:
            Path(partial).unlink(missing_ok=True)

    def release_staging(self, association: str) -> None:
        """Remove an association's (empty) staging folder after its instances were committed."""
        shutil.rmtree(self._staged_dir(association), ignore_errors=True)

    # ------------------------------------------------------------ contents
    def used_bytes(self) -> int:
        """Bytes under the store's ``spool/`` prefix (every pipeline's) plus the local staging folder."""
        total = 0
        path = self.store.path(SPOOL)
        self.store.fs.invalidate_cache(path)
        try:
            found = self.store.fs.find(path, detail=True)
        except FileNotFoundError:
            found = {}
        staging = str(self.staging)
        for name, info in found.items():
            if not (self.store.local and name.startswith(staging + "/")):
                total += int(info.get("size") or 0)
        for root, _, files in os.walk(self.staging):
            for f in files:
                try:
                    total += os.stat(os.path.join(root, f)).st_size
                except FileNotFoundError:  # committed or dropped meanwhile
                    pass
        return total

    def series(self) -> list[str]:
        """Every series folder of the pipeline (keys), in a stable order."""
        out = []
        for study in self.store.list(self.prefix):
            if study.startswith("."):
                continue
            out += [f"{self.prefix}/{study}/{s}" for s in self.store.list(f"{self.prefix}/{study}")
                    if not s.startswith(".")]
        return out

    def objects(self, series_key: str) -> list[dict]:
        """The instances of a series folder: ``{"key", "version" (content hash), "size"}``, by key."""
        path = self.store.path(series_key)
        self.store.fs.invalidate_cache(path)
        try:
            found = self.store.fs.find(path, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for name, info in sorted(found.items()):
            base = posixpath.basename(name)
            if base.startswith(".") or not base.endswith(".dcm"):
                continue
            key = f"{series_key}/{base}"
            out.append({"key": key, "version": base.removesuffix(".dcm"), "size": int(info.get("size") or 0)})
        return out

    def announce(self, series_key: str, announced: dict[str, str], cursor: str,
                 emit: Callable[[Arrival], None]) -> Arrival | None:
        """Emit the instances of a series not announced yet (by content hash) as one ``voxelflow.data.arrived``
        batch with ``voxelflow watch``'s ids, then note them in ``announced`` (the caller saves it as its
        cursor): the same content is announced once. None when nothing is new."""
        fresh = [o for o in self.objects(series_key) if announced.get(o["key"]) != o["version"]]
        if not fresh:
            return None
        arrival = Arrival(self.store.url_of(series_key), [{**o, "key": self.store.url_of(o["key"])} for o in fresh],
                          announcement_id(DATA_ARRIVED, cursor, [[o["key"], o["version"]] for o in fresh],
                                          {o["key"]: announced.get(o["key"]) for o in fresh}))
        emit(arrival)
        announced.update({o["key"]: o["version"] for o in fresh})
        return arrival
