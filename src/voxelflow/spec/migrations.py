"""Older spec shapes brought up to this voxelflow's ``version``, each change named in a warning.

A spec without ``version`` is version 0: any spec written before the key existed. Each migration
takes a spec of the version before its own and returns what it changed (one sentence a change).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from voxelflow.spec.components import SpecError

CURRENT = 1


class SpecMigrated(UserWarning):
    """A spec was written in an older shape; the message names the key and what it became."""


@dataclass(frozen=True)
class Migration:
    version: int  # the version it brings a spec to
    name: str
    apply: Callable[[dict[str, Any]], list[str]]  # changes data in place, returns what it changed


def _deidentify_value(data: dict[str, Any]) -> list[str]:
    section = data.get("data")
    if isinstance(section, dict) and section.get("deidentify") == "dicom-basic-profile":
        section["deidentify"] = "basic-profile"
        return ["data.deidentify: dicom-basic-profile is now called basic-profile"]
    return []


def _deploy_autoscale(data: dict[str, Any]) -> list[str]:
    deploy = data.get("deploy")
    if not isinstance(deploy, dict) or "autoscale" not in deploy:
        return []
    old = deploy.pop("autoscale")
    if deploy.get("target") != "kubernetes":
        return ["deploy.autoscale: removed (nothing read it; a local deployment does not scale); for Kubernetes "
                "it is deploy.kubernetes.autoscale"]
    new = dict(old) if isinstance(old, dict) else {}
    if "target_cpu_percent" in new:
        new["target"] = new.pop("target_cpu_percent")
        new.setdefault("metric", "cpu")
    kubernetes = deploy.get("kubernetes")
    kubernetes = deploy["kubernetes"] = dict(kubernetes) if isinstance(kubernetes, dict) else {}
    if "autoscale" in kubernetes:
        return ["deploy.autoscale: removed; deploy.kubernetes.autoscale, which the spec sets too, is kept"]
    kubernetes["autoscale"] = new
    return ["deploy.autoscale: moved to deploy.kubernetes.autoscale"
            + (" (target_cpu_percent is now target, with metric: cpu)" if "target" in new else "")]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "deidentify-basic-profile", _deidentify_value),
    Migration(1, "deploy-autoscale", _deploy_autoscale),
)


def migrate(data: dict[str, Any], source: str = "<spec>") -> tuple[dict[str, Any], list[str]]:
    """``data`` in this voxelflow's spec shape (a copy, ``version`` set) and the changes made, each naming
    ``source`` and the key; a version newer than this voxelflow knows is refused."""
    version = data.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise SpecError(f"{source}: version: expected a spec version (1), got {version!r}")
    if version > CURRENT:
        raise SpecError(f"{source}: version: the spec is version {version}, but this voxelflow reads spec versions "
                        f"up to {CURRENT}: upgrade voxelflow to use it")
    if version == CURRENT:
        return data, []
    out = copy.deepcopy(data)
    changes: list[str] = []
    for migration in MIGRATIONS:
        if migration.version > version:
            changes += [f"{source}: {change} (migrated from spec version {version}; update the spec and set "
                        f"version: {CURRENT})" for change in migration.apply(out)]
    out["version"] = CURRENT
    return out, changes
