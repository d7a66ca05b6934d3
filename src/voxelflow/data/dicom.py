"""DICOM series: de-identified (PS3.15 Annex E basic profile) before anything else, then stacked into a volume.

De-identification runs through dicognito with a seed derived from a key the caller holds (never the
data): the same key maps the same UID to the same new UID in every file and every run. Private tags
are removed afterwards and ``BurnedInAnnotation = YES`` refuses the slice, since pixels cannot be
de-identified by header edits. Geometry comes from ImagePositionPatient / ImageOrientationPatient /
PixelSpacing only (never SliceThickness; per frame, from the functional groups, in multi-frame
objects); slices are ordered along the slice normal. A series that repeats every position the same
number of times is 4-D and refused as such.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np

from voxelflow.data.formats import Volume, VolumeError

METHOD = "PS3.15 E basic profile (dicognito), keyed UIDs, no private tags"
_ORIENT_TOL = 1e-4
_SPACING_TOL = 0.01  # relative


@dataclass
class Slice:
    key: str
    dataset: object  # a de-identified pydicom Dataset

    def deidentified_bytes(self) -> bytes:
        fh = io.BytesIO()
        self.dataset.save_as(fh, enforce_file_format=True)
        return fh.getvalue()


# Basic-profile attributes (PS3.15 Table E.1-1, action X or Z) that dicognito keeps: free text and
# device identifiers. They are removed wherever they occur, nested sequences included.
REMOVE = frozenset("""
AccessionNumber AcquisitionComments AcquisitionDeviceProcessingDescription AcquisitionProtocolDescription
AdditionalPatientHistory AdmissionID AdmittingDiagnosesDescription Allergies BranchOfService CassetteID
CommentsOnThePerformedProcedureStep ContentCreatorName CountryOfResidence CurrentPatientLocation
DerivationDescription DetectorID DeviceDescription DeviceSerialNumber DigitalSignaturesSequence
DischargeDiagnosisDescription EthnicGroup FrameComments GantryID IdentifyingComments ImageComments
ImagePresentationComments InstitutionalDepartmentName IssuerOfPatientID MedicalAlerts MedicalRecordLocator
MilitaryRank ModifiedAttributesSequence Occupation OriginalAttributesSequence PatientComments
PatientInstitutionResidence PatientMotherBirthName PatientReligiousPreference PatientState
PerformedProcedureStepDescription PerformedProcedureStepID PlateID ProtocolName ReasonForStudy
RegionOfResidence RequestAttributesSequence RequestedProcedureDescription RequestedProcedureID
ResponsibleOrganization ResponsiblePerson ScheduledProcedureStepDescription ScheduledProcedureStepID
SeriesDescription ServiceEpisodeDescription SourceSerialNumber StudyComments StudyDescription StudyID
TextComments TextString VisitComments
""".split()) | frozenset("""
AcquisitionContextSequence AdmittingDiagnosesCodeSequence AuthorObserverSequence ContentSequence
CustodialOrganizationSequence DataSetTrailingPadding DistributionAddress DistributionName
EncryptedAttributesSequence GraphicAnnotationSequence HumanPerformerName HumanPerformerOrganization
IconImageSequence InsurancePlanIdentification IntendedRecipientsOfResultsIdentificationSequence
InterpretationApproverSequence InterpretationAuthor InterpretationDiagnosisDescription InterpretationRecorder
InterpretationText InterpretationTranscriber LastMenstrualDate MACParametersSequence OrderCallbackPhoneNumber
OrderEntererLocation OtherPatientIDsSequence OtherPatientNames PatientBirthName PatientBirthTime
PatientInsurancePlanCodeSequence PatientPrimaryLanguageCodeSequence PatientTelephoneNumbers PerformedLocation
PersonAddress PersonTelephoneNumbers PhysicianApprovingInterpretation PregnancyStatus
ReasonForTheRequestedProcedure ReferencedPatientAliasSequence ReferencedPatientPhotoSequence
ReferringPhysicianAddress ReferringPhysicianTelephoneNumbers RequestedContrastAgent ResultsComments
SmokingStatus SpecialNeeds TopicAuthor TopicKeywords TopicSubject TopicTitle
""".split()) | frozenset("PatientAge PatientSize PatientWeight".split())
# (the second set: more Table E.1-1 X rows, free text and sequences, that dicognito was found to keep;
# the third: patient characteristics, X unless the Retain Patient Characteristics Option is used)
EMPTY = frozenset({"PatientSex"})  # Table E.1-1 action Z: present, zero length


# Table E.1-1's repeating-group rows, which dicognito keeps: Curve Data (50xx,xxxx), Overlay Data
# (60xx,3000) and Overlay Comments (60xx,4000). Overlays are bitmaps drawn over the image (often text):
# their whole groups go, so no overlay plane is left without its data.
REMOVE_GROUPS = frozenset(range(0x5000, 0x5020, 2)) | frozenset(range(0x6000, 0x6020, 2))


def _strip(ds) -> None:
    """Remove private tags, :data:`REMOVE` attributes and :data:`REMOVE_GROUPS` at every nesting level."""
    for elem in list(ds):
        if elem.tag.is_private or elem.keyword in REMOVE or elem.tag.group in REMOVE_GROUPS:
            del ds[elem.tag]
        elif elem.keyword in EMPTY:
            elem.value = ""
        elif elem.VR == "SQ":
            for item in elem.value:
                _strip(item)


def _seed(key: str) -> str:
    return hashlib.sha256(b"voxelflow-deid\0" + key.encode()).hexdigest()


def parse(data: bytes, name: str) -> Slice:
    """One DICOM object read in memory as it arrived (``deidentify: none``); raise :class:`VolumeError`."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001
        raise VolumeError("unreadable", f"{name}: not a DICOM file ({type(exc).__name__})") from None
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":  # identity in the pixels: no tag removal helps
        raise VolumeError("burned-in-annotation", f"{name}: the pixels carry burned-in annotation")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        # a DICOMDIR (file paths named after patients), a report (free text), a presentation state: not an
        # image, and not something header edits can be trusted to clean, so it is never copied
        raise VolumeError("no-pixel-data", f"{name}: a DICOM object without pixels (a DICOMDIR, report or "
                                           "presentation state), not an image")
    return Slice(name, ds)


def deidentify(data: bytes, key: str, name: str) -> Slice:
    """One DICOM object de-identified in memory; raise :class:`VolumeError` when that is not possible."""
    from dicognito.anonymizer import Anonymizer

    sl = parse(data, name)
    ds = sl.dataset
    try:
        ds.remove_private_tags()
        Anonymizer(seed=_seed(key)).anonymize(ds)
        _strip(ds)  # private tags again, and what the profile removes that dicognito keeps
    except Exception as exc:  # noqa: BLE001 - dicognito cannot handle this object
        raise VolumeError("deidentify-failed", f"{name}: {type(exc).__name__}") from None
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    return sl


def _floats(ds, tag: str, n: int) -> np.ndarray | None:
    value = ds.get(tag)
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.isfinite(arr).all() else None


def _frames_of(ds) -> int:
    """NumberOfFrames (1 when absent or unusable)."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def object_header(data: bytes) -> tuple[str, int, int] | None:
    """(SeriesInstanceUID, voxels, pixel bytes) a DICOM object's header declares, from its first bytes: ""
    as the UID when it has none, voxels rows x columns x frames, bytes those times samples x bits
    allocated / 8. None when it is not DICOM."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - not DICOM
        return None
    uid = ds.get("SeriesInstanceUID")
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 8) or 8)
    except (TypeError, ValueError):
        rows = cols = samples = bits = 0  # stacking refuses it (missing-geometry) once it is within bounds
    voxels = rows * cols * _frames_of(ds)
    return (str(uid) if uid else ""), voxels, voxels * max(samples, 1) * max(bits, 1) // 8


@dataclass
class _Frame:
    """Where one plane of a series lies: object ``obj``'s frame ``index`` (None: a single-frame object)."""

    obj: int
    index: int | None
    ipp: np.ndarray | None
    iop: np.ndarray | None
    ps: np.ndarray | None
    slope: float
    intercept: float


def _group_value(groups: list, sequence: str, tag: str, n: int) -> np.ndarray | None:
    """``tag`` in the first item of ``sequence`` of the first functional group (per frame, then shared) having it."""
    for group in groups:
        seq = group.get(sequence) if group is not None else None
        if seq:
            value = _floats(seq[0], tag, n)
            if value is not None:
                return value
    return None


def _rescale(ds, groups: list) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept: from the frame's or the shared PixelValueTransformationSequence, else
    the object's own."""
    item = ds
    for group in groups:
        seq = group.get("PixelValueTransformationSequence") if group is not None else None
        if seq and "RescaleSlope" in seq[0]:
            item = seq[0]
            break
    return float(item.get("RescaleSlope", 1) or 1), float(item.get("RescaleIntercept", 0) or 0)


def _frames(ds, obj: int) -> list[_Frame]:
    """The planes of one object: itself, or each frame of a multi-frame object placed by its functional groups
    (PS3.3 C.7.6.16: per-frame PlanePositionSequence, orientation, spacing and rescale per frame or shared)."""
    n = _frames_of(ds)
    per = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    if per is None and shared is None:
        if n > 1:
            raise VolumeError("multi-frame", f"a multi-frame object ({n} frames) without per-frame functional "
                                             "groups: its frames cannot be placed")
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        return [_Frame(obj, None, _floats(ds, "ImagePositionPatient", 3), _floats(ds, "ImageOrientationPatient", 6),
                       _floats(ds, "PixelSpacing", 2), slope, intercept)]
    if per is None or len(per) != n:
        raise VolumeError("multi-frame", f"a multi-frame object of {n} frames with "
                                         f"{0 if per is None else len(per)} per-frame functional groups")
    out = []
    for f in range(n):
        groups = [per[f], shared]
        ipp = _group_value(groups, "PlanePositionSequence", "ImagePositionPatient", 3)
        if ipp is None and n > 1:
            raise VolumeError("multi-frame", f"a multi-frame object ({n} frames) without per-frame positions "
                                             "(PlanePositionSequence): its frames cannot be placed")
        if ipp is None:
            ipp = _floats(ds, "ImagePositionPatient", 3)
        iop = _group_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient", 6)
        ps = _group_value(groups, "PixelMeasuresSequence", "PixelSpacing", 2)
        out.append(_Frame(obj, f if n > 1 else None, ipp,
                          iop if iop is not None else _floats(ds, "ImageOrientationPatient", 6),
                          ps if ps is not None else _floats(ds, "PixelSpacing", 2), *_rescale(ds, groups)))
    return out


def stack(slices: list[Slice], max_voxels: int) -> Volume:
    """One volume from the de-identified objects of a series (single-frame slices, multi-frame objects with
    per-frame positions, or both), checked; raise :class:`VolumeError`."""
    frames: list[_Frame] = []
    shapes = []
    for i, s in enumerate(slices):
        got = _frames(s.dataset, i)
        frames += got
        shapes.append((int(s.dataset.get("Rows", 0) or 0), int(s.dataset.get("Columns", 0) or 0)))
    if len(frames) < 2:
        raise VolumeError("single-slice", "a series of one slice is not a volume")
    for fr in frames:
        rows, cols = shapes[fr.obj]
        if fr.ipp is None or fr.iop is None or fr.ps is None or rows < 2 or cols < 2:
            raise VolumeError("missing-geometry", "a slice lacks position, orientation, pixel spacing or size")
    iop0, ps0, shape0 = frames[0].iop, frames[0].ps, shapes[frames[0].obj]
    for fr in frames:
        if not np.allclose(fr.iop, iop0, atol=_ORIENT_TOL) or shapes[fr.obj] != shape0 or not np.allclose(fr.ps, ps0):
            raise VolumeError("mixed-orientation", "slices differ in orientation, size or pixel spacing")
    row_dir, col_dir = iop0[:3], iop0[3:]
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 0.5:
        raise VolumeError("missing-geometry", "ImageOrientationPatient is degenerate")
    depth = np.array([float(np.dot(fr.ipp, normal)) for fr in frames])
    order = np.argsort(depth, kind="stable")
    depth = depth[order]
    gaps = np.diff(depth)
    if (gaps < 1e-3).any():
        counts = np.diff(np.flatnonzero(np.r_[True, gaps >= 1e-3, True]))  # planes at each distinct position
        if counts.min() == counts.max() > 1:
            raise VolumeError("4d-series", f"each of {len(counts)} slice positions occurs {counts[0]} times "
                                           "(time points, echoes or acquisitions): a 4-D series, not one volume")
        raise VolumeError("duplicate-position", "two different slices lie at one position")
    step = float(gaps.min())
    ratio = gaps / step
    whole = np.abs(ratio - np.round(ratio)) < _SPACING_TOL * np.round(ratio)
    if whole.all() and (np.round(ratio) > 1).any():
        raise VolumeError("missing-slices", f"{int((np.round(ratio) - 1).sum())} slice(s) missing from the series")
    if np.abs(gaps - step).max() > _SPACING_TOL * step:
        raise VolumeError("uneven-spacing", f"slice spacing varies from {gaps.min():.3f} to {gaps.max():.3f} mm")
    rows, cols = shape0
    if rows * cols * len(frames) > max_voxels:
        raise VolumeError("too-large", f"{rows}x{cols}x{len(frames)} voxels, over the limit {max_voxels}")
    planes = np.empty((len(frames), rows, cols), np.float32)  # filled plane by plane: one strided copy at the end
    where: dict[int, list[int]] = {}  # object -> the planes (in order) that come from it
    for k, i in enumerate(order):
        where.setdefault(frames[i].obj, []).append(k)
    for obj, ks in where.items():  # each object decoded once, multi-frame ones too
        ds = slices[obj].dataset
        try:
            px = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - truncated or undecodable pixel data
            raise VolumeError("unreadable", f"pixel data does not decode ({type(exc).__name__})") from None
        n = _frames_of(ds)
        if px.shape != ((n, rows, cols) if n > 1 else (rows, cols)):
            raise VolumeError("bad-shape", f"an object decodes to {px.shape}, not {n} {rows}x{cols} plane(s)")
        for k in ks:
            fr = frames[order[k]]
            plane = planes[k]
            plane[...] = px if fr.index is None else px[fr.index]
            if fr.slope != 1:
                plane *= fr.slope
            if fr.intercept:
                plane += fr.intercept
        del px
    if not np.isfinite(planes).all():
        raise VolumeError("non-finite", "contains NaN or infinite values")
    # voxel (i, j, k): i along the row direction (columns), j along the column direction (rows), k along the normal
    array = np.ascontiguousarray(planes.transpose(2, 1, 0))
    ipp_first = frames[order[0]].ipp
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps0[1]
    lps[:3, 1] = col_dir * ps0[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = ipp_first
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM is LPS, NIfTI/MONAI affines are RAS
    return Volume(array=array, affine=affine, spacing=(float(ps0[1]), float(ps0[0]), step))
