"""Results as DICOM: a Segmentation and a TID 1500 measurement report of one prediction, through highdicom.

Given the source series' original instances (as the PACS holds them: their headers suffice), the
predicted label mask on the volume voxelflow stacked from them (:func:`voxelflow.data.dicom.stack`:
voxel ``(i, j, k)`` is column ``i``, row ``j`` of the ``k``-th plane along the slice normal), the
model's ``labels`` and its name and version, :func:`dicom_results` makes

- a DICOM Segmentation (BINARY): one segment per foreground class of the network, named and coded
  from ``labels`` (codes given there, else SNOMED CT's for a name it knows, else Tissue), algorithm
  type AUTOMATIC identified by the model's name and version; its frames lie on the source planes and
  reference the source instances and their frame of reference;
- a Comprehensive 3D SR (TID 1500 Imaging Measurement Report): each segment's volume in mL,
  referencing that segment of the Segmentation and the source series.

Both carry the source's patient and study attributes (they belong to that study in the PACS) and a
series description marking them as a model's output. Their UIDs are derived from the model, its
version and the source series, so a result made again replaces the first one where it is stored.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import voxelflow

MANUFACTURER = "voxelflow"
SEG_SERIES_NUMBER = 9901  # series numbers of the results, out of the way of a scanner's own
SR_SERIES_NUMBER = 9902
DESCRIPTION = "AI model output: {model} v{version}"
# SNOMED CT types whose category is Morphologically Abnormal Structure, not Anatomical Structure: tumor
# (neoplasm), lesion, mass, nodule, cyst, metastasis, carcinoma, hemorrhage, edema, necrosis
ABNORMAL = frozenset({"108369006", "52988006", "4147007", "27925004", "367643001", "128462008", "1187425009",
                      "50960005", "79654002", "6574001"})
_ORIENT_TOL = 1e-4


class DicomResultError(ValueError):
    """The source instances and the mask do not make a DICOM result (the reason says why)."""


@dataclass
class DicomResults:
    seg: bytes  # the Segmentation, a DICOM file
    sr: bytes  # the measurement report, a DICOM file
    seg_uid: str  # their SOP Instance UIDs
    sr_uid: str


# ---------------------------------------------------------------- names and codes


def _code(spec: Mapping[str, Any] | None):
    from highdicom.sr import CodedConcept

    if not spec:
        return None
    return CodedConcept(value=str(spec["value"]), scheme_designator=str(spec.get("scheme") or "SCT"),
                        meaning=str(spec["meaning"]))


def known_type(name: str):
    """SNOMED CT's code for a structure's name (``spleen``, ``left kidney``, ``tumor``), or None."""
    from pydicom.sr.codedict import codes

    keyword = "".join(w[:1].upper() + w[1:] for w in re.split(r"[^A-Za-z0-9]+", name.strip().lower()) if w)
    if not keyword or not keyword[0].isalpha():
        return None
    try:
        return getattr(codes.SCT, keyword)
    except AttributeError:
        return None


def segment_codes(index: int, label: Mapping[str, Any] | None) -> tuple[str, Any, Any]:
    """(segment label, category, type) of class ``index`` from its ``labels`` entry (None: 'class N', Tissue)."""
    from pydicom.sr.codedict import codes

    name = str((label or {}).get("name") or f"class {index}")
    found = known_type(name)
    kind = _code((label or {}).get("type")) or found or codes.SCT.Tissue
    category = _code((label or {}).get("category"))
    if category is None:
        if found is None and not (label or {}).get("type"):
            category = codes.SCT.Tissue
        elif kind.value in ABNORMAL and kind.scheme_designator == "SCT":
            category = codes.SCT.MorphologicallyAbnormalStructure
        else:
            category = codes.SCT.AnatomicalStructure
    return name, category, kind


def normalize_labels(labels: Mapping[Any, Any] | None) -> dict[int, dict[str, Any]]:
    """``labels`` from a spec (:class:`~voxelflow.spec.labels.LabelSpec` values) or a model config (string keys)."""
    out: dict[int, dict[str, Any]] = {}
    for key, value in (labels or {}).items():
        out[int(key)] = value.model_dump(mode="json", exclude_none=True) if hasattr(value, "model_dump") \
            else dict(value)
    return out


# ---------------------------------------------------------------- geometry


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) else None


def _planes(sources: Sequence[Any]) -> tuple[list[Any], list[int]]:
    """The instances in the order highdicom takes frames (single-frame ones sorted along the slice normal, as
    :func:`voxelflow.data.dicom.stack` sorts them; one multi-frame object as it is) and, for each of those
    frames, the volume plane ``k`` it is."""
    if not sources:
        raise DicomResultError("no source instances")
    if len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) > 1:
        ds = sources[0]
        shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
        per = ds.get("PerFrameFunctionalGroupsSequence") or []
        iop = _floats(ds.get("ImageOrientationPatient"), 6)
        if shared is not None and shared.get("PlaneOrientationSequence"):
            iop = _floats(shared.PlaneOrientationSequence[0].get("ImageOrientationPatient"), 6)
        positions = [_floats(f.PlanePositionSequence[0].get("ImagePositionPatient"), 3)
                     if f.get("PlanePositionSequence") else None for f in per]
        if iop is None or len(positions) != int(ds.NumberOfFrames) or any(p is None for p in positions):
            raise DicomResultError("a multi-frame source without a shared orientation and per-frame positions")
        normal = np.cross(iop[:3], iop[3:])
        depth = [float(np.dot(p, normal)) for p in positions]
        rank = np.empty(len(depth), int)
        rank[np.argsort(depth, kind="stable")] = np.arange(len(depth))
        return [ds], rank.tolist()
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in sources):
        raise DicomResultError("DICOM results need single-frame instances or one multi-frame object")
    iops = [_floats(ds.get("ImageOrientationPatient"), 6) for ds in sources]
    ipps = [_floats(ds.get("ImagePositionPatient"), 3) for ds in sources]
    if any(v is None for v in iops + ipps):
        raise DicomResultError("a source instance lacks ImagePositionPatient or ImageOrientationPatient")
    if any(not np.allclose(v, iops[0], atol=_ORIENT_TOL) for v in iops):
        raise DicomResultError("the source instances differ in orientation")
    normal = np.cross(iops[0][:3], iops[0][3:])
    order = np.argsort([float(np.dot(p, normal)) for p in ipps], kind="stable")
    return [sources[i] for i in order], list(range(len(sources)))


def frames_of(mask: np.ndarray, ranks: list[int]) -> np.ndarray:
    """The label mask as source frames: frame ``f`` is plane ``ranks[f]``, rows by columns."""
    return np.ascontiguousarray(np.asarray(mask).transpose(2, 1, 0)[ranks])


def mask_of(frames: np.ndarray, ranks: list[int]) -> np.ndarray:
    """The inverse of :func:`frames_of`: source frames back to the volume's ``(i, j, k)`` voxels."""
    planes = np.empty_like(frames)
    planes[ranks] = frames
    return np.ascontiguousarray(planes.transpose(2, 1, 0))


# ---------------------------------------------------------------- the objects


def uid_for(*parts: str) -> str:
    """A UID derived from ``parts`` (``2.25.`` and a hash): the same parts give the same UID, and none reveals them."""
    digest = hashlib.sha256("\0".join(("voxelflow", *parts)).encode()).digest()[:16]  # 128 bits, as a UUID
    return f"2.25.{int.from_bytes(digest, 'big')}"


def _description(model: str, version: str, kind: str) -> str:
    text = DESCRIPTION.format(model=model, version=version)
    return (text[:64 - len(kind) - 1] + " " + kind) if kind else text[:64]


def segmentation(sources: Sequence[Any], mask: np.ndarray, labels: Mapping[Any, Any] | None, classes: int,
                 model: str, version: str):
    """A highdicom BINARY Segmentation of ``mask`` (values 0..classes-1) on the ``sources``' planes."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    ordered, ranks = _planes(sources)
    mask = np.asarray(mask)
    first = ordered[0]
    rows, cols = int(first.Rows), int(first.Columns)
    if mask.ndim != 3 or mask.shape != (cols, rows, len(ranks)):
        raise DicomResultError(f"the mask's grid {tuple(mask.shape)} is not the source's ({cols}, {rows}, "
                               f"{len(ranks)}): columns x rows x planes")
    if "FrameOfReferenceUID" not in first:
        raise DicomResultError("the source instances have no FrameOfReferenceUID: a segmentation cannot be "
                               "placed on them")
    if classes < 2 or (mask.size and int(mask.max()) >= classes):
        raise DicomResultError(f"the mask holds labels up to {int(mask.max()) if mask.size else 0}, the network "
                               f"{classes} classes")
    named = normalize_labels(labels)
    algorithm = hd.AlgorithmIdentificationSequence(name=model[:64], family=codes.DCM.ArtificialIntelligence,
                                                   version=str(version)[:64])
    series = str(first.SeriesInstanceUID)
    descriptions = []
    for index in range(1, classes):
        name, category, kind = segment_codes(index, named.get(index))
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=index, segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=uid_for(model, version, series, "segment", str(index)),
            tracking_id=f"{name} ({model} v{version})"[:64]))
    pixels = frames_of(mask.astype(np.uint8, copy=False), ranks)
    return hd.seg.Segmentation(
        source_images=ordered, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=uid_for(model, version, series, "seg-series"),
        series_number=SEG_SERIES_NUMBER, sop_instance_uid=uid_for(model, version, series, "seg"), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=model[:64], software_versions=voxelflow.__version__,
        device_serial_number=str(version)[:64], series_description=_description(model, version, "SEG"),
        content_label="SEGMENTATION", content_description=_description(model, version, "")[:64],
        omit_empty_frames=bool(pixels.any()))


def measurement_report(seg, sources: Sequence[Any], volumes_ml: Mapping[Any, float], model: str, version: str):
    """A Comprehensive 3D SR (TID 1500) with each segment of ``seg``'s volume in mL (``volumes_ml``: class ->
    mL; a class missing there is 0)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    volumes = {int(k): float(v) for k, v in volumes_ml.items()}
    series = str(sources[0].SeriesInstanceUID)
    algorithm = hd.sr.AlgorithmIdentification(name=model[:64], version=str(version)[:64])
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid_for(model, version, "device"), name=MANUFACTURER, manufacturer_name=MANUFACTURER,
            model_name=model[:64]))
    millilitre = hd.sr.CodedConcept(value="mL", scheme_designator="UCUM", meaning="milliliter")
    groups = []
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        reference = hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(series))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=str(item.TrackingUID),
                                                         identifier=str(item.TrackingID)),
            referenced_segment=reference, algorithm_id=algorithm,
            finding_type=hd.sr.CodedConcept.from_dataset(item.SegmentedPropertyTypeCodeSequence[0]),
            finding_category=hd.sr.CodedConcept.from_dataset(item.SegmentedPropertyCategoryCodeSequence[0]),
            measurements=[hd.sr.Measurement(name=codes.SCT.Volume, value=volumes.get(number, 0.0), unit=millilitre,
                                            algorithm_id=algorithm)]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=groups)
    return hd.sr.Comprehensive3DSR(
        evidence=[seg, *sources], content=report[0], series_instance_uid=uid_for(model, version, series, "sr-series"),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=uid_for(model, version, series, "sr"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, series_description=_description(model, version, "SR"))


def to_bytes(ds) -> bytes:
    fh = io.BytesIO()
    ds.save_as(fh, enforce_file_format=True)
    return fh.getvalue()


# the patient and study attributes (type 2: present, maybe empty) that a SEG and an SR copy from their source
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
         "StudyTime", "ReferringPhysicianName")


def complete_type2(sources: Sequence[Any]) -> None:
    """Add, empty, each type-2 patient or study attribute a source instance lacks (many scanners' and
    anonymisers' files omit some), since the results copy them: in place, on the caller's in-memory copies."""
    for ds in sources:
        for keyword in TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, "")


def dicom_results(sources: Sequence[Any], mask: np.ndarray, labels: Mapping[Any, Any] | None, classes: int,
                  volumes_ml: Mapping[Any, float], model: str, version: str) -> DicomResults:
    """The Segmentation and the measurement report of one prediction, as DICOM files (see the module). A type-2
    patient or study attribute a source lacks is added to it empty (:func:`complete_type2`)."""
    complete_type2(sources)
    seg = segmentation(sources, mask, labels, classes, model, version)
    sr = measurement_report(seg, sources, volumes_ml, model, version)
    return DicomResults(to_bytes(seg), to_bytes(sr), str(seg.SOPInstanceUID), str(sr.SOPInstanceUID))
