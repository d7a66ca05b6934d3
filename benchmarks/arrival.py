"""Arrival latency: a file landing in a watched folder -> its ingest flow Running, and -> the new model served.

A real Prefect server, the demo pipeline's deployments (deployments/prefect.yaml's, which are what ``voxelflow
up deployments/specs/demo.yaml`` makes), a process worker and ``voxelflow watch`` run as in production (README,
"Data arrival"), with the settings the project ships.

``arrival_to_running_s``: each round copies one new Decathlon case (image + label, then dataset.json)
into the watched folder and times landing -> the ``ingest-arrived/demo-spheres`` run's start time (set
by the server when the run enters Running; that deployment alone is deployed, so no lifecycle runs meanwhile). The shipped settings (watch ``--settle`` default, worker
``PREFECT_WORKER_QUERY_SECONDS=0.5``) are measured side by side with Prefect's default worker polling.

``arrival_to_serving_s``: on a second server with a fresh home, ``voxelflow run`` of the demo spec on 12
of its synthetic cases with 2 epochs makes an older champion (v1) and ``voxelflow serve`` (its defaults)
serves it; then 16 cases (the 12 v1 saw and 4 new) are copied into the watched folder, with the deployments ``voxelflow up
deployments/specs/demo.yaml`` makes, and nobody types anything: watch -> ingest run ->
voxelflow.dataset.updated -> ``lifecycle/demo-spheres`` (train, evaluate, promote against the champion on the
same held-out cases with the demo spec's gates, smoke-test) -> the service's alias poll swaps the new version
in. (The lifecycle starts from the dataset that ingest recorded, every case the ledger holds, without reading
a source again.)
Timed from the copy's start to ``/v1/model`` answering a newer
version; the breakdown comes from the Prefect API's flow- and task-run timestamps and events. The
data land at a random moment of the service's alias-poll cycle (``serve --poll-seconds``), as real
data do, so one run's figure is one sample: it varies by up to that period (``promoted_to_served``).

Each metric is one JSON line (metric, value, goal, higher_is_better). ``--serving-only`` skips the
arrival_to_running rounds, ``--no-serving`` the serving measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SHIPPED_WORKER = {"PREFECT_WORKER_QUERY_SECONDS": "0.5", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
SPEC = "deployments/specs/demo.yaml"
PIPELINE = "demo-spheres"  # SPEC's name: the name of each of its deployments


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    if done.returncode and "already exists" not in done.stdout:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path):
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=REPO, stdout=fh,
                                stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def started_runs(api_url: str) -> dict[str, tuple[float, float]]:
    """Run id -> (created, started) in epoch seconds of every ingest-arrived/demo-spheres run that has started."""
    return {str(r.id): (r.created.timestamp(), r.start_time.timestamp()) for r in flow_runs(api_url, "ingest-arrived")
            if r.start_time is not None}


def rounds(api_url: str, env: dict[str, str], work: Path, worker_env: dict[str, str], label: str, n: int,
           first_case: int) -> list[float]:
    from voxelflow.data.synthetic import make_decathlon

    incoming = work / f"incoming-{label}"
    incoming.mkdir()
    staged = make_decathlon(work / f"staged-{label}", n_cases=first_case + n, size=24)
    out = []
    logs = [work / f"worker-{label}.log", work / f"watch-{label}.log"]
    with process(["prefect", "worker", "start", "--pool", "voxelflow-process", "--type", "process"],
                 {**env, **worker_env}, logs[0]), \
            process(["voxelflow", "watch", str(incoming), "--spec", SPEC], env, logs[1]):
        # both up before anything lands (a loaded machine can take longer than a fixed wait to start them)
        wait_for(lambda: "started" in logs[0].read_text() and "watching" in logs[1].read_text(), 120,
                 f"{label}: worker and watcher", logs)
        time.sleep(2)
        for i in range(first_case, first_case + n):
            before = set(started_runs(api_url))
            name = f"synth_{i:03d}.nii.gz"
            landed = time.time()
            for sub in ("imagesTr", "labelsTr"):
                (incoming / sub).mkdir(exist_ok=True)
                shutil.copy(staged / sub / name, incoming / sub / name)
            shutil.copy(staged / "dataset.json", incoming / "dataset.json")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                new = {k: v for k, v in started_runs(api_url).items() if k not in before}
                if new:
                    created, started = min(new.values(), key=lambda v: v[1])
                    out.append(started - landed)
                    announced = float("nan")  # the server stores events in batches: wait for this one
                    for _ in range(60):
                        times = [e["occurred"] for e in voxelflow_events(api_url)
                                 if e["event"] == "voxelflow.data.arrived" and e["occurred"] > landed]
                        if times:
                            announced = min(times)
                            break
                        time.sleep(0.25)
                    print(f"{label}: arrival -> running {out[-1]:.2f} s (announced by the watcher after "
                          f"{announced - landed:.2f} s, run created by the trigger after {created - landed:.2f} s, "
                          f"running {started - created:.2f} s later)", flush=True)
                    break
                time.sleep(0.2)
            else:
                raise SystemExit(f"{label}: no ingest run started within 120 s; see {work}")
            time.sleep(6)  # let the run finish before the next drop
    return out


def serve_poll_default() -> float:
    """`voxelflow serve --poll-seconds` as shipped: how often the service looks for a moved alias."""
    import inspect

    from flows.cli import serve

    return float(inspect.signature(serve).parameters["poll_seconds"].default)


def flow_runs(api_url: str, flow: str, deployment: str = PIPELINE) -> list:
    """Every flow run of the deployment ``flow/deployment`` (oldest first)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
                                     deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))
    return sorted(runs, key=lambda r: r.created)


def task_runs(api_url: str, flow_run_id) -> dict[str, object]:
    """Task name -> its last task run in the flow run (names without Prefect's run suffix)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r for r in sorted(runs, key=lambda r: r.created)}


def voxelflow_events(api_url: str) -> list[dict]:
    """The voxelflow.* events the server received, oldest first (event name, occurred as epoch seconds)."""
    from datetime import datetime

    import httpx

    resp = httpx.post(f"{api_url}/events/filter", json={"filter": {"event": {"prefix": ["voxelflow."]}}, "limit": 50},
                      timeout=30)
    resp.raise_for_status()
    out = [{"event": e["event"], "occurred": datetime.fromisoformat(e["occurred"]).timestamp()}
           for e in resp.json()["events"]]
    return sorted(out, key=lambda e: e["occurred"])


def wait_for(check, timeout: float, what: str, logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            found = check()
            if found:
                return found
        time.sleep(0.25)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in logs if log.exists())
    raise SystemExit(f"{what}: not within {timeout:.0f} s\n{tails}")


def served_model(url: str, key: str) -> dict:
    import httpx

    resp = httpx.get(f"{url}/v1/model", headers={"X-API-Key": key}, timeout=10)
    resp.raise_for_status()
    return resp.json()


def serving(work: Path, timeout: float, warm_off: bool = False, prefect_worker: bool = False) -> dict:
    """One arrival of the demo's data set, timed to the service answering with the newly promoted version."""
    from flows.server import free_port, local_prefect_server
    from voxelflow.data.synthetic import make_decathlon

    home, incoming = work / "serving-home", work / "serving-incoming"
    incoming.mkdir()
    logs = [work / f"serving-{name}.log" for name in ("serve", "worker", "watch")]
    setup: dict[str, float] = {}
    serve_poll = serve_poll_default()
    t0 = time.monotonic()
    with local_prefect_server(work / "prefect-server-serving") as api_url:
        env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(work / "prefect-client-serving"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "VOXELFLOW_HOME": str(home), "PYTHONWARNINGS": "ignore",
               # the flow runs' warm-start servers (voxelflow.core.warm) in a folder of this run's: none is up
               # before the arrival, as on a worker that has run nothing yet; --warm-off: none at all
               "VOXELFLOW_WARM_DIR": str(work / "warm"), **({"VOXELFLOW_WARM_START": "0"} if warm_off else {})}
        setup["prefect_server_s"] = time.monotonic() - t0
        # the set-up of README "Data arrival": pool, the spec's deployments, a worker with the shipped polling
        cli(["prefect", "work-pool", "create", "voxelflow-process", "--type", "process"], env)
        cli(["voxelflow", "up", SPEC], env)
        staged = make_decathlon(work / "staged-demo", n_cases=16)  # the 12 cases v1 saw and 4 new ones
        # `voxelflow worker` (README "Data arrival"): its runs' warm-start server starts with it; --prefect-worker:
        # `prefect worker start`, whose first run starts that server and runs cold beside its imports
        worker = (["prefect", "worker", "start", "--pool", "voxelflow-process", "--type", "process"] if prefect_worker
                  else ["voxelflow", "worker", "--pool", "voxelflow-process"])
        with process(worker, {**env, **SHIPPED_WORKER}, logs[1]), \
                process(["voxelflow", "watch", str(incoming), "--spec", SPEC], env, logs[2]):
            t = time.monotonic()
            older = make_decathlon(work / "older-demo", n_cases=12)  # the older champion: v1, 2 epochs on 12 cases
            cli(["voxelflow", "run", SPEC, "--set", f"data.source={older}", "--set", "train.epochs=2",
                 "--set", "promote.gates.min_dice=0"], env)
            setup["older_champion_demo_s"] = time.monotonic() - t
            key = cli(["voxelflow", "keys", "create", "arrival-benchmark", "--role", "viewer"], env).stdout.split()[-1]
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with process(["voxelflow", "serve", "--port", str(port)], env, logs[0]):  # its defaults otherwise
                t = time.monotonic()
                before = wait_for(lambda: served_model(url, key).get("version"), 120, "voxelflow serve on v1", logs)
                wait_for(lambda: "watching" in logs[2].read_text() and "started" in logs[1].read_text(), 120,
                         "worker and watcher", logs)
                setup["serve_up_s"] = time.monotonic() - t
                # The service looks for a moved alias every `serve_poll` s from its start; a fixed delay here
                # would land the data at the same phase of that cycle in every run and bias the figure one
                # way. Data arrive at any moment: land them at a uniformly random phase (after 3 s that let
                # the service's start-up work end).
                setup["landing_phase_s"] = random.uniform(0, serve_poll)
                time.sleep(3 + setup["landing_phase_s"])

                landed = time.time()
                shutil.copytree(staged, incoming, dirs_exist_ok=True)
                copied = time.time()

                def stuck() -> None:
                    """Stop early, saying why, when a run failed or a lifecycle ended without a swap."""
                    for flow in ("ingest-arrived", "lifecycle"):
                        for run in flow_runs(api_url, flow):
                            if run.state.is_final() and not run.state.is_completed():
                                raise SystemExit(f"{flow}/{PIPELINE} run {run.name} ended {run.state.name}: "
                                                 f"{run.state.message}")
                            if (flow == "lifecycle" and run.state.is_completed()
                                    and time.time() - run.end_time.timestamp() > serve_poll + 30):
                                raise SystemExit(f"lifecycle run {run.name} completed at "
                                                 f"+{run.end_time.timestamp() - landed:.0f} s but the service still "
                                                 f"answers v{before}: not promoted?")

                # /v1/model twice a second, the runs' states every 5 s: the probe itself costs the cores little
                deadline, about, checked = time.monotonic() + timeout, None, time.monotonic()
                while time.monotonic() < deadline:
                    with contextlib.suppress(Exception):  # the service busy for a moment: ask again
                        answer = served_model(url, key)
                        if answer.get("version") not in (None, before):
                            about = answer
                            break
                    if time.monotonic() - checked > 5:
                        with contextlib.suppress(Exception):
                            stuck()
                        checked = time.monotonic()
                    time.sleep(0.5)
                served = time.time()
                if about is None:
                    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
                    raise SystemExit(f"no newer version served within {timeout:.0f} s of the arrival\n{tails}")
                # the breakdown needs the runs' final states (the service may swap before the lifecycle ends)
                wait_for(lambda: all(r.state.is_final() for r in flow_runs(api_url, "lifecycle")), 180,
                         "the lifecycle run's end", logs)
        ingests, lifecycles = flow_runs(api_url, "ingest-arrived"), flow_runs(api_url, "lifecycle")
        tasks = task_runs(api_url, lifecycles[0].id) if lifecycles else {}
        events = voxelflow_events(api_url)

    def rel(at) -> float | None:  # seconds after the landing; ``at`` a datetime, epoch seconds or None
        if at is None:
            return None
        return round((at if isinstance(at, float) else at.timestamp()) - landed, 2)

    marks = {"copied": round(copied - landed, 2)}
    first = {}
    for e in events:
        first.setdefault(e["event"], e["occurred"])
    marks["event_data_arrived"] = rel(first.get("voxelflow.data.arrived"))
    if ingests:
        marks.update(ingest_run_created=rel(ingests[0].created), ingest_run_running=rel(ingests[0].start_time))
    marks["event_dataset_updated"] = rel(first.get("voxelflow.dataset.updated"))
    if ingests:
        marks["ingest_run_done"] = rel(ingests[-1].end_time)
    if lifecycles:
        life = lifecycles[0]
        marks.update(lifecycle_run_created=rel(life.created), lifecycle_run_running=rel(life.start_time))
        for name in ("ingest", "preprocess", "train", "evaluate", "register-and-promote", "deploy"):
            if name in tasks:
                marks[f"lifecycle_{name.split('-')[-1]}_done"] = rel(tasks[name].end_time)  # promote_done: alias moved
        marks["lifecycle_run_done"] = rel(life.end_time)
    marks["served"] = round(served - landed, 2)
    split = {}
    if lifecycles and "register-and-promote" in tasks:  # the lifecycle's own work, and the arrival machinery around it
        split["lifecycle_running_to_promoted"] = round(
            tasks["register-and-promote"].end_time.timestamp() - lifecycles[0].start_time.timestamp(), 2)
        split["everything_else"] = round(served - landed - split["lifecycle_running_to_promoted"], 2)
        split["promoted_to_served"] = round(served - tasks["register-and-promote"].end_time.timestamp(), 2)
    # a stage that failed once and was tried again (its warning in the worker's log, which goes with the folder)
    retried = [line.strip()[:300] for line in logs[1].read_text(errors="replace").splitlines()
               if ("attempt" in line and "failed" in line) or "Retrying" in line]
    warm_servers = [json.loads(line) for log in (work / "warm").glob("*.log") for line in log.read_text().splitlines()
                    if line.startswith('{"event": "warm.serving"')]
    for server in warm_servers:
        server["serving_at"] = rel(server["at"])
    return {"value": served - landed, "breakdown_s": marks, "warm_servers": warm_servers, "split_s": split, "versions": [before, about["version"]],
            "retried": retried,
            "runs": {"ingest": len(ingests), "lifecycle": len(lifecycles)},
            "new_version_gates": {k.removeprefix("voxelflow.gate."): v for k, v in about.get("tags", {}).items()
                                  if k.startswith("voxelflow.gate.")},
            "setup_s": {k: round(v, 1) for k, v in setup.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true", help="skip Prefect's default worker polling")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--serving-only", action="store_true", help="measure arrival_to_serving_s alone")
    what.add_argument("--no-serving", action="store_true", help="measure arrival_to_running_s alone")
    parser.add_argument("--serving-timeout", type=float, default=480, help="seconds to wait for the new version")
    warmth = parser.add_mutually_exclusive_group()
    warmth.add_argument("--warm-off", action="store_true", help="flow runs start cold (VOXELFLOW_WARM_START=0)")
    warmth.add_argument("--prefect-worker", action="store_true",
                        help="`prefect worker start` instead of `voxelflow worker`: the first flow run starts the "
                             "warm-start server and runs cold")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (server, worker, watch logs)")
    args = parser.parse_args()

    from flows.server import local_prefect_server

    work = Path(tempfile.mkdtemp(prefix="voxelflow-arrival-"))
    baseline: list[float] = []
    shipped: list[float] = []
    served = None
    try:
        if not args.serving_only:
            with local_prefect_server(work / "prefect-server") as api_url:
                env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(work / "prefect-client"),
                       "VOXELFLOW_HOME": str(work / "home"), "PYTHONWARNINGS": "ignore",
                       "VOXELFLOW_WARM_DIR": str(work / "warm-rounds")}
                cli(["prefect", "work-pool", "create", "voxelflow-process", "--type", "process"], env)
                # the ingest's deployment alone: no lifecycle runs on the rounds' cases meanwhile
                cli(["prefect", "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                     "--name", f"ingest/{PIPELINE}"], env)
                baseline = [] if args.no_baseline else rounds(api_url, env, work, {}, "prefect-defaults", 1, 0)
                shipped = rounds(api_url, env, work, SHIPPED_WORKER, "shipped", args.rounds, 1)
        if not args.no_serving:
            served = serving(work, args.serving_timeout, args.warm_off, args.prefect_worker)
    except BaseException:
        print(f"failed; logs kept in {work}", file=sys.stderr)
        raise
    if args.keep:
        print(f"working folder kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    if shipped:
        if baseline:
            print(json.dumps({"baseline_prefect_default_polling_s": round(statistics.median(baseline), 2)}))
        print(json.dumps({"settings": {"watch --settle": "default", **SHIPPED_WORKER},
                          "rounds": [round(x, 2) for x in shipped]}))
        print(json.dumps({"metric": "arrival_to_running_s", "value": round(statistics.median(shipped), 2), "goal": 5,
                          "higher_is_better": False}))
    if served is not None:
        print(json.dumps({"settings": {"watch --settle": "default", **SHIPPED_WORKER,
                                       "serve --poll-seconds": serve_poll_default()},
                          **{k: v for k, v in served.items() if k != "value"}}))
        print(json.dumps({"metric": "arrival_to_serving_s", "value": round(served["value"], 2), "goal": 20,
                          "higher_is_better": False}))


if __name__ == "__main__":
    main()
