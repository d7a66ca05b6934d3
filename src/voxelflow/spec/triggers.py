"""How a pipeline starts: the spec's ``triggers`` section (``voxelflow up SPEC`` makes its deployments).

``schedule`` runs the lifecycle on a cron schedule; ``arrival`` ingests what ``voxelflow watch`` announced
from a source; ``dataset_updated`` runs the lifecycle when an ingest grew the labelled dataset by
``min_new_cases``; ``unlabelled`` segments newly arrived unlabelled cases with the champion. The section
(and the top-level ``work_pool``) says how a pipeline runs, not what it computes: neither is part of the
spec's digest. ``data.retrain_after``, which said what ``dataset_updated.min_new_cases`` says now, is moved
there when a spec still has it (:func:`move_retrain_after`).
"""

from __future__ import annotations

import datetime
import functools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from voxelflow.spec.components import SpecError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


@functools.cache
def _timezones() -> frozenset[str]:
    import zoneinfo

    return frozenset(zoneinfo.available_timezones())


class Schedule(_Section):
    cron: str = Field(description="when the lifecycle runs: a five-field cron expression (minute hour day month "
                      "weekday)", examples=["0 3 * * 1"])
    timezone: str = Field("UTC", description="the IANA time zone the cron expression is read in",
                          examples=["Europe/Berlin"])
    active: bool = Field(True, description="false: the schedule is made but paused (switch it on in the Prefect UI "
                         "or set true and run voxelflow up again)")

    @field_validator("cron")
    @classmethod
    def _cron_parses(cls, value: str) -> str:
        fields = value.split()
        if len(fields) != 5:
            raise ValueError(f"{value!r} is not a cron expression: it needs five fields (minute hour day month "
                             f"weekday), it has {len(fields)}")
        if any(f.casefold() in ("r", "h") or f.startswith(("H(", "R(")) for f in fields):
            raise ValueError(f"{value!r}: random and hashed cron fields (R, H) are not supported")
        from cronsim import CronSim, CronSimError  # Prefect's own dependency, the parser its scheduler accepts

        try:
            next(CronSim(value, datetime.datetime(2000, 1, 1)))
        except (CronSimError, StopIteration) as exc:
            raise ValueError(f"{value!r} is not a valid cron expression: {exc or 'it never fires'}") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone_exists(cls, value: str) -> str:
        if value not in _timezones():
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. UTC, Europe/Berlin, America/New_York)")
        return value


class Arrival(_Section):
    source: str | None = Field(None, description="fsspec URL `voxelflow watch` watches for arriving data and the "
                               "arrival ingest reads; unset: data.source", examples=["s3://bucket/incoming"])
    settle_s: float = Field(2.0, ge=0, description="seconds without change under the source before a batch is "
                            "announced (voxelflow watch's --settle)")


class DatasetUpdated(_Section):
    min_new_cases: int = Field(1, ge=1, description="an ingest after which the labelled dataset holds this many "
                               "cases not in the last announced one (new, or replacing others) emits "
                               "voxelflow.dataset.updated, which runs the pipeline's lifecycle")


class Unlabelled(_Section):
    predict: bool = Field(True, description="segment newly ingested unlabelled cases with the champion "
                          "(promote.model_name@champion) when an ingest announces them")


class Triggers(_Section):
    """What starts the pipeline's runs; each part unset starts nothing."""

    schedule: Schedule | None = Field(None, description="run the lifecycle on a cron schedule")
    arrival: Arrival | None = Field(None, description="ingest what voxelflow watch announces "
                                    "(voxelflow.data.arrived)")
    dataset_updated: DatasetUpdated | None = Field(None, description="run the lifecycle when an ingest grew the "
                                                   "labelled dataset (voxelflow.dataset.updated)")
    unlabelled: Unlabelled | None = Field(None, description="act on newly ingested unlabelled cases "
                                          "(voxelflow.cases.unlabelled)")

    def min_new_cases(self) -> int:
        """The new labelled cases after which an ingest announces an updated dataset."""
        return (self.dataset_updated or DatasetUpdated()).min_new_cases


def arrival_source(spec: Any) -> str:
    """The source the pipeline watches and its arrival ingest reads: ``triggers.arrival.source``, else
    ``data.source``."""
    arrival = spec.triggers.arrival
    return arrival.source if arrival is not None and arrival.source else spec.data.source


def move_retrain_after(data: Any) -> list[str]:
    """Move a spec's ``data.retrain_after`` (in place) to ``triggers.dataset_updated.min_new_cases``, which says
    the same; refuse a spec that sets both. Returns what it changed (one sentence, or none)."""
    section = data.get("data") if isinstance(data, dict) else None
    if not isinstance(section, dict) or "retrain_after" not in section:
        return []
    triggers = data.get("triggers")
    if triggers is None:
        triggers = data["triggers"] = {}
    if not isinstance(triggers, dict):
        return []  # validation names the bad section
    updated = triggers.get("dataset_updated")
    if isinstance(updated, dict) and "min_new_cases" in updated:
        raise SpecError("data.retrain_after: moved to triggers.dataset_updated.min_new_cases, which the spec sets "
                        "too: remove data.retrain_after")
    value = section.pop("retrain_after")
    triggers["dataset_updated"] = {**(updated if isinstance(updated, dict) else {}), "min_new_cases": value}
    return [f"data.retrain_after: moved to triggers.dataset_updated.min_new_cases ({value!r})"]
