"""Preprocessing: the spec's MONAI transforms, applied to new cases shard by shard on Dask.

Output is one Zarr v3 store of fixed-shape arrays (one case per chunk) named after the
transforms' digest, so a rerun with the same transforms only processes cases it lacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xarray as xr

from voxelflow.config import PreprocessSpec, resolve_monai
from voxelflow.storage import digest_json

KEYS = ("image", "label")


def build_transforms(transforms: list[dict[str, dict[str, Any]]], keys: tuple[str, ...] | None = None):
    """A MONAI ``Compose`` from the spec's list; with ``keys``, each transform keeps only those keys."""
    import warnings

    from monai.transforms import Compose

    out = []
    for item in transforms:
        for name, kwargs in item.items():
            kwargs = dict(kwargs)
            if keys is not None:
                wanted = [kwargs["keys"]] if isinstance(kwargs["keys"], str) else list(kwargs["keys"])
                kept = [i for i, k in enumerate(wanted) if k in keys]
                if not kept:
                    continue
                for arg, value in list(kwargs.items()):
                    if arg != "keys" and isinstance(value, (list, tuple)) and len(value) == len(wanted) and \
                            len(wanted) > 1 and all(v is None or isinstance(v, (str, bool)) for v in value):
                        kwargs[arg] = [value[i] for i in kept]
                kwargs["keys"] = [wanted[i] for i in kept]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # MONAI's notices about changed defaults
                out.append(resolve_monai("monai.transforms", name, "transform")(**kwargs))
    return Compose(out)


def transform_digest(spec: PreprocessSpec) -> str:
    return digest_json(spec.transforms)


def to_meta(array: np.ndarray, affine: np.ndarray):
    """A channel-first MetaTensor carrying the affine, as MONAI's loaders would make it."""
    import torch
    from monai.data import MetaTensor

    return MetaTensor(torch.as_tensor(np.ascontiguousarray(array))[None], affine=torch.as_tensor(affine))


def preprocess_case(case: dict[str, Any], transforms) -> dict[str, np.ndarray]:
    item = {"image": to_meta(case["image"].astype(np.float32), case["affine"])}
    if "label" in case:
        item["label"] = to_meta(case["label"], case["affine"])
    out = transforms(item)
    result = {"image": np.asarray(out["image"].detach().cpu().numpy(), dtype=np.float32)}
    if "label" in out:
        result["label"] = np.rint(out["label"].detach().cpu().numpy()).astype(np.uint8)
    return result


def preprocess_shard(
    raw_store: str, case_ids: list[str], transforms_spec: list[dict[str, dict[str, Any]]], threads: int | None = None
):
    """One Dask task: load, transform and return a shard of cases (in the given order)."""
    from voxelflow.ingest import load_case

    if threads:  # a worker process of its own: one torch thread per Dask thread
        import torch

        torch.set_num_threads(threads)
    transforms = build_transforms(transforms_spec)
    return [(cid, preprocess_case(load_case(raw_store, cid), transforms)) for cid in case_ids]


def shards(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def stored_cases(store: Path) -> list[str]:
    if not (store / "zarr.json").exists():
        return []
    ds = xr.open_zarr(str(store), consolidated=False, zarr_format=3)
    return [str(c) for c in ds["case"].values]


def append_cases(store: Path, results: list[tuple[str, dict[str, np.ndarray]]]) -> None:
    """Append preprocessed cases to the store, one case per chunk."""
    if not results:
        return
    ids = [cid for cid, _ in results]
    image = np.stack([r["image"] for _, r in results])
    dims = ("case", "channel", "x", "y", "z")
    data_vars = {"image": (dims, image)}
    if all("label" in r for _, r in results):
        data_vars["label"] = (dims, np.stack([r["label"] for _, r in results]))
    ds = xr.Dataset(data_vars, coords={"case": np.array(ids, dtype=object)})
    store.parent.mkdir(parents=True, exist_ok=True)
    if (store / "zarr.json").exists():
        ds.to_zarr(str(store), append_dim="case", zarr_format=3, consolidated=False)
    else:
        encoding = {v: {"chunks": (1, *image.shape[1:])} for v in data_vars}
        ds.to_zarr(str(store), mode="w", zarr_format=3, consolidated=False, encoding=encoding)


@dataclass
class PreprocessReport:
    store: str
    processed: int
    skipped: int
    shards: int
    shape: tuple[int, ...]


def preprocess(
    spec: PreprocessSpec,
    raw_store: Path,
    case_ids: list[str],
    out_store: Path,
    submit: Callable[[list[str]], Any] | None = None,
    gather: Callable[[list[Any]], list] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PreprocessReport:
    """Preprocess the cases the store lacks; shards go through ``submit``/``gather`` (Dask) or run here."""
    done = set(stored_cases(out_store))
    todo = sorted(c for c in case_ids if c not in done)
    parts = shards(todo, spec.shard_size)
    results: list[tuple[str, dict[str, np.ndarray]]] = []
    if submit is None or gather is None:
        for i, part in enumerate(parts):
            results.extend(preprocess_shard(str(raw_store), part, spec.transforms))
            if progress:
                progress(i + 1, len(parts))
    else:
        futures = [submit(part) for part in parts]
        for i, shard_result in enumerate(gather(futures)):
            results.extend(shard_result)
            if progress:
                progress(i + 1, len(parts))
    shapes = {r["image"].shape for _, r in results}
    if len(shapes) > 1:
        raise ValueError(
            f"preprocessed cases differ in shape {sorted(shapes)}: end the transforms with one that fixes "
            "the size (e.g. ResizeWithPadOrCropd)"
        )
    append_cases(out_store, results)
    ds = xr.open_zarr(str(out_store), consolidated=False, zarr_format=3) if (out_store / "zarr.json").exists() else None
    shape = tuple(ds["image"].shape[1:]) if ds is not None else ()
    return PreprocessReport(str(out_store), len(todo), len(done & set(case_ids)), len(parts), shape)


def load_arrays(store: Path, case_ids: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read (a subset of) the preprocessed store into memory, in ``case_ids`` order."""
    ds = xr.open_zarr(str(store), consolidated=False, zarr_format=3)
    if case_ids is not None:
        ds = ds.sel(case=list(case_ids))
    out = {"case": np.array([str(c) for c in ds["case"].values]), "image": ds["image"].values}
    if "label" in ds:
        out["label"] = ds["label"].values
    return out
