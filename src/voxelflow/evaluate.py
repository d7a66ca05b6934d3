"""Evaluation: score a segmenter on held-out raw cases, in their own voxel grid."""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Callable

import numpy as np

from voxelflow.ingest import load_case
from voxelflow.storage import CaseStore


def split(case_ids: list[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split by hashed case id (at least one case each side)."""
    if len(case_ids) < 2:
        raise ValueError(f"need at least 2 cases to hold some out, have {len(case_ids)}")
    ranked = sorted(case_ids, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    n_val = min(len(ranked) - 1, max(1, math.ceil(len(ranked) * val_fraction)))
    return sorted(ranked[n_val:]), sorted(ranked[:n_val])


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground Dice; 1.0 when both are empty."""
    p, t = pred > 0, truth > 0
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, t).sum() / denom)


def hausdorff95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> float:
    import torch
    from monai.metrics import compute_hausdorff_distance

    if not (pred > 0).any() or not (truth > 0).any():
        return float("nan")
    p = torch.as_tensor(pred > 0)[None, None]
    t = torch.as_tensor(truth > 0)[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # raised inside MONAI's own edge helper
        hd = compute_hausdorff_distance(p, t, percentile=95, spacing=list(spacing))
    return float(hd.item())


def score(
    segment: Callable[[np.ndarray, np.ndarray], np.ndarray],
    raw: CaseStore,
    case_ids: list[str],
    metrics: list[str],
) -> dict[str, float]:
    """Mean of each metric over the cases, each predicted from its raw volume."""
    per_case: dict[str, list[float]] = {m: [] for m in metrics}
    for cid in case_ids:
        case = load_case(raw, cid)
        if "label" not in case:
            raise ValueError(f"{cid} has no label: it cannot be used for evaluation")
        pred = segment(case["image"], case["affine"])
        if "dice" in per_case:
            per_case["dice"].append(dice(pred, case["label"]))
        if "hausdorff95" in per_case:
            per_case["hausdorff95"].append(hausdorff95(pred, case["label"], tuple(case["attrs"]["spacing"])))
    return {m: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for m, v in per_case.items()}
