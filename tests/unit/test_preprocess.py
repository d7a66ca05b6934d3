"""Preprocessing: the spec's MONAI transforms, the fixed-shape Zarr store, reruns and Dask."""

from __future__ import annotations

import json

import numpy as np
import pytest

from voxelflow.config import PreprocessSpec, load_spec
from voxelflow.preprocess import build_transforms, load_arrays, preprocess, preprocess_shard, transform_digest

# the demo's preprocessing as first written; the tests of trimming use it whatever the demo becomes
DEMO_TRANSFORMS = [
    {"Orientationd": {"keys": ["image", "label"], "axcodes": "RAS"}},
    {"Spacingd": {"keys": ["image", "label"], "pixdim": [1.5, 1.5, 1.5], "mode": ["bilinear", "nearest"]}},
    {"ScaleIntensityRanged": {"keys": "image", "a_min": 0.0, "a_max": 1.0, "b_min": 0.0, "b_max": 1.0,
                              "clip": True}},
    {"ResizeWithPadOrCropd": {"keys": ["image", "label"], "spatial_size": [32, 32, 32]}},
]
DEMO_NAMES = [next(iter(t)) for t in DEMO_TRANSFORMS]


@pytest.fixture(scope="module")
def demo_pre(demo_spec_path) -> PreprocessSpec:
    return load_spec(demo_spec_path).preprocess


@pytest.fixture(scope="module")
def size(demo_pre) -> tuple[int, ...]:
    assert demo_pre.spatial_size is not None
    return demo_pre.spatial_size


def test_build_transforms_from_the_demo_spec_in_order(demo_pre):
    from monai.transforms import Compose

    compose = build_transforms(demo_pre.transforms)
    assert isinstance(compose, Compose)
    assert [type(t).__name__ for t in compose.transforms] == [next(iter(t)) for t in demo_pre.transforms]
    for t, item in zip(compose.transforms, demo_pre.transforms):
        (kwargs,) = item.values()
        wanted = [kwargs["keys"]] if isinstance(kwargs["keys"], str) else kwargs["keys"]
        assert list(t.keys) == wanted


def test_build_transforms_for_image_only_on_the_demo_spec(demo_pre):
    compose = build_transforms(demo_pre.transforms, keys=("image",))
    image_items = [t for t in demo_pre.transforms if "image" in json.dumps(next(iter(t.values()))["keys"])]
    assert [type(t).__name__ for t in compose.transforms] == [next(iter(t)) for t in image_items]
    for t in compose.transforms:
        assert tuple(t.keys) == ("image",)


def test_build_transforms_exact_names_and_modes():
    compose = build_transforms(PreprocessSpec(transforms=DEMO_TRANSFORMS).transforms)
    assert [type(t).__name__ for t in compose.transforms] == DEMO_NAMES
    assert tuple(compose.transforms[1].keys) == ("image", "label")
    assert tuple(compose.transforms[1].mode) == ("bilinear", "nearest")


def test_build_transforms_for_image_only():
    spec = PreprocessSpec(transforms=[*DEMO_TRANSFORMS, {"Orientationd": {"keys": "label", "axcodes": "LPS"}}])
    compose = build_transforms(spec.transforms, keys=("image",))
    # the label-only transform is dropped, the rest keep their order
    assert [type(t).__name__ for t in compose.transforms] == DEMO_NAMES
    for t in compose.transforms:
        assert tuple(t.keys) == ("image",)
    spacing = compose.transforms[1]
    assert tuple(spacing.mode) == ("bilinear",)  # the per-key list is trimmed to the kept key
    # non per-key lists (pixdim) are untouched
    np.testing.assert_allclose(spacing.spacing_transform.pixdim, [1.5, 1.5, 1.5])
    # the spec itself is not modified
    assert spec.transforms[1]["Spacingd"]["mode"] == ["bilinear", "nearest"]
    assert spec.transforms[1]["Spacingd"]["keys"] == ["image", "label"]
    # label only: the image-only transform goes, the label keeps its own mode
    label_only = build_transforms(spec.transforms, keys=("label",))
    assert [type(t).__name__ for t in label_only.transforms] == ["Orientationd", "Spacingd",
                                                                 "ResizeWithPadOrCropd", "Orientationd"]
    assert tuple(label_only.transforms[1].mode) == ("nearest",)


def test_build_transforms_keeps_lists_that_are_not_per_key():
    spec = PreprocessSpec(transforms=[
        {"ResizeWithPadOrCropd": {"keys": ["image", "label"], "spatial_size": [8, 8]}},
    ])
    compose = build_transforms(spec.transforms, keys=("image",))
    (resize,) = compose.transforms
    assert tuple(resize.keys) == ("image",)
    out = resize({"image": np.zeros((1, 5, 11), np.float32)})
    assert tuple(out["image"].shape) == (1, 8, 8)


def test_build_transforms_trims_non_string_per_key_lists():
    spec = PreprocessSpec(transforms=[
        {"Spacingd": {"keys": ["image", "label"], "pixdim": [1.5, 1.5, 1.5], "mode": ["bilinear", "nearest"],
                      "align_corners": [False, False]}},
    ])
    build_transforms(spec.transforms)  # both keys: fine
    (spacing,) = build_transforms(spec.transforms, keys=("image",)).transforms
    assert tuple(spacing.align_corners) == (False,)


def test_transform_digest_follows_the_transforms(demo_pre):
    changed = PreprocessSpec(transforms=[*demo_pre.transforms[:-1],
                                         {"ResizeWithPadOrCropd": {"keys": ["image", "label"],
                                                                   "spatial_size": [7, 7, 7]}}])
    assert transform_digest(demo_pre) == transform_digest(PreprocessSpec(transforms=demo_pre.transforms))
    assert transform_digest(changed) != transform_digest(demo_pre)
    # shard size and cluster do not change what is computed
    assert transform_digest(demo_pre.model_copy(update={"shard_size": 1})) == transform_digest(demo_pre)


@pytest.fixture(scope="module")
def sequential(ingested, demo_pre, tmp_path_factory):
    """The three synthetic cases preprocessed here, without Dask, two cases per shard."""
    layout, report = ingested
    spec = demo_pre.model_copy(update={"shard_size": 2})
    out = tmp_path_factory.mktemp("pre-seq") / "pre.zarr"
    calls = []
    result = preprocess(spec, layout.raw_store, report.case_ids, out, progress=lambda i, n: calls.append((i, n)))
    return spec, out, result, calls


def test_sequential_preprocess(sequential, ingested, size):
    spec, out, report, calls = sequential
    _, ingest_report = ingested
    assert report.processed == 3 and report.skipped == 0
    assert report.shards == 2
    assert calls == [(1, 2), (2, 2)]
    assert report.shape == (1, *size)
    assert json.loads((out / "zarr.json").read_text())["zarr_format"] == 3
    arrays = load_arrays(out)
    assert sorted(arrays["case"]) == sorted(ingest_report.case_ids)
    assert arrays["image"].shape == (3, 1, *size)
    assert arrays["image"].dtype == np.float32
    assert arrays["label"].shape == (3, 1, *size)
    assert arrays["label"].dtype == np.uint8
    assert set(np.unique(arrays["label"])) == {0, 1}
    assert np.isfinite(arrays["image"]).all()
    # one case per chunk
    meta = json.loads((out / "image" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, 1, *size]


def test_subset_is_returned_in_the_asked_order(sequential):
    _, out, _, _ = sequential
    every = load_arrays(out)
    wanted = list(reversed(every["case"]))[:2]
    subset = load_arrays(out, wanted)
    assert list(subset["case"]) == wanted
    for i, cid in enumerate(wanted):
        j = list(every["case"]).index(cid)
        np.testing.assert_array_equal(subset["image"][i], every["image"][j])


def test_rerun_processes_nothing(sequential, ingested, size):
    spec, out, _, _ = sequential
    layout, report = ingested
    before = load_arrays(out)
    again = preprocess(spec, layout.raw_store, report.case_ids, out)
    assert again.processed == 0
    assert again.skipped == 3
    assert again.shards == 0
    assert again.shape == (1, *size)
    after = load_arrays(out)
    assert list(after["case"]) == list(before["case"])
    np.testing.assert_array_equal(after["image"], before["image"])


def test_new_cases_are_appended(ingested, demo_pre, tmp_path):
    layout, report = ingested
    out = tmp_path / "pre.zarr"
    first = preprocess(demo_pre, layout.raw_store, report.case_ids[:1], out)
    second = preprocess(demo_pre, layout.raw_store, report.case_ids, out)
    assert (first.processed, first.skipped) == (1, 0)
    assert (second.processed, second.skipped) == (2, 1)
    assert sorted(load_arrays(out)["case"]) == sorted(report.case_ids)


def test_preprocess_on_a_local_dask_cluster_is_bit_identical(sequential, ingested, tmp_path):
    from distributed import Client, LocalCluster

    spec, seq_out, _, _ = sequential
    layout, report = ingested
    out = tmp_path / "pre-dask.zarr"
    # in-process worker; protocol="tcp" because the default in-process transport cannot parse host="127.0.0.1"
    with LocalCluster(n_workers=1, processes=False, host="127.0.0.1", protocol="tcp",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        submitted = []

        def submit(part):
            submitted.append(list(part))
            return client.submit(preprocess_shard, str(layout.raw_store), part, spec.transforms)

        result = preprocess(spec, layout.raw_store, report.case_ids, out, submit=submit, gather=client.gather)
    assert result.processed == 3 and result.shards == 2
    assert len(submitted) == 2 and sum(len(p) for p in submitted) == 3
    seq, par = load_arrays(seq_out), load_arrays(out)
    order = [list(par["case"]).index(c) for c in seq["case"]]
    assert sorted(par["case"]) == sorted(seq["case"])
    for key in ("image", "label"):
        assert par[key].dtype == seq[key].dtype
        np.testing.assert_array_equal(par[key][order], seq[key])
        assert par[key][order].tobytes() == seq[key].tobytes()


def test_mixed_shapes_are_refused(tmp_path):
    import nibabel as nib

    from voxelflow.config import DataSpec
    from voxelflow.ingest import ingest
    from voxelflow.storage import Layout

    for name, size in (("a", 10), ("b", 12)):
        (tmp_path / "src" / name).mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.ones((size,) * 3, np.float32), np.eye(4)), tmp_path / "src" / name / "image.nii.gz")
    layout = Layout(tmp_path / "home", "p")
    report = ingest(DataSpec(source=str(tmp_path / "src"), layout="folder"), layout, str(tmp_path / "src"))
    assert len(report.case_ids) == 2
    spec = PreprocessSpec(transforms=[{"Orientationd": {"keys": "image", "axcodes": "RAS"}}])
    out = tmp_path / "pre.zarr"
    with pytest.raises(ValueError, match="differ in shape"):
        preprocess(spec, layout.raw_store, report.case_ids, out)
    assert not out.exists()
    # fixing the size makes the same cases acceptable
    fixed = PreprocessSpec(transforms=[*spec.transforms,
                                       {"ResizeWithPadOrCropd": {"keys": "image", "spatial_size": [8, 8, 8]}}])
    result = preprocess(fixed, layout.raw_store, report.case_ids, out)
    assert result.shape == (1, 8, 8, 8)
    assert "label" not in load_arrays(out)
