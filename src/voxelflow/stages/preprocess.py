"""The preprocess stage: new cases through the spec's transforms on a Dask cluster; the cases left usable."""

from __future__ import annotations

from voxelflow.core import audit
from voxelflow.data import ingest, preprocess
from voxelflow.spec.config import PreprocessSpec
from voxelflow.stages.context import Context, Progress


def preprocess_stage(
    spec: PreprocessSpec, ctx: Context, case_ids: list[str], progress: Progress | None = None
) -> preprocess.PreprocessReport:
    """New cases only, shard by shard on a Dask cluster whose workers read and write the store themselves.
    On a cluster voxelflow would start itself for CPU transforms (:func:`here_first`), shards run in the
    lifecycle's process first and the rest moves onto that cluster once it is predicted to end sooner there,
    its start and close included: what an arrival or the demo adds never waits for a cluster."""
    from voxelflow.data.cluster import dask_client, local_workers

    layout = ctx.layout
    out = layout.preprocessed(preprocess.transform_digest(spec))
    for cases in (layout.raw, out):  # attempts of crashed or outraced writers, once they are an hour old
        swept = cases.sweep()
        if swept:
            audit.append(ctx.db, "store.swept", "voxelflow", pipeline=ctx.pipeline, prefix=cases.prefix,
                         attempts=len(swept))
    new = set(case_ids) - set(out.committed())

    def cluster():
        return dask_client(spec.cluster, ctx.settings.dask_scheduler, ctx.settings.dask_workers, device=spec.device,
                           adaptive=spec.adaptive)

    if not new:
        report = preprocess.preprocess(spec, layout.raw, case_ids, out, progress=progress)
    elif here_first(spec, ctx):
        report = preprocess.preprocess(spec, layout.raw, case_ids, out, progress=progress, cluster=cluster,
                                       workers=local_workers(ctx.settings.dask_workers))
    else:
        with cluster() as client:
            report = preprocess.preprocess(spec, layout.raw, case_ids, out, client=client, progress=progress)
    for failure in report.failed:
        audit.append(ctx.db, "data.preprocess_failed", "voxelflow", pipeline=ctx.pipeline, **failure)
    return report


def here_first(spec: PreprocessSpec, ctx: Context) -> bool:
    """Whether new cases start in the lifecycle's process: on a cluster voxelflow would start itself for CPU
    transforms (``cluster: auto``, no VOXELFLOW_DASK_SCHEDULER, no adaptive scaling). A shared scheduler, an
    explicit cluster, adaptive scaling or the GPU get the cluster from the first case."""
    return (spec.cluster == "auto" and not ctx.settings.dask_scheduler and spec.adaptive is None
            and spec.device == "cpu")


def usable_cases(ingested: ingest.IngestReport, prep: preprocess.PreprocessReport) -> list[str]:
    """The dataset less the cases preprocessing could not handle."""
    failed = {f["case"] for f in prep.failed}
    return [c for c in ingested.case_ids if c not in failed]
