"""The preprocessed store is keyed by everything that decides its bytes: the transforms, where they
run, the code versions and the source of a user's own transform classes. Changing any of them
preprocesses again; changing none reuses the store."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import textwrap

import numpy as np
import pytest

from voxelflow.core.storage import Layout, Store
from voxelflow.data.preprocess import load_case_arrays, preprocess, transform_digest, transform_key
from voxelflow.spec.config import PreprocessSpec

TRANSFORMS = [
    {"Orientationd": {"keys": ["image", "label"], "axcodes": "RAS"}},
    {"ResizeWithPadOrCropd": {"keys": ["image", "label"], "spatial_size": [16, 16, 16]}},
]

BASE = '''
from monai.transforms import MapTransform


class Scaled(MapTransform):
    factor = {factor}

    def __call__(self, data):
        return {{k: (v * self.factor if k == "image" else v) for k, v in data.items()}}
'''

USER = '''
from vf_key_base import Scaled


class Scale(Scaled):
    """A user's transform whose behaviour lives in a base class of another module."""
'''


@pytest.fixture
def layout(ingested, tmp_path):
    """A fresh preprocessed side over the shared raw store."""
    raw_layout, report = ingested
    here = Layout(Store(tmp_path / "store"), "p")
    return raw_layout.raw, here, report.case_ids


def _run(spec: PreprocessSpec, raw, here: Layout, case_ids: list[str]):
    """What the preprocess stage does: the store named by the key, only the cases it lacks."""
    out = here.preprocessed(transform_digest(spec))
    return out, preprocess(spec, raw, case_ids, out)


def test_an_unchanged_section_reuses_the_store(layout):
    raw, here, ids = layout
    spec = PreprocessSpec(transforms=TRANSFORMS)
    _, first = _run(spec, raw, here, ids)
    _, again = _run(PreprocessSpec(transforms=TRANSFORMS, shard_size=1), raw, here, ids)
    assert (first.processed, again.processed, again.skipped) == (len(ids), 0, len(ids))


def test_a_monai_upgrade_preprocesses_again(layout, monkeypatch):
    raw, here, ids = layout
    spec = PreprocessSpec(transforms=TRANSFORMS)
    before, _ = _run(spec, raw, here, ids)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: "99.0.0" if d == "monai" else real(d))
    after, report = _run(spec, raw, here, ids)
    assert after.prefix != before.prefix and (report.processed, report.skipped) == (len(ids), 0)


def test_a_voxelflow_upgrade_preprocesses_again(layout, monkeypatch):
    import voxelflow

    raw, here, ids = layout
    spec = PreprocessSpec(transforms=TRANSFORMS)
    before, _ = _run(spec, raw, here, ids)
    monkeypatch.setattr(voxelflow, "__version__", voxelflow.__version__ + ".post1")
    after, report = _run(spec, raw, here, ids)
    assert after.prefix != before.prefix and (report.processed, report.skipped) == (len(ids), 0)


def test_another_device_is_another_store(layout):
    raw, here, ids = layout
    cpu = PreprocessSpec(transforms=TRANSFORMS, device="cpu")
    _run(cpu, raw, here, ids)
    cuda = PreprocessSpec(transforms=TRANSFORMS, device="cuda")
    assert transform_digest(cuda) != transform_digest(cpu)
    # nothing preprocessed on the CPU counts as done for the GPU (which would run every case again)
    assert here.preprocessed(transform_digest(cuda)).committed() == []
    assert transform_key(TRANSFORMS, "cuda") == transform_digest(cuda)


@pytest.fixture
def user_transform(tmp_path, monkeypatch):
    """``vf_key_user:Scale`` (allowed), whose behaviour comes from ``vf_key_base``; returns a function that
    rewrites the base module with another factor."""
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()

    def write(factor: float) -> None:
        (pkgs / "vf_key_base.py").write_text(textwrap.dedent(BASE.format(factor=factor)))
        for name in ("vf_key_base", "vf_key_user"):
            if name in sys.modules:
                importlib.reload(sys.modules[name])

    (pkgs / "vf_key_user.py").write_text(textwrap.dedent(USER))
    write(2.0)
    monkeypatch.syspath_prepend(str(pkgs))
    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,torch,voxelflow,vf_key_user,vf_key_base")
    yield write
    for name in ("vf_key_base", "vf_key_user"):
        sys.modules.pop(name, None)


def test_an_edited_user_transform_class_preprocesses_again(layout, user_transform):
    raw, here, ids = layout
    spec = PreprocessSpec(transforms=[*TRANSFORMS, {"vf_key_user:Scale": {"keys": ["image"]}}])
    before, first = _run(spec, raw, here, ids)
    assert first.processed == len(ids)
    _, rerun = _run(spec, raw, here, ids)
    assert rerun.processed == 0  # the same source: reused
    user_transform(3.0)  # the base class of the user's transform changes what it computes
    after, report = _run(spec, raw, here, ids)
    assert after.prefix != before.prefix and (report.processed, report.skipped) == (len(ids), 0)
    old, new = (load_case_arrays(s, ids[0])["image"] for s in (before, after))
    np.testing.assert_allclose(new, old * 1.5, rtol=1e-6)


def test_the_key_names_the_store_and_the_cases(layout):
    raw, here, ids = layout
    spec = PreprocessSpec(transforms=TRANSFORMS)
    out, _ = _run(spec, raw, here, ids)
    from voxelflow.data.preprocess import open_case

    assert out.prefix.endswith("/" + transform_digest(spec))
    assert open_case(out, ids[0]).attrs["transforms_digest"] == transform_digest(spec)
