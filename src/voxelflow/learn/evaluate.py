"""Evaluation: score a segmenter on held-out raw cases, in their own voxel grid."""

from __future__ import annotations

import hashlib
import inspect
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from voxelflow.core.storage import CaseStore
from voxelflow.data.ingest import load_case
from voxelflow.spec.config import BUILTIN_METRICS, CustomMetric, metric_names, sides_problem

SPLIT_SALT = b"voxelflow-split-v1:"

#: built-in metric name -> True when higher is better
DIRECTIONS = BUILTIN_METRICS


def split_position(case_id: str) -> float:
    """Where a case falls in [0, 1): a fixed function of its id, which is its content hash."""
    digest = hashlib.sha256(SPLIT_SALT + case_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def sides(case_ids: list[str], test_fraction: float, val_fraction: float) -> tuple[list[str], list[str], list[str]]:
    """The three fixed sides (train, validation, test) by :func:`split_position`.

    A case whose position is below ``test_fraction`` is a test case (promotion decides on it alone);
    the next ``val_fraction`` of positions are validation (checkpoint selection, early stopping); the
    rest train. Membership depends on the case alone, so adding cases never moves one from side to
    side, and no seed changes it. Raises, naming the keys, on fractions the spec would refuse and when
    a side would be empty.
    """
    problem = sides_problem(test_fraction, val_fraction)
    if problem:
        raise ValueError(problem)
    positions = {c: split_position(c) for c in case_ids}
    test = sorted(c for c, p in positions.items() if p < test_fraction)
    val = sorted(c for c, p in positions.items() if test_fraction <= p < test_fraction + val_fraction)
    train = sorted(c for c, p in positions.items() if p >= test_fraction + val_fraction)
    for side, members, key in (("test", test, "evaluate.test_fraction"), ("validation", val, "evaluate.val_fraction"),
                               ("training", train, "evaluate.test_fraction and evaluate.val_fraction")):
        if not members:
            raise ValueError(
                f"no case falls on the {side} side (test_fraction {test_fraction}, val_fraction {val_fraction}) "
                f"among {len(positions)} cases; add cases or change {key}")
    return train, val, test


def sides_rule(test_fraction: float, val_fraction: float) -> str:
    """The rule :func:`sides` applies, in words (kept with the run in ``split.json``)."""
    return (f"p = sha256({SPLIT_SALT.decode()!r} + case id)[:8] / 2**64; test: p < {test_fraction}; "
            f"val: {test_fraction} <= p < {test_fraction + val_fraction}; train: the rest")


def direction(metric: str, directions: Mapping[str, bool] | None = None) -> bool:
    """True when higher is better for a reported metric name (``dice``, ``dice_2``, ``hausdorff95_1``);
    ``directions`` adds a spec's custom metrics (:meth:`~voxelflow.spec.config.EvaluateSpec.directions`)."""
    known = {**DIRECTIONS, **(directions or {})}
    if metric in known:  # a name given whole (a step's metric such as qc.volume_1) before one class of a metric
        return known[metric]
    base = metric.rsplit("_", 1)[0] if metric.rsplit("_", 1)[-1].isdigit() else metric
    if base not in known:
        raise KeyError(f"unknown metric {metric!r}; known: {sorted(known)}")
    return known[base]


def _one_hot(labels: np.ndarray, n_classes: int):
    import torch

    t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_classes):  # never clamped into a class
        raise ValueError(f"label-values: {outside_classes(t.numpy(), n_classes)} outside 0..{n_classes - 1} "
                         f"({n_classes} classes)")
    return torch.nn.functional.one_hot(t, n_classes).movedim(-1, 0)[None]


def outside_classes(labels: np.ndarray, n_classes: int) -> list[int]:
    """The values of ``labels`` that are no class of ``n_classes`` (``0..n_classes-1``), ascending."""
    return sorted(int(v) for v in np.unique(labels) if not 0 <= v < n_classes)


def diagonal_mm(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    """The length of the volume's diagonal: the distance given when a structure is missed entirely."""
    return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def dice_per_class(pred: np.ndarray, truth: np.ndarray, n_classes: int = 2) -> list[float]:
    """Dice of each foreground class (1..n_classes-1), MONAI's ``compute_dice`` values from one confusion
    matrix (``tests/unit/test_labels.py`` holds them equal).

    A class absent from both gives 1.0; absent from one of them gives 0.0 (never dropped).
    """
    from voxelflow.learn.labels import confusion, dice_from_confusion

    return dice_from_confusion(confusion(pred, truth, n_classes))


def hausdorff95_per_class(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...],
                          n_classes: int = 2) -> list[float]:
    """95th-percentile Hausdorff distance (mm) of each foreground class, through MONAI.

    Both empty: 0. One empty and not the other: the volume's diagonal in mm, the worst distance the
    volume allows (MONAI gives inf or NaN there, which a mean would drop).
    """
    from monai.metrics import compute_hausdorff_distance

    worst = diagonal_mm(pred.shape, spacing)
    p1, t1 = _one_hot(pred, n_classes), _one_hot(truth, n_classes)
    out = []
    for c in range(1, n_classes):
        has_p, has_t = bool(p1[0, c].any()), bool(t1[0, c].any())
        if not has_p and not has_t:
            out.append(0.0)
        elif has_p != has_t:
            out.append(worst)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # FutureWarning raised inside MONAI's own edge helper
                hd = compute_hausdorff_distance(p1[:, [0, c]], t1[:, [0, c]], include_background=False,
                                                percentile=95, spacing=list(spacing))
            out.append(min(float(hd.item()), worst))
    return out


def custom_per_class(metric: CustomMetric, pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...],
                     n_classes: int = 2) -> list[float]:
    """A user metric (:class:`~voxelflow.spec.config.CustomMetric`) of each foreground class.

    The function (or an instance of the class) gets one-hot float tensors (1, classes, *spatial);
    ``include_background=False``, ``ignore_empty=False`` (an empty truth is scored, not dropped) and
    ``spacing`` are passed where its signature takes them and the spec's ``args`` do not set them.
    It must return one value per class, with or without the background. A NaN it returns stays NaN:
    the mean over cases is then NaN, and a gate on it fails.
    """
    fn = metric.load()
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        params = {}
    kwargs: dict[str, Any] = {}
    for key, value in (("include_background", False), ("ignore_empty", False), ("spacing", list(spacing))):
        if key in params and key not in metric.args:
            kwargs[key] = value
    kwargs.update(metric.args)
    y_pred, y = _one_hot(pred, n_classes).float(), _one_hot(truth, n_classes).float()
    if inspect.isclass(fn):
        init = {k: v for k, v in kwargs.items() if k in params or k in metric.args}
        values = fn(**init)(y_pred, y)
    else:
        values = fn(y_pred, y, **kwargs)
    out = np.asarray(values.detach().cpu().numpy() if hasattr(values, "detach") else values,
                     dtype=np.float64).reshape(-1)
    if out.size == n_classes:
        out = out[1:]
    if out.size != n_classes - 1:
        raise ValueError(f"metric {metric.function!r} returned {out.size} values for {n_classes} classes; it must "
                         f"return one per class ({n_classes}, or {n_classes - 1} without the background)")
    return [float(v) for v in out]


def dice(pred: np.ndarray, truth: np.ndarray, n_classes: int = 2) -> float:
    """Mean foreground Dice over classes."""
    return float(np.mean(dice_per_class(pred, truth, n_classes)))


def hausdorff95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...], n_classes: int = 2) -> float:
    """Mean 95th-percentile Hausdorff distance over foreground classes (mm)."""
    return float(np.mean(hausdorff95_per_class(pred, truth, spacing, n_classes)))


#: metric name -> case id -> that case's value (:func:`score_cases`)
CaseScores = dict[str, dict[str, float]]


def score_cases(
    segment: Callable[[np.ndarray, np.ndarray], np.ndarray],
    raw: CaseStore,
    case_ids: list[str],
    metrics: list[str],
    n_classes: int = 2,
    custom: Mapping[str, CustomMetric | dict[str, Any]] | None = None,
) -> CaseScores:
    """Each metric of each case, per class and over classes: what the paired relative gate compares.

    Keys are :func:`metric_names`: ``dice`` is a case's mean over foreground classes, ``dice_2``
    that of class 2 alone; likewise ``hausdorff95`` and ``custom`` metrics.
    """
    custom = {k: v if isinstance(v, CustomMetric) else CustomMetric(**v) for k, v in (custom or {}).items()}
    per_case: CaseScores = {m: {} for m in metric_names(metrics, n_classes)}
    for cid in case_ids:
        case = load_case(raw, cid)
        if "label" not in case:
            raise ValueError(f"{cid} has no label: it cannot be used for evaluation")
        bad = outside_classes(case["label"], n_classes)
        if bad:
            raise ValueError(f"label-values: case {cid} holds label values {bad} outside 0..{n_classes - 1} (the "
                             f"network's out_channels is {n_classes}): fix its label or out_channels; never clamped")
        pred = segment(case["image"], case["affine"])
        for m in metrics:
            if m == "dice":
                values = dice_per_class(pred, case["label"], n_classes)
            elif m == "hausdorff95":
                values = hausdorff95_per_class(pred, case["label"], tuple(case["attrs"]["spacing"]), n_classes)
            elif m in custom:
                values = custom_per_class(custom[m], pred, case["label"], tuple(case["attrs"]["spacing"]),
                                          n_classes)
            else:
                raise ValueError(f"unknown metric {m!r}")
            per_case[m][cid] = float(np.mean(values))
            for c, v in enumerate(values, start=1):
                per_case[f"{m}_{c}"][cid] = v
    return per_case


def means(cases: Mapping[str, Mapping[str, float] | float]) -> dict[str, float]:
    """Mean of each metric over the cases (every case counts; a NaN stays NaN); a value that is already
    a number (scores kept without their cases) is kept as it is."""
    return {name: float(v) if isinstance(v, (int, float)) else float(np.mean(list(v.values())))
            if v else float("nan") for name, v in cases.items()}


def score(
    segment: Callable[[np.ndarray, np.ndarray], np.ndarray],
    raw: CaseStore,
    case_ids: list[str],
    metrics: list[str],
    n_classes: int = 2,
    custom: Mapping[str, CustomMetric | dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Mean of each metric over the cases (every case counts), per class and over classes
    (:func:`score_cases`, averaged)."""
    return means(score_cases(segment, raw, case_ids, metrics, n_classes, custom))
