"""Preprocessing: the spec's MONAI transforms, applied to new cases shard by shard on Dask workers.

Each case's result is its own Zarr v3 store in a :class:`~voxelflow.core.storage.CaseStore` named by
:func:`transform_key` (the transforms, ``preprocess.device``, the MONAI, torch and voxelflow versions
and the source of user transform classes; ``image`` float32 ``(channel, x, y, z)``, ``label`` uint8
when the case has one), committed by a marker written last. The worker that runs a shard reads its cases from the
raw store, transforms them and writes them itself: only small metadata (case ids, shapes, bytes)
comes back to the driver, never an array. Writes are per case and idempotent, so a shard that
Dask reschedules after its worker died produces the same bytes; a case that keeps killing its
worker ends in :attr:`PreprocessReport.failed` while the others complete.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from voxelflow.core.storage import CaseStore
from voxelflow.data.transforms import _monai_transform as _monai_transform  # imported from here
from voxelflow.data.transforms import build_transforms as build_transforms  # imported from here
from voxelflow.data.transforms import cached_transforms, transform_digest, transform_key

if TYPE_CHECKING:  # the workers need neither pydantic nor the rest of the spec machinery
    from voxelflow.spec.config import PreprocessSpec

log = logging.getLogger(__name__)

KEYS = ("image", "label")
CHUNK = 128  # largest chunk edge of a preprocessed array (channel axis excepted)


def open_case(store: CaseStore, case_id: str):
    """A case's Dataset backed by Zarr directly (no Dask graph).

    ``CaseStore.open`` gives Dask arrays; computing those inside a Dask task would submit their
    chunks to the cluster as tasks of their own, and in the driver while a Client is the default
    scheduler, read them through the cluster. Here ``.values`` reads the chunks in this process.
    """
    import xarray as xr

    return xr.open_zarr(store.url(case_id), zarr_format=3, consolidated=False, chunks=None)


def read_case(raw: CaseStore, case_id: str) -> dict[str, Any]:
    """One raw (ingested) case: ``image``, ``affine`` (4, 4), ``attrs``, ``label`` when it has one.

    What ``voxelflow.data.ingest.load_case`` returns, read as :func:`open_case` does (and without
    importing the ingestion module, its database layer included, on every worker).
    """
    ds = open_case(raw, case_id)
    case = {"image": np.asarray(ds["image"].values), "affine": np.asarray(ds.attrs["affine"], dtype=np.float64),
            "attrs": dict(ds.attrs)}
    if "label" in ds:
        case["label"] = np.asarray(ds["label"].values)
    return case


def to_meta(array: np.ndarray, affine: np.ndarray):
    """A channel-first MetaTensor carrying the affine, as MONAI's loaders would make it."""
    import torch
    from monai.data import MetaTensor

    return MetaTensor(torch.as_tensor(np.ascontiguousarray(array))[None], affine=torch.as_tensor(affine))


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        value = value.as_tensor() if hasattr(value, "as_tensor") else value
        return value.numpy()
    return np.asarray(value)


def preprocess_case(case: dict[str, Any], transforms, device: str = "cpu") -> dict[str, Any]:
    """Transform one loaded case: ``image`` float32 and ``label`` uint8 (channel first), ``affine`` or None.

    ``device="cuda"``: the tensors go to the GPU before the transforms and come back before anything
    is returned.
    """
    item = {"image": to_meta(case["image"].astype(np.float32, copy=False), case["affine"])}
    if "label" in case:
        item["label"] = to_meta(case["label"], case["affine"])
    if device != "cpu":
        item = {k: v.to(device) for k, v in item.items()}
    out = transforms(item)
    affine = getattr(out["image"], "affine", None)
    result = {
        "image": np.ascontiguousarray(_to_numpy(out["image"]), dtype=np.float32),
        "affine": None if affine is None else np.asarray(_to_numpy(affine), dtype=np.float64),
    }
    if "label" in out:
        result["label"] = np.rint(_to_numpy(out["label"])).astype(np.uint8)
    return result


def case_dataset(result: dict[str, Any], source_attrs: dict[str, Any], transforms_digest: str):
    """The xarray Dataset one preprocessed case is stored as."""
    import xarray as xr

    dims = ("channel", "x", "y", "z")[-result["image"].ndim:]
    data_vars = {"image": (dims, result["image"])}
    if "label" in result:
        data_vars["label"] = (dims, result["label"])
    attrs = {k: v for k, v in source_attrs.items() if k not in ("affine", "spacing", "dtype")}
    for k in ("affine", "spacing", "dtype"):
        if k in source_attrs:
            attrs[f"source_{k}"] = source_attrs[k]
    attrs["transforms_digest"] = transforms_digest
    if result["affine"] is not None:  # the geometry after the transforms (MONAI's MetaTensor tracks it)
        affine = result["affine"]
        attrs["affine"] = affine.tolist()
        attrs["spacing"] = np.linalg.norm(affine[:3, :3], axis=0).tolist()
    return xr.Dataset(data_vars, attrs=attrs)


def chunks_for(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Whole channels, spatial chunks of at most ``CHUNK`` per axis."""
    return (shape[0], *(min(s, CHUNK) for s in shape[1:]))


def _case_bytes(ds) -> int:
    return int(sum(ds[v].size * ds[v].dtype.itemsize for v in ds.data_vars))


def committed_summary(out: CaseStore, case_id: str) -> dict[str, Any]:
    """Shape and bytes of a case already in ``out`` (metadata only)."""
    ds = open_case(out, case_id)
    return {"case": case_id, "shape": [int(s) for s in ds["image"].shape], "bytes": _case_bytes(ds)}


def _worker_threads() -> int | None:
    try:
        from distributed import get_worker

        return get_worker().state.nthreads
    except (ImportError, ValueError):  # not inside a Dask worker
        return None


def preprocess_shard(
    raw: CaseStore, out: CaseStore, case_ids: list[str], transforms_spec: list[dict[str, dict[str, Any]]],
    device: str = "cpu", key: str | None = None,
) -> list[dict[str, Any]]:
    """One Dask task: read, transform and write each case of a shard, in order; return small metadata.

    Each entry is ``{"case", "shape", "bytes"}`` for a written case (``"resumed": True`` when an
    earlier attempt of this shard had already committed it) or ``{"case", "error"}`` for a case
    whose processing raised; the other cases of the shard go on. Nothing else comes back. ``key``
    (recorded with each case) is the store's :func:`transform_key`, computed here when not given.
    """
    threads = _worker_threads()
    if threads:  # a worker process: as many torch threads as the worker has (the preload sets it too)
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    digest = key or transform_key(transforms_spec, device)
    transforms = cached_transforms(transforms_spec, digest)
    results = []
    for cid in case_ids:
        if out.is_committed(cid):  # a rescheduled shard: its killed attempt got this far
            results.append({**committed_summary(out, cid), "resumed": True})
            continue
        try:
            t0 = time.perf_counter()
            case = read_case(raw, cid)
            t1 = time.perf_counter()
            ds = case_dataset(preprocess_case(case, transforms, device), case["attrs"], digest)
            del case
            t2 = time.perf_counter()
            out.write(cid, ds, chunks=chunks_for(ds["image"].shape))
            t3 = time.perf_counter()
            results.append({"case": cid, "shape": [int(s) for s in ds["image"].shape], "bytes": _case_bytes(ds),
                            "seconds": {"read": t1 - t0, "transform": t2 - t1, "write": t3 - t2}})
        except Exception as exc:  # this case only; a transient error gets one more try as a single task
            if device != "cpu" and threads and sticky_cuda_error(exc):
                # the CUDA context of this process is broken for good: every later case (and retry) landing
                # here would fail. End the worker process; its nanny starts a fresh one, and the shard is
                # rescheduled (KilledWorker), its cases alone if it kills workers again
                log.error("preprocessing %s broke this worker's CUDA context (%s): restarting the worker", cid, exc)
                os._exit(75)
            log.warning("preprocessing %s failed: %s", cid, exc)
            results.append({"case": cid, "error": describe(exc)})
    return results


_STICKY_CUDA = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
                "illegal instruction", "uncorrectable ecc error", "launch timed out")


def sticky_cuda_error(exc: BaseException) -> bool:
    """A CUDA error that leaves the process's context unusable (every later call fails), unlike running
    out of memory, which frees up when the case is gone."""
    import torch

    text = str(exc).lower()
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text:
        return False
    accelerator = getattr(torch, "AcceleratorError", None)
    return (accelerator is not None and isinstance(exc, accelerator)) or (
        "cuda error" in text and any(s in text for s in _STICKY_CUDA))


def describe(exc: BaseException) -> str:
    """An error and what caused it, one line: MONAI wraps the real cause in "applying transform ..."."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(parts)[:2000]


def shards(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@dataclass
class PreprocessReport:
    store: str
    processed: int
    skipped: int
    shards: int
    bytes_written: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # summed over the cases, wherever they ran


class _Tally:
    """The driver's bookkeeping: which cases ended how, and the progress callback."""

    def __init__(self, total: int, progress: Callable[[int, int], None] | None) -> None:
        self.total, self.progress = total, progress
        self.shapes: dict[str, list[int]] = {}
        self.failed: dict[str, str] = {}
        self.bytes = 0
        self.seconds = {"read": 0.0, "transform": 0.0, "write": 0.0}

    def written(self, entry: dict[str, Any]) -> None:
        if entry["case"] not in self.shapes:
            self.shapes[entry["case"]] = entry["shape"]
            self.bytes += entry["bytes"]
            for phase, seconds in entry.get("seconds", {}).items():
                self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def fail(self, case_id: str, reason: str) -> None:
        log.warning("preprocessing %s failed for good: %s", case_id, reason)
        self.failed[case_id] = reason

    def tick(self) -> None:
        if self.progress:
            self.progress(len(self.shapes) + len(self.failed), self.total)


def _killed_reason(exc: BaseException) -> str:
    last = getattr(getattr(exc, "last_worker", None), "address", None)
    return ("KilledWorker: the worker process died while processing this case, also when it ran alone on the "
            f"cluster (out of memory, or a crash in native code?); last worker: {last}")


def _run_local(spec: PreprocessSpec, raw: CaseStore, out: CaseStore, parts: list[list[str]], tally: _Tally) -> None:
    """No cluster: the same shard function in this process, one shard after the other."""
    key = transform_digest(spec)
    for part in parts:
        try:
            entries = preprocess_shard(raw, out, part, spec.transforms, spec.device, key)
        except Exception as exc:  # the shard as a whole: every case gets its own try
            entries = [{"case": c, "error": describe(exc)} for c in part]
        for entry in entries:
            if "error" not in entry:
                tally.written(entry)
                continue
            try:
                (single,) = preprocess_shard(raw, out, [entry["case"]], spec.transforms, spec.device, key)
            except Exception as exc:
                single = {"case": entry["case"], "error": describe(exc)}
            if "error" in single:
                tally.fail(single["case"], single["error"])
            else:
                tally.written(single)
        tally.tick()


def _check_cuda(client) -> None:
    def cuda_ok() -> bool:
        import torch

        return torch.cuda.is_available()

    missing = sorted(addr for addr, ok in client.run(cuda_ok).items() if not ok)
    if missing:
        raise RuntimeError(f"preprocess.device is cuda but these Dask workers have no CUDA device: {missing}")


def _run_dask(client, spec: PreprocessSpec, raw: CaseStore, out: CaseStore, parts: list[list[str]],
              tally: _Tally) -> None:
    """Shards as Dask tasks; failed shards come back as single-case tasks, suspects of killing run alone."""
    from distributed import KilledWorker, as_completed

    if spec.device != "cpu":
        _check_cuda(client)
    key = transform_digest(spec)
    pending: dict[Any, tuple[list[str], str]] = {}  # future -> (cases, "shard" | "single" | "alone")
    ac = as_completed()

    def submit(cases: list[str], kind: str) -> None:
        fut = client.submit(preprocess_shard, raw, out, cases, spec.transforms, spec.device, key, pure=False)
        pending[fut] = (cases, kind)
        ac.add(fut)

    suspects: list[str] = []  # cases that may kill a worker: each runs with nothing else of ours running
    for part in parts:
        submit(part, "shard")
    while True:
        for fut in ac:
            cases, kind = pending.pop(fut)
            try:
                entries = fut.result()
            except Exception as exc:  # KilledWorker, a lost scheduler connection, ...
                entries = None
                error = exc
            finally:
                fut.release()
            if entries is not None:
                for entry in entries:
                    if "error" not in entry:
                        tally.written(entry)
                    elif kind == "shard":
                        submit([entry["case"]], "single")
                    else:
                        tally.fail(entry["case"], entry["error"])
            elif kind == "alone":
                tally.fail(cases[0], _killed_reason(error) if isinstance(error, KilledWorker) else describe(error))
            elif kind == "single" and not isinstance(error, KilledWorker):
                tally.fail(cases[0], describe(error))
            else:
                # A worker died (KilledWorker counts every task that was on it, not only the culprit), or
                # the task failed as a whole. Cases an attempt committed are done; a shard's first
                # uncommitted case is the one its last attempt was processing: it runs alone later, the
                # rest as single-case tasks now. A single that was killed among others runs alone too.
                left = []
                for cid in cases:
                    if out.is_committed(cid):
                        tally.written(committed_summary(out, cid))
                    else:
                        left.append(cid)
                log.warning("preprocessing task for %d case(s) failed (%s: %s); %d case(s) to redo",
                            len(cases), type(error).__name__, error, len(left))
                if left and isinstance(error, KilledWorker):
                    suspects.append(left.pop(0))
                for cid in left:
                    submit([cid], "single")
            tally.tick()
        if not suspects:
            break
        submit([suspects.pop(0)], "alone")


# What a Dask cluster started for one run costs to start and close. Measured on 2 cores: a 2-worker LocalCluster
# took 7.7 s to start and 10.3 s with its close.
CLUSTER_COST_S = 10.0


def worth_a_cluster(seconds: float, done: int, left: int, workers: int) -> bool:
    """Whether ``left`` cases, at the ``seconds``/``done`` each the ``done`` ones took here, end sooner on a
    cluster of ``workers`` started now (:data:`CLUSTER_COST_S` included) than here, one after the other."""
    if workers < 2 or done < 1 or left < 1:
        return False
    here = seconds / done * left
    return here - here / workers > CLUSTER_COST_S


def _run_here_first(spec: PreprocessSpec, raw: CaseStore, out: CaseStore, parts: list[list[str]], tally: _Tally,
                    cluster: Callable[[], AbstractContextManager[Any]], workers: int) -> None:
    """Shards here one after the other while that is the sooner way; the rest on ``cluster()`` once it is not."""
    started, done, left = time.perf_counter(), 0, sum(map(len, parts))
    for i, part in enumerate(parts):
        _run_local(spec, raw, out, [part], tally)
        rest = parts[i + 1 :]
        done, left = done + len(part), left - len(part)
        seconds = time.perf_counter() - started
        if worth_a_cluster(seconds, done, left, min(workers, len(rest))):
            log.info("preprocessing the %d case(s) left on a Dask cluster: %d took %.1f s here", left, done, seconds)
            with cluster() as client:
                _run_dask(client, spec, raw, out, rest, tally)
            return


def preprocess(
    spec: PreprocessSpec,
    raw: CaseStore,
    case_ids: list[str],
    out: CaseStore,
    client=None,
    progress: Callable[[int, int], None] | None = None,
    cluster: Callable[[], AbstractContextManager[Any]] | None = None,
    workers: int = 1,
) -> PreprocessReport:
    """Preprocess the cases ``out`` lacks, shard by shard: on Dask workers with ``client``, else here.

    With ``cluster`` instead (a function that starts a Dask cluster of ``workers`` workers: a context manager
    giving its client), shards run here first, and the rest moves onto that cluster as soon as the time the
    done ones took predicts it ends sooner there, its start and close included (:func:`worth_a_cluster`);
    so a few cases never wait for a cluster and many never run one by one.
    ``out`` is the store for these transforms (``Layout.preprocessed(transform_digest(spec))``).
    ``progress(done_cases, total_cases)`` is called as shards end. Cases that cannot be processed
    (an error, or killing their worker again and again) are listed in ``failed`` with a reason;
    the others are committed and the call does not raise for them.
    """
    wanted = list(dict.fromkeys(case_ids))
    done = set(out.committed())
    todo = sorted(c for c in wanted if c not in done)
    parts = shards(todo, spec.shard_size)
    tally = _Tally(len(todo), progress)
    if parts:
        if client is None:
            if spec.device != "cpu":
                import torch

                if not torch.cuda.is_available():
                    raise RuntimeError("preprocess.device is cuda but torch sees no CUDA device in this process")
            if cluster is None:
                _run_local(spec, raw, out, parts, tally)
            else:
                _run_here_first(spec, raw, out, parts, tally, cluster, workers)
        else:
            _run_dask(client, spec, raw, out, parts, tally)
    return PreprocessReport(
        store=out.store.url_of(out.prefix),
        processed=len(tally.shapes),
        skipped=len(wanted) - len(todo),
        shards=len(parts),
        bytes_written=tally.bytes,
        failed=[{"case": c, "reason": r} for c, r in sorted(tally.failed.items())],
        shapes=dict(sorted(tally.shapes.items())),
        seconds={k: round(v, 3) for k, v in tally.seconds.items()},
    )


def load_case_arrays(out: CaseStore, case_id: str) -> dict[str, Any]:
    """One preprocessed case: ``image`` (C, x, y, z) float32, ``label`` uint8 when stored, ``affine``."""
    ds = open_case(out, case_id)
    result: dict[str, Any] = {"case": case_id, "image": np.asarray(ds["image"].values)}
    if "label" in ds:
        result["label"] = np.asarray(ds["label"].values)
    if "affine" in ds.attrs:
        result["affine"] = np.asarray(ds.attrs["affine"], dtype=np.float64)
    return result


def load_arrays(out: CaseStore, case_ids: list[str] | None = None) -> dict[str, np.ndarray]:
    """Preprocessed cases stacked for training, in ``case_ids`` order (default: every committed case):
    ``case``, ``image`` (N, C, ...), ``label`` (when the cases have one).

    Training on whole volumes needs every case to have the same shape.
    """
    if case_ids is None:
        case_ids = out.committed()
    cases = [load_case_arrays(out, cid) for cid in case_ids]
    if not cases:
        raise ValueError("no cases to load")
    shapes = {tuple(c["image"].shape) for c in cases}
    if len(shapes) > 1:
        raise ValueError(
            f"the preprocessed cases differ in shape ({len(shapes)} shapes, e.g. {sorted(shapes)[:3]}); training on "
            "whole volumes needs equal shapes: end the transforms with one that fixes the size "
            "(e.g. ResizeWithPadOrCropd)"
        )
    arrays = {"case": np.array([c["case"] for c in cases]), "image": np.stack([c["image"] for c in cases])}
    with_label = [c for c in cases if "label" in c]
    if with_label and len(with_label) != len(cases):
        raise ValueError("some of these cases have a label and some do not")
    if with_label:
        arrays["label"] = np.stack([c["label"] for c in cases])
    return arrays
