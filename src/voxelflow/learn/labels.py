"""Label maps from logits, and Dice from label maps, without the slow paths.

``torch.argmax`` over the channel axis of a CPU tensor reduces along a strided axis: on 2 × 128³ logits
it takes about 0.34 s, against 0.013 s for one elementwise comparison per class (the same labels, ties
to the lowest class as argmax gives them). Dice through MONAI's ``compute_dice`` needs one-hot copies
of both masks in int64 (16 bytes a voxel a class); a confusion matrix from one ``bincount`` gives the
same values.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def argmax_channels(logits: Any, dim: int = 0):
    """The index of the largest value along ``dim`` (the channels), uint8 where the classes fit, with the
    lowest index on ties: ``torch.argmax(logits, dim)`` at elementwise cost."""
    import torch

    logits = torch.as_tensor(logits)
    n = logits.shape[dim]
    if n > 255 or logits.device.type != "cpu":  # on a GPU the reduction is fast; uint8 holds 255 classes
        out = torch.argmax(logits, dim=dim)
        return out.to(torch.uint8) if n <= 255 else out
    channels = logits.unbind(dim)
    best = channels[0].clone()
    labels = torch.zeros(best.shape, dtype=torch.uint8)
    for c in range(1, n):
        higher = channels[c] > best
        labels.masked_fill_(higher, c)
        torch.maximum(best, channels[c], out=best)
    return labels


def confusion(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """``n_classes × n_classes`` counts, truth by row and prediction by column. Values outside the
    classes are refused (``label-values``), never clamped into one."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and label {truth.shape} differ in shape")
    for name, a in (("prediction", pred), ("label", truth)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            outside = sorted(int(v) for v in np.unique(a) if not 0 <= v < n_classes)
            raise ValueError(f"label-values: {outside} outside 0..{n_classes - 1} ({n_classes} classes) in the {name}")
    if n_classes**2 <= 256 and pred.dtype == truth.dtype == np.uint8:  # one uint8 code a voxel, no int64 copies
        flat = truth.ravel() * np.uint8(n_classes) + pred.ravel()
    else:
        flat = truth.astype(np.int64, copy=False).ravel() * n_classes + pred.astype(np.int64, copy=False).ravel()
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def dice_from_confusion(counts: np.ndarray) -> list[float]:
    """Dice of each foreground class (1..n-1): 1.0 where a class is absent from both, 0.0 where from one."""
    out = []
    for c in range(1, counts.shape[0]):
        tp = counts[c, c]
        denominator = counts[c, :].sum() + counts[:, c].sum()  # 2 tp + fp + fn
        out.append(1.0 if denominator == 0 else float(2 * tp / denominator))
    return out
