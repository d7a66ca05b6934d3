"""A user's own components (``mypackage.nets:MyNet``) travel with the model and are named in lineage.

A model whose network or preprocessing uses a user's class loads only where that class can be
imported: :func:`code_paths` lists the packages' sources for MLflow's ``code_paths`` (copied under
``code/`` and put on ``sys.path`` when the model loads), and :func:`versions` what lineage records
of them (the installed distribution's version, else the package's ``__version__``, and always a
digest of the source shipped).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

CORE = ("voxelflow", "monai", "torch")  # shipped already (voxelflow) or named in the requirements


def _paths(section: Mapping[str, Any] | list[Mapping[str, Any]] | None) -> list[str]:
    items = section if isinstance(section, list) else [section] if section else []
    return [name for item in items for name in item if ":" in name]


def packages(config: Mapping[str, Any]) -> list[str]:
    """The top-level packages, other than voxelflow, MONAI and torch, that the import paths of a model
    config (``network``, ``transforms``, ``postprocess``) or a spec's ``train``, ``preprocess`` and
    ``evaluate.postprocess`` name."""
    names = [*_paths(config.get("network")), *_paths(config.get("loss")), *_paths(config.get("transforms")),
             *_paths(config.get("augment")), *_paths(config.get("postprocess"))]
    tops = (name.partition(":")[0].split(".")[0] for name in names)
    return sorted({t for t in tops if t not in CORE})


def spec_packages(spec: Any) -> list[str]:
    """:func:`packages` of a :class:`~voxelflow.spec.config.PipelineSpec` (network, loss, transforms, augment,
    postprocess)."""
    return packages({"network": spec.train.network, "loss": spec.train.loss, "augment": spec.train.augment,
                     "transforms": spec.preprocess.transforms, "postprocess": spec.evaluate.postprocess})


def source_of(package: str) -> Path:
    """The directory of a package, or the file of a single-module one."""
    mod = importlib.import_module(package)
    locations = list(getattr(mod, "__path__", []) or [])
    if len(locations) > 1:
        raise ValueError(f"{package!r} is a namespace package spread over {len(locations)} folders: its code cannot "
                         "travel with the model; make it a regular package (with an __init__.py)")
    path = Path(locations[0]) if locations else Path(getattr(mod, "__file__", "") or "")
    if not path.exists() or not str(path):
        raise ValueError(f"{package!r} has no source on disk to ship with the model")
    return path


def code_paths(config: Mapping[str, Any]) -> list[str]:
    """What MLflow's ``code_paths`` needs besides voxelflow for this model config to load anywhere."""
    return [str(source_of(p)) for p in packages(config)]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*.py")) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _distributions() -> Mapping[str, list[str]]:
    """Top-level package -> the distributions that install it. Read once per process: it reads every installed
    distribution's file list (about a second in a full environment), and what is installed does not change
    under a running lifecycle."""
    from importlib.metadata import packages_distributions

    return packages_distributions()


def version_of(package: str) -> str:
    """``DIST==VERSION`` of the distribution that installs ``package``, else its ``__version__``, else
    ``unversioned``; with ``+src.DIGEST`` of its Python sources."""
    from importlib.metadata import version

    dists = _distributions().get(package, [])
    if dists:
        label = f"{dists[0]}=={version(dists[0])}"
    else:
        label = str(getattr(importlib.import_module(package), "__version__", "unversioned"))
    return f"{label}+src.{_digest(source_of(package))}"


def source_digests(names: Iterable[str]) -> dict[str, str]:
    """Package -> the digest of its Python sources (what a key of finished work needs: no distribution lookup)."""
    return {p: _digest(source_of(p)) for p in sorted(set(names))}


def versions(names: Iterable[str]) -> dict[str, str]:
    """Package -> :func:`version_of`, for lineage."""
    return {p: version_of(p) for p in sorted(set(names))}


def lineage(spec: Any) -> dict[str, str]:
    """The lineage entry for a spec's user packages (``{}`` when it uses none): ``user_code`` =
    ``pkg=VERSION; ...``."""
    found = versions(spec_packages(spec))
    return {"user_code": "; ".join(f"{p}={v}" for p, v in found.items())} if found else {}
