"""The preprocess stage: new cases through the spec's transforms on a Dask cluster; the cases left usable."""

from __future__ import annotations

import math

from voxelflow.core import audit
from voxelflow.data import ingest, preprocess
from voxelflow.spec.config import PreprocessSpec
from voxelflow.stages.context import Context, Progress


def preprocess_stage(
    spec: PreprocessSpec, ctx: Context, case_ids: list[str], progress: Progress | None = None
) -> preprocess.PreprocessReport:
    """New cases only, shard by shard on a Dask cluster whose workers read and write the store themselves.
    With ``cluster: auto``, no shared scheduler and the CPU, new cases of at most :data:`HERE_VOXELS` voxels in
    all (what an arrival or the demo adds) are processed here: a local cluster costs more to start and stop than
    they take (:func:`needs_cluster`)."""
    from voxelflow.data.cluster import dask_client

    layout = ctx.layout
    out = layout.preprocessed(preprocess.transform_digest(spec))
    for cases in (layout.raw, out):  # attempts of crashed or outraced writers, once they are an hour old
        swept = cases.sweep()
        if swept:
            audit.append(ctx.db, "store.swept", "voxelflow", pipeline=ctx.pipeline, prefix=cases.prefix,
                         attempts=len(swept))
    new = sorted(set(case_ids) - set(out.committed()))
    if not needs_cluster(spec, ctx, new):
        report = preprocess.preprocess(spec, layout.raw, case_ids, out, progress=progress)
    else:
        with dask_client(spec.cluster, ctx.settings.dask_scheduler, ctx.settings.dask_workers, device=spec.device,
                         adaptive=spec.adaptive) as client:
            report = preprocess.preprocess(spec, layout.raw, case_ids, out, client=client, progress=progress)
    for failure in report.failed:
        audit.append(ctx.db, "data.preprocess_failed", "voxelflow", pipeline=ctx.pipeline, **failure)
    return report


# New cases up to this many voxels in all are preprocessed in the lifecycle's process rather than on a local
# cluster started for them. Measured on 2 cores: a local cluster took 7.7 s to start and 10.3 s with its close,
# while the demo's transforms took 0.63 s for 12 cases of 48^3 in the process (about 2.5 M voxels a second),
# so 2^24 voxels are a few seconds here, well under the cluster's cost, and 4 or 5 CT slabs of 512x512x16.
HERE_VOXELS = 2**24


def needs_cluster(spec: PreprocessSpec, ctx: Context, new: list[str]) -> bool:
    """Whether the ``new`` cases are worth a Dask cluster: none are not, nor, on a cluster voxelflow would start
    itself for CPU transforms (``cluster: auto``, no VOXELFLOW_DASK_SCHEDULER, no adaptive scaling), cases of
    at most :data:`HERE_VOXELS` voxels in all (their raw stores' metadata, read until the sum passes it)."""
    if not new:
        return False
    local = spec.cluster == "auto" and not ctx.settings.dask_scheduler and spec.adaptive is None
    if not (local and spec.device == "cpu"):
        return True
    total = 0
    for cid in new:
        total += math.prod(ctx.layout.raw.open(cid)["image"].shape)
        if total > HERE_VOXELS:
            return True
    return False


def usable_cases(ingested: ingest.IngestReport, prep: preprocess.PreprocessReport) -> list[str]:
    """The dataset less the cases preprocessing could not handle."""
    failed = {f["case"] for f in prep.failed}
    return [c for c in ingested.case_ids if c not in failed]
