"""The ingest stage: the source into the store's raw cases, the rest quarantined and audited."""

from __future__ import annotations

from voxelflow.core import audit
from voxelflow.data import ingest
from voxelflow.spec.config import DataSpec
from voxelflow.stages.context import Context, Progress


def ingest_stage(data: DataSpec, ctx: Context, progress: Progress | None = None,
                 require_cases: bool = True) -> ingest.IngestReport:
    source = ctx.settings.expand(data.source)
    key = ctx.settings.deid_key.get_secret_value() if ctx.settings.deid_key else None
    result = ingest.ingest(data, ctx.layout, ctx.db, source, progress=progress, deid_key=key)
    if require_cases and not result.case_ids:
        raise ValueError(f"no usable cases under {source}: {len(result.quarantined)} quarantined")
    audit.append(ctx.db, "data.ingested", "voxelflow", pipeline=ctx.pipeline, **result.summary())
    for q in result.quarantined:
        # case id and reason only: details name source objects, which only the ledger maps to hashes
        audit.append(ctx.db, "data.quarantined", "voxelflow", pipeline=ctx.pipeline, case=q["case"], reason=q["reason"])
    return result
