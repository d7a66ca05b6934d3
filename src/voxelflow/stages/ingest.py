"""The ingest stage: the source into the store's raw cases, the rest quarantined and audited."""

from __future__ import annotations

import logging
import re

from voxelflow.core import audit
from voxelflow.data import ingest
from voxelflow.spec.config import DataSpec
from voxelflow.stages.context import Context, Progress

log = logging.getLogger(__name__)


def recorded(ctx: Context, dataset: str) -> ingest.IngestReport | None:
    """The pipeline's dataset as the ledger holds it now, when its digest is ``dataset`` (the one an ingest
    announced); None when the dataset has changed since (or never was that one)."""
    if not re.fullmatch(r"[0-9a-f]{8,64}", dataset):
        raise ValueError(f"dataset must be a dataset digest (hexadecimal), not {dataset[:80]!r}")
    report = ingest.finish(ingest.IngestReport(recorded=True), ctx.layout, ctx.db)
    return report if report.case_ids and report.dataset_digest == dataset else None


def ingest_stage(data: DataSpec, ctx: Context, progress: Progress | None = None,
                 require_cases: bool = True, dataset: str | None = None) -> ingest.IngestReport:
    """Ingest the spec's source. With ``dataset`` (the digest a triggering ``voxelflow.dataset.updated`` carried),
    a lifecycle starts from the dataset that ingest recorded instead of reading the source again; when the
    ledger's dataset is no longer that one, the source is ingested as usual."""
    if dataset:
        found = recorded(ctx, dataset)
        if found is not None:
            audit.append(ctx.db, "data.recorded", "voxelflow", pipeline=ctx.pipeline, **found.summary())
            return found
        log.info("the dataset %s announced is no longer the recorded one: ingesting the source", dataset[:12])
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
