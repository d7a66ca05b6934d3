"""Ingestion throughput: voxelflow's ingest against a plain sequential nibabel/pydicom + zarr loop.

Same files, one run: NIfTI cases (Decathlon layout) and DICOM series. voxelflow reads, hashes,
checks, de-identifies (DICOM) and writes committed Zarr v3 cases, several cases at once; the baseline
loads each file with nibabel/pydicom and writes it with zarr, one after the other, with no checks
and no de-identification. Both sides are warmed once, then timed ``--repeats`` times in alternating
order, each voxelflow run on a fresh home. Prints ``ingest_throughput_ratio`` = voxelflow MB/s ÷
baseline MB/s (medians).

Then, with a Prefect server on 127.0.0.1, the same files through two runners (``--no-runners``
skips this): one batch task that calls ``ingest.ingest`` (cases in parallel inside the library,
what ``flows/ingest.py`` ships) against one task per case mapped on a ``ThreadPoolTaskRunner``
with as many workers as the library uses (``ingest.ingest_case``, decisions under the same lock).
Prints ``ingest_per_case_vs_batch`` = per-case MB/s ÷ batch MB/s (medians; informative, no goal).

    python benchmarks/ingest.py [--cases 12] [--size 128] [--series 4] [--slices 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "src")]


def make_nifti(root: Path, cases: int, size: int) -> None:
    rng = np.random.default_rng(0)
    training = []
    for i in range(cases):
        image = rng.normal(0, 1, (size, size, size)).astype(np.float32)
        label = (image > 1.5).astype(np.uint8)
        for kind, arr in (("imagesTr", image), ("labelsTr", label)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr, np.eye(4)), root / kind / f"c{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/c{i:03d}.nii.gz", "label": f"./labelsTr/c{i:03d}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"training": training}))


def make_dicom(root: Path, series: int, slices: int, size: int) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(1)
    for s in range(series):
        uid, study = generate_uid(), generate_uid()
        (root / f"s{s}").mkdir(parents=True)
        for k in range(slices):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, uid, "CT"
            ds.PatientName, ds.PatientID = f"Patient^{s}", f"ID{s}"
            ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 2.0 * k], [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing, ds.RescaleSlope, ds.RescaleIntercept = [0.7, 0.7], 1, -1024
            ds.Rows = ds.Columns = size
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.PixelData = rng.integers(0, 3000, (size, size), dtype=np.uint16).tobytes()
            ds.save_as(root / f"s{s}" / f"{k:04d}.dcm", enforce_file_format=True)


def baseline(nifti: Path, dicom_root: Path, out: Path) -> None:
    """The plain loop: load with nibabel / pydicom, write with zarr, one file after the other."""
    import pydicom
    import zarr

    def write(name: str, arr: np.ndarray) -> None:
        z = zarr.create_array(store=str(out / name), shape=arr.shape, dtype=arr.dtype,
                              chunks=tuple(min(s, 128) for s in arr.shape), zarr_format=3)
        z[...] = arr

    for item in json.loads((nifti / "dataset.json").read_text())["training"]:
        for kind in ("image", "label"):
            img = nib.load(nifti / item[kind])
            write(f"{Path(item[kind]).name}.{kind}.zarr", np.asanyarray(img.dataobj))
    for series in sorted(dicom_root.iterdir()):
        planes = [pydicom.dcmread(f) for f in sorted(series.iterdir())]
        planes.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
        vol = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in planes], -1)
        write(f"{series.name}.zarr", vol.astype(np.float32))


def voxelflow_ingest(nifti: Path, dicom_root: Path, home: Path) -> int:
    from voxelflow.core.db import Database
    from voxelflow.core.storage import Layout, Store
    from voxelflow.data.ingest import ingest
    from voxelflow.spec.config import DataSpec

    layout, db = Layout(Store(home), "bench"), Database(f"sqlite:///{home}/voxelflow.db")
    a = ingest(DataSpec(source=str(nifti), max_voxels=1024**3), layout, db, str(nifti))
    b = ingest(DataSpec(source=str(dicom_root), layout="dicom", max_voxels=1024**3), layout, db, str(dicom_root),
               deid_key="benchmark-key")
    return len(a.ingested) + len(b.ingested)


def runner_flows():
    """Two Prefect flows over the same two sources: one batch task per source, or one task per case."""
    from prefect import flow, task, unmapped
    from prefect.cache_policies import NO_CACHE
    from prefect.task_runners import ThreadPoolTaskRunner

    from voxelflow.core.db import Database
    from voxelflow.core.storage import Layout, Store
    from voxelflow.data import ingest as vi
    from voxelflow.spec.config import DataSpec

    workers = min(4, os.cpu_count() or 1)  # what the library's own pool uses

    def sources(nifti: str, dicom_root: str) -> list[tuple[DataSpec, str, str | None]]:
        return [(DataSpec(source=nifti, max_voxels=1024**3), nifti, None),
                (DataSpec(source=dicom_root, layout="dicom", max_voxels=1024**3), dicom_root, "benchmark-key")]

    def place(home: str):
        return Layout(Store(home), "bench"), Database(f"sqlite:///{home}/voxelflow.db")

    @task(name="ingest-batch", cache_policy=NO_CACHE)
    def ingest_batch(data, layout, db, source, key) -> vi.IngestReport:
        return vi.ingest(data, layout, db, source, deid_key=key, workers=workers)

    @task(name="ingest-case", cache_policy=NO_CACHE)
    def ingest_one(case, data, layout, db, key) -> vi.IngestReport:
        return vi.ingest_case(case, data, layout, db, key)

    @flow(name="bench-ingest-batch")
    def batch(home: str, nifti: str, dicom_root: str) -> int:
        layout, db = place(home)
        return sum(len(ingest_batch(data, layout, db, source, key).ingested)
                   for data, source, key in sources(nifti, dicom_root))

    @flow(name="bench-ingest-per-case", task_runner=ThreadPoolTaskRunner(max_workers=workers))
    def per_case(home: str, nifti: str, dicom_root: str) -> int:
        layout, db = place(home)
        n = 0
        for data, source, key in sources(nifti, dicom_root):
            cases, report = vi.begin(data, layout, db, source, key)
            for part in ingest_one.map(cases, unmapped(data), unmapped(layout), unmapped(db), unmapped(key)).result():
                vi.merge(report, part)
            n += len(vi.finish(report, layout, db).ingested)
        return n

    return {"batch": batch, "per-case": per_case}


def compare_runners(nifti: Path, dicom_root: Path, work: Path, repeats: int, expected: int, mb: float) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.server import local_prefect_server

    flows = runner_flows()
    times: dict[str, list[float]] = {name: [] for name in flows}
    with local_prefect_server(work / "prefect") as api:
        with temporary_settings({PREFECT_API_URL: api, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            for name, run in flows.items():  # warm: imports, the server's first runs, the task runner
                run(str(work / f"warm-{name}"), str(nifti), str(dicom_root))
            for i in range(repeats):
                line = []
                for name in (list(flows) if i % 2 == 0 else list(flows)[::-1]):
                    t0 = time.perf_counter()
                    n = flows[name](str(work / f"{name}-{i}"), str(nifti), str(dicom_root))
                    times[name].append(time.perf_counter() - t0)
                    assert n == expected, (name, n)
                    line.append(f"{name} {mb / times[name][-1]:.1f} MB/s ({times[name][-1]:.2f} s)")
                print(f"runners, repeat {i + 1}: " + ", ".join(line), flush=True)
    ratio = statistics.median(times["batch"]) / statistics.median(times["per-case"])
    print(json.dumps({"metric": "ingest_per_case_vs_batch", "value": round(ratio, 3), "goal": None,
                      "higher_is_better": True, "batch_s": [round(t, 2) for t in times["batch"]],
                      "per_case_s": [round(t, 2) for t in times["per-case"]]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--dicom-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-runners", action="store_true", help="skip the per-case vs batch Prefect comparison")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vf-bench-ingest-"))
    try:
        nifti, dicom_root = work / "nifti", work / "dicom"
        make_nifti(nifti, args.cases, args.size)
        make_dicom(dicom_root, args.series, args.slices, args.dicom_size)
        mb = sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) / 1e6
        expected = args.cases + args.series
        # warm imports and caches on both sides
        voxelflow_ingest(nifti, dicom_root, work / "warm")
        baseline(nifti, dicom_root, work / "warm-base")
        t_base: list[float] = []
        t_vf: list[float] = []
        for i in range(args.repeats):
            for side in (("baseline", "voxelflow") if i % 2 == 0 else ("voxelflow", "baseline")):
                t0 = time.perf_counter()
                if side == "baseline":
                    baseline(nifti, dicom_root, work / f"base-{i}")
                    t_base.append(time.perf_counter() - t0)
                else:
                    n = voxelflow_ingest(nifti, dicom_root, work / f"home-{i}")
                    t_vf.append(time.perf_counter() - t0)
                    assert n == expected, n
            print(f"repeat {i + 1}: baseline {mb / t_base[-1]:.1f} MB/s ({t_base[-1]:.2f} s), "
                  f"voxelflow {mb / t_vf[-1]:.1f} MB/s ({t_vf[-1]:.2f} s), ratio {t_base[-1] / t_vf[-1]:.3f}",
                  flush=True)
        print(f"{mb:.1f} MB of source ({args.cases} NIfTI cases {args.size}^3 + {args.series} DICOM series "
              f"{args.slices}x{args.dicom_size}^2), {os.cpu_count()} cores")
        print(json.dumps({"metric": "ingest_throughput_ratio",
                          "value": round(statistics.median(t_base) / statistics.median(t_vf), 3), "goal": 1.5,
                          "higher_is_better": True, "baseline_s": [round(t, 2) for t in t_base],
                          "voxelflow_s": [round(t, 2) for t in t_vf]}), flush=True)
        if not args.no_runners:
            compare_runners(nifti, dicom_root, work, args.repeats, expected, mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
