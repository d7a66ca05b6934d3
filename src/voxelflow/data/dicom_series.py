"""DICOM series found from their headers alone: grouped by SeriesInstanceUID, sized, bounded, labelled.

Discovery reads the first MiB of each object (the header of any sane DICOM object, not its pixels)
and keeps a few integers per series: how many objects, how many voxels (rows x columns x frames) and
pixel bytes (those times samples x bits allocated / 8) their headers declare. A series over
``data.max_voxels`` or ``data.max_series_files`` is refused from those figures before any of its
pixels is held, de-identified or decoded.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from voxelflow.data import dicom
from voxelflow.data.formats import VolumeError

HEADER_BYTES = 1 << 20  # what discovery reads of each object
LABELS_MANIFEST = "labels.json"  # dicom layout: {"labels": [{"series": SeriesInstanceUID, "label": "x.nii.gz"}]}


@dataclass
class Series:
    """One SeriesInstanceUID's objects (or one object that is not DICOM) and what their headers declare."""

    keys: list[str] = field(default_factory=list)
    voxels: int = 0
    pixel_bytes: int = 0
    not_dicom: bool = False


def group(fs, paths: list[str], url: Callable[[str], str], threads: int = 8) -> dict[str, Series]:
    """SeriesInstanceUID (or ``"\\0" + key`` for an object that is not DICOM) -> its :class:`Series`.

    Headers are read ``threads`` at a time (object stores: latency) and reduced to their UID and two
    integers as they come: nothing per object is kept but its key.
    """

    def header(path: str) -> tuple[str, int, int] | None:
        with fs.open(path, "rb") as fh:
            return dicom.object_header(fh.read(HEADER_BYTES))

    groups: dict[str, Series] = {}
    window = 64 * threads  # headers in flight at once: memory does not grow with the number of objects
    with ThreadPoolExecutor(threads, thread_name_prefix="voxelflow-discover") as pool:
        for start in range(0, len(paths), window):
            chunk = paths[start:start + window]
            for path, head in zip(chunk, pool.map(header, chunk)):
                _add(groups, url(path), head)
    return groups


def _add(groups: dict[str, Series], key: str, head: tuple[str, int, int] | None) -> None:
    if head is None:  # a non-DICOM object is its own case
        groups[f"\0{key}"] = Series([key], not_dicom=True)
        return
    uid, voxels, nbytes = head
    series = groups.setdefault(uid or f"\0{key}", Series())  # one without a UID: its own case too
    series.keys.append(key)
    series.voxels += voxels
    series.pixel_bytes += nbytes


def bound(objects: int, voxels: int, pixel_bytes: int, max_voxels: int, max_series_files: int,
          max_bytes: int) -> VolumeError | None:
    """``too-large`` for a series over the limits, from what discovery read; None when it is within them."""
    if objects > max_series_files:
        return VolumeError("too-large", f"a series of {objects} objects, over data.max_series_files "
                                        f"({max_series_files}); none held, kept where they arrived")
    if voxels > max_voxels or pixel_bytes > max_bytes:
        return VolumeError("too-large", f"the headers declare {voxels} voxels ({pixel_bytes} pixel bytes), over "
                                        f"data.max_voxels ({max_voxels}); none held, kept where they arrived")
    return None


def labels(fs, manifest: str, source: str) -> dict[str, str]:
    """``labels.json``: SeriesInstanceUID -> label path; a malformed manifest is a clear error."""
    if not fs.exists(manifest):
        return {}
    try:
        meta = json.loads(fs.cat_file(manifest))
    except ValueError as exc:
        raise ValueError(f"{source}: {LABELS_MANIFEST} is not valid JSON ({exc})") from None
    items = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"{source}: {LABELS_MANIFEST} must be an object whose labels is a list")
    out: dict[str, str] = {}
    for i, item in enumerate(items):
        series, label = (item.get("series"), item.get("label")) if isinstance(item, dict) else (None, None)
        if not isinstance(series, str) or not series or not isinstance(label, str) or not label:
            raise ValueError(f"{source}: {LABELS_MANIFEST} labels[{i}] needs a series (a SeriesInstanceUID) and a "
                             "label path")
        if out.setdefault(series, label) != label:
            raise ValueError(f"{source}: {LABELS_MANIFEST} names two labels for one series (labels[{i}])")
    return out
