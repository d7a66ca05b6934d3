"""The split: train, validation and test sides by content hash."""

from __future__ import annotations

from dataclasses import dataclass, field

from voxelflow.learn import evaluate
from voxelflow.spec.config import EvaluateSpec


@dataclass
class Split:
    train: list[str]
    val: list[str]  # checkpoint selection and early stopping
    test: list[str] = field(default_factory=list)  # the gates and the champion comparison, alone


def split_stage(spec: EvaluateSpec, case_ids: list[str]) -> Split:
    """The three sides by content hash alone: new cases never move an old one across (no seed)."""
    tr, va, te = evaluate.sides(case_ids, spec.test_fraction, spec.val_fraction)
    return Split(tr, va, te)
