"""`voxelflow demo` end to end against a real Prefect server: every stage leaves its artifact."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, client_env, run_cli

pytestmark = pytest.mark.slow
FLOOR = 0.6  # the demo spec's promotion gate


@pytest.fixture(scope="module")
def demo_run(prefect_api, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    proc = run_cli(["voxelflow", "demo"], client_env(prefect_api, tmp))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, tmp / "home"


def test_demo_prints_http_dice(demo_run):
    proc, _ = demo_run
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("HTTP prediction dice:"))
    assert float(line.split(":")[1]) > FLOOR


def test_progress_artifacts_of_completed_steps_end_at_100(demo_run, prefect_api):
    """Updates are sent in the background and thinned out, but the last one always lands."""
    import httpx

    with httpx.Client(base_url=prefect_api, timeout=30) as api:
        artifacts = api.post("/artifacts/filter", json={"artifacts": {"type": {"any_": ["progress"]}}}).json()
        done = 0
        for a in artifacts:
            if not a.get("task_run_id"):
                continue
            run = api.get(f"/task_runs/{a['task_run_id']}").json()
            if run["state_type"] == "COMPLETED":
                assert float(a["data"]) == 100.0, a
                done += 1
    assert done >= 3  # ingest, preprocess, train


def test_stores_exist(demo_run):
    from voxelflow.core.db import connect
    from voxelflow.core.storage import Layout, Store
    from voxelflow.data.ingest import read_ledger
    from voxelflow.data.preprocess import transform_digest
    from voxelflow.spec.config import Settings, load_spec

    _, home = demo_run
    settings = Settings(home=home)
    layout = Layout(Store(settings.store_url), "demo-spheres")
    cases = layout.raw.committed()
    assert len(cases) == 12
    assert layout.store.list(f"{layout.dataset}/preprocessed") == [transform_digest(
        load_spec(REPO / "deployments/specs/demo.yaml").preprocess)]
    assert layout.preprocessed(layout.store.list(f"{layout.dataset}/preprocessed")[0]).committed() == cases
    ledger = read_ledger(connect(settings.database), "demo-spheres")
    assert len(ledger) == 24 and {r["state"] for r in ledger} == {"ingested"}


def test_champion_registered_with_lineage(demo_run):
    from voxelflow.release import registry
    from voxelflow.spec.config import Settings

    _, home = demo_run
    uri = Settings(home=home).tracking_uri
    version = registry.alias_version(uri, "demo-spheres", "champion")
    assert version == "1"
    mv = registry.client(uri).get_model_version("demo-spheres", version)
    assert len(mv.tags["voxelflow.dataset_digest"]) == 16
    run = registry.client(uri).get_run(mv.run_id)
    assert run.data.metrics["test_dice"] > FLOOR
    assert "train_loss" in run.data.metrics
    assert {"test_dice_1", "test_hausdorff95", "test_hausdorff95_1"} <= set(run.data.metrics)
    # the three sides are kept with the run, and they are the content-hash rule's
    import json

    from voxelflow.learn import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        split = json.loads(Path(registry.client(uri).download_artifacts(mv.run_id, "split.json", tmp)).read_text())
    assert (split["train"], split["val"], split["test"]) == evaluate.sides(
        split["train"] + split["val"] + split["test"], 0.25, 0.25)
    assert len(split["test"]) == 3  # what the demo's promote.gates.min_test_cases asks for
    # tracking: the data set as the run's input, validation during training with its pictures, the flow run
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [mv.tags["voxelflow.dataset_digest"]]
    history = registry.client(uri).get_metric_history(mv.run_id, "val_epoch_dice")
    assert [m.step for m in history] == [4, 9, 14, 19]  # every 5 epochs (demo.yaml: val_every)
    assert run.data.metrics["best_val_epoch_dice"] == max(m.value for m in history)
    names = {a.path for a in registry.client(uri).list_artifacts(mv.run_id)}
    assert {f"validation-epoch-{e:04d}.png" for e in (5, 10, 15, 20)} <= names
    assert len(run.data.tags["prefect.flow_run_id"]) == 36


def test_trained_beats_untrained_over_http(demo_run):
    """The served champion clears the floor; the same network untrained does not."""
    import httpx

    from voxelflow.core.db import connect
    from voxelflow.core.storage import Layout, Store
    from voxelflow.data.ingest import load_case
    from voxelflow.learn import evaluate, train
    from voxelflow.learn.model import Segmenter
    from voxelflow.pipeline import model_config
    from voxelflow.release import registry
    from voxelflow.serving.serve import KeyStore, ModelHolder, Server, create_app
    from voxelflow.spec.config import Settings, load_spec

    _, home = demo_run
    settings = Settings(home=home)
    spec = load_spec(REPO / "deployments/specs/demo.yaml")
    layout = Layout(Store(settings.store_url), spec.name)
    _, _, test = evaluate.sides(layout.raw.committed(), spec.evaluate.test_fraction, spec.evaluate.val_fraction)
    case = load_case(layout.raw, test[0])
    holder = ModelHolder(lambda: registry.load_segmenter(settings.tracking_uri, spec.promote.model_name, home / "cache"))
    holder.reload()
    keys = KeyStore(connect(settings.database))
    key = keys.create("test", ["predict"])
    buf = io.BytesIO()
    np.save(buf, case["image"])
    with Server(create_app(holder, keys)) as server:
        resp = httpx.post(f"{server.url}/v1/segment", content=buf.getvalue(), timeout=60,
                          headers={"X-API-Key": key, "Content-Type": "application/x-npy"})
    assert resp.status_code == 200, resp.text
    trained = evaluate.dice(np.load(io.BytesIO(resp.content)), case["label"])

    import torch

    torch.manual_seed(123)
    untrained = Segmenter(model_config(spec),
                         train.state_dict_bytes(train.build_network(spec.train.network)))
    untrained_dice = evaluate.dice(untrained.segment(case["image"]), case["label"])
    print(f"dice trained {trained:.3f} untrained {untrained_dice:.3f} floor {FLOOR}")
    assert trained > FLOOR > untrained_dice


def test_audit_log_intact(demo_run, prefect_env):
    _, home = demo_run
    env = {**prefect_env, "VOXELFLOW_HOME": str(home)}
    proc = run_cli(["voxelflow", "audit", "verify"], env)
    assert proc.returncode == 0, proc.stderr
    from voxelflow.core import audit
    from voxelflow.core.db import connect
    from voxelflow.spec.config import Settings

    events = [e["event"] for e in audit.entries(connect(Settings(home=home).database))]
    assert events[:1] == ["data.ingested"] and "model.promoted" in events and "service.deployed" in events


def test_reports_are_pictures(demo_run):
    _, home = demo_run
    pngs = list((home / "reports").rglob("*.png"))
    assert {p.name for p in pngs} == {"training-curve.png", "overlay.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_second_run_reuses_data_and_gates_against_the_champion(demo_run, prefect_api, tmp_path):
    """A rerun ingests nothing new, preprocesses nothing, and a weaker candidate does not unseat the champion."""
    from voxelflow.release import registry
    from voxelflow.spec.config import Settings

    _, home = demo_run
    env = {**client_env(prefect_api, tmp_path), "VOXELFLOW_HOME": str(home)}
    proc = run_cli(["voxelflow", "run", "deployments/specs/demo.yaml", "--set", "train.epochs=2"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = " ".join(proc.stdout.replace("│", " ").split())  # the table may wrap a cell over lines
    assert "12 (0 new, 0 duplicate, 0 quarantined; 24 objects already in the ledger)" in out
    assert "0 new, 12 reused" in out
    assert "not promoted" in out and "does not beat the champion" in out.replace("\n", " ")

    uri = Settings(home=home).tracking_uri
    assert registry.alias_version(uri, "demo-spheres", "champion") == "1"
    v2 = registry.client(uri).get_model_version("demo-spheres", "2")
    run = registry.client(uri).get_run(v2.run_id)
    assert run.data.metrics["champion_test_dice"] > run.data.metrics["test_dice"]
    from voxelflow.core import audit
    from voxelflow.core.db import connect

    entries = list(audit.entries(connect(Settings(home=home).database)))
    rejected = [e for e in entries if e["event"] == "model.rejected"]
    assert [e["details"]["version"] for e in rejected] == ["2"]
    # the endpoint keeps serving the champion, v1
    assert entries[-1]["event"] == "service.deployed" and entries[-1]["details"]["version"] == "1"
