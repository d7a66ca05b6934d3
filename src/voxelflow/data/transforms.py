"""The spec's MONAI transforms: built into a ``Compose`` (once per thread on a worker), and the key of the
store they preprocess into (:func:`transform_key`: the transforms, the device, the MONAI, torch and
voxelflow versions and the source of user transform classes)."""

from __future__ import annotations

import importlib
import inspect
import json
import threading
from typing import TYPE_CHECKING, Any

from voxelflow.core.storage import digest_json

if TYPE_CHECKING:  # the workers need neither pydantic nor the rest of the spec machinery
    from voxelflow.spec.config import PreprocessSpec


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
                out.append(_monai_transform(name)(**kwargs))
    return Compose(out)


def _monai_transform(name: str) -> type:
    """``voxelflow.spec.config.resolve_monai`` for transforms (a MONAI name or ``package.module:Class``), without
    importing the spec machinery."""
    module, _, attr = name.rpartition(":") if ":" in name else ("monai.transforms", "", name)
    cls = getattr(importlib.import_module(module), attr, None)
    if not inspect.isclass(cls):
        raise ValueError(f"unknown transform {name!r}: expected a class in monai.transforms")
    return cls


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _module_source_digest(module: str) -> str:
    """The sha256 of a module's source (the file a class was defined in), or of its compiled file."""
    import hashlib
    import sys

    mod = sys.modules.get(module) or importlib.import_module(module)
    try:
        text = inspect.getsource(mod).encode()
    except (OSError, TypeError):  # no source shipped: the bytes of whatever file was loaded
        path = getattr(mod, "__file__", None)
        if not path:
            raise ValueError(f"the module {module!r} has no source or file to key preprocessing on") from None
        with open(path, "rb") as f:
            text = f.read()
    return hashlib.sha256(text).hexdigest()[:16]


def user_transform_sources(transforms: list[dict[str, dict[str, Any]]]) -> dict[str, str]:
    """Module -> source digest of every module defining a user transform class (``package.module:Class``)
    or one of its bases; MONAI's, torch's and Python's own classes are keyed by their versions instead."""
    import sys

    skip = {"monai", "torch", "builtins", *sys.stdlib_module_names}
    out: dict[str, str] = {}
    for item in transforms:
        for name in item:
            if ":" not in name:
                continue
            for klass in _monai_transform(name).__mro__:
                module = klass.__module__
                if module.split(".")[0] not in skip and module not in out:
                    out[module] = _module_source_digest(module)
    return dict(sorted(out.items()))


def transform_key(transforms: list[dict[str, dict[str, Any]]], device: str = "cpu") -> str:
    """The name of the preprocessed store: everything that decides its bytes. The transforms, where they
    run (``preprocess.device``), the versions of MONAI, torch and voxelflow, and the source of every user
    transform class, so that an upgrade, another device or an edited class preprocesses again."""
    from voxelflow import __version__

    return digest_json({"transforms": transforms, "device": device, "monai": _version("monai"),
                        "torch": _version("torch"), "voxelflow": __version__,
                        "sources": user_transform_sources(transforms)})


def transform_digest(spec: PreprocessSpec) -> str:
    """:func:`transform_key` of a ``preprocess`` section."""
    return transform_key(spec.transforms, spec.device)


_local = threading.local()


def cached_transforms(transforms: list[dict[str, dict[str, Any]]], key: str | None = None):
    """The ``Compose`` for these transforms, built once per thread of a process (a Dask worker keeps it);
    ``key`` (their :func:`transform_key`) tells an edited user class from the one built before."""
    cache = _local.__dict__.setdefault("transforms", {})
    key = key or json.dumps(transforms, sort_keys=True, default=str)
    if key not in cache:
        cache[key] = build_transforms(transforms)
    return cache[key]
