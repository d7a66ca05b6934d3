"""Results as DICOM (voxelflow.serving.dicom_results, voxelflow predict on DICOM input): a real CT series built
from pydicom's CT_small.dcm, a Segmentation and a TID 1500 SR read back by highdicom and pydicom; segments named
and coded from the spec's labels; references to the original instances, never the de-identified copy; the SEG's
masks voxel for voxel the NIfTI mask of the same prediction.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from voxelflow.data import dicom
from voxelflow.serving import dicom_results as dr
from voxelflow.spec.config import SpecError, validate_spec

REPO = Path(__file__).resolve().parents[2]
PATIENT = "Quernby^Ottoline"  # identifying: the results carry it (they go back to this patient's study)
STEP = 5.0


def ct_series(n: int = 8, descending: bool = True) -> list[pydicom.Dataset]:
    """CT_small.dcm as ``n`` slices of one series: own UIDs, positions ``STEP`` mm apart, instance numbers running
    against the positions when ``descending`` (the order of the planes must come from geometry)."""
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series, rng = generate_uid(), np.random.default_rng(n)
    out = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID, ds.PatientName = series, PATIENT
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        z = (n - 1 - i) if descending else i
        ds.ImagePositionPatient = [-158.135803, -179.035797, -75.7 + STEP * z]
        ds.InstanceNumber = i + 1
        ds.PixelData = (rng.integers(0, 1200, (ds.Rows, ds.Columns))).astype(np.int16).tobytes()
        out.append(ds)
    return [out[i] for i in rng.permutation(n)]  # nor the order they come in


def headers(series: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """What the source holds, read back as the PACS would serve it (headers only: pixels are not needed)."""
    return [pydicom.dcmread(io.BytesIO(dr.to_bytes(ds)), stop_before_pixels=True) for ds in series]


def a_mask(shape: tuple[int, ...], classes: int = 3) -> np.ndarray:
    """A label mask on the stacked volume's grid, asymmetric on every axis (a flip or transpose shows)."""
    mask = np.zeros(shape, np.uint8)
    mask[10:50, 30:100, 1:5] = 1
    mask[70:90, 5:20, 4:8] = classes - 1
    mask[0, 0, 0] = 1
    return mask


def by_position(series: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    return sorted(series, key=lambda ds: float(ds.ImagePositionPatient[2]))


def seg_mask(seg, series: list[pydicom.Dataset]) -> np.ndarray:
    """The SEG's label map back on the volume's (column, row, plane) grid, planes by position."""
    uids = [ds.SOPInstanceUID for ds in by_position(series)]
    frames = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    return np.ascontiguousarray(np.asarray(frames).transpose(2, 1, 0))


# ---------------------------------------------------------------- the library


def test_the_segmentation_reads_back_named_coded_referencing_the_source_and_equal_to_the_mask():
    series = ct_series()
    volume = dicom.stack([dicom.Slice(str(i), ds) for i, ds in enumerate(series)], 1 << 30)
    mask = a_mask(volume.array.shape)
    labels = {1: {"name": "spleen"}, 2: {"name": "tumor"}}
    results = dr.dicom_results(headers(series), mask, labels, 3, {"1": 1.5, "2": 0.25}, "demo-spheres", "7")

    seg = hd.seg.segread(io.BytesIO(results.seg))
    plain = pydicom.dcmread(io.BytesIO(results.seg))  # pydicom reads it too
    assert plain.Modality == "SEG" and plain.SOPInstanceUID == results.seg_uid == seg.SOPInstanceUID
    assert seg.SegmentationType == "BINARY" and "AI model output" in seg.SeriesDescription
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["spleen", "tumor"]
    spleen, tumor = seg.SegmentSequence
    assert spleen.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Spleen.value
    assert spleen.SegmentedPropertyCategoryCodeSequence[0].CodeValue == codes.SCT.AnatomicalStructure.value
    assert tumor.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Tumor.value
    assert tumor.SegmentedPropertyCategoryCodeSequence[0].CodeValue == codes.SCT.MorphologicallyAbnormalStructure.value
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC" and item.SegmentAlgorithmName == "demo-spheres"
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "7"

    # what it references is the source: its instances, its series, its frame of reference, its study and patient
    source_uids = {ds.SOPInstanceUID for ds in series}
    assert {ref.ReferencedSOPInstanceUID for ref in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
        == source_uids
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == series[0].FrameOfReferenceUID
    assert (seg.StudyInstanceUID, str(seg.PatientName)) == (series[0].StudyInstanceUID, PATIENT)
    assert seg.SeriesInstanceUID != series[0].SeriesInstanceUID

    # voxel for voxel: frames on the source planes in position order, rows and columns as the volume has them
    back = seg_mask(seg, series)
    assert back.shape == mask.shape and np.array_equal(back, mask)
    positions = [float(f.PlanePositionSequence[0].ImagePositionPatient[2])
                 for f in seg.PerFrameFunctionalGroupsSequence]
    assert set(positions) <= {float(ds.ImagePositionPatient[2]) for ds in series}

    # made again: the same UIDs (a result stored twice replaces itself)
    again = dr.dicom_results(headers(series), mask, labels, 3, {"1": 1.5, "2": 0.25}, "demo-spheres", "7")
    assert (again.seg_uid, again.sr_uid) == (results.seg_uid, results.sr_uid)


def test_a_multi_frame_source_gets_its_frames_in_its_own_order():
    series = ct_series(6)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        series, series_instance_uid=generate_uid(), series_number=3, sop_instance_uid=generate_uid(), instance_number=1)
    enhanced = pydicom.dcmread(io.BytesIO(dr.to_bytes(enhanced)))
    depth = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in enhanced.PerFrameFunctionalGroupsSequence]
    assert depth != sorted(depth), "frames stored along the normal would not show an ordering error"
    volume = dicom.stack([dicom.Slice("mf", enhanced)], 1 << 30)
    mask = a_mask(volume.array.shape)
    results = dr.dicom_results(headers([enhanced]), mask, {}, 3, {}, "m", "1")
    seg = hd.seg.segread(io.BytesIO(results.seg))
    frames = np.asarray(seg.get_pixels_by_source_frame(enhanced.SOPInstanceUID, list(range(1, len(depth) + 1)),
                                                        combine_segments=True, skip_overlap_checks=True))
    np.testing.assert_array_equal(frames[np.argsort(depth)].transpose(2, 1, 0), mask)


def test_the_report_holds_each_segments_volume_in_ml_and_references_the_segmentation():
    series = ct_series(6, descending=False)
    volume = dicom.stack([dicom.Slice(str(i), ds) for i, ds in enumerate(series)], 1 << 30)
    mask = a_mask(volume.array.shape)
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    volumes = {str(c): round(float((mask == c).sum()) * voxel_ml, 3) for c in (1, 2)}
    assert volume.spacing[2] == pytest.approx(STEP) and all(v > 0 for v in volumes.values())
    results = dr.dicom_results(headers(series), mask, {}, 3, volumes, "demo", "1")

    sr = hd.sr.srread(io.BytesIO(results.sr))
    assert isinstance(sr, hd.sr.Comprehensive3DSR) and pydicom.dcmread(io.BytesIO(results.sr)).Modality == "SR"
    assert sr.SOPInstanceUID == results.sr_uid and sr.StudyInstanceUID == series[0].StudyInstanceUID
    assert "AI model output" in sr.SeriesDescription
    groups = sr.content.get_volumetric_roi_measurement_groups()
    found = {}
    for group in groups:
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == results.seg_uid
        (number,) = ref.referenced_segment_numbers
        (measurement,) = group.get_measurements(name=codes.SCT.Volume)
        assert measurement.unit.value == "mL"
        found[str(number)] = measurement.value
    assert found == pytest.approx(volumes)
    seg = hd.seg.segread(io.BytesIO(results.seg))  # class names default to "class N"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["class 1", "class 2"]


def test_names_without_a_code_get_tissue_and_given_codes_win():
    from pydicom.sr.codedict import codes

    name, category, kind = dr.segment_codes(1, {"name": "glorpus"})
    assert (name, category.value, kind.value) == ("glorpus", codes.SCT.Tissue.value, codes.SCT.Tissue.value)
    assert dr.segment_codes(2, None)[0] == "class 2"
    assert dr.segment_codes(1, {"name": "Portal vein"})[2].value == codes.SCT.PortalVein.value
    given = {"name": "lesion A", "type": {"value": "52988006", "scheme": "SCT", "meaning": "Lesion"},
             "category": {"value": "49755003", "meaning": "Morphologically Abnormal Structure"}}
    _, category, kind = dr.segment_codes(1, given)
    assert (category.value, category.scheme_designator, kind.value, kind.meaning) == (
        "49755003", "SCT", "52988006", "Lesion")


def test_a_mask_off_the_source_grid_or_outside_the_classes_is_refused():
    series = ct_series(4)
    shape = (128, 128, 4)
    with pytest.raises(dr.DicomResultError, match="grid"):
        dr.dicom_results(headers(series), np.zeros((128, 128, 5), np.uint8), {}, 2, {}, "m", "1")
    with pytest.raises(dr.DicomResultError, match="grid"):
        dr.dicom_results(headers(series), np.zeros((64, 128, 4), np.uint8), {}, 2, {}, "m", "1")
    with pytest.raises(dr.DicomResultError, match="labels up to 2"):
        dr.dicom_results(headers(series), np.full(shape, 2, np.uint8), {}, 2, {}, "m", "1")
    no_frame = headers(series)
    for ds in no_frame:
        del ds.FrameOfReferenceUID
    with pytest.raises(dr.DicomResultError, match="FrameOfReferenceUID"):
        dr.dicom_results(no_frame, np.zeros(shape, np.uint8), {}, 2, {}, "m", "1")
    # an empty prediction is still a result: its segment has no voxel
    empty = dr.dicom_results(headers(series), np.zeros(shape, np.uint8), {}, 2, {"1": 0.0}, "m", "1")
    assert not seg_mask(hd.seg.segread(io.BytesIO(empty.seg)), series).any()


# ---------------------------------------------------------------- the spec


def spec_with(labels, out_channels: int = 3) -> dict:
    data = yaml.safe_load((REPO / "deployments/specs/demo.yaml").read_text())
    data["train"]["network"]["UNet"]["out_channels"] = out_channels
    data["evaluate"]["metrics"] = ["dice"]
    if labels is not None:
        data["labels"] = labels
    return data


def test_labels_are_checked_against_the_network_and_travel_with_the_model_config():
    from voxelflow.stages.train import model_config

    spec = validate_spec(spec_with({1: {"name": "spleen"}, "2": {"name": "tumor", "type": {
        "value": "108369006", "meaning": "Tumor"}}}), "s")
    assert sorted(spec.labels) == [1, 2] and spec.labels[2].type.scheme == "SCT"
    config = model_config(spec)
    assert config["labels"] == {"1": {"name": "spleen"},
                                "2": {"name": "tumor", "type": {"value": "108369006", "scheme": "SCT",
                                                                "meaning": "Tumor"}}}
    assert dr.normalize_labels(config["labels"]) == dr.normalize_labels(spec.labels)
    with pytest.raises(SpecError, match=r"s: labels\.3: class 3 is not one the network gives.*1\.\.2"):
        validate_spec(spec_with({1: {"name": "spleen"}, 3: {"name": "liver"}}), "s")
    with pytest.raises(SpecError, match=r"labels\.0: "):
        validate_spec(spec_with({0: {"name": "background"}}), "s")
    with pytest.raises(SpecError, match=r"labels\.2\.name: 'Spleen' names class 1 too"):
        validate_spec(spec_with({1: {"name": "spleen"}, 2: {"name": "Spleen"}}), "s")
    with pytest.raises(SpecError, match=r"labels\.1\.colour: unknown key"):
        validate_spec(spec_with({1: {"name": "spleen", "colour": "red"}}), "s")
    # a spec without labels hashes as it did before labels existed
    plain = validate_spec(spec_with(None), "s")
    assert plain.labels == {} and model_config(plain)["labels"] == {}
    assert plain.digest() != validate_spec(spec_with({1: {"name": "spleen"}}), "s").digest()


# ---------------------------------------------------------------- voxelflow predict on DICOM input


def register_with_labels(uri: str, labels: dict) -> str:
    """A tiny untrained model whose registered config carries ``labels``, as its champion: its name."""
    import torch

    from tests.unit.test_predict import NETWORK, spec_data
    from voxelflow.learn.train import build_network, state_dict_bytes
    from voxelflow.release import registry
    from voxelflow.stages.train import model_config

    name = "tiny-labelled"
    spec = validate_spec({**spec_data("tiny", "unused"), "labels": labels}, "tiny")
    config = {**model_config(spec), "spatial_size": [16, 16, 16]}
    assert config["labels"] == labels
    torch.manual_seed(3)
    run_id = registry.start_run(uri, None, spec, {"dataset_digest": "0" * 16})
    model_uri = registry.log_model(uri, run_id, config, state_dict_bytes(build_network(copy.deepcopy(NETWORK))))
    version = registry.register(uri, model_uri, name, run_id, {})
    registry.promote(uri, name, version)
    return name


def test_predict_on_a_dicom_source_writes_seg_and_sr_that_reference_the_originals_and_equal_the_nifti_mask(
        tmp_path, tmp_path_factory):
    from tests.unit.test_predict import MODEL, tiny_registry
    from voxelflow.core.db import connect
    from voxelflow.core.storage import Layout, Store
    from voxelflow.data.ingest import ingest, load_case
    from voxelflow.serving import predict as batch
    from voxelflow.spec.config import DataSpec

    uri = tiny_registry(tmp_path_factory)
    src = tmp_path / "incoming"
    series = ct_series(8)
    (src / "study").mkdir(parents=True)
    for i, ds in enumerate(series):
        ds.save_as(src / "study" / f"{PATIENT.split('^')[0]}_{i}.dcm", enforce_file_format=True)
    home = tmp_path / "home"
    db, layout = connect(f"sqlite:///{home / 'voxelflow.db'}"), Layout(Store(home), "dicom-results")
    arrived = ingest(DataSpec(source=str(src), layout="dicom"), layout, db, str(src), deid_key="k")
    (case,) = arrived.case_ids or arrived.unlabelled
    stored = load_case(layout.raw, case)  # the ingested copy: de-identified, its UIDs remapped
    assert stored["image"].shape == (128, 128, 8)

    dest = tmp_path / "out"
    report = batch.run(db, layout, uri, batch.ModelRef(MODEL), str(dest), source=str(src))
    assert report.failed == [] and [p["case"] for p in report.predicted] == [case]
    (entry,) = report.predicted
    folder = dest / f"{MODEL}-v1"
    assert (entry["seg"], entry["sr"]) == (str(folder / f"{case}.seg.dcm"), str(folder / f"{case}.sr.dcm"))
    nifti = np.asanyarray(nib.load(folder / f"{case}.nii.gz").dataobj)
    assert 0 < (nifti == 1).sum() < nifti.size, "an empty or full mask would hide an axis error"

    seg = hd.seg.segread(entry["seg"])
    assert {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
        == {ds.SOPInstanceUID for ds in series}  # the originals, not the de-identified copy's UIDs
    assert seg.FrameOfReferenceUID == series[0].FrameOfReferenceUID
    assert seg.SegmentSequence[0].SegmentLabel == "class 1"  # registered without labels: still a result
    assert seg.SegmentSequence[0].SegmentAlgorithmName == MODEL
    np.testing.assert_array_equal(seg_mask(seg, series), nifti)

    sr = hd.sr.srread(entry["sr"])
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    assert group.get_measurements(name=codes.SCT.Volume)[0].value == pytest.approx(entry["volumes_ml"]["1"])

    # a rerun skips; a SEG removed since makes the case predicted again, the same UIDs
    assert batch.run(db, layout, uri, batch.ModelRef(MODEL), str(dest), source=str(src)).skipped == [case]
    Path(entry["seg"]).unlink()
    redo = batch.run(db, layout, uri, batch.ModelRef(MODEL), str(dest), source=str(src))
    assert [p["case"] for p in redo.predicted] == [case]
    assert hd.seg.segread(entry["seg"]).SOPInstanceUID == seg.SOPInstanceUID

    # a model registered with labels names and codes its segments by them
    labelled = register_with_labels(uri, {"1": {"name": "spleen"}})
    named = batch.run(db, layout, uri, batch.ModelRef(labelled), str(dest), source=str(src))
    (segment,) = hd.seg.segread(named.predicted[0]["seg"]).SegmentSequence
    assert (segment.SegmentLabel, segment.SegmentedPropertyTypeCodeSequence[0].CodeValue) == (
        "spleen", codes.SCT.Spleen.value)

    # an original changed since ingestion is not what was segmented: that case fails, with a reason naming no file
    Path(entry["seg"]).unlink()
    target = sorted((src / "study").iterdir())[0]
    changed = pydicom.dcmread(target)
    changed.SOPInstanceUID = generate_uid()
    changed.save_as(target, enforce_file_format=True)
    failed = batch.predict(db, layout, [case], MODEL, "1", lambda: batch.registry.load_version(
        uri, MODEL, "1", tmp_path / "w"), Store(str(dest)), source=str(src))
    (problem,) = failed.failed
    assert "holds other bytes" in problem["reason"] and PATIENT.split("^")[0] not in problem["reason"]


def test_a_source_without_its_type2_patient_and_study_attributes_still_gets_results():
    """Scanners and anonymisers leave out type-2 attributes (accession number, study id, referring physician, ...);
    the results copy them, so they are added empty instead of failing the prediction."""
    series = ct_series(4)
    for ds in series:
        for keyword in dr.TYPE2:
            if keyword in ds:
                delattr(ds, keyword)
    sources = headers(series)
    assert not any(k in ds for ds in sources for k in dr.TYPE2)
    volume = dicom.stack([dicom.Slice(str(i), ds) for i, ds in enumerate(series)], 1 << 30)
    results = dr.dicom_results(sources, a_mask(volume.array.shape, 2), None, 2, {"1": 1.0}, "demo-spheres", "1")
    seg = hd.seg.segread(io.BytesIO(results.seg))
    assert seg.AccessionNumber == "" and str(seg.PatientName) == ""
    assert pydicom.dcmread(io.BytesIO(results.sr)).Modality == "SR"
