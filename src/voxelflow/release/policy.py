"""The promotion policy as a pure function: every gate is evaluated and its result kept.

Gates: absolute bounds on any computed metric (at least / at most by the metric's direction), a
relative gate against the champion on the same test cases (a paired bootstrap interval of the
improvement whose lower bound must beat a delta; a negative delta is non-inferiority within that
margin), behavioural checks measured on a real volume (left-right flip consistency, an empty
volume gives an empty mask, finite output) and lineage completeness.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from voxelflow.learn.evaluate import direction

#: lineage tags a version must carry to be promoted (``promote.gates.require_lineage`` overrides)
LINEAGE = ("dataset_digest", "spec_digest", "run_id")


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool
    detail: str
    value: float | None = None
    threshold: float | None = None


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    gates: list[GateResult] = field(default_factory=list)

    def tags(self) -> dict[str, str]:
        """One model version tag per gate: ``voxelflow.gate.NAME`` = ``pass: …`` / ``fail: …``."""
        return {f"voxelflow.gate.{g.gate}": f"{'pass' if g.passed else 'fail'}: {g.detail}"[:5000] for g in self.gates}

    def rows(self) -> list[dict[str, Any]]:
        return [asdict(g) for g in self.gates]


def _value(scores: Mapping[str, float] | None, metric: str) -> float:
    value = (scores or {}).get(metric)
    return float(value) if value is not None else float("nan")


def absolute_gate(candidate: Mapping[str, float], metric: str, bound: float,
                  directions: Mapping[str, bool] | None = None) -> GateResult:
    """``metric`` at least ``bound`` when higher is better, at most when lower is better; NaN/missing fails."""
    higher = direction(metric, directions)
    value = _value(candidate, metric)
    passed = value >= bound if higher else value <= bound
    word = "below" if higher else "above"
    detail = (f"{metric} {value:.4f} meets the gate {bound:.4f}" if passed
              else f"{metric} {value:.4f} is {word} the gate {bound:.4f}" if math.isfinite(value)
              else f"{metric} was not computed (or is not finite): the gate {bound:.4f} cannot pass")
    return GateResult(f"min_{metric}" if higher else f"max_{metric}", passed, detail, value, bound)


def _cases(scores: Mapping[str, Any] | None, metric: str) -> Mapping[str, float]:
    """One metric's per-case values; none when the scores were kept as means only."""
    value = (scores or {}).get(metric)
    return value if isinstance(value, Mapping) else {}


#: resamples of the paired bootstrap behind the relative gate
RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """The paired bootstrap of candidate minus champion, in the metric's better direction."""

    cases: int
    mean: float
    low: float
    high: float
    confidence: float


def bootstrap_seed(case_ids: list[str]) -> int:
    """The resampling seed: a fixed function of the cases compared, so a decision can be reproduced."""
    digest = hashlib.sha256("\n".join(sorted(case_ids)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def paired_bootstrap(improvement: Mapping[str, float], confidence: float = 0.95,
                     resamples: int = RESAMPLES) -> Interval:
    """Percentile interval (two-sided, level ``confidence``) of the mean of per-case improvements,
    resampling the cases with replacement ``resamples`` times from :func:`bootstrap_seed`."""
    ids = sorted(improvement)
    values = np.asarray([improvement[c] for c in ids], dtype=np.float64)
    if not ids:
        return Interval(0, float("nan"), float("nan"), float("nan"), confidence)
    rng = np.random.default_rng(bootstrap_seed(ids))
    sampled = values[rng.integers(0, len(ids), size=(resamples, len(ids)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(sampled, [tail, 1 - tail])
    return Interval(len(ids), float(values.mean()), float(low), float(high), confidence)


def relative_gate(candidate: Mapping[str, Mapping[str, float]] | None,
                  champion: Mapping[str, Mapping[str, float]] | None, metric: str, delta: float,
                  directions: Mapping[str, bool] | None = None, confidence: float = 0.95,
                  min_cases: int = 5) -> GateResult:
    """Beat the champion on ``metric`` by ``delta`` in its better direction, case by case.

    ``candidate`` and ``champion`` are per-case scores (metric -> case id -> value) on the test side;
    the cases both were scored on are paired, and the gate passes only when the lower bound of the
    paired bootstrap interval of the improvement reaches ``delta`` (``delta`` < 0: no worse than the
    champion by more than ``-delta``, a non-inferiority margin). Fewer than ``min_cases`` pairs fail.
    """
    higher = direction(metric, directions)
    name = f"vs_champion_{metric}"
    cand, champ = _cases(candidate, metric), _cases(champion, metric)
    paired = sorted(set(cand) & set(champ))
    if len(paired) < min_cases:
        return GateResult(name, False, f"{metric} compared on {len(paired)} paired test cases: the relative gate "
                          f"needs at least {min_cases} (promote.gates.min_test_cases)", float(len(paired)),
                          float(min_cases))
    sign = 1.0 if higher else -1.0
    improvement = {c: sign * (float(cand[c]) - float(champ[c])) for c in paired}
    if not all(math.isfinite(v) for v in improvement.values()):
        return GateResult(name, False, f"{metric} is not finite on some test case: the relative gate cannot pass",
                          float("nan"), delta)
    iv = paired_bootstrap(improvement, confidence)
    passed = iv.low >= delta - 1e-12  # to rounding: a bound equal to delta reaches it
    kind = "beat the champion by" if delta >= 0 else "stay within the margin of the champion of"
    verb = "does" if passed else "does not"
    mean_cand = float(np.mean([cand[c] for c in paired]))
    mean_champ = float(np.mean([champ[c] for c in paired]))
    detail = (f"{metric} {mean_cand:.4f} vs the champion's {mean_champ:.4f} on {iv.cases} test cases: improvement "
              f"{iv.mean:+.4f}, {confidence:.0%} interval [{iv.low:+.4f}, {iv.high:+.4f}]; its lower bound {verb} "
              f"{kind} {abs(delta):.4f}")
    return GateResult(name, passed, detail, iv.low, delta)


def behaviour_gates(behaviour: Mapping[str, float], flip_tolerance: float) -> list[GateResult]:
    """Checks on measured behaviour (:func:`measure_behaviour`)."""
    flip = float(behaviour["flip_disagreement"])
    empty = float(behaviour["empty_volume_foreground"])
    finite = float(behaviour["nonfinite_outputs"])
    return [
        GateResult("flip_consistency", flip <= flip_tolerance,
                   f"{flip:.4f} of the voxels change when the volume is flipped left-right "
                   f"(tolerance {flip_tolerance:.4f})", flip, flip_tolerance),
        GateResult("empty_volume", empty == 0, f"an empty volume gives {int(empty)} foreground voxels", empty, 0.0),
        GateResult("finite_output", finite == 0, f"{int(finite)} non-finite output values", finite, 0.0),
    ]


def lineage_gate(tags: Mapping[str, str], required: tuple[str, ...] | list[str] = LINEAGE) -> GateResult:
    missing = [k for k in required if not str(tags.get(k) or "").strip()]
    detail = "lineage complete: " + ", ".join(required) if not missing else "lineage lacks " + ", ".join(missing)
    return GateResult("lineage", not missing, detail)


def decide(candidate: Mapping[str, float], champion: Mapping[str, float] | None, gates: Any,
           behaviour: Mapping[str, float] | None = None, lineage: Mapping[str, str] | None = None,
           directions: Mapping[str, bool] | None = None,
           candidate_cases: Mapping[str, Mapping[str, float]] | None = None,
           champion_cases: Mapping[str, Mapping[str, float]] | None = None) -> Decision:
    """Apply every gate of ``gates`` (a :class:`~voxelflow.spec.config.Gates`); promote only when all pass.

    ``candidate`` holds the means over the test cases (the absolute gates); ``champion`` None means
    there is no champion (the relative gate does not apply), else the relative gate pairs
    ``candidate_cases`` with ``champion_cases`` (metric -> test case -> value; without them it fails,
    for want of cases). Behaviour is required when ``gates.flip_tolerance`` is set; lineage when
    ``gates.require_lineage`` is not empty. ``directions`` gives custom metrics' directions.
    """
    results = []
    if gates.min_dice is not None:
        results.append(absolute_gate(candidate, "dice", gates.min_dice))
    results += [absolute_gate(candidate, metric, bound, directions) for metric, bound in sorted(gates.absolute.items())]
    if champion is not None:
        results.append(relative_gate(candidate_cases, champion_cases, gates.relative_metric, gates.beat_champion_by,
                                     directions, gates.confidence, gates.min_test_cases))
    if gates.flip_tolerance is not None:
        if behaviour is None:
            results.append(GateResult("behaviour", False, "behavioural checks were asked for but not measured"))
        else:
            results += behaviour_gates(behaviour, gates.flip_tolerance)
    if gates.require_lineage:
        results.append(lineage_gate(lineage or {}, gates.require_lineage))
    failed = [g.detail for g in results if not g.passed]
    return Decision(not failed, failed or ["all gates passed"], results)


def measure_behaviour(segment: Callable[..., np.ndarray], volume: np.ndarray,
                      affine: np.ndarray | None = None) -> dict[str, float]:
    """Run ``segment(volume, affine)`` on the volume, its left-right mirror and an empty volume.

    The left-right axis is the voxel axis that the affine maps most onto x (axis 0 without an affine).
    """
    volume = np.asarray(volume, dtype=np.float32)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    axis = int(np.argmax(np.abs(affine[0, :3])))
    mask = np.asarray(segment(volume, affine))
    mirrored = np.flip(np.asarray(segment(np.ascontiguousarray(np.flip(volume, axis)), affine)), axis)
    empty = np.asarray(segment(np.zeros_like(volume), affine))
    outputs = (mask, mirrored, empty)
    nonfinite = sum(int((~np.isfinite(o.astype(np.float64))).sum()) for o in outputs)
    if mask.shape != volume.shape or mirrored.shape != volume.shape:
        raise ValueError(f"the segmenter returned shape {mask.shape} for a volume of shape {volume.shape}")
    return {
        "flip_disagreement": float(np.mean(mask != mirrored)),
        "empty_volume_foreground": float(np.count_nonzero(empty)),
        "nonfinite_outputs": float(nonfinite),
    }
