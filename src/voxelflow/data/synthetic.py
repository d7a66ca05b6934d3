"""Small labelled volumes for the demo and the tests, written as a Decathlon-layout dataset."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np


def make_case(
    size: int, seed: int, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """One noisy-spheres image and its binary label, as NIfTI images."""
    from monai.data import create_test_image_3d

    image, label = create_test_image_3d(
        size, size, size, num_objs=4, rad_max=max(4, size // 6), rad_min=max(2, size // 12),
        noise_max=0.4, num_seg_classes=1, random_state=np.random.RandomState(seed),
    )
    affine = np.diag([*spacing, 1.0])
    img = nib.Nifti1Image(image.astype(np.float32), affine)
    lab = nib.Nifti1Image((label > 0).astype(np.uint8), affine)
    return img, lab


def make_decathlon(dest: Path, n_cases: int = 12, size: int = 48, seed: int = 0) -> Path:
    """Write ``n_cases`` image/label pairs plus ``dataset.json``; existing cases are kept."""
    dest = Path(dest)
    (dest / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dest / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n_cases):
        name = f"synth_{i:03d}.nii.gz"
        image_path, label_path = dest / "imagesTr" / name, dest / "labelsTr" / name
        if not (image_path.exists() and label_path.exists()):
            img, lab = make_case(size, seed + i)
            nib.save(img, image_path)
            nib.save(lab, label_path)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    manifest = {
        "name": "synthetic-spheres",
        "description": "Noisy spheres made with monai.data.create_test_image_3d",
        "modality": {"0": "synthetic"},
        "labels": {"0": "background", "1": "sphere"},
        "numTraining": n_cases,
        "training": training,
    }
    (dest / "dataset.json").write_text(json.dumps(manifest, indent=2))
    return dest


# A fictitious patient, in attributes the PS3.15 basic profile covers, in a nested sequence and in a
# private tag: what a hospital's export holds and de-identification must remove. Nobody real.
FICTITIOUS_IDENTITY = {
    "PatientName": "Quillfeather^Marigold", "PatientID": "MRN4417702", "PatientBirthDate": "19470312",
    "PatientAddress": "7 Larkspur Row Hollinsby", "AccessionNumber": "ACC5512093",
    "InstitutionName": "Saint Aldric Infirmary", "ReferringPhysicianName": "Brackenridge^Tobias",
    "OperatorsName": "Penhallow^Cora", "StationName": "CT-HOLLINSBY-2", "StudyDescription": "Abdomen of Marigold",
    "DeviceSerialNumber": "SN-QF-90317",
}
FICTITIOUS_PRIVATE = "PrivateNote-Larkspur"


def _dicom_slice(plane: np.ndarray, k: int, study: str, series: str, frame: str, identity: dict[str, str],
                 private_note: str) -> bytes:
    """One CT slice (explicit VR little endian) of a series whose voxel (i, j, k) is ``plane[i, j]`` at 1 mm."""
    from io import BytesIO

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    for name, value in identity.items():
        setattr(ds, name, value)
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = generate_uid()
    ref.PatientName = identity.get("PatientName", "")
    ds.ReferencedStudySequence = Sequence([ref])
    ds.private_block(0x0011, "VOXELFLOW DEMO", create=True).add_new(0x01, "LO", private_note)
    ds.Modality, ds.StudyDate, ds.InstanceNumber = "CT", "20240229", k + 1
    # rows run along +y, columns along +x (LPS); the RAS affine of the volume is diag(-1, -1, 1)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, float(k)]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.RescaleSlope, ds.RescaleIntercept = 0.001, 0.0  # stored values are thousandths of the image's
    pixels = np.clip(np.round(plane.T * 1000), 0, 65535).astype(np.uint16)  # DICOM planes are (row, column)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    fh = BytesIO()
    ds.save_as(fh, enforce_file_format=True)
    return fh.getvalue()


def make_dicom(dest: Path, n_cases: int = 4, size: int = 24, seed: int = 0,
               identity: dict[str, str] | None = None, private_note: str = FICTITIOUS_PRIVATE) -> Path:
    """Write ``n_cases`` labelled CT series as a ``dicom``-layout source: one folder of slices per series,
    NIfTI labels under ``labels/`` and the ``labels.json`` manifest that names them by SeriesInstanceUID.

    Every slice carries a fictitious patient (:data:`FICTITIOUS_IDENTITY` unless ``identity`` is given)
    in basic-profile attributes and a nested sequence, ``private_note`` in a private tag, and is named
    after the patient's surname,
    as exports often are: ingestion must leave none of it anywhere.
    """
    from pydicom.uid import generate_uid

    dest = Path(dest)
    (dest / "labels").mkdir(parents=True, exist_ok=True)
    who = dict(FICTITIOUS_IDENTITY if identity is None else identity)
    surname = str(who.get("PatientName", "anonymous")).split("^")[0]
    entries = []
    for i in range(n_cases):
        img, lab = make_case(size, seed + i)
        image = np.asarray(img.dataobj, dtype=np.float32)
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        folder = dest / f"{surname}_{i:03d}"
        folder.mkdir(exist_ok=True)
        for k in range(image.shape[2]):
            (folder / f"{surname}_{i:03d}_{k:04d}.dcm").write_bytes(
                _dicom_slice(image[:, :, k], k, study, series, frame, who, private_note))
        label = f"labels/{surname}_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(lab.dataobj, dtype=np.uint8), np.diag([-1.0, -1.0, 1.0, 1.0])),
                 dest / label)
        entries.append({"series": series, "label": label})
    (dest / "labels.json").write_text(json.dumps({"labels": entries}, indent=2))
    return dest
