"""Data arrival for real, with nobody typing after the deploy: `voxelflow up` deploys a spec with candidates
and triggers; files copied into its watched folder (a Decathlon set, and labelled DICOM series with a
(fictitious) patient in their headers, de-identified with the key from a Prefect Secret block) end in a
completed ``ingest-arrived/<pipeline>`` run that stored them, then a completed ``lifecycle/<pipeline>`` run that
started from the dataset that ingest recorded, trained the candidates in parallel, promoted the best and served it.

`voxelflow watch` emits voxelflow.data.arrived to the session's real Prefect server; the trigger of
``ingest-arrived/<pipeline>`` creates a run that a process worker executes; the ingest's voxelflow.dataset.updated
triggers ``lifecycle/<pipeline>``, the pipeline's one lifecycle deployment.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time

import pytest

from tests.conftest import BIN, REPO, run_cli
from tests.services import prefect_worker

pytestmark = pytest.mark.slow

FAST_WORKER = {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}


def runs_of(api_url: str, flow: str, deployment: str) -> list:
    """The runs of the deployment ``flow/deployment``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
                                     deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))


def staged_source(dest):
    """(a source of labelled cases, its object and case counts, its DICOM header values, words of its file names):
    a Decathlon set (4 cases) and 4 labelled DICOM series, one folder, one spec (the ``mixed`` layout)."""
    from voxelflow.data import synthetic

    synthetic.make_decathlon(dest, n_cases=4, size=24)
    # values made here, not constants of the code: a model's logged code must not count as a leak
    rng = random.Random()
    token = "".join(rng.choices("ABCDEFGHJKLMNPQRSTUVWXYZ", k=6))
    identity = {key: f"{value}{token}" for key, value in synthetic.FICTITIOUS_IDENTITY.items()}
    identity["PatientBirthDate"] = f"19{rng.randint(20, 89)}0{rng.randint(1, 9)}1{rng.randint(0, 9)}"
    identity["StationName"] = f"CT-{token}"
    identity["PatientName"] = f"Q{token}^Marigold"  # the files are named after the surname: Q<token>_000_0000.dcm
    private = f"PrivateNote-{token}"
    synthetic.make_dicom(dest, n_cases=4, size=24, seed=100, identity=identity, private_note=private)
    return dest, 8 + 4 * 24 + 4, 8, [*identity.values(), private], ["synth_000", f"Q{token}"]


def three_sides(decathlon, scratch) -> dict[str, float]:
    """test_fraction and val_fraction that put one of the Decathlon set's four cases on the test side, one or two
    on the validation side and the rest on the training side (the cases' ids, their content hashes, decide:
    ingested into a scratch home to learn them). More cases, as in the mixed layout, only add to the sides."""
    from voxelflow.learn.evaluate import split_position
    from voxelflow.pipeline import Context, ingest_stage
    from voxelflow.spec.config import DataSpec, Settings

    settings = Settings(home=scratch, store=None, database_url=None, mlflow_tracking_uri=None)
    ids = ingest_stage(DataSpec(source=str(decathlon), layout="decathlon"), Context(settings, "scratch")).case_ids
    p = sorted(split_position(c) for c in ids)
    test = p[0] + min(1e-6, (p[1] - p[0]) / 2)
    for end in ((p[1] + p[2]) / 2, (p[2] + p[3]) / 2):
        if end - test >= test:  # the test side lies within the validation range's size (the spec's rule)
            return {"test_fraction": test, "val_fraction": end - test}
    pytest.skip(f"no fractions split these four cases into three sides: {p}")



NETWORK = {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
                    "num_res_units": 0}}  # as tests/e2e/test_candidates.py: candidates train in seconds
CANDIDATES = {"list": [{"train.learning_rate": 0.01}, {"train.learning_rate": 0.003}], "select": {"metric": "dice"},
              "max_parallel": 2}


def test_files_dropped_into_a_watched_folder_end_in_a_served_model_with_nobody_starting_anything(
        prefect_api, prefect_env, tmp_path):
    import json
    import uuid

    import yaml
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {**prefect_env, **FAST_WORKER}
    env.pop("VOXELFLOW_DEID_KEY", None)  # the worker has no key in its environment: the flow runs read the Secret block
    env["VOXELFLOW_DEID_KEY_BLOCK"] = f"deid-{uuid.uuid4().hex[:12]}"
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        Secret(value=f"key-{uuid.uuid4().hex}").save(env["VOXELFLOW_DEID_KEY_BLOCK"])
    pool = run_cli(["prefect", "work-pool", "create", "voxelflow-process", "--type", "process"], env)
    assert pool.returncode == 0 or "already exists" in pool.stdout, pool.stdout + pool.stderr

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    staged, n_objects, n_cases, secrets, names = staged_source(tmp_path / "staged")
    name = f"arrival-{uuid.uuid4().hex[:8]}"  # a pipeline of its own: the session's server holds others' deployments
    spec = yaml.safe_load((REPO / "deployments/specs/demo.yaml").read_text())
    spec["name"] = name
    spec["data"]["layout"] = "mixed"  # the spec's own data.source is not the watched folder, and does not exist
    for item in spec["preprocess"]["transforms"]:
        for kwargs in item.values():
            if "spatial_size" in kwargs:
                kwargs["spatial_size"] = [16, 16, 16]
    spec["train"].update(network=NETWORK, epochs=2, val_every=1, precision="fp32")
    spec["promote"]["gates"] = {"min_dice": 0.0}
    spec["evaluate"].update(three_sides(staged, tmp_path / "scratch"))
    spec["candidates"] = CANDIDATES
    spec["triggers"] = {"arrival": {"settle_s": 1}, "dataset_updated": {"min_new_cases": 1}}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))

    # the deploy: its path is the deployments' parameter, never the event's
    up = run_cli(["voxelflow", "up", str(spec_path)], env)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    made = [line.split() for line in up.stdout.splitlines() if line.startswith("created")]
    assert sorted(label for _, label in made) == sorted(
        f"{flow}/{name}" for flow in ("lifecycle", "ingest-arrived", "predict-arrived")), up.stdout
    try:
        with prefect_worker("voxelflow-process", env, tmp_path / "worker.log", REPO), \
                open(tmp_path / "watch.log", "w") as watch_log:
            watcher = subprocess.Popen([str(BIN / "voxelflow"), "watch", str(incoming), "--spec", str(spec_path),
                                        "--poll", "0.5"], env=env, cwd=REPO, stdout=watch_log, stderr=subprocess.STDOUT)
            try:
                time.sleep(2)  # the watcher is up before anything lands
                shutil.copytree(staged, incoming, dirs_exist_ok=True)
                deadline, runs = time.monotonic() + 300, {}
                while time.monotonic() < deadline:
                    runs = {flow: runs_of(prefect_api, flow, name)
                            for flow in ("ingest-arrived", "predict-arrived", "lifecycle")}
                    if runs["ingest-arrived"] and runs["lifecycle"] and all(
                            r.state and r.state.is_final() for rs in runs.values() for r in rs):
                        break
                    time.sleep(1)
            finally:
                watcher.terminate()
                watcher.wait(timeout=30)
    finally:
        down = run_cli(["voxelflow", "down", str(spec_path)], env)
        assert down.returncode == 0, down.stdout + down.stderr
    worker_log = (tmp_path / "worker.log").read_text()
    logs = (tmp_path / "watch.log").read_text() + worker_log
    ingests, routes, lifecycles = runs["ingest-arrived"], runs["predict-arrived"], runs["lifecycle"]
    assert len(ingests) == 1, f"{len(ingests)} ingest runs\n{logs[-4000:]}"  # one settled batch, one event, one run
    assert ingests[0].state.is_completed(), f"{ingests[0].state}\n{logs[-4000:]}"
    assert ingests[0].parameters["source"] == str(incoming)
    # a watched folder's arrival is routed by its label to ingest-arrived alone: predict-arrived (the spool's
    # received series) starts no run for it
    assert routes == [], f"{routes}\n{logs[-4000:]}"
    assert len(lifecycles) == 1, f"{len(lifecycles)} lifecycle runs\n{logs[-4000:]}"
    life = lifecycles[0]
    assert life.state.is_completed(), f"{life.state}\n{logs[-4000:]}"
    assert life.parameters["sets"] == [f"data.source={incoming}"]  # what grew, not the spec's default
    for run, event in ((ingests[0], "voxelflow.data.arrived"), (life, "voxelflow.dataset.updated")):
        announced = run.parameters["announcement"]  # the triggering event, checked by the run: data references only
        assert announced["event"] == event and announced["resource"] == f"voxelflow.dataset.{name}"
        assert "spec" not in announced["keys"], announced
        assert run.parameters["spec"] == str(spec_path) and run.parameters["spec_digest"]  # voxelflow up's

    from voxelflow.core import audit
    from voxelflow.core.db import connect
    from voxelflow.data.ingest import read_ledger
    from voxelflow.release import registry
    from voxelflow.spec.config import Settings

    home = tmp_path / "home"
    db = connect(Settings(home=home).database)
    ledger = read_ledger(db, name)
    assert len(ledger) == n_objects and {r["state"] for r in ledger} == {"ingested"}, ledger  # all seen, once
    assert len({r["case_id"] for r in ledger}) == n_cases
    # the lifecycle started from the dataset the ingest recorded (the event's dataset_digest), not a second ingest
    mine = [e for e in audit.entries(db) if isinstance(e["details"], dict) and e["details"].get("pipeline") == name]
    [ingested] = [e["details"] for e in mine if e["event"] == "data.ingested"]
    [recorded] = [e["details"] for e in mine if e["event"] == "data.recorded"]
    assert life.parameters["dataset"] == ingested["dataset_digest"] == recorded["dataset_digest"]
    assert recorded["recorded"] is True and recorded["cases"] == n_cases
    db.dispose()

    # it trained the two candidates at once, promoted the best and served it
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        [table] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"candidates-{slug}"])))
        [report] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"lifecycle-{slug}"])))
        trains = [t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[life.id])))
                  if t.name.startswith("train-")]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["status"] for r in rows] == ["trained", "trained"] and sum(r["chosen"] for r in rows) == 1, rows
    assert len(trains) == 2 and all(t.state.is_completed() for t in trains), trains
    first, second = sorted(trains, key=lambda t: t.start_time)
    assert second.start_time < first.end_time, "the candidates trained one after the other"
    assert "the dataset the triggering ingest recorded; the source not read again" in report.data, report.data
    assert "promoted to champion" in report.data and "HTTP prediction dice" in report.data, report.data
    assert "HTTP prediction dice" in worker_log
    assert registry.alias_version(Settings(home=home).tracking_uri, spec["promote"]["model_name"]) == "1"

    # logs carry case ids and hashes only; nothing from a DICOM header is anywhere under the home, and file names
    # only in the ledger (the database), which alone maps object keys to hashes
    for word in [*names, *secrets]:
        assert word not in worker_log, word
    for path in home.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert not [w for w in secrets if w.encode() in blob], path
            if not path.name.startswith("voxelflow.db"):
                assert not [w for w in names if w.encode() in blob], path
