"""Lineage of a registered model, every link looked up and checked: endpoints that served it ->
model version (gates, decision) -> training run (params, metrics) -> preprocessing digest ->
dataset digest -> every case -> its source objects and their sha256 in the ingestion ledger."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from voxelflow.core import audit
from voxelflow.core.db import Database
from voxelflow.core.storage import Layout, Store
from voxelflow.data import ingest
from voxelflow.release.registry import CHAMPION, alias_version, client


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``NAME``, ``NAME@ALIAS`` or ``NAME/VERSION`` -> (name, alias, version); a bare name means @champion."""
    m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]*)(?:@([A-Za-z0-9_-]+)|/(\d+))?", ref)
    if not m:
        raise ValueError(f"not a model reference: {ref!r} (expected NAME, NAME@ALIAS or NAME/VERSION)")
    name, alias, version = m.groups()
    return name, (alias or (None if version else CHAMPION)), version


def trace(tracking_uri: str, db: Database, store_url: str, ref: str) -> dict[str, Any]:
    """Follow ``ref`` back to its source objects. Broken or missing links are listed in ``problems``;
    registry errors raise."""
    name, alias, version = parse_ref(ref)
    if version is None:
        version = alias_version(tracking_uri, name, alias)
        if version is None:
            raise LookupError(f"model {name!r} has no {alias!r} alias")
    mc = client(tracking_uri)
    mv = mc.get_model_version(name, version)
    problems: list[str] = []
    tags = dict(mv.tags)
    out: dict[str, Any] = {
        "model": name, "version": version, "alias": alias, "aliases": list(mv.aliases), "problems": problems,
        "decision": tags.get("voxelflow.decision"), "compared_with": tags.get("voxelflow.compared_with"),
        "gates": {k.removeprefix("voxelflow.gate."): v for k, v in sorted(tags.items())
                  if k.startswith("voxelflow.gate.")},
        "approval": {k.removeprefix("voxelflow.approval."): v for k, v in sorted(tags.items())
                     if k.startswith("voxelflow.approval.")},
    }
    out["endpoints"] = sorted({e["details"].get("endpoint") for e in audit.entries(db)
                               if e["event"] == "service.deployed" and isinstance(e["details"], dict)
                               and e["details"].get("model") == name and str(e["details"].get("version")) == version
                               and e["details"].get("endpoint")})
    if not mv.run_id:
        problems.append(f"version {version} names no training run")
        return out
    if tags.get("voxelflow.run_id") not in (None, mv.run_id):
        problems.append(f"version {version} is tagged with run {tags['voxelflow.run_id']} but made by {mv.run_id}")
    run = mc.get_run(mv.run_id)
    rtags = run.data.tags
    out["run"] = {"id": mv.run_id, "params": dict(run.data.params), "metrics": dict(run.data.metrics),
                  "code_version": rtags.get("voxelflow.code_version"), "spec_digest": rtags.get("voxelflow.spec_digest")}
    parent_id = rtags.get("mlflow.parentRunId")  # a candidate's run: its split and the spec are its parent's
    if parent_id:
        ptags = mc.get_run(parent_id).data.tags
        out["parent_run"] = {"id": parent_id, "spec_digest": ptags.get("voxelflow.spec_digest"),
                             "candidate": rtags.get("voxelflow.candidate")}
        if ptags.get("voxelflow.dataset_digest") != rtags.get("voxelflow.dataset_digest"):
            problems.append(f"run {mv.run_id} and its parent run {parent_id} disagree on the dataset digest")
    pipeline, digest = rtags.get("voxelflow.pipeline"), rtags.get("voxelflow.dataset_digest")
    pre_digest = rtags.get("voxelflow.preprocess_digest")
    out.update(pipeline=pipeline, dataset_digest=digest, preprocess_digest=pre_digest)
    for key, value in (("pipeline", pipeline), ("dataset_digest", digest), ("preprocess_digest", pre_digest)):
        if not value:
            problems.append(f"run {mv.run_id} has no voxelflow.{key} tag")
    if tags.get("voxelflow.dataset_digest") not in (None, digest):
        problems.append(f"version {version} and its run disagree on the dataset digest")
    split = _split(tracking_uri, mv.run_id)
    if split is None and parent_id:
        split = _split(tracking_uri, parent_id)
    if split is None:
        problems.append(f"run {mv.run_id} keeps no split.json: its cases cannot be named")
        return out
    cases = sorted(set(split["train"]) | set(split["val"]) | set(split.get("test", [])))  # no test side before
    if digest and ingest.dataset_digest(cases) != digest:
        problems.append(f"the run's {len(cases)} cases hash to {ingest.dataset_digest(cases)}, "
                        f"not to its dataset digest {digest}")
    layout = Layout(Store(store_url), pipeline or "")
    processed = layout.preprocessed(pre_digest) if pre_digest and pipeline else None
    objects: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    for row in ingest.read_ledger(db, pipeline, state="ingested") if pipeline else []:
        if row["case_id"] in objects:
            objects[row["case_id"]].append({"object": row["object"], "sha256": row["sha256"]})
    out["cases"] = []
    for case in cases:
        side = "test" if case in split.get("test", []) else "val" if case in split["val"] else "train"
        entry = {"case": case, "held_out": side != "train", "side": side, "sources": objects[case]}
        if not objects[case]:
            problems.append(f"case {case} has no ingested source object in the ledger")
        if processed is not None:
            entry["preprocessed"] = processed.is_committed(case)
            if not entry["preprocessed"]:
                problems.append(f"case {case} is not in the preprocessed store {pre_digest}")
        out["cases"].append(entry)
    return out


def _split(tracking_uri: str, run_id: str) -> dict[str, list[str]] | None:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="split.json", dst_path=tmp,
                                                       tracking_uri=tracking_uri)
        except OSError:
            return None
        except Exception as exc:  # noqa: BLE001 - MLflow reports a missing artifact as its own exception
            if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower():
                return None
            raise
        return json.loads(Path(path).read_text())


def render(trace_: dict[str, Any]) -> str:
    """The trace as indented text, one link per line."""
    t = trace_
    lines = [f"endpoints: {', '.join(t.get('endpoints') or []) or 'none recorded'}",
             f"model {t['model']} version {t['version']} (aliases: {', '.join(t['aliases']) or 'none'}; "
             f"decision: {t.get('decision') or 'none'}, compared with {t.get('compared_with') or '-'})"]
    lines += [f"  gate {k}: {v}" for k, v in t["gates"].items()]
    lines += [f"  approval {k}: {v}" for k, v in t["approval"].items()]
    if "run" in t:
        run = t["run"]
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(run["metrics"].items()))
        lines += [f"  training run {run['id']} (code {run['code_version']}, {len(run['params'])} params; {metrics})",
                  *([f"    candidate {t['parent_run']['candidate']} of lifecycle run {t['parent_run']['id']} (spec "
                     f"digest {t['parent_run']['spec_digest']})"] if t.get("parent_run") else []),
                  f"    preprocessing digest {t.get('preprocess_digest')}",
                  f"    dataset digest {t.get('dataset_digest')} of pipeline {t.get('pipeline')}"]
    for case in t.get("cases", []):
        lines.append(f"      case {case['case']}{' (held out)' if case['held_out'] else ''}")
        lines += [f"        {s['object']}  sha256 {s['sha256']}" for s in case["sources"]]
    lines += [f"problem: {p}" for p in t["problems"]]
    return "\n".join(lines)
