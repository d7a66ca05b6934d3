"""DICOM series: grouping, geometry, defects with their own reasons, and de-identification before anything is stored."""

from __future__ import annotations

import copy
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.unit.test_ingest import home
from voxelflow.data import dicom
from voxelflow.data.formats import VolumeError
from voxelflow.data.ingest import ingest, load_case, read_ledger
from voxelflow.spec.config import DataSpec

KEY = "test-key-1"
CT5N = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"

# identifying values, one per basic-profile attribute we set; none may survive ingestion
SECRETS = {
    "PatientName": "Smithereen^Johanna", "PatientID": "MRN8839201", "PatientBirthDate": "19510417",
    "PatientAddress": "42 Quarry Lane Ottersham", "OtherPatientIDs": "ALTID55521", "AccessionNumber": "ACC7731902",
    "InstitutionName": "Saint Wendolin Hospital", "InstitutionAddress": "9 Bramble Road Kestwick",
    "ReferringPhysicianName": "Grumblewick^Otto", "PerformingPhysicianName": "Tasselhoff^Ida",
    "OperatorsName": "Vandermeer^Pim", "StationName": "SCAN-FERNHILL", "StudyID": "STUDY66120",
    "StudyDescription": "Knee of Johanna", "SeriesDescription": "Fernhill protocol 7",
    "InstitutionalDepartmentName": "Radiology Wing Q", "PatientTelephoneNumbers": "5550199321",
    "RequestingPhysician": "Oakhollow^Bernd", "DeviceSerialNumber": "SN-ZX-448812",
}
NESTED_SECRET = "Nestedname^Quillon"
PRIVATE_SECRET = "PrivateRemark-Hollowmere"
ORIGINAL_UIDS = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}


def make_slice(z: float, index: int, pixels: np.ndarray, *, series: str | None = None, orientation=None,
               burned: bool = False, slope: float = 2.0, intercept: float = -100.0) -> bytes:
    """One CT slice with identifying values in basic-profile attributes, a nested sequence and a private tag."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    sop = generate_uid()
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = ORIGINAL_UIDS["study"], ORIGINAL_UIDS["frame"]
    ds.SeriesInstanceUID = series or ORIGINAL_UIDS["series"]
    for name, value in SECRETS.items():
        setattr(ds, name, value)
    ds.Modality = "CT"
    ds.StudyDate = ds.SeriesDate = "20240229"
    ds.InstanceNumber = index + 1
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = generate_uid()
    ref.PatientName = NESTED_SECRET
    ds.ReferencedStudySequence = Sequence([ref])
    block = ds.private_block(0x0011, "ACME HOSPITAL", create=True)
    block.add_new(0x01, "LO", PRIVATE_SECRET)
    ds.ImageOrientationPatient = list(orientation or [1, 0, 0, 0, 1, 0])
    ds.ImagePositionPatient = [-50.0, -40.0, z]
    ds.PixelSpacing = [0.8, 0.6]  # row spacing, column spacing
    ds.SliceThickness = 99.0  # wrong on purpose: spacing comes from positions
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if burned:
        ds.BurnedInAnnotation = "YES"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    from io import BytesIO

    fh = BytesIO()
    ds.save_as(fh, enforce_file_format=True)
    return fh.getvalue()


def series_pixels(n: int, shape=(6, 5)) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.integers(0, 1000, shape).astype(np.uint16) for _ in range(n)]


def write_series(folder: Path, zs: list[float], **kw) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = series_pixels(len(zs))
    for i, (z, px) in enumerate(zip(zs, pixels)):
        # names out of order and identifying: neither order nor names may matter
        (folder / f"Smithereen_Johanna_{(i * 7) % len(zs)}_{i}.dcm").write_bytes(make_slice(z, i, px, **kw))
    return pixels


def run(src: Path, tmp_path: Path, key: str = KEY):
    layout, db = home(tmp_path)
    report = ingest(DataSpec(source=str(src), layout="dicom"), layout, db, str(src), deid_key=key)
    return layout, db, report


def test_a_generated_series_is_stacked_along_the_normal_with_rescale_and_geometry(tmp_path):
    src = tmp_path / "src"
    zs = [10.0, 4.0, 7.0, 1.0, 13.0, 16.0]  # shuffled positions, 3 mm apart
    pixels = write_series(src / "deep" / "tree", zs)
    layout, db, report = run(src, tmp_path)
    assert len(report.ingested) == 1 and not report.quarantined
    rows = read_ledger(db, "p")
    assert len(rows) == 6 and {r["state"] for r in rows} == {"ingested"}  # one ledger row per object
    case = load_case(layout.raw, report.ingested[0])
    order = np.argsort(zs)
    expected = np.stack([pixels[i].astype(np.float32) * 2.0 - 100.0 for i in order], axis=-1).transpose(1, 0, 2)
    np.testing.assert_array_equal(case["image"], expected)
    assert case["attrs"]["spacing"] == [0.6, 0.8, 3.0]
    assert case["attrs"]["modality"] == "CT"
    # voxel (i, j, k) -> RAS: x = -(−50 + 0.6 i), y = -(−40 + 0.8 j), z = 1 + 3 k
    np.testing.assert_allclose(case["affine"] @ [2, 3, 4, 1], [50 - 1.2, 40 - 2.4, 13.0, 1])
    assert "label" not in case
    assert report.unlabelled == report.ingested and report.case_ids == []  # never trained or evaluated on


def test_pydicom_shipped_ct_series(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(CT5N, src)
    layout, db, report = run(src, tmp_path)
    assert len(report.ingested) == 1, read_ledger(db, "p")
    case = load_case(layout.raw, report.ingested[0])
    assert case["image"].shape == (16, 16, 5)
    assert case["attrs"]["spacing"][2] == pytest.approx(2.5)
    first = pydicom.dcmread(CT5N / "3353")  # the lowest slice along the normal
    np.testing.assert_array_equal(case["image"][:, :, 0], first.pixel_array.T * float(first.RescaleSlope)
                                  + float(first.RescaleIntercept))


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm"])
def test_transfer_syntaxes_decode_alike(tmp_path, name):
    base = pydicom.dcmread(get_testdata_file(name))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        ds = copy.deepcopy(base)
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(src / f"s{i}.dcm")
    layout, db, report = run(src, tmp_path)
    assert len(report.ingested) == 1, read_ledger(db, "p")
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float32).T
    np.testing.assert_array_equal(load_case(layout.raw, report.ingested[0])["image"][:, :, 1], reference)


def test_byte_duplicates_are_duplicate_before_grouping(tmp_path):
    src = tmp_path / "src"
    write_series(src / "a", [0.0, 2.0, 4.0])
    shutil.copytree(src / "a", src / "copy")
    for f in (src / "copy").iterdir():
        f.rename(f.with_name("renamed_" + f.name))
    _, db, report = run(src, tmp_path)
    rows = read_ledger(db, "p")
    assert len(rows) == 6 and len(report.ingested) == 1
    assert sorted(r["state"] for r in rows) == ["duplicate"] * 3 + ["ingested"] * 3
    assert {r["case_id"] for r in rows} == set(report.ingested)
    again = ingest(DataSpec(source=str(src), layout="dicom"), home(tmp_path)[0], db, str(src), deid_key=KEY)
    assert again.seen == 6 and len(read_ledger(db, "p")) == 6


def series_defects(root: Path) -> dict[str, str]:
    """A folder per defect; returns folder -> expected reason."""
    write_series(root / "gap", [0.0, 2.0, 6.0, 8.0], series=generate_uid())
    write_series(root / "twice", [0.0, 2.0, 2.0, 4.0], series=generate_uid())
    write_series(root / "uneven", [0.0, 2.0, 4.5, 6.0], series=generate_uid())
    write_series(root / "single", [0.0], series=generate_uid())
    write_series(root / "burned", [0.0, 2.0, 4.0], series=generate_uid(), burned=True)
    mixed = generate_uid()
    write_series(root / "mixed", [0.0, 2.0], series=mixed)
    (root / "mixed" / "odd.dcm").write_bytes(make_slice(4.0, 9, series_pixels(1)[0], series=mixed,
                                                        orientation=[0, 1, 0, 0, 0, 1]))
    (root / "trunc").mkdir()
    full = make_slice(0.0, 0, series_pixels(1)[0], series=generate_uid())
    (root / "trunc" / "cut.dcm").write_bytes(full[: len(full) - 20])
    (root / "junk").mkdir()
    (root / "junk" / "notes.txt").write_bytes(b"Smithereen^Johanna called on Tuesday\n")
    return {"gap": "missing-slices", "twice": "duplicate-position", "uneven": "uneven-spacing",
            "single": "single-slice", "burned": "burned-in-annotation", "mixed": "mixed-orientation",
            "trunc": "single-slice", "junk": "unreadable"}


def test_series_defects_have_their_own_reasons_and_every_object_one_state(tmp_path):
    src = tmp_path / "src"
    expected = series_defects(src)
    _, db, report = run(src, tmp_path)
    assert report.ingested == []
    rows = read_ledger(db, "p")
    n_files = sum(1 for p in src.rglob("*") if p.is_file())
    assert len(rows) == n_files and len({r["object"] for r in rows}) == n_files
    for folder, reason in expected.items():
        got = {(r["state"], r["reason"]) for r in rows if f"/{folder}/" in r["object"]}
        assert got == {("quarantined", reason)}, (folder, got)


def test_a_truncated_slice_in_a_series_is_unreadable(tmp_path):
    src = tmp_path / "src"
    write_series(src, [0.0, 2.0, 4.0])
    victim = sorted(src.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:-40])
    _, db, _ = run(src, tmp_path)
    assert {(r["state"], r["reason"]) for r in read_ledger(db, "p")} == {("quarantined", "unreadable")}


def test_no_identifying_value_survives_anywhere_under_the_home(tmp_path):
    src = tmp_path / "src"
    write_series(src / "ok", [0.0, 2.0, 4.0])
    series_defects(src / "bad")  # quarantined ones too: their de-identified bytes are kept
    layout, db, report = run(src, tmp_path)
    assert len(report.ingested) == 1
    kept = list((tmp_path / "home").rglob("quarantine/*"))
    assert kept  # quarantined DICOM is kept, de-identified
    words = [*SECRETS.values(), NESTED_SECRET, PRIVATE_SECRET, *ORIGINAL_UIDS.values(), "Smithereen", "Johanna"]
    for path in (tmp_path / "home").rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            for word in words:
                if path.name.startswith("voxelflow.db") and word in ("Smithereen", "Johanna"):
                    continue  # the ledger alone maps object keys (the arrived file names) to hashes
                assert word.encode() not in blob, (path, word)
    for path in kept:
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES" and "basic profile" in ds.DeidentificationMethod
        assert not any(elem.tag.is_private for elem in ds.iterall())
    burned = [r for r in read_ledger(db, "p") if r["reason"] in ("burned-in-annotation", "unreadable")]
    quarantined = {p.name for p in kept}
    assert burned and not any(r["sha256"] in quarantined for r in burned)
    assert all(os.path.exists(r["object"]) for r in burned)  # left where they arrived


def test_uid_remapping_is_consistent_under_one_key_and_differs_under_another():
    a, b = (make_slice(z, i, series_pixels(1)[0]) for i, z in enumerate((0.0, 2.0)))
    one = [dicom.deidentify(x, KEY, "x").dataset for x in (a, b)]
    again = dicom.deidentify(a, KEY, "x").dataset
    other = dicom.deidentify(a, "another-key", "x").dataset
    assert one[0].StudyInstanceUID == one[1].StudyInstanceUID == again.StudyInstanceUID
    assert one[0].SeriesInstanceUID == one[1].SeriesInstanceUID != ORIGINAL_UIDS["series"]
    assert one[0].SOPInstanceUID != one[1].SOPInstanceUID
    assert other.StudyInstanceUID != again.StudyInstanceUID


def test_a_dicom_ingest_without_a_key_is_refused(tmp_path):
    src = tmp_path / "src"
    write_series(src, [0.0, 2.0, 4.0])
    layout, db = home(tmp_path)
    with pytest.raises(ValueError, match="VOXELFLOW_DEID_KEY"):
        ingest(DataSpec(source=str(src), layout="dicom"), layout, db, str(src))
    assert read_ledger(db, "p") == []


def test_stack_refuses_before_decoding_oversized_series():
    slices = [dicom.deidentify(make_slice(z, i, px), KEY, "x")
              for i, (z, px) in enumerate(zip((0.0, 2.0, 4.0), series_pixels(3)))]
    with pytest.raises(VolumeError) as err:
        dicom.stack(slices, max_voxels=50)
    assert err.value.reason == "too-large"


def test_a_link_leaving_the_source_is_outside_source_and_never_read(tmp_path):
    src = tmp_path / "src"
    write_series(src / "ok", [0.0, 2.0, 4.0])
    secret = tmp_path / "elsewhere.dcm"
    secret.write_bytes(make_slice(0.0, 0, series_pixels(1)[0], series=generate_uid()))
    os.symlink(secret, src / "ok" / "link.dcm")
    layout, db, report = run(src, tmp_path)
    assert len(report.ingested) == 1
    rows = read_ledger(db, "p")
    (out,) = [r for r in rows if r["object"].endswith("link.dcm")]
    assert (out["state"], out["reason"], out["sha256"]) == ("quarantined", "outside-source", "not-read")
    assert len(rows) == 4


def test_labels_for_series_come_from_nifti_files_named_in_a_manifest(tmp_path):
    import json

    import nibabel as nib

    src = tmp_path / "src"
    labelled, wrong, bare = generate_uid(), generate_uid(), generate_uid()
    write_series(src / "a", [0.0, 2.0, 4.0], series=labelled)
    write_series(src / "b", [0.0, 2.0, 4.0], series=wrong)
    write_series(src / "c", [0.0, 2.0, 4.0], series=bare)
    affine = np.array([[-0.6, 0, 0, 50.0], [0, -0.8, 0, 40.0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    mask = np.zeros((5, 6, 3), np.uint8)
    mask[1:3, 2:5, 1] = 1
    (src / "seg").mkdir()
    nib.save(nib.Nifti1Image(mask, affine), src / "seg" / "a.nii.gz")
    nib.save(nib.Nifti1Image(mask[:4].copy(), affine), src / "seg" / "b.nii.gz")
    (src / "labels.json").write_text(json.dumps({"labels": [{"series": labelled, "label": "seg/a.nii.gz"},
                                                           {"series": wrong, "label": "./seg/b.nii.gz"}]}))
    layout, db, report = run(src, tmp_path)
    assert len(report.ingested) == 2 and len(report.case_ids) == 1 and len(report.unlabelled) == 1
    case = load_case(layout.raw, report.case_ids[0])
    np.testing.assert_array_equal(case["label"], mask)
    rows = read_ledger(db, "p")
    assert len(rows) == 11  # 9 slices + 2 label files; the manifest is not an object of a case
    assert {(r["state"], r["reason"]) for r in rows if "/b/" in r["object"] or r["object"].endswith("b.nii.gz")} \
        == {("quarantined", "label-mismatch")}


def test_a_mixed_source_holds_a_decathlon_set_and_dicom_series_side_by_side(tmp_path):
    """layout: mixed — what dataset.json names is a Decathlon case; every other file is read as DICOM."""
    import gzip
    import json

    import nibabel as nib

    src = tmp_path / "src"
    write_series(src / "pacs" / "a", [0.0, 2.0, 4.0])
    image = np.random.default_rng(0).random((6, 6, 6)).astype(np.float32)
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    (src / "imagesTr" / "c.nii.gz").write_bytes(gzip.compress(nib.Nifti1Image(image, np.eye(4)).to_bytes()))
    label = (image > 0.5).astype(np.uint8)
    (src / "labelsTr" / "c.nii.gz").write_bytes(gzip.compress(nib.Nifti1Image(label, np.eye(4)).to_bytes()))
    (src / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/c.nii.gz",
                                                                "label": "./labelsTr/c.nii.gz"}]}))
    (src / "notes.txt").write_text("not an image")
    layout, db = home(tmp_path)
    report = ingest(DataSpec(source=str(src), layout="mixed"), layout, db, str(src), deid_key=KEY)
    assert len(report.case_ids) == 1 and len(report.unlabelled) == 1  # the labelled NIfTI case; the series
    rows = read_ledger(db, "p")
    assert report.arrived == len(rows) == 3 + 2 + 1  # slices, image and label, the stray file
    (stray,) = [r for r in rows if r["object"].endswith("notes.txt")]
    assert stray["state"] == "quarantined"
    assert not any(r["object"].endswith("dataset.json") for r in rows)  # the manifest is not an object
    with pytest.raises(ValueError, match="VOXELFLOW_DEID_KEY"):  # it may hold DICOM: the key is needed
        ingest(DataSpec(source=str(src), layout="mixed"), layout, db, str(src))


def test_a_mixed_source_in_an_object_store_reads_as_the_same_folder_does(tmp_path, s3_store_url):
    import fsspec

    from voxelflow.data.synthetic import make_decathlon, make_dicom

    local = tmp_path / "drop"
    make_decathlon(local, n_cases=2, size=12)
    make_dicom(local, n_cases=2, size=12, seed=7)
    remote = f"{s3_store_url}/mixed-{tmp_path.name}"
    fsspec.filesystem("s3").put(str(local), remote.removeprefix("s3://"), recursive=True)
    reports = []
    for i, src in enumerate((str(local), remote)):
        layout, db = home(tmp_path / f"home{i}")
        reports.append(ingest(DataSpec(source=src, layout="mixed"), layout, db, src, deid_key=KEY))
        assert {r["state"] for r in read_ledger(db, "p")} == {"ingested"}
    assert [r.dataset_digest for r in reports] == [reports[0].dataset_digest] * 2  # the same cases, by content
    assert len(reports[0].case_ids) == 4 and reports[0].arrived == reports[1].arrived == 4 + 2 * 12 + 2


@pytest.mark.parametrize("manifest, message", [
    ("{oops", "not valid JSON"),
    ('{"labels": {"series": "1.2"}}', "labels is a list"),
    ('{"labels": [{"series": "1.2"}]}', r"labels\[0\] needs a series"),
    ('{"labels": [{"series": "1.2", "label": "a.nii.gz"}, {"series": "1.2", "label": "b.nii.gz"}]}',
     "two labels for one series"),
])
def test_a_malformed_labels_manifest_is_a_clear_error_and_records_nothing(tmp_path, manifest, message):
    src = tmp_path / "src"
    write_series(src, [0.0, 2.0, 4.0])
    (src / "labels.json").write_text(manifest)
    layout, db = home(tmp_path)
    with pytest.raises(ValueError, match=message):
        ingest(DataSpec(source=str(src), layout="dicom"), layout, db, str(src), deid_key=KEY)
    assert read_ledger(db, "p") == []


def test_dicom_objects_without_pixels_are_never_copied(tmp_path):
    """A DICOMDIR names its files by paths that are often patient IDs, a structured report holds free text:
    header edits cannot be trusted to clean either, so neither is kept, even de-identified.

    pydicom's own DICOMDIR test tree, plus its structured report: before, the store's quarantine held
    the DICOMDIR's patient-ID folder name and the report's text."""
    tree = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests"
    report = Path(get_testdata_file("test-SR.dcm"))
    words = set()
    for f in [*tree.rglob("*"), report]:
        if f.is_file():
            for elem in pydicom.dcmread(f, stop_before_pixels=True, force=True).iterall():
                if elem.keyword in ("PatientName", "PatientID", "ReferencedFileID", "TextValue") and elem.value:
                    values = elem.value if elem.VM > 1 else [elem.value]
                    words |= {str(v) for v in values if len(str(v)) >= 6}
    assert "77654033" in words and any("mass" in w for w in words)  # a patient-ID folder, a report's text
    src = tmp_path / "src"
    shutil.copytree(tree, src)
    shutil.copy(report, src / "report.dcm")
    layout, db, result = run(src, tmp_path)
    ledger = read_ledger(db, "p")
    assert len(ledger) == result.arrived and result.ingested  # every object one state; CT5N still ingested
    rows = {Path(r["object"]).name: r for r in ledger if Path(r["object"]).name in ("DICOMDIR", "report.dcm")}
    assert rows["DICOMDIR"]["reason"] == rows["report.dcm"]["reason"] == "no-pixel-data"
    kept = {p.name for p in (tmp_path / "home").rglob("quarantine/*")}
    assert rows["DICOMDIR"]["sha256"] not in kept and rows["report.dcm"]["sha256"] not in kept
    for path in (tmp_path / "home").rglob("*"):
        if path.is_file() and not path.name.startswith("voxelflow.db"):  # the ledger maps keys (paths) to hashes
            blob = path.read_bytes()
            assert not [w for w in words if w.encode() in blob], path


def test_overlays_and_curves_are_removed_as_the_basic_profile_says():
    """Table E.1-1 removes Curve Data (50xx,xxxx), Overlay Data (60xx,3000) and Overlay Comments (60xx,4000):
    an overlay is a bitmap drawn over the image, often a name. pydicom's overlay example, and a slice of ours
    with an overlay comment and a curve."""
    shipped = Path(get_testdata_file("examples_overlay.dcm")).read_bytes()
    assert any(e.tag.group == 0x6000 for e in pydicom.dcmread(io.BytesIO(shipped)))
    ds = pydicom.dcmread(io.BytesIO(make_slice(0.0, 0, series_pixels(1)[0])))
    ds.add_new(0x60000010, "US", 6)
    ds.add_new(0x60000011, "US", 5)
    ds.add_new(0x60003000, "OW", b"\xff" * 4)
    ds.add_new(0x60024000, "LT", "Overlay of Smithereen^Johanna")
    ds.add_new(0x50000005, "US", 1)
    ds.add_new(0x50003000, "OW", b"\x01\x02")
    fh = io.BytesIO()
    ds.save_as(fh, enforce_file_format=True)
    for blob in (shipped, fh.getvalue()):
        out = dicom.deidentify(blob, KEY, "x").deidentified_bytes()
        kept = pydicom.dcmread(io.BytesIO(out))
        assert not [e.tag for e in kept.iterall() if e.tag.group in dicom.REMOVE_GROUPS]
        assert b"Smithereen" not in out


def test_basic_profile_rows_dicognito_keeps_are_removed_too():
    """Free text, sequences and patient characteristics of Table E.1-1 that dicognito was found to keep."""
    ds = pydicom.dcmread(io.BytesIO(make_slice(0.0, 0, series_pixels(1)[0])))
    ds.PatientAge, ds.PatientWeight, ds.PatientSize, ds.PatientSex = "073Y", 81.5, 1.83, "F"
    ds.ReasonForTheRequestedProcedure = "Reason Smithereen"
    ds.OtherPatientNames = "Alias^Smithereen"
    ds.InterpretationText = "Findings of Smithereen"
    text = Dataset()
    text.TextValue = "Tumour in Smithereen"
    ds.ContentSequence = Sequence([text])
    icon = Dataset()
    icon.Rows = icon.Columns = 2
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.add_new(0x7FE00010, "OB", b"Smithereen"[:4])
    ds.IconImageSequence = Sequence([icon])  # a thumbnail: pixels that may show a name
    ds.add_new(0x04000500, "SQ", Sequence([Dataset()]))  # Encrypted Attributes Sequence
    fh = io.BytesIO()
    ds.save_as(fh, enforce_file_format=True)
    out = dicom.deidentify(fh.getvalue(), KEY, "x")
    assert b"Smithereen" not in out.deidentified_bytes() and b"Smit" not in out.deidentified_bytes()
    kept = out.dataset
    for keyword in ("PatientAge", "PatientWeight", "PatientSize", "IconImageSequence", "ContentSequence",
                    "EncryptedAttributesSequence", "ReasonForTheRequestedProcedure"):
        assert keyword not in kept, keyword
    assert kept.PatientSex == ""  # action Z: kept, empty
