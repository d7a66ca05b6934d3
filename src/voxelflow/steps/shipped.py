"""Steps shipped with voxelflow: ``voxelflow.steps:label_volume_check``, ``:intensity_stats``, ``:notify_webhook``.

Each reads one case at a time (a CT is 512 x 512 x 100 voxels and more), so memory stays that of the
largest case, whatever the size of the dataset.
"""

from __future__ import annotations

import json
import math
import tempfile
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from voxelflow.steps.api import StepContext, StepResult, step

_LISTED = 10  # outlier cases a reason names before "and N more"
_BLOCK = 1 << 22  # voxels converted (int64, float64) at once: 32 MB


# ---------------------------------------------------------------- label volumes


@step(outputs=["cases", "outliers", "min_ml_seen", "max_ml_seen"])
def label_volume_check(ctx: StepContext, min_ml: float = 0.0, max_ml: float | None = None,
                       classes: list[int] | None = None) -> StepResult:
    """Each labelled case's volume per class in millilitres within ``[min_ml, max_ml]``; a class absent
    from a case counts as 0 mL. The classes are ``classes``, or every label value > 0 seen in any case.

    Fails naming the outlier cases and their volumes; the volumes (case -> class -> mL) are the
    artifact ``label_volumes.json``."""
    where = f"step {ctx.step_id}"
    if not _finite(min_ml) or min_ml < 0:
        raise ValueError(f"{where}: with.min_ml must be a finite number >= 0, got {min_ml!r}")
    if max_ml is not None and (isinstance(max_ml, bool) or not isinstance(max_ml, (int, float))
                               or math.isnan(max_ml) or max_ml < min_ml):
        raise ValueError(f"{where}: with.max_ml must be a number >= min_ml ({min_ml}), got {max_ml!r}")
    if classes is not None:
        bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, int) or not 0 < c <= 255]
        if bad or not classes:
            raise ValueError(f"{where}: with.classes must list label values 1..255, got {classes!r}")

    counts: dict[str, tuple[np.ndarray, float]] = {}  # case -> (voxels per label value, mL per voxel)
    for case in ctx.cases("raw"):
        label = case.label
        if label is None:
            raise ValueError(f"{where}: case {case.id} has no label: label_volume_check measures labelled cases")
        counts[case.id] = (_label_counts(label, f"{where}: case {case.id}"), case.voxel_ml)
        del label, case  # one case in memory at a time

    if classes is None:
        found = set()
        for n, _ in counts.values():
            found.update(int(v) for v in np.flatnonzero(n) if v > 0)
        wanted = sorted(found)
    else:
        wanted = sorted(set(classes))
    volumes = {cid: {c: float(n[c]) * ml if c < len(n) else 0.0 for c in wanted} for cid, (n, ml) in counts.items()}

    high = math.inf if max_ml is None else float(max_ml)
    bounds = f"[{_ml(min_ml)}, {_ml(high) if max_ml is not None else 'inf'}] mL"
    outliers = {cid: {c: v for c, v in per.items() if not min_ml <= v <= high} for cid, per in sorted(volumes.items())}
    outliers = {cid: bad for cid, bad in outliers.items() if bad}
    if not wanted and min_ml > 0:  # no foreground anywhere: every case lies below the bound
        outliers = {cid: {} for cid in sorted(volumes)}
    seen = [v for per in volumes.values() for v in per.values()] or ([0.0] if volumes else [])

    metrics: dict[str, float] = {"cases": len(volumes), "outliers": len(outliers)}
    if seen:
        metrics |= {"min_ml_seen": min(seen), "max_ml_seen": max(seen)}
    if outliers:
        named = [f"{cid} ({'; '.join(f'class {c}: {_ml(v)} mL' for c, v in bad.items()) or 'no labelled voxel'})"
                 for cid, bad in list(outliers.items())[:_LISTED]]
        more = f" and {len(outliers) - _LISTED} more" if len(outliers) > _LISTED else ""
        reason = f"{len(outliers)} of {len(volumes)} cases outside {bounds}: {', '.join(named)}{more}"
    elif not volumes:
        reason = "no labelled case to check"
    else:
        reason = (f"{len(volumes)} cases, classes {', '.join(map(str, wanted)) or 'none'} within {bounds}"
                  f" (seen {_ml(metrics['min_ml_seen'])} to {_ml(metrics['max_ml_seen'])} mL)")
    ctx.logger.info("%s: %s", where, reason)

    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix=f"{ctx.step_id}-label-volumes-",
                                     delete=False) as f:
        json.dump({cid: {str(c): v for c, v in per.items()} for cid, per in sorted(volumes.items())}, f, indent=1)
    return StepResult(metrics=metrics, passed=not outliers, reason=reason,
                      artifacts={"label_volumes.json": f.name})


def _label_counts(label: np.ndarray, where: str) -> np.ndarray:
    """Voxels per label value, counted in blocks (bincount's int64 copy of a whole CT would be 200 MB)."""
    flat = label.reshape(-1)
    if not np.issubdtype(flat.dtype, np.integer):
        if not np.issubdtype(flat.dtype, np.floating) or not np.array_equal(flat, np.round(flat)):
            raise ValueError(f"{where}: label holds non-integer values ({flat.dtype})")
    if flat.size and (flat.min() < 0 or flat.max() > 255):
        raise ValueError(f"{where}: label values must lie in 0..255")
    total = np.zeros(256, dtype=np.int64)
    for i in range(0, flat.size, _BLOCK):
        total += np.bincount(flat[i:i + _BLOCK].astype(np.intp, copy=False), minlength=256)
    return total


def _ml(v: float) -> str:
    return f"{v:.1f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3g}"


def _finite(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


# ---------------------------------------------------------------- intensity statistics


@step(outputs=["cases", "channels", "mean_c0", "std_c0", "drift"])
def intensity_stats(ctx: StepContext, max_drift: float = 0.5) -> StepResult:
    """Per-channel mean and standard deviation over every voxel of the preprocessed cases (metrics
    ``mean_c{i}``, ``std_c{i}``), compared with the champion's training set: the same metrics on the
    champion's MLflow run under this step's id. ``drift`` is the largest ``|mean - champion mean| /
    champion std`` over the channels; it fails above ``max_drift``. Passes when there is no champion."""
    where = f"step {ctx.step_id}"
    if not _finite(max_drift) or max_drift < 0:
        raise ValueError(f"{where}: with.max_drift must be a finite number >= 0, got {max_drift!r}")
    stats: list[list[float]] | None = None  # per channel: voxels, mean, sum of squared deviations
    cases = 0
    for case in ctx.cases("preprocessed"):
        image = case.image
        if image.ndim == 3:  # no channel axis: one channel
            image = image[None]
        elif image.ndim != 4:
            raise ValueError(f"{where}: case {case.id}: image of shape {image.shape}, expected (channel, x, y, z)")
        if stats is None:
            stats = [[0, 0.0, 0.0] for _ in range(image.shape[0])]
        elif image.shape[0] != len(stats):
            raise ValueError(f"{where}: case {case.id} has {image.shape[0]} channels, the cases before it "
                             f"{len(stats)}")
        for c in range(image.shape[0]):
            flat = image[c].reshape(-1)
            for i in range(0, flat.size, _BLOCK):
                _merge(stats[c], flat[i:i + _BLOCK].astype(np.float64), f"{where}: case {case.id} channel {c}")
        cases += 1
        del image, case  # one case in memory at a time
    if stats is None:
        raise ValueError(f"{where}: no preprocessed case to measure")

    means = [s[1] for s in stats]
    stds = [math.sqrt(s[2] / s[0]) if s[0] else 0.0 for s in stats]
    metrics: dict[str, float] = {"cases": cases, "channels": len(stats)}
    for c, (m, s) in enumerate(zip(means, stds)):
        metrics[f"mean_c{c}"], metrics[f"std_c{c}"] = m, s
        ctx.logger.info("%s: channel %d over %d cases: mean %.6g, std %.6g", where, c, cases, m, s)

    champion = _champion_metrics(ctx)
    if champion is None:
        return StepResult(metrics=metrics, reason="no champion to compare with")
    version, logged = champion
    prefix = ctx.step_id
    known = [c for c in range(len(stats)) if f"{prefix}.mean_c{c}" in logged and f"{prefix}.std_c{c}" in logged]
    theirs = sum(1 for k in logged if k.startswith(f"{prefix}.mean_c"))
    if not theirs:
        return StepResult(metrics=metrics, reason=f"champion v{version} has no {prefix}.mean_c* metrics to compare "
                          "with (its run did not run this step)")
    if theirs != len(stats) or len(known) != len(stats):
        reason = (f"the champion v{version}'s training set had {theirs} channels, these cases have {len(stats)}: "
                  "not comparable")
        ctx.logger.warning("%s: %s", where, reason)
        return StepResult(metrics=metrics, passed=False, reason=reason)

    drifts = [abs(means[c] - logged[f"{prefix}.mean_c{c}"]) / max(logged[f"{prefix}.std_c{c}"], 1e-8)
              for c in range(len(stats))]
    worst = int(np.argmax(drifts))
    metrics["drift"] = drifts[worst]
    detail = (f"channel {worst} mean {means[worst]:.6g} vs {logged[f'{prefix}.mean_c{worst}']:.6g} on champion "
              f"v{version}'s training set (std {logged[f'{prefix}.std_c{worst}']:.6g}): {drifts[worst]:.3g} "
              "standard deviations")
    if drifts[worst] > max_drift:
        reason = f"intensities drifted: {detail}, above max_drift {max_drift:g}"
        ctx.logger.warning("%s: %s", where, reason)
        return StepResult(metrics=metrics, passed=False, reason=reason)
    return StepResult(metrics=metrics, reason=f"largest drift {detail}, within max_drift {max_drift:g}")


def _merge(acc: list[float], x: np.ndarray, where: str) -> None:
    """Fold a block into (count, mean, M2) by Chan's parallel update: exact in float64, no catastrophic
    cancellation (a sum of squares of CT values in the thousands would lose digits)."""
    n = x.size
    if not n:
        return
    mean = float(x.mean())
    if not math.isfinite(mean):
        raise ValueError(f"{where}: the image holds non-finite values (NaN or inf)")
    m2 = float(np.square(x - mean).sum())
    total = acc[0] + n
    delta = mean - acc[1]
    acc[1] += delta * n / total
    acc[2] += m2 + delta * delta * acc[0] * n / total
    acc[0] = total


def _champion_metrics(ctx: StepContext) -> tuple[str, dict[str, float]] | None:
    """The champion's version and the metrics of the MLflow run it was trained in; None without one."""
    if not ctx.model_name:
        return None
    from voxelflow.release import registry

    uri = ctx._settings.tracking_uri  # a secret (it may carry a password): never put into messages
    version = registry.alias_version(uri, ctx.model_name, registry.CHAMPION)
    if version is None:
        return None
    mc = registry.client(uri)
    mv = registry.retrying("read version", lambda: mc.get_model_version(ctx.model_name, version))
    run_id = mv.run_id or (mv.tags or {}).get("voxelflow.run_id")
    if not run_id:
        return version, {}
    run = registry.retrying("read run", lambda: mc.get_run(run_id))
    return version, dict(run.data.metrics)


# ---------------------------------------------------------------- webhook


class WebhookError(RuntimeError):
    """The webhook refused the summary or could not be reached; ``transient`` says whether a retry may help
    (read by :func:`voxelflow.core.transient.is_transient`)."""

    def __init__(self, message: str, transient: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.transient, self.status = transient, status

    def __reduce__(self):  # pickles (process-based task runners) with its verdict
        return (type(self), (str(self), self.transient, self.status))


@step(outputs=["status"])
def notify_webhook(ctx: StepContext, timeout_s: float = 10.0, include_metrics: bool = True,
                   required: bool = False) -> StepResult:
    """POST a JSON summary of the lifecycle to ``VOXELFLOW_WEBHOOK_URL``: pipeline, model version, the
    promotion decision, evaluate's metrics and the deployment; never a case id, a path or anything read
    from an image. Without the setting nothing is sent and the step does not pass (a warning, unless it is a
    gate); with ``required: true`` that is an error. A 5xx, 429 or unreachable server raises a transient error (the step's ``retries``
    apply), any other refusal a lasting one. Errors and logs name only the server's scheme, host and port."""
    import httpx

    where = f"step {ctx.step_id}"
    if not _finite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"{where}: with.timeout_s must be a number > 0, got {timeout_s!r}")
    secret = getattr(ctx._settings, "webhook_url", None)
    url = (secret.get_secret_value() if hasattr(secret, "get_secret_value") else str(secret or "")).strip()
    if not url:
        if required:
            raise ValueError(f"{where}: VOXELFLOW_WEBHOOK_URL is not set: notify_webhook posts its summary there")
        return StepResult(passed=False, reason="nothing sent: VOXELFLOW_WEBHOOK_URL is not set (with required: true "
                          "this is an error)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where}: VOXELFLOW_WEBHOOK_URL must be an http(s) URL with a host, got one with scheme "
                         f"{parts.scheme or 'none'!r}")
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        raise ValueError(f"{where}: VOXELFLOW_WEBHOOK_URL has an invalid port") from None
    shown = f"{parts.scheme}://{parts.hostname}{port}"  # the path and query may hold a token: never shown

    body = summary(ctx, include_metrics)
    try:
        response = httpx.post(url, json=body, timeout=timeout_s, follow_redirects=False,
                              headers={"User-Agent": "voxelflow"})
    except httpx.TransportError as exc:  # refused, reset, timed out, DNS: the network, worth another attempt
        text = str(exc).replace(url, shown)
        from voxelflow.core.redact import redact

        raise WebhookError(f"{where}: the webhook at {shown} could not be reached: {type(exc).__name__}: "
                           f"{redact(text)[:300]}", transient=True) from None  # httpx's error carries the URL
    code = response.status_code
    if code >= 300:
        transient = code >= 500 or code == 429
        what = ("a server error: retried" if transient else "a redirect: set VOXELFLOW_WEBHOOK_URL to the final "
                "address" if code < 400 else "refused: fix VOXELFLOW_WEBHOOK_URL or the receiver")
        raise WebhookError(f"{where}: the webhook at {shown} answered HTTP {code} {response.reason_phrase} ({what})",
                           transient=transient, status=code)
    ctx.logger.info("%s: posted the lifecycle summary to %s: HTTP %d", where, shown, code)
    return StepResult(metrics={"status": code})


def summary(ctx: StepContext, include_metrics: bool = True) -> dict[str, Any]:
    """What :func:`notify_webhook` posts: the lifecycle's outcome, nothing about any case."""
    from voxelflow.core.redact import redact

    outputs = ctx.outputs
    promote, deploy, evaluate = (outputs.get(k) or {} for k in ("promote", "deploy", "evaluate"))
    hidden = set(ctx.inputs.case_ids) | set(ctx.inputs.test_ids)

    def clean(value: Any) -> Any:  # a text that names a case (a reason, say) says "a case" instead
        if not isinstance(value, str):
            return value
        for cid in hidden:
            value = value.replace(cid, "<case>")
        return redact(value)

    body: dict[str, Any] = {
        "pipeline": ctx.pipeline,
        "step": ctx.step_id,
        "model_name": ctx.model_name,
        "model_version": clean(ctx.model_version or promote.get("version")),
        "decision": {k: clean(promote.get(k)) for k in ("promoted", "champion", "reasons")} if promote else None,
        "metrics": {k: float(v) for k, v in sorted(evaluate.items()) if _finite(v)} if include_metrics else {},
        "deployment": {"endpoint": clean(deploy.get("endpoint")),
                       "version": clean(deploy.get("model_version", deploy.get("version")))} if deploy else None,
    }
    return body
