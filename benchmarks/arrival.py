"""Arrival latency: seconds from a file landing in a watched folder to its ingest flow run being Running.

A real Prefect server, the ``ingest-arrived/on-arrival`` deployment of deployments/prefect.yaml, a
process worker and ``voxelflow watch`` run as in production. Each round copies one new Decathlon case
(image + label, then dataset.json) into the watched folder and times landing -> the run's start time
(set by the server when the run enters Running). The shipped settings (watch ``--settle`` default,
worker ``PREFECT_WORKER_QUERY_SECONDS=1``) are measured side by side with Prefect's default worker
polling. Last line: one JSON object (metric, value, goal, higher_is_better).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
    """Run id -> (created, started) in epoch seconds of every on-arrival run that has started."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["on-arrival"])))
    return {str(r.id): (r.created.timestamp(), r.start_time.timestamp()) for r in runs if r.start_time is not None}


def rounds(api_url: str, env: dict[str, str], work: Path, worker_env: dict[str, str], label: str, n: int,
           first_case: int) -> list[float]:
    from voxelflow.synthetic import make_decathlon

    incoming = work / f"incoming-{label}"
    incoming.mkdir()
    staged = make_decathlon(work / f"staged-{label}", n_cases=first_case + n, size=24)
    out = []
    with process(["prefect", "worker", "start", "--pool", "voxelflow-process", "--type", "process"],
                 {**env, **worker_env}, work / f"worker-{label}.log"), \
            process(["voxelflow", "watch", str(incoming), "--spec", "deployments/specs/demo.yaml"], env,
                    work / f"watch-{label}.log"):
        time.sleep(8)  # worker and watcher up
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
                    print(f"{label}: arrival -> running {out[-1]:.2f} s (run created by the trigger after "
                          f"{created - landed:.2f} s, running {started - created:.2f} s later)", flush=True)
                    break
                time.sleep(0.2)
            else:
                raise SystemExit(f"{label}: no ingest run started within 120 s; see {work}")
            time.sleep(6)  # let the run finish before the next drop
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true", help="skip Prefect's default worker polling")
    args = parser.parse_args()

    from flows.server import local_prefect_server

    work = Path(tempfile.mkdtemp(prefix="voxelflow-arrival-"))
    try:
        with local_prefect_server(work / "prefect-server") as api_url:
            env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(work / "prefect-client"),
                   "VOXELFLOW_HOME": str(work / "home"), "PYTHONWARNINGS": "ignore"}
            cli(["prefect", "work-pool", "create", "voxelflow-process", "--type", "process"], env)
            cli(["prefect", "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                 "--name", "*/on-arrival"], env)
            baseline = [] if args.no_baseline else rounds(api_url, env, work, {}, "prefect-defaults", 1, 0)
            shipped = rounds(api_url, env, work, SHIPPED_WORKER, "shipped", args.rounds, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if baseline:
        print(json.dumps({"baseline_prefect_default_polling_s": round(statistics.median(baseline), 2)}))
    print(json.dumps({"settings": {"watch --settle": "default", **SHIPPED_WORKER}, "rounds": [round(x, 2) for x in shipped]}))
    print(json.dumps({"metric": "arrival_to_running_s", "value": round(statistics.median(shipped), 2), "goal": 5,
                      "higher_is_better": False}))


if __name__ == "__main__":
    main()
