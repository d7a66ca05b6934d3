"""Data arrival for real: files copied into a watched folder end in a completed ingest flow run that stored
them, then a completed lifecycle run on what it stored: a Decathlon set, and labelled DICOM series with a
(fictitious) patient in their headers, de-identified with the key from a Prefect Secret block.

`voxelflow watch` emits voxelflow.data.arrived to a real Prefect server; the ``ingest-arrived/on-arrival``
deployment's trigger (deployments/prefect.yaml, deployed with this test's spec as its parameter) creates a
run that a process worker executes; the ingest's voxelflow.dataset.updated triggers ``lifecycle/on-update``.
Nobody starts anything by hand.
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


def runs_of(api_url: str, deployment: str, spec: str) -> list:
    """The runs of ``deployment`` started for ``spec`` (the session's server holds other tests' runs too)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))
    return [r for r in runs if r.parameters.get("spec") == spec]


def staged_source(layout: str, dest):
    """(a source of labelled cases in ``layout``, its object and case counts, its DICOM header values, words of
    its file names).

    ``mixed``: a Decathlon set (4 cases) and 4 labelled DICOM series, one folder, one spec.
    """
    from voxelflow.data import synthetic

    synthetic.make_decathlon(dest, n_cases=4, size=24)
    if layout == "decathlon":
        return dest, 8, 4, [], ["synth_000"]
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


@pytest.mark.parametrize("layout", ["decathlon", "mixed"])
def test_files_dropped_into_a_watched_folder_are_ingested_by_a_triggered_run(prefect_api, prefect_env, tmp_path,
                                                                              layout):
    import json
    import uuid

    import yaml

    env = {**prefect_env, **FAST_WORKER}
    env.pop("VOXELFLOW_DEID_KEY", None)
    if layout == "mixed":  # the worker has no key in its environment: the flow runs read the Secret block
        from prefect.blocks.system import Secret
        from prefect.settings import PREFECT_API_URL, temporary_settings

        env["VOXELFLOW_DEID_KEY_BLOCK"] = f"deid-{uuid.uuid4().hex[:12]}"
        with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
            Secret(value=f"key-{uuid.uuid4().hex}").save(env["VOXELFLOW_DEID_KEY_BLOCK"])
    pool = run_cli(["prefect", "work-pool", "create", "voxelflow-process", "--type", "process"], env)
    assert pool.returncode == 0 or "already exists" in pool.stdout, pool.stdout + pool.stderr
    # the shipped deployments, made for this test's spec: its path is their parameter, never the event's
    # (one deployment per command: `prefect deploy` ignores --params when it makes several)
    for name in ("*/on-arrival", "lifecycle/on-update"):
        deploy = run_cli(["prefect", "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                          "--name", name, "--params", json.dumps({"spec": str(tmp_path / "spec.yaml")})], env)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    staged, n_objects, n_cases, secrets, names = staged_source(layout, tmp_path / "staged")
    spec = yaml.safe_load((REPO / "deployments/specs/demo.yaml").read_text())
    spec["data"]["layout"] = layout
    spec["train"]["epochs"] = 2  # the spec's own data.source is not the watched folder, and does not exist
    spec["promote"]["gates"] = {"min_dice": 0.0}
    spec["evaluate"].update(three_sides(tmp_path / "staged", tmp_path / "scratch"))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    with prefect_worker("voxelflow-process", env, tmp_path / "worker.log", REPO), \
            open(tmp_path / "watch.log", "w") as watch_log:
        watcher = subprocess.Popen([str(BIN / "voxelflow"), "watch", str(incoming), "--spec",
                                    str(tmp_path / "spec.yaml"), "--settle", "1", "--poll", "0.5"],
                                   env=env, cwd=REPO, stdout=watch_log, stderr=subprocess.STDOUT)
        try:
            time.sleep(2)  # the watcher is up before anything lands
            shutil.copytree(staged, incoming, dirs_exist_ok=True)
            deadline, runs, lifecycles = time.monotonic() + 300, [], []
            while time.monotonic() < deadline:
                runs, lifecycles = (runs_of(prefect_api, name, str(tmp_path / "spec.yaml"))
                                    for name in ("on-arrival", "on-update"))
                if runs and lifecycles and all(r.state and r.state.is_final() for r in runs + lifecycles):
                    break
                time.sleep(1)
        finally:
            watcher.terminate()
            watcher.wait(timeout=30)
    logs = (tmp_path / "watch.log").read_text() + (tmp_path / "worker.log").read_text()
    assert len(runs) == 1, f"{len(runs)} ingest runs\n{logs[-4000:]}"  # one settled batch, one event, one run
    assert runs[0].state.is_completed(), f"{runs[0].state}\n{logs[-4000:]}"
    assert runs[0].parameters["source"] == str(incoming)
    assert len(lifecycles) == 1, f"{len(lifecycles)} lifecycle runs\n{logs[-4000:]}"
    assert lifecycles[0].state.is_completed(), f"{lifecycles[0].state}\n{logs[-4000:]}"
    assert lifecycles[0].parameters["sets"] == [f"data.source={incoming}"]  # what grew, not the spec's default
    for run, event in ((runs[0], "voxelflow.data.arrived"), (lifecycles[0], "voxelflow.dataset.updated")):
        announced = run.parameters["announcement"]  # the triggering event, checked by the run: data references only
        assert announced["event"] == event and announced["resource"] == "voxelflow.dataset.demo-spheres"
        assert "spec" not in announced["keys"], announced

    from voxelflow.core.db import connect
    from voxelflow.data.ingest import read_ledger
    from voxelflow.spec.config import Settings

    home = tmp_path / "home"
    ledger = read_ledger(connect(Settings(home=home).database), "demo-spheres")
    assert len(ledger) == n_objects and {r["state"] for r in ledger} == {"ingested"}, ledger  # all seen, once
    assert len({r["case_id"] for r in ledger}) == n_cases
    from voxelflow.release import registry

    assert registry.alias_version(Settings(home=home).tracking_uri, "demo-spheres") == "1"
    # logs carry case ids and hashes only; nothing from a DICOM header is anywhere under the home, and file names
    # only in the ledger (the database), which alone maps object keys to hashes
    for word in [*names, *secrets]:
        assert word not in (tmp_path / "worker.log").read_text(), word
    for path in home.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert not [w for w in secrets if w.encode() in blob], path
            if not path.name.startswith("voxelflow.db"):
                assert not [w for w in names if w.encode() in blob], path
