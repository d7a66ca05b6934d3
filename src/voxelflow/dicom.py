"""DICOM series: de-identified (PS3.15 Annex E basic profile) before anything else, then stacked into a volume.

De-identification runs through dicognito with a seed derived from a key the caller holds (never the
data): the same key maps the same UID to the same new UID in every file and every run. Private tags
are removed afterwards and ``BurnedInAnnotation = YES`` refuses the slice, since pixels cannot be
de-identified by header edits. Geometry comes from ImagePositionPatient / ImageOrientationPatient /
PixelSpacing only (never SliceThickness); slices are ordered along the slice normal.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np

from voxelflow.formats import Volume, VolumeError

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


def series_uid(data: bytes) -> str | None:
    """The SeriesInstanceUID of a DICOM object (header only): "" when it has none, None when it is not DICOM."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - not DICOM
        return None
    uid = ds.get("SeriesInstanceUID")
    return str(uid) if uid else ""


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


def stack(slices: list[Slice], max_voxels: int) -> Volume:
    """One volume from the de-identified slices of a series, checked; raise :class:`VolumeError`."""
    if len(slices) < 2:
        raise VolumeError("single-slice", "a series of one slice is not a volume")
    geo = []
    for s in slices:
        ds = s.dataset
        ipp, iop, ps = _floats(ds, "ImagePositionPatient", 3), _floats(ds, "ImageOrientationPatient", 6), \
            _floats(ds, "PixelSpacing", 2)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if ipp is None or iop is None or ps is None or rows < 2 or cols < 2:
            raise VolumeError("missing-geometry", "a slice lacks position, orientation, pixel spacing or size")
        geo.append((ipp, iop, ps, rows, cols))
    iop0, ps0, shape0 = geo[0][1], geo[0][2], geo[0][3:]
    for _, iop, ps, rows, cols in geo:
        if not np.allclose(iop, iop0, atol=_ORIENT_TOL) or (rows, cols) != shape0 or not np.allclose(ps, ps0):
            raise VolumeError("mixed-orientation", "slices differ in orientation, size or pixel spacing")
    row_dir, col_dir = iop0[:3], iop0[3:]
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 0.5:
        raise VolumeError("missing-geometry", "ImageOrientationPatient is degenerate")
    depth = np.array([float(np.dot(g[0], normal)) for g in geo])
    order = np.argsort(depth, kind="stable")
    depth = depth[order]
    gaps = np.diff(depth)
    if (gaps < 1e-3).any():
        raise VolumeError("duplicate-position", "two different slices lie at one position")
    step = float(gaps.min())
    ratio = gaps / step
    whole = np.abs(ratio - np.round(ratio)) < _SPACING_TOL * np.round(ratio)
    if whole.all() and (np.round(ratio) > 1).any():
        raise VolumeError("missing-slices", f"{int((np.round(ratio) - 1).sum())} slice(s) missing from the series")
    if np.abs(gaps - step).max() > _SPACING_TOL * step:
        raise VolumeError("uneven-spacing", f"slice spacing varies from {gaps.min():.3f} to {gaps.max():.3f} mm")
    rows, cols = shape0
    if rows * cols * len(slices) > max_voxels:
        raise VolumeError("too-large", f"{rows}x{cols}x{len(slices)} voxels, over the limit {max_voxels}")
    planes = np.empty((len(slices), rows, cols), np.float32)  # filled plane by plane: one strided copy at the end
    for k, i in enumerate(order):
        ds = slices[i].dataset
        try:
            px = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - truncated or undecodable pixel data
            raise VolumeError("unreadable", f"pixel data does not decode ({type(exc).__name__})") from None
        if px.shape != (rows, cols):
            raise VolumeError("bad-shape", f"a slice decodes to {px.shape}, not one {rows}x{cols} plane")
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        plane = planes[k]
        plane[...] = px
        if slope != 1:
            plane *= slope
        if intercept:
            plane += intercept
    if not np.isfinite(planes).all():
        raise VolumeError("non-finite", "contains NaN or infinite values")
    # voxel (i, j, k): i along the row direction (columns), j along the column direction (rows), k along the normal
    array = np.ascontiguousarray(planes.transpose(2, 1, 0))
    ipp_first = geo[order[0]][0]
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps0[1]
    lps[:3, 1] = col_dir * ps0[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = ipp_first
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM is LPS, NIfTI/MONAI affines are RAS
    return Volume(array=array, affine=affine, spacing=(float(ps0[1]), float(ps0[0]), step))
