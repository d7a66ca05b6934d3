"""Hostile and unusual input: NIfTI-2, sizes checked from the header first, bombs, entries that leave the source."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.unit.test_ingest import AFFINE, home, nifti_bytes, sphere, states_by_object, write_decathlon
from voxelflow.data.formats import VolumeError, read_header, read_nifti
from voxelflow.data.ingest import ingest, read_ledger
from voxelflow.spec.config import DataSpec

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def nifti2_bytes(array: np.ndarray, gz: bool = True) -> bytes:
    raw = nib.Nifti2Image(array, AFFINE).to_bytes()
    return gzip.compress(raw) if gz else raw


def claiming(shape: tuple[int, ...], dtype=np.uint8, body: bytes = b"") -> bytes:
    """A NIfTI-1 header that declares ``shape`` followed by ``body`` (not the voxels it promises)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_data_offset(352)
    return hdr.binaryblock + b"\0" * 4 + body


# ---------------------------------------------------------------- formats


def test_nifti2_plain_and_gzip_decode_like_nifti1():
    image, _ = sphere()
    for gz in (False, True):
        vol = read_nifti(nifti2_bytes(image, gz), "v.nii.gz", 10**6)
        np.testing.assert_array_equal(vol.array, image)
        np.testing.assert_allclose(vol.affine, AFFINE)
        assert vol.spacing == (1.5, 1.25, 2.0)
    assert read_header(nifti2_bytes(image, False)[:540], "v").version == 2


def test_nibabel_shipped_files():
    vol = read_nifti((NIBABEL_DATA / "anatomical.nii").read_bytes(), "anatomical.nii", 10**6)
    assert vol.array.shape == (33, 41, 25)
    with pytest.raises(VolumeError) as err:  # a real NIfTI-2 with two time points: not a 3-D volume
        read_nifti((NIBABEL_DATA / "example_nifti2.nii.gz").read_bytes(), "example_nifti2.nii.gz", 10**6)
    assert err.value.reason == "bad-shape"


def test_free_text_header_fields_are_not_carried_over(tmp_path):
    image, label = sphere()
    img = nib.Nifti1Image(image, AFFINE)
    img.header["descrip"] = b"Jane Doe 1970-01-01"
    img.header["aux_file"] = b"MRN-0042"
    img.header["intent_name"] = b"DoeJ"
    img.header["db_name"] = b"StMary"
    src = write_decathlon(tmp_path / "src", {"a": ("imagesTr/a.nii.gz", gzip.compress(img.to_bytes()),
                                                   "labelsTr/a.nii.gz", nifti_bytes(label))})
    layout, db = home(tmp_path)
    ingest(DataSpec(source=str(src)), layout, db, str(src))
    for path in (tmp_path / "home").rglob("*"):
        if path.is_file() and "quarantine" not in path.parts:
            blob = path.read_bytes()
            for word in (b"Jane Doe", b"MRN-0042", b"DoeJ", b"StMary"):
                assert word not in blob, (path, word)


@pytest.mark.parametrize("blob, reason", [
    (claiming((30000, 30000, 30000)), "too-large"),
    (claiming((2, 2, 2), np.float32, b"\0" * 10), "truncated"),
    (claiming((64, 64), np.float32), "bad-shape"),
    (claiming((8, 0, 8), np.float32), "bad-shape"),
    (claiming((4, 4, 4), np.complex64, b"\0" * 512), "bad-dtype"),
    (gzip.compress(claiming((2, 2, 2)), mtime=0)[:26], "truncated"),  # the gzip stream ends inside the header
    (b"\x1f\x8b" + b"garbage" * 100, "unreadable"),
    (b"not a nifti at all" * 40, "unreadable"),
])
def test_header_problems_are_refused_before_reading(blob, reason):
    with pytest.raises(VolumeError) as err:
        read_nifti(blob, "x.nii", 512**3)
    assert err.value.reason == reason


def test_a_truncated_gzip_volume_is_truncated():
    image, _ = sphere((20, 20, 20))
    blob = nifti_bytes(image)
    with pytest.raises(VolumeError) as err:
        read_nifti(blob[: len(blob) // 2], "x.nii.gz", 10**6)
    assert err.value.reason == "truncated"


BOMB_SCRIPT = r"""
import gzip, resource, sys, zlib
from pathlib import Path
import numpy as np
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/src"]
from voxelflow.spec.config import DataSpec
from voxelflow.core.db import Database
from voxelflow.data.ingest import ingest, read_ledger
from voxelflow.core.storage import Layout, Store
src, kind = Path(sys.argv[2]), sys.argv[3]
import nibabel as nib
def member(shape, dtype, zeros):
    hdr = nib.Nifti1Header(); hdr.set_data_dtype(dtype); hdr.set_data_shape(shape); hdr.set_data_offset(352)
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [c.compress(hdr.binaryblock + b"\0" * 4)]
    block = b"\0" * (1 << 24)
    for _ in range(zeros >> 24):
        out.append(c.compress(block))
    return b"".join(out) + c.flush()
(src / "imagesTr").mkdir(parents=True)
if kind == "bomb":   # 2 GiB of zeros behind a header that declares 1000 x 1000 x 2000 uint8
    blob = member((1000, 1000, 2000), np.uint8, 2 << 30)
else:                # a header that declares 30000^3 voxels
    blob = member((30000, 30000, 30000), np.uint8, 0)
(src / "imagesTr" / "x.nii.gz").write_bytes(blob)
(src / "dataset.json").write_text('{"training": [{"image": "./imagesTr/x.nii.gz"}]}')
root = src.parent / "home"
layout, db = Layout(Store(root), "p"), Database(f"sqlite:///{root}/voxelflow.db")
ingest(DataSpec(source=str(src)), layout, db, str(src))  # warm: imports and the database
idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
(src / "dataset.json").write_text('{"training": [{"image": "./imagesTr/x.nii.gz"}, {"image": "./imagesTr/y.nii.gz"}]}')
(src / "imagesTr" / "y.nii.gz").write_bytes(blob + b"")  # same bytes: a duplicate object, read once more
ingest(DataSpec(source=str(src)), layout, db, str(src))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = read_ledger(db, "p")
print(len(blob), (peak - idle) // 1024, sorted((r["state"], r["reason"]) for r in rows))
"""


@pytest.mark.parametrize("kind", ["bomb", "claim"])
def test_bombs_are_quarantined_with_little_memory(kind, tmp_path):
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(repo), str(tmp_path / "src"), kind],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    size, grown_mib, rows = out.stdout.strip().splitlines()[-1].split(" ", 2)
    assert int(size) < 4 << 20  # a few MB on disk
    assert int(grown_mib) < 512, f"peak RSS grew by {grown_mib} MiB"
    assert rows == str([("quarantined", "too-large"), ("quarantined", "too-large")])


STRAY_SCRIPT = r"""
import os, resource, sys
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/src"]
from tests.unit.test_dicom import KEY, write_series
from voxelflow.spec.config import DataSpec
from voxelflow.core.db import Database
from voxelflow.data.ingest import ingest, read_ledger
from voxelflow.core.storage import Layout, Store
src = Path(sys.argv[2])
write_series(src / "a", [0.0, 2.0, 4.0])
root = src.parent / "home"
layout, db = Layout(Store(root), "p"), Database(f"sqlite:///{root}/voxelflow.db")
ingest(DataSpec(source=str(src), layout="dicom"), layout, db, str(src), deid_key=KEY)  # warm
idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for i in range(4):  # 4 x 160 MiB that are not DICOM: a video, an archive, someone's backup
    with open(src / f"stray{i}.bin", "wb") as fh:
        for _ in range(40):
            fh.write(os.urandom(1 << 22))
ingest(DataSpec(source=str(src), layout="dicom"), layout, db, str(src), deid_key=KEY)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - idle) // 1024, sorted((r["state"], r["reason"]) for r in read_ledger(db, "p")))
"""


def test_large_files_that_are_not_dicom_are_hashed_as_they_stream_by_and_never_held(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", STRAY_SCRIPT, str(repo), str(tmp_path / "src")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    grown_mib, rows = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(grown_mib) < 256, f"peak RSS grew by {grown_mib} MiB for 640 MiB of stray files"  # was 976
    assert rows == str([("ingested", None)] * 3 + [("quarantined", "unreadable")] * 4)


# ---------------------------------------------------------------- entries that leave the source


def test_entries_outside_the_source_are_quarantined_and_never_read(tmp_path):
    image, label = sphere()
    secret = tmp_path / "secret.nii.gz"
    secret.write_bytes(nifti_bytes(image))
    src = tmp_path / "src"
    (src / "imagesTr").mkdir(parents=True)
    (src / "imagesTr" / "ok.nii.gz").write_bytes(nifti_bytes(image))
    os.symlink(secret, src / "imagesTr" / "link.nii.gz")
    entries = ["../secret.nii.gz", str(secret), "imagesTr/%2e%2e/%2e%2e/secret.nii.gz",
               "imagesTr/%252e%252e/%252e%252e/secret.nii.gz", "file:///etc/passwd", "imagesTr/link.nii.gz",
               "imagesTr/ok.nii.gz"]
    (src / "dataset.json").write_text(json.dumps({"training": [{"image": e} for e in entries]}))
    layout, db = home(tmp_path)
    report = ingest(DataSpec(source=str(src)), layout, db, str(src))
    assert len(report.ingested) == 1
    rows = read_ledger(db, "p")
    outside = [r for r in rows if r["reason"] == "outside-source"]
    assert len(outside) == len(entries) - 1 and all(r["sha256"] == "not-read" for r in outside)
    assert len(rows) == len(entries)  # every entry exactly one state
    assert not list((tmp_path / "home").rglob("quarantine/*"))  # nothing of them was copied anywhere


def test_a_folder_case_linking_outside_is_quarantined(tmp_path):
    image, _ = sphere()
    secret = tmp_path / "outside.nii.gz"
    secret.write_bytes(nifti_bytes(image))
    src = tmp_path / "src"
    (src / "case1").mkdir(parents=True)
    os.symlink(secret, src / "case1" / "image.nii.gz")
    layout, db = home(tmp_path)
    report = ingest(DataSpec(source=str(src), layout="folder"), layout, db, str(src))
    assert report.ingested == []
    assert [r["reason"] for r in read_ledger(db, "p")] == ["outside-source"]


def test_oversized_objects_are_hashed_but_never_held(tmp_path):
    image, label = sphere((72, 72, 72))  # 1.4 MB: over the 1 MiB + 8 bytes x 100 voxels an object may be
    src = write_decathlon(tmp_path / "src", {"a": ("imagesTr/a.nii", nifti_bytes(image, gz=False), None, None)})
    layout, db = home(tmp_path)
    ingest(DataSpec(source=str(src), max_voxels=100), layout, db, str(src))
    (row,) = read_ledger(db, "p")
    assert (row["state"], row["reason"]) == ("quarantined", "too-large")
    assert len(row["sha256"]) == 64 and row["size"] == (src / "imagesTr/a.nii").stat().st_size
    assert not list((tmp_path / "home").rglob("quarantine/*"))
    assert states_by_object(db)["a.nii"][0]["state"] == "quarantined"


def test_header_helper_really_declares_what_it_says():
    hdr = read_header(claiming((30000, 30000, 30000)), "x")
    assert hdr.voxels == 30000**3 and hdr.offset == 352
    assert struct.unpack("<i", claiming((2, 2, 2))[:4])[0] == 348


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("gz", [True, False])
def test_a_quarantined_nifti_is_kept_without_its_free_text_and_extensions(tmp_path, version, gz):
    """descrip, aux_file, intent_name, db_name and header extensions (a converter may embed the whole DICOM
    header) are where NIfTI files carry names: the quarantine's copy has none of them, and the same voxels."""
    data = np.ones((6, 6, 6), np.float32)
    data[1, 2, 3] = np.nan  # quarantined: non-finite
    cls = nib.Nifti2Image if version == 2 else nib.Nifti1Image
    img = cls(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header["descrip"] = b"Smithereen MRN8839201"
    img.header["aux_file"] = b"Smithereen.aux"
    img.header["intent_name"] = b"Smithereen"
    if version == 1:
        img.header["db_name"] = b"Smithereen"
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"PatientName=Smithereen^Johanna"))
    raw = img.to_bytes()
    name = "c.nii.gz" if gz else "c.nii"
    src = write_decathlon(tmp_path / "src", {"c": (f"imagesTr/{name}", gzip.compress(raw) if gz else raw,
                                                   None, None)})
    layout, db = home(tmp_path)
    ingest(DataSpec(source=str(src)), layout, db, str(src))
    (row,) = read_ledger(db, "p")
    assert row["reason"] == "non-finite"
    (kept,) = (tmp_path / "home").rglob("quarantine/*")
    blob = kept.read_bytes()
    assert (blob[:2] == b"\x1f\x8b") == gz
    plain = gzip.decompress(blob) if gz else blob
    assert b"Smithereen" not in plain and b"MRN" not in plain
    back = nib.Nifti2Image.from_bytes(plain) if version == 2 else nib.Nifti1Image.from_bytes(plain)
    assert np.array_equal(np.asanyarray(back.dataobj), data, equal_nan=True)
    assert np.allclose(back.affine, img.affine) and not back.header.extensions


def test_a_quarantined_file_whose_header_does_not_parse_is_not_copied(tmp_path):
    src = write_decathlon(tmp_path / "src", {"c": ("imagesTr/c.nii", b"Smithereen " * 100, None, None)})
    layout, db = home(tmp_path)
    ingest(DataSpec(source=str(src)), layout, db, str(src))
    assert read_ledger(db, "p")[0]["reason"] == "unreadable"
    assert not list((tmp_path / "home").rglob("quarantine/*"))  # left where it arrived
