"""Finding the cases under a data source: the layouts (decathlon, folder, dicom, mixed), ``dataset.json``
read and checked, and every entry that would leave the source (a path, URL or link) named, never read."""

from __future__ import annotations

import json
import posixpath
import typing
from dataclasses import dataclass
from pathlib import Path

import fsspec

from voxelflow.data import dicom_series
from voxelflow.data.formats import NIFTI_SUFFIXES
from voxelflow.spec.config import DataSpec


@dataclass(frozen=True)
class SourceCase:
    """One case found under a source: its objects (fsspec URLs) and what discovery learned of them."""

    name: str
    image: str
    label: str | None = None
    outside: str | None = None  # why an entry points outside the source: never read
    series: tuple[str, ...] = ()  # dicom layout: every object of one series (or one object that is not DICOM)
    not_dicom: bool = False  # dicom layout: a lone object whose first MiB is no DICOM header (hashed, never kept)
    voxels: int = 0  # dicom layout: rows x columns x frames, summed over the series' headers
    pixel_bytes: int = 0  # dicom layout: the pixel bytes those headers declare

    @property
    def objects(self) -> list[str]:
        if self.series:
            return [*self.series, *([self.label] if self.label else [])]
        return [u for u in (self.image, self.label) if u]


def _join(base: str, rel: str) -> str:
    rel = rel.removeprefix("./")
    return posixpath.join(base.rstrip("/"), rel)


def _escapes(rel: str) -> str | None:
    """Why a manifest entry would leave the source (absolute, ``..``, encoded or not), or None."""
    from urllib.parse import unquote

    decoded = rel
    for _ in range(3):  # %252e%252e is %2e%2e is ..
        decoded = unquote(decoded)
    for text in (rel, decoded):
        text = text.replace("\\", "/")
        if "://" in text or text.startswith("/") or (len(text) > 1 and text[1] == ":"):
            return f"{rel!r} is an absolute path or URL"
        if ".." in text.split("/"):
            return f"{rel!r} climbs out of the source"
    return None


def _leaves_by_link(fs, root: str, path: str) -> bool:
    """A local path whose real location (symlinks followed) is outside the real source folder."""
    import os

    if "file" not in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        return False  # object stores have no links
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) != real_root


def discover(source: str, layout: str) -> list[SourceCase]:
    """List the cases under an fsspec URL, in a stable order."""
    fs, root = fsspec.core.url_to_fs(source)
    if not fs.exists(root):
        raise FileNotFoundError(f"data source {source!r} does not exist")
    proto = source.split("://", 1)[0] + "://" if "://" in source else ""
    url = lambda p: p if not proto or p.startswith(proto) else proto + p  # noqa: E731
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    cases: list[SourceCase] = []
    named: set[str] = set()  # mixed: what dataset.json names (and itself) is not read as DICOM
    if layout in ("decathlon", "mixed"):
        manifest = _join(root, "dataset.json")
        if fs.exists(manifest):
            named.add(posixpath.normpath(manifest))
            try:
                meta = json.loads(fs.cat_file(manifest))
            except ValueError as exc:
                raise ValueError(f"{source}: dataset.json is not valid JSON ({exc})") from None
        elif layout == "decathlon":
            raise FileNotFoundError(f"{source}: decathlon layout needs a dataset.json")
        else:
            meta = {}
        if not isinstance(meta, dict):
            raise ValueError(f"{source}: dataset.json must be an object whose training and test are lists")
        # `training` entries are labelled cases; `test` entries (Decathlon's imagesTs) unlabelled ones
        training, test = meta.get("training") or [], meta.get("test") or []
        if not isinstance(training, list) or not isinstance(test, list):
            raise ValueError(f"{source}: dataset.json must be an object whose training and test are lists")
        entries = [*((f"training[{i}]", t) for i, t in enumerate(training)),
                   *((f"test[{i}]", t) for i, t in enumerate(test))]
        for i, (where, item) in enumerate(entries):
            image = item.get("image") if isinstance(item, dict) else item
            label = item.get("label") if isinstance(item, dict) else None
            if not isinstance(image, str) or not image or not isinstance(label, (str, type(None))):
                raise ValueError(f"{source}: dataset.json {where} needs an image path (a string) and at most "
                                 "one label path")
            label = label or None
            name = Path(image).name
            for suffix in NIFTI_SUFFIXES[::-1]:
                name = name.removesuffix(suffix)
            outside = next((why for why in map(_escapes, filter(None, (image, label))) if why), None)
            if outside is None:
                for rel in filter(None, (image, label)):
                    named.add(posixpath.normpath(_join(root, rel)))
                    if _leaves_by_link(fs, root, _join(root, rel)):
                        outside = f"{rel!r} is a link to outside the source"
            cases.append(
                SourceCase(
                    name=name or f"case{i}",
                    # an entry outside the source is named as written and never joined, opened or read
                    image=image if outside else url(_join(root, image)),
                    label=(label if outside else url(_join(root, label))) if label else None,
                    outside=outside,
                )
            )
    if layout == "folder":
        for entry in sorted(fs.ls(root, detail=False)):
            if not fs.isdir(entry):
                continue
            files = {posixpath.basename(f): f for f in fs.ls(entry, detail=False)}
            image = next((files[n] for n in ("image.nii.gz", "image.nii") if n in files), None)
            label = next((files[n] for n in ("label.nii.gz", "label.nii") if n in files), None)
            if image is None:
                image = next((f for n, f in sorted(files.items()) if not n.startswith("label")), None)
            if image:
                links = [f for f in (image, label) if f and _leaves_by_link(fs, root, f)]
                outside = f"{posixpath.basename(links[0])!r} is a link to outside the source" if links else None
                cases.append(SourceCase(posixpath.basename(entry), url(image), url(label) if label else None,
                                        outside))
    if layout in ("dicom", "mixed"):
        manifest = _join(root, dicom_series.LABELS_MANIFEST)
        labels = dicom_series.labels(fs, manifest, source)  # SeriesInstanceUID -> label NIfTI, relative to the source
        skip = {posixpath.normpath(_join(root, rel)) for rel in labels.values() if not _escapes(rel)}
        skip |= {posixpath.normpath(manifest)} | named
        inside = []
        for path in sorted(fs.find(root)):
            if posixpath.normpath(path) in skip:
                continue
            if _leaves_by_link(fs, root, path):
                key = url(path)
                cases.append(SourceCase(f"object{len(cases)}", key, None, "a link to outside the source", (key,)))
            else:
                inside.append(path)
        groups = dicom_series.group(fs, inside, url)
        for i, (uid, series) in enumerate(sorted(groups.items(), key=lambda kv: kv[1].keys[0])):
            rel = labels.get(uid)
            outside = _escapes(rel) if rel else None
            if rel and outside is None and _leaves_by_link(fs, root, _join(root, rel)):
                outside = f"{rel!r} is a link to outside the source"
            label = (rel if outside else url(_join(root, rel))) if rel else None
            cases.append(SourceCase(f"series{i}", series.keys[0], label, outside, tuple(series.keys),
                                    series.not_dicom, series.voxels, series.pixel_bytes))
    return cases


LAYOUTS = typing.get_args(DataSpec.model_fields["layout"].annotation)  # the spec's Literal: one list
