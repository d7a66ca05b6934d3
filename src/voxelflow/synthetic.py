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
