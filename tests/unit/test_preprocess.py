"""Preprocessing: the spec's MONAI transforms, one Zarr store per case written by the workers, reruns, Dask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from distributed.diagnostics.plugin import SchedulerPlugin

from voxelflow.core.storage import CaseStore, Layout, Store
from voxelflow.data.preprocess import build_transforms, load_arrays, load_case_arrays, preprocess, transform_digest
from voxelflow.spec.config import PreprocessSpec, load_spec

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
    out = CaseStore(Store(tmp_path_factory.mktemp("pre-seq")), "pre")
    calls = []
    result = preprocess(spec, layout.raw, report.case_ids, out, progress=lambda i, n: calls.append((i, n)))
    return spec, out, result, calls


def test_sequential_preprocess(sequential, ingested, size):
    spec, out, report, calls = sequential
    _, ingest_report = ingested
    assert report.processed == 3 and report.skipped == 0 and not report.failed
    assert report.shards == 2
    assert calls == [(2, 3), (3, 3)]  # (cases done, cases to do) as each shard ends
    assert report.shapes == {c: [1, *size] for c in ingest_report.case_ids}
    assert report.bytes_written == 3 * (4 + 1) * int(np.prod(size))
    assert out.committed() == sorted(ingest_report.case_ids)
    meta = json.loads((Path(out.url(ingest_report.case_ids[0])) / "image" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3
    arrays = load_arrays(out, ingest_report.case_ids)
    assert list(arrays["case"]) == ingest_report.case_ids
    assert arrays["image"].shape == (3, 1, *size)
    assert arrays["image"].dtype == np.float32
    assert arrays["label"].shape == (3, 1, *size)
    assert arrays["label"].dtype == np.uint8
    assert set(np.unique(arrays["label"])) == {0, 1}
    assert np.isfinite(arrays["image"]).all()
    affine = np.asarray(out.open(ingest_report.case_ids[0]).attrs["affine"])
    np.testing.assert_allclose(np.abs(np.diag(affine))[:3], [1.5, 1.5, 1.5])  # the grid after Spacingd


def test_subset_is_returned_in_the_asked_order(sequential, ingested):
    _, out, _, _ = sequential
    _, report = ingested
    every = load_arrays(out, report.case_ids)
    wanted = list(reversed(report.case_ids))[:2]
    subset = load_arrays(out, wanted)
    assert list(subset["case"]) == wanted
    for i, cid in enumerate(wanted):
        np.testing.assert_array_equal(subset["image"][i], every["image"][report.case_ids.index(cid)])


def test_rerun_processes_nothing(sequential, ingested):
    spec, out, _, _ = sequential
    layout, report = ingested
    before = load_arrays(out, report.case_ids)
    again = preprocess(spec, layout.raw, report.case_ids, out)
    assert (again.processed, again.skipped, again.shards) == (0, 3, 0)
    after = load_arrays(out, report.case_ids)
    np.testing.assert_array_equal(after["image"], before["image"])


def test_new_cases_are_added(ingested, demo_pre, tmp_path):
    layout, report = ingested
    out = CaseStore(Store(tmp_path), "pre")
    first = preprocess(demo_pre, layout.raw, report.case_ids[:1], out)
    second = preprocess(demo_pre, layout.raw, report.case_ids, out)
    assert (first.processed, first.skipped) == (1, 0)
    assert (second.processed, second.skipped) == (2, 1)
    assert out.committed() == sorted(report.case_ids)


class ResultSizes(SchedulerPlugin):
    """Records the size of every task result the scheduler is told about."""

    name = "test-result-sizes"

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.sizes: dict[str, int] = {}

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if finish == "memory":
            self.sizes[str(key)] = self.scheduler.tasks[key].nbytes


@pytest.fixture(scope="module")
def client():
    """One 2-worker LocalCluster (processes, 127.0.0.1) for this module's Dask tests."""
    from voxelflow.data.cluster import dask_client

    with dask_client("local", n_workers=2) as c:
        plugin = ResultSizes(c.cluster.scheduler)  # the scheduler of a LocalCluster lives in this process
        c.cluster.scheduler.add_plugin(plugin)
        c.result_sizes = plugin.sizes
        yield c


def test_dask_workers_write_the_store_bit_identical_to_a_sequential_run(sequential, ingested, tmp_path, client):
    spec, seq_out, _, _ = sequential
    layout, report = ingested
    out = CaseStore(Store(tmp_path), "pre")
    calls = []
    client.result_sizes.clear()
    result = preprocess(spec, layout.raw, report.case_ids, out, client=client,
                        progress=lambda i, n: calls.append((i, n)))
    assert result.processed == 3 and result.shards == 2 and not result.failed
    assert sorted(calls) == calls and calls[-1] == (3, 3) and len(calls) == 2  # as each shard completes
    assert result.bytes_written == 3 * (4 + 1) * 32**3
    seq, par = load_arrays(seq_out, report.case_ids), load_arrays(out, report.case_ids)
    for key in ("image", "label"):
        assert par[key].dtype == seq[key].dtype
        assert par[key].tobytes() == seq[key].tobytes()
    for cid in report.case_ids:
        assert out.open(cid).attrs == seq_out.open(cid).attrs
    # what came back from the workers: two small lists of metadata, nothing the size of an array
    shard_results = {k: v for k, v in client.result_sizes.items() if k.startswith("preprocess_shard")}
    assert len(shard_results) == 2 and max(shard_results.values()) < 4096, shard_results
    assert all(not keys for keys in client.has_what().values())  # and nothing is left on the workers


def test_a_rerun_on_dask_submits_nothing(sequential, ingested, client):
    spec, seq_out, _, _ = sequential
    layout, report = ingested
    client.result_sizes.clear()
    again = preprocess(spec, layout.raw, report.case_ids, seq_out, client=client)
    assert (again.processed, again.skipped, again.shards) == (0, 3, 0)
    assert not client.result_sizes


def test_progress_moves_shard_by_shard_on_dask(tmp_path, client):
    raw = CaseStore(Store(tmp_path), "raw")
    ids = [f"case-{i:02d}" for i in range(7)]
    for i, cid in enumerate(ids):
        write_synthetic(raw, cid, i, (20, 18 + i, 16))
    spec = PreprocessSpec(transforms=[{"ScaleIntensityd": {"keys": "image"}}], shard_size=2)
    out = CaseStore(Store(tmp_path), "pre")
    calls = []
    report = preprocess(spec, raw, ids, out, client=client, progress=lambda i, n: calls.append((i, n)))
    assert report.shards == 4 and report.processed == 7
    assert [n for _, n in calls] == [7] * 4 and calls[-1] == (7, 7)
    done = [i for i, _ in calls]
    assert all(b - a in (1, 2) for a, b in zip([0, *done], done))  # one or two cases more per finished shard
    # cases keep their own shapes (no stacking, no check that they agree)
    assert report.shapes == {cid: [1, 20, 18 + i, 16] for i, cid in enumerate(ids)}
    assert load_case_arrays(out, ids[3])["image"].shape == (1, 20, 21, 16)
    with pytest.raises(ValueError, match="differ in shape"):
        load_arrays(out, ids)


def write_synthetic(raw: CaseStore, case_id: str, seed: int, shape: tuple[int, int, int]) -> None:
    import xarray as xr
    from monai.data import create_test_image_3d

    image, label = create_test_image_3d(*shape, rad_max=4, rad_min=2, num_seg_classes=1,
                                        random_state=np.random.RandomState(seed))
    ds = xr.Dataset({"image": (("x", "y", "z"), image.astype(np.float32)),
                     "label": (("x", "y", "z"), (label > 0).astype(np.uint8))},
                    attrs={"affine": np.eye(4).tolist(), "spacing": [1.0, 1.0, 1.0]})
    raw.write(case_id, ds)


def test_large_volumes_are_chunked(tmp_path):
    raw = CaseStore(Store(tmp_path), "raw")
    write_synthetic(raw, "big", 0, (150, 40, 20))
    out = CaseStore(Store(tmp_path), "pre")
    preprocess(PreprocessSpec(transforms=[{"ScaleIntensityd": {"keys": "image"}}]), raw, ["big"], out)
    meta = json.loads((Path(out.url("big")) / "image" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, 128, 40, 20]
    assert meta["data_type"] == "float32"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present")
def test_cuda_device_without_a_gpu_is_a_clear_error(tmp_path):
    raw = CaseStore(Store(tmp_path), "raw")
    write_synthetic(raw, "case-0", 0, (12, 12, 12))
    spec = PreprocessSpec(transforms=[{"ScaleIntensityd": {"keys": "image"}}], device="cuda")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        preprocess(spec, raw, ["case-0"], CaseStore(Store(tmp_path), "pre"))


def test_cuda_device_on_cpu_workers_is_a_clear_error(tmp_path, client):
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    raw = CaseStore(Store(tmp_path), "raw")
    write_synthetic(raw, "case-0", 0, (12, 12, 12))
    spec = PreprocessSpec(transforms=[{"ScaleIntensityd": {"keys": "image"}}], device="cuda")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        preprocess(spec, raw, ["case-0"], CaseStore(Store(tmp_path), "pre"), client=client)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_gives_the_cpu_result(tmp_path):
    """device="cuda": the transforms run on the GPU; what is stored matches the CPU path."""
    raw = CaseStore(Store(tmp_path), "raw")
    ids = [f"case-{i}" for i in range(3)]
    for i, cid in enumerate(ids):
        write_synthetic(raw, cid, i, (24, 22, 20))
    cpu = CaseStore(Store(tmp_path), "cpu")
    gpu = CaseStore(Store(tmp_path), "gpu")
    preprocess(PreprocessSpec(transforms=DEMO_TRANSFORMS), raw, ids, cpu)
    report = preprocess(PreprocessSpec(transforms=DEMO_TRANSFORMS, device="cuda"), raw, ids, gpu)
    assert report.processed == 3 and not report.failed
    for cid in ids:
        a, b = load_case_arrays(cpu, cid), load_case_arrays(gpu, cid)
        assert b["image"].dtype == np.float32 and b["image"].shape == a["image"].shape
        np.testing.assert_allclose(b["image"], a["image"], atol=1e-4)
        assert (b["label"] != a["label"]).mean() < 0.01
        np.testing.assert_allclose(b["affine"], a["affine"])


def test_cases_keep_their_own_shapes(tmp_path):
    import nibabel as nib

    from voxelflow.core.db import Database
    from voxelflow.data.ingest import ingest
    from voxelflow.spec.config import DataSpec

    for name, size in (("a", 10), ("b", 16)):
        (tmp_path / "src" / name).mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.ones((size,) * 3, np.float32), np.eye(4)), tmp_path / "src" / name / "image.nii.gz")
    layout = Layout(Store(tmp_path / "home"), "p")
    db = Database(f"sqlite:///{tmp_path / 'home' / 'voxelflow.db'}")
    report = ingest(DataSpec(source=str(tmp_path / "src"), layout="folder"), layout, db, str(tmp_path / "src"))
    assert len(report.ingested) == 2 and report.case_ids == []  # unlabelled: stored, never trained on
    spec = PreprocessSpec(transforms=[{"Spacingd": {"keys": "image", "pixdim": [2.0, 2.0, 2.0]}}])
    out = CaseStore(Store(tmp_path / "out"), "pre")
    result = preprocess(spec, layout.raw, report.ingested, out)
    assert sorted(tuple(s) for s in result.shapes.values()) == [(1, 6, 6, 6), (1, 8, 8, 8)]
    assert "label" not in load_case_arrays(out, report.ingested[0])
    with pytest.raises(ValueError, match="differ in shape"):  # whole-volume training needs one shape
        load_arrays(out, report.ingested)


def test_a_few_new_cases_are_processed_without_starting_a_cluster(demo_pre, tmp_path, monkeypatch):
    """What an arrival or the demo adds is preprocessed in the lifecycle's process under `cluster: auto`: a
    local cluster costs more to start than the cases take. A shared scheduler, an explicit cluster, adaptive
    scaling or the GPU get the cluster from the first case."""
    from voxelflow.data import cluster
    from voxelflow.data.synthetic import make_decathlon
    from voxelflow.spec.config import DataSpec, Settings
    from voxelflow.spec.sections import Adaptive
    from voxelflow.stages import preprocess as stage
    from voxelflow.stages.context import Context
    from voxelflow.stages.ingest import ingest_stage

    source = make_decathlon(tmp_path / "src", n_cases=3, size=12)
    ctx = Context(Settings(home=tmp_path / "home", store=str(tmp_path / "store"), dask_scheduler=None,
                           dask_workers=2), "p")
    ids = ingest_stage(DataSpec(source=str(source), layout="decathlon"), ctx).case_ids

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started for a few small new cases")

    monkeypatch.setattr(cluster, "dask_client", no_cluster)
    one = demo_pre.model_copy(update={"shard_size": 1})  # a decision after every case
    first = stage.preprocess_stage(one, ctx, ids[:2])
    second = stage.preprocess_stage(one, ctx, ids)  # the one case the first left is the only new one
    assert (first.processed, second.processed, second.skipped) == (2, 1, 2) and not second.failed

    assert stage.here_first(demo_pre, ctx)
    for changed in ({"cluster": "local"}, {"device": "cuda"}, {"adaptive": Adaptive(minimum=1, maximum=2)}):
        assert not stage.here_first(demo_pre.model_copy(update=changed), ctx), changed
    shared = Context(ctx.settings.model_copy(update={"dask_scheduler": "tcp://127.0.0.1:8786"}), "p")
    assert not stage.here_first(demo_pre, shared)


def test_a_cluster_is_worth_it_when_the_rest_would_take_longer_here_than_its_start():
    from voxelflow.data.preprocess import CLUSTER_COST_S, worth_a_cluster

    per_case = 1.0
    even = CLUSTER_COST_S * 2  # cases left at which two workers save exactly the cluster's cost
    assert not worth_a_cluster(8 * per_case, 8, int(even), 2)
    assert worth_a_cluster(8 * per_case, 8, int(even) + 1, 2)
    assert worth_a_cluster(8 * per_case, 8, int(even), 4)  # more workers share the rest
    assert not worth_a_cluster(8 * per_case, 8, 10_000, 1)  # one worker is one case at a time, as here
    assert not worth_a_cluster(8 * per_case, 8, 0, 8) and not worth_a_cluster(0.0, 0, 10_000, 8)


def test_the_rest_moves_onto_a_cluster_once_it_is_predicted_sooner(sequential, ingested, tmp_path, client,
                                                                   monkeypatch):
    """Cases start here; once the first shard's time predicts the rest ends sooner on the cluster (its cost
    set to nothing here), the other shards run there, with one report, progress to the end and the same bytes."""
    import contextlib

    from voxelflow.data import preprocess as prep

    spec, seq_out, _, _ = sequential
    layout, report = ingested
    one = spec.model_copy(update={"shard_size": 1})
    started = []

    def cluster():
        started.append(1)
        return contextlib.nullcontext(client)

    for cost, expected in ((1e9, 0), (0.0, 2)):  # never worth it; worth it after the first case
        monkeypatch.setattr(prep, "CLUSTER_COST_S", cost)
        out = CaseStore(Store(tmp_path / str(cost)), "pre")
        calls = []
        client.result_sizes.clear()
        result = preprocess(one, layout.raw, report.case_ids, out, progress=lambda i, n, calls=calls: calls.append((i, n)),
                            cluster=cluster, workers=2)
        assert (result.processed, result.shards, result.failed) == (3, 3, [])
        assert calls == [(1, 3), (2, 3), (3, 3)]  # one case more per shard, wherever it ran
        on_workers = [k for k in client.result_sizes if k.startswith("preprocess_shard")]
        assert len(on_workers) == expected, (cost, on_workers)
        seq, got = load_arrays(seq_out, report.case_ids), load_arrays(out, report.case_ids)
        assert all(got[k].tobytes() == seq[k].tobytes() for k in ("image", "label"))
    assert started == [1]  # only the cheap cluster was started, and once
