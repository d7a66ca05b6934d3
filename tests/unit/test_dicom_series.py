"""DICOM series bounded from their headers, multi-frame objects and 4-D series."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.unit.test_dicom import KEY, SECRETS, make_slice, run, series_pixels, write_series
from tests.unit.test_ingest import home
from voxelflow.data.ingest import discover, ingest, load_case, read_ledger
from voxelflow.spec.config import DataSpec

REPO = Path(__file__).resolve().parents[2]


def header_only(folder: Path, n: int, rows: int = 512, cols: int = 512, pixels: bool = False, series: int = 1
                ) -> None:
    """``n`` CT objects of one series whose headers declare ``rows`` x ``cols`` slices; without PixelData
    unless ``pixels`` (then real planes of that size). One dataset, written ``n`` times with new UIDs and
    positions: fast enough for tens of thousands of files."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    root = f"1.2.826.0.1.3680043.8.498.7.{series}"  # no run of six nines, unlike a generated UID may have
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = f"{root}.1", f"{root}.2", f"{root}.3"
    ds.PatientName, ds.PatientID, ds.Modality = "Smithereen^Johanna", "MRN8839201", "CT"
    ds.ImageOrientationPatient, ds.PixelSpacing = [1, 0, 0, 0, 1, 0], [0.7, 0.7]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if pixels:
        ds.PixelData = np.random.default_rng(0).integers(0, 4000, (rows, cols), dtype=np.uint16).tobytes()
    # written once with fixed-width placeholders, then patched: UIDs, positions and numbers of one width
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = f"{root}.4.1999999"  # patched to 1000001, ...
    ds.InstanceNumber, ds.ImagePositionPatient = "999999", ["0.0", "0.0", "8888.8"]
    fh = io.BytesIO()
    ds.save_as(fh, enforce_file_format=True)
    template = fh.getvalue()
    assert template.count(b"999999") == 3 and template.count(b"8888.8") == 1
    for k in range(n):
        blob = template.replace(b"999999", b"%06d" % (k + 1)).replace(b"8888.8", b"%06.1f" % (0.5 * k))
        (folder / f"Smithereen_{k:05d}.dcm").write_bytes(blob)


SERIES_SCRIPT = r"""
import resource, sys
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/src"]
from tests.unit.test_dicom import KEY, write_series
from tests.unit.test_dicom_series import header_only
from voxelflow.spec.config import DataSpec
from voxelflow.core.db import Database
from voxelflow.data.ingest import ingest, read_ledger
from voxelflow.core.storage import Layout, Store
src, kind = Path(sys.argv[2]), sys.argv[3]
write_series(src / "small", [0.0, 2.0, 4.0])
root = src.parent / "home"
layout, db = Layout(Store(root), "p"), Database(f"sqlite:///{root}/voxelflow.db")
ingest(DataSpec(source=str(src), layout="dicom"), layout, db, str(src), deid_key=KEY)  # warm
if kind == "headers":  # 20 000 header-only objects of one series, each declaring a 512 x 512 slice
    header_only(src / "many", 20000)
else:                  # 3000 slices of 256 x 256 with their pixels: 196 608 000 voxels, over 512**3
    header_only(src / "deep", 3000, 256, 256, pixels=True)
idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = ingest(DataSpec(source=str(src), layout="dicom"), layout, db, str(src), deid_key=KEY)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = read_ledger(db, "p")
states = {}
for r in rows:
    states[(r["state"], r["reason"])] = states.get((r["state"], r["reason"]), 0) + 1
quarantined = sum(1 for _ in (root / "p").rglob("quarantine/*")) if (root / "p").exists() else 0
print((peak - idle) // 1024, quarantined, sorted(states.items()), report.quarantined[0]["detail"])
"""


def _series_run(tmp_path: Path, kind: str) -> tuple[int, int, str, str]:
    out = subprocess.run([sys.executable, "-c", SERIES_SCRIPT, str(REPO), str(tmp_path / "src"), kind],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    grown, kept, rest = out.stdout.strip().splitlines()[-1].split(" ", 2)
    states, detail = rest.split("] ", 1)
    return int(grown), int(kept), states + "]", detail


def test_twenty_thousand_objects_of_one_series_are_too_large_from_their_headers(tmp_path):
    grown_mib, kept, states, detail = _series_run(tmp_path, "headers")
    assert grown_mib < 512, f"peak RSS grew by {grown_mib} MiB"
    assert states == str([(("ingested", None), 3), (("quarantined", "too-large"), 20000)])  # a row per object
    assert kept == 0  # neither copied nor de-identified
    assert "20000 objects" in detail and "data.max_series_files" in detail


def test_a_deep_series_over_max_voxels_is_too_large_before_a_pixel_is_held(tmp_path):
    """3000 slices of 256 x 256 (393 MB): fetched and de-identified whole, this grew peak RSS by 1.1 GiB."""
    grown_mib, kept, states, detail = _series_run(tmp_path, "deep")
    assert grown_mib < 128, f"peak RSS grew by {grown_mib} MiB"
    assert states == str([(("ingested", None), 3), (("quarantined", "too-large"), 3000)])
    assert kept == 0
    assert "196608000 voxels" in detail and "data.max_voxels" in detail


def test_bounds_come_from_discovery_and_name_their_key(tmp_path):
    src = tmp_path / "src"
    write_series(src, [0.0, 2.0, 4.0, 6.0])
    (case,) = discover(str(src), "dicom")
    assert (case.voxels, case.pixel_bytes) == (4 * 6 * 5, 4 * 6 * 5 * 2)
    for spec, key in ((dict(max_series_files=3), "data.max_series_files"), (dict(max_voxels=100), "data.max_voxels")):
        layout, db = home(tmp_path / key)
        report = ingest(DataSpec(source=str(src), layout="dicom", **spec), layout, db, str(src), deid_key=KEY)
        rows = read_ledger(db, "p")
        assert [(r["state"], r["reason"]) for r in rows] == [("quarantined", "too-large")] * 4
        assert all(len(r["sha256"]) == 64 and r["size"] > 0 for r in rows)  # hashed as they streamed by
        assert key in report.quarantined[0]["detail"]
        assert not list((tmp_path / key).rglob("quarantine/*"))  # never held, so never copied
        again = ingest(DataSpec(source=str(src), layout="dicom", **spec), layout, db, str(src), deid_key=KEY)
        assert again.seen == 4 and len(read_ledger(db, "p")) == 4
    layout, db = home(tmp_path / "fits")
    assert len(ingest(DataSpec(source=str(src), layout="dicom", max_series_files=4, max_voxels=120), layout, db,
                      str(src), deid_key=KEY).ingested) == 1


def test_max_series_files_is_checked():
    with pytest.raises(ValueError, match="max_series_files"):
        DataSpec(source="/x", layout="dicom", max_series_files=0)
    assert DataSpec(source="/x").max_series_files == 4096


# ---------------------------------------------------------------- multi-frame and 4-D


def enhanced_ct(frames: np.ndarray, zs: list[float], *, per_frame_positions: bool = True,
                series: str | None = None, slope: float = 2.0, intercept: float = -100.0) -> bytes:
    """One Enhanced CT object holding ``frames`` (frame, row, column), frame ``f`` at z = ``zs[f]``, geometry
    and rescale in the functional groups (shared: orientation, spacing, rescale; per frame: position)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), series or generate_uid(), \
        generate_uid()
    for name, value in SECRETS.items():
        setattr(ds, name, value)
    ds.Modality = "CT"
    shared = Dataset()
    orient, measures, rescale = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing, measures.SliceThickness = [0.8, 0.6], 99.0
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = slope, intercept, "HU"
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    items = []
    for z in zs:
        item = Dataset()
        if per_frame_positions:
            pos = Dataset()
            pos.ImagePositionPatient = [-50.0, -40.0, z]
            item.PlanePositionSequence = Sequence([pos])
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    ds.NumberOfFrames = len(zs)
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = frames.astype(np.uint16).tobytes()
    fh = io.BytesIO()
    ds.save_as(fh, enforce_file_format=True)
    return fh.getvalue()


def test_an_enhanced_multi_frame_object_is_stacked_by_its_per_frame_positions(tmp_path):
    zs = [9.0, 3.0, 6.0, 0.0, 12.0]  # frames out of order, 3 mm apart
    frames = np.stack(series_pixels(5))
    src = tmp_path / "src"
    src.mkdir()
    (src / "Smithereen_enhanced.dcm").write_bytes(enhanced_ct(frames, zs))
    (case,) = discover(str(src), "dicom")
    assert case.voxels == 5 * 6 * 5  # rows x columns x frames, from the header
    layout, db, report = run(src, tmp_path)
    assert len(report.ingested) == 1, read_ledger(db, "p")
    stored = load_case(layout.raw, report.ingested[0])
    order = np.argsort(zs)
    expected = np.stack([frames[i].astype(np.float32) * 2.0 - 100.0 for i in order], axis=-1).transpose(1, 0, 2)
    np.testing.assert_array_equal(stored["image"], expected)
    assert stored["attrs"]["spacing"] == [0.6, 0.8, 3.0]
    np.testing.assert_allclose(stored["affine"] @ [2, 3, 4, 1], [50 - 1.2, 40 - 2.4, 12.0, 1])
    for path in (tmp_path / "home").rglob("*"):
        if path.is_file() and not path.name.startswith("voxelflow.db"):
            assert b"Smithereen" not in path.read_bytes(), path


def test_multi_frame_objects_of_one_series_are_stacked_together(tmp_path):
    """Two enhanced objects of one series, each holding half of the slices."""
    series = generate_uid()
    frames = np.stack(series_pixels(4))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.dcm").write_bytes(enhanced_ct(frames[:2], [0.0, 4.0], series=series))
    (src / "b.dcm").write_bytes(enhanced_ct(frames[2:], [2.0, 6.0], series=series))
    layout, db, report = run(src, tmp_path)
    assert len(report.ingested) == 1, read_ledger(db, "p")
    image = load_case(layout.raw, report.ingested[0])["image"]
    np.testing.assert_array_equal(image[:, :, 1], frames[2].T.astype(np.float32) * 2.0 - 100.0)


def test_a_multi_frame_object_without_per_frame_positions_is_multi_frame(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "cine.dcm").write_bytes(enhanced_ct(np.stack(series_pixels(3)), [0.0, 1.0, 2.0],
                                               per_frame_positions=False))
    _, db, report = run(src, tmp_path)
    assert [(r["state"], r["reason"]) for r in read_ledger(db, "p")] == [("quarantined", "multi-frame")]
    assert "per-frame" in report.quarantined[0]["detail"]


def test_a_4d_series_is_4d_series_not_duplicate_position(tmp_path):
    """A perfusion-like series: the same 3 positions at 4 time points, as single-frame objects and as one
    multi-frame object."""
    src = tmp_path / "src"
    series = generate_uid()
    (src / "single").mkdir(parents=True)
    for t in range(4):
        for k, px in enumerate(series_pixels(3)):
            (src / "single" / f"t{t}_{k}.dcm").write_bytes(make_slice(2.0 * k, 3 * t + k, px + t, series=series))
    (src / "multi").mkdir()
    (src / "multi" / "perfusion.dcm").write_bytes(enhanced_ct(np.stack(series_pixels(12)), [0.0, 2.0, 4.0] * 4))
    _, db, report = run(src, tmp_path)
    rows = read_ledger(db, "p")
    assert len(rows) == 13 and {(r["state"], r["reason"]) for r in rows} == {("quarantined", "4d-series")}
    assert {q["detail"] for q in report.quarantined} == {
        "each of 3 slice positions occurs 4 times (time points, echoes or acquisitions): a 4-D series, "
        "not one volume"}
    kept = list((tmp_path / "home").rglob("quarantine/*"))
    assert len(kept) == 13 and all(pydicom.dcmread(p).PatientIdentityRemoved == "YES" for p in kept)


def test_a_multi_frame_object_without_functional_groups_is_multi_frame(tmp_path):
    """A legacy multi-frame object (cine, NM): NumberOfFrames and one position for all of its frames."""
    ds = pydicom.dcmread(io.BytesIO(make_slice(0.0, 0, series_pixels(1)[0])))
    ds.NumberOfFrames = 3
    ds.PixelData = np.stack(series_pixels(3)).astype(np.uint16).tobytes()
    src = tmp_path / "src"
    src.mkdir()
    ds.save_as(src / "cine.dcm")
    (case,) = discover(str(src), "dicom")
    assert case.voxels == 3 * 6 * 5
    _, db, report = run(src, tmp_path)
    assert [(r["state"], r["reason"]) for r in read_ledger(db, "p")] == [("quarantined", "multi-frame")]
    assert "3 frames" in report.quarantined[0]["detail"]
