"""Patch centres for ``RandCropByPosNegLabeld`` without scanning the whole label at every draw.

MONAI's transform finds every foreground and background voxel of the case (two ``nonzero`` passes over the
label) each time it is called, then picks the centres among them: on a 128³ case that is about 8 ms a draw,
three quarters of what drawing a training batch costs, on the same cores as the training step. The same
law is had from a few random voxels: a voxel drawn uniformly from the volume and kept only when it is
foreground is uniform over the foreground, so :class:`SampledPosNegCropd` probes random voxels, keeps
``PER_CENTRE`` voxels of each kind for every patch, and hands them to MONAI as the ``fg_indices`` and
``bg_indices`` it accepts; MONAI then chooses and corrects the centres exactly as before. Where a kind is
too rare for the probes (a lesion of a few voxels), the exact scan runs, as MONAI would. The probes come
from the transform's own random state, so a seeded draw gives the same patches every time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from monai.transforms import RandCropByPosNegLabeld
from monai.transforms.utils import map_binary_to_indices

PER_CENTRE = 32  # voxels of each kind kept per patch: two centres share a voxel with probability 1 / (32 x patches)
PROBES, ROUNDS = 8192, 4  # random voxels probed per round, rounds per kind before the exact scan


def _plain(t: Any):
    """A MetaTensor as the plain tensor it wraps (indexing it skips MONAI's metadata handling)."""
    import torch

    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def sampled_indices(label: Any, image: Any, threshold: float, want: int,
                    rng: np.random.Generator) -> tuple[Any, Any]:
    """``want`` foreground and ``want`` background voxel indices (flat, C order) of ``label`` (channels first),
    each uniform over its kind, as MONAI's ``map_binary_to_indices`` defines the kinds: foreground where any
    channel is non-zero; background elsewhere where, with ``image``, some channel of it exceeds ``threshold``.
    Both kinds exactly, as that function gives them, when the probes find too few of one."""
    import torch

    lab = _plain(label).reshape(label.shape[0], -1)
    img = None if image is None else _plain(image).reshape(image.shape[0], -1)
    n = lab.shape[1]

    def foreground(idx):
        return (lab[:, idx] != 0).any(0)

    def background(idx):
        keep = ~foreground(idx)
        return keep & (img[:, idx] > threshold).any(0) if img is not None else keep

    found = []
    for kind in (foreground, background):
        hits = []
        count = 0
        for _ in range(ROUNDS):
            idx = torch.from_numpy(rng.integers(0, n, PROBES)).to(lab.device)
            hit = idx[kind(idx)]
            hits.append(hit)
            count += len(hit)
            if count >= want:
                break
        if count < want:
            return map_binary_to_indices(label, image, threshold)
        found.append(torch.cat(hits)[:want].cpu().numpy())
    return found[0], found[1]


class SampledPosNegCropd(RandCropByPosNegLabeld):
    """``RandCropByPosNegLabeld`` whose foreground and background voxels are sampled (see the module), unless the
    data carry their own (``fg_indices_key``, ``bg_indices_key``)."""

    spec_name = "RandCropByPosNegLabeld"  # what errors name: the transform as the spec calls it

    def randomize(self, label=None, fg_indices=None, bg_indices=None, image=None) -> None:  # noqa: D102
        if fg_indices is None and bg_indices is None and label is not None:
            # a stream of its own, drawn from the transform's state (the cropper's state is seeded alike)
            rng = np.random.default_rng([int(self.R.randint(2**31)), 0x5EED])
            fg_indices, bg_indices = sampled_indices(label, image, self.cropper.image_threshold,
                                                     PER_CENTRE * self.cropper.num_samples, rng)
        super().randomize(label, fg_indices, bg_indices, image)


def with_sampled_centres(compose: Any) -> Any:
    """``compose`` with each ``RandCropByPosNegLabeld`` that is not given indices drawing its centres by
    :class:`SampledPosNegCropd` (the same object, its arguments as MONAI parsed them)."""
    for t in getattr(compose, "transforms", ()):
        if type(t) is RandCropByPosNegLabeld and t.fg_indices_key is None and t.bg_indices_key is None:
            t.__class__ = SampledPosNegCropd
    return compose
