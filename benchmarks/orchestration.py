"""Orchestration overhead: the demo lifecycle through Prefect ÷ the same library functions called directly;
step_overhead: the demo lifecycle flow with three no-op user steps ÷ without; and cached_rerun_ratio: an
unchanged rerun of the demo lifecycle flow ÷ its first run.

Both run in this process on the same synthetic data, each on a fresh VOXELFLOW_HOME, after one
warm-up pass of each, in alternating order, with a Prefect server already up; the ratio of the
medians is printed. Every run of these two computes every step (``fresh``: nothing recorded is reused).
step_overhead is the median of ``--step-pairs`` paired ratios (default 5). cached_rerun_ratio is the median
of ``--reruns`` unchanged reruns (default 3) on the first run's home, which reuse its preprocessing, training
and evaluation, ÷ that first run. Each metric ends as one JSON line (metric, value, goal, higher_is_better).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def clock_stages(into: dict[str, list[float]]) -> None:
    """Time each library stage wherever it is called from: the direct chain (the executor calls each stage
    through its module in ``voxelflow.stages``) or a Prefect task (which holds the function itself)."""
    import importlib

    from voxelflow import pipeline

    names = ["ingest_stage", "preprocess_stage", "start_run", "train_stage", "evaluate_stage",
             "register_stage", "deploy_stage"]
    stages = [importlib.import_module(f"voxelflow.stages.{m}")
              for m in ("ingest", "preprocess", "tracking", "train", "evaluate", "promote", "deploy")]
    modules = [pipeline, *stages] + [importlib.import_module(f"tasks.{m}")
                                     for m in ("ingest", "preprocess", "train", "evaluate", "registry", "deploy")]
    for name in names:
        original = getattr(pipeline, name)
        if not any(getattr(module, name, None) is original for module in stages):
            raise RuntimeError(f"{name} is not defined in voxelflow.stages: its time would not be measured")

        def timed(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                into[_name.removesuffix("_stage")].append(time.perf_counter() - start)

        for module in modules:
            if getattr(module, name, None) is original:
                setattr(module, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="spec override key.path=value")
    parser.add_argument("--step-pairs", type=int, default=5, help="paired runs for step_overhead (0: skip it)")
    parser.add_argument("--reruns", type=int, default=3, help="unchanged reruns for cached_rerun_ratio (0: skip it)")
    parser.add_argument("--only", choices=["all", "orchestration", "steps", "cached"], default="all")
    args = parser.parse_args()
    import sys

    sys.path.insert(0, str(REPO))  # benchmarks.noop_step, the no-op steps' function
    os.environ["VOXELFLOW_ALLOWED_IMPORTS"] = "monai,torch,voxelflow,benchmarks"
    warnings.simplefilter("ignore")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.lifecycle import lifecycle
    from flows.server import local_prefect_server
    from voxelflow import pipeline
    from voxelflow.data.synthetic import make_decathlon
    from voxelflow.spec.config import Settings, load_spec

    spec = load_spec(REPO / "deployments/specs/demo.yaml", sets=args.set)
    work = Path(tempfile.mkdtemp(prefix="voxelflow-bench-"))
    data = make_decathlon(work / "incoming", n_cases=12)
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"source": str(data)})})

    stage_s: dict[str, list[float]] = collections.defaultdict(list)
    clock_stages(stage_s)

    def fresh_home(tag: str) -> Settings:
        # a new folder each time: no run finds another's database, store or MLflow runs
        return Settings(home=work / tag)

    reused: list[list[str]] = []  # each run's reused steps: the last one's is checked by cached_rerun

    def direct(run_spec, tag: str, fresh: bool = True) -> tuple[float, float]:
        settings = fresh_home(tag)
        start = time.perf_counter()
        result = pipeline.run(run_spec, settings, fresh=fresh)
        reused.append(result.reused)
        return time.perf_counter() - start, result.metrics["dice"]

    task_calls: list[int] = []  # Prefect task calls of each flow lifecycle
    count_task_calls(task_calls)

    def flowed(run_spec, tag: str, fresh: bool = True) -> tuple[float, float]:
        os.environ["VOXELFLOW_HOME"] = str(fresh_home(tag).home)
        task_calls.append(0)
        start = time.perf_counter()
        result = lifecycle(run_spec, fresh=fresh)
        reused.append(result["reused"])
        return time.perf_counter() - start, result["metrics"]["dice"]

    sides = {"direct": direct, "flow": flowed}
    times: dict[str, list[float]] = {"direct": [], "flow": []}
    stages: dict[str, dict[str, list[float]]] = {"direct": collections.defaultdict(list),
                                                 "flow": collections.defaultdict(list)}
    with local_prefect_server(work / "prefect") as api:
        with temporary_settings({PREFECT_API_URL: api, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            # warm-up: the first pass through each side pays lazy imports and caches the other would not
            warm = load_spec(REPO / "deployments/specs/demo.yaml",
                             sets=[*args.set, "train.epochs=1", "promote.gates.min_dice=0", f"data.source={data}"])
            for name, side in sides.items():
                if args.only != "cached" or name == "flow":
                    side(warm, f"warm-{name}")
            for i in range(args.repeats if args.only in ("all", "orchestration") else 0):
                order = ["direct", "flow"] if i % 2 == 0 else ["flow", "direct"]
                line = []
                for name in order:
                    stage_s.clear()
                    seconds, dice = sides[name](spec, f"{name}-{i}")
                    times[name].append(seconds)
                    stage_s["outside stages"].append(seconds - sum(sum(v) for v in stage_s.values()))
                    for stage, values in stage_s.items():
                        stages[name][stage].append(sum(values))
                    line.append(f"{name} {seconds:.1f} s (dice {dice:.3f})")
                print(f"repeat {i + 1}: " + ", ".join(line), flush=True)
            measured = args.only in ("all", "orchestration") and args.repeats > 0
            lifecycle_tasks = statistics.median(task_calls[-args.repeats:]) if measured else 0
            floor = prefect_floor(spec, direct, flowed) if measured else None
            steps = (step_overhead(spec, flowed, args.step_pairs, stage_s) if args.only in ("all", "steps")
                     else None)
            cached = (cached_rerun(spec, flowed, args.reruns, stage_s, reused) if args.only in ("all", "cached")
                      else None)
            APILogHandler().flush()  # ship the last run's logs before the server stops
    shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    if args.only in ("all", "orchestration"):
        report(times, stages, floor, lifecycle_tasks)
    if steps:
        print(json.dumps(steps))
    if cached:
        print(json.dumps(cached))


def count_task_calls(into: list[int]) -> None:
    """Count each Prefect task call in ``into[-1]`` (a flow lifecycle appends its 0 before it starts)."""
    from prefect.tasks import Task

    original = Task.__call__

    def counted(self, *args, **kwargs):
        if into:
            into[-1] += 1
        return original(self, *args, **kwargs)

    Task.__call__ = counted


def server_cpu_s() -> float:
    """CPU time (user + system) used so far by the Prefect server this script started, its children included."""
    import psutil

    total = 0.0
    for proc in psutil.Process().children():
        try:
            if "prefect" not in " ".join(proc.cmdline()):
                continue
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


FLOOR_TASKS = 8  # no-op tasks in each flow of prefect_floor's


def prefect_floor(spec, direct, flowed, runs: int = 10, settle_s: float = 1.0) -> dict[str, float]:
    """What Prefect itself costs here, on the lifecycle's server: an empty flow's run (its creation, states and
    result storage lookups through the API) and a no-op task's (its engine and state events), medians of ``runs``;
    and the server's CPU for each, and for one lifecycle of each side (less what the idle server uses).

    Each run waits ``settle_s`` first, as a lifecycle starts after the one before has settled: the server records
    a run's task events after it ends, and a flow run created meanwhile can meet SQLite's lock (503, then the client
    retries after about 2 s). The server's CPU is read after a run has settled (its events recorded), so each
    lifecycle here is followed by a few seconds of nothing."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    per_task: list[float] = []

    @task(name="floor-noop", cache_policy=NO_CACHE)
    def noop() -> None:
        return None

    @flow(name="floor-empty")
    def empty() -> None:
        return None

    @flow(name="floor-tasks")
    def tasks() -> None:
        for _ in range(FLOOR_TASKS):
            start = time.perf_counter()
            noop()
            per_task.append(time.perf_counter() - start)

    empty()
    tasks()
    per_task.clear()
    time.sleep(3 * settle_s)
    before, at = server_cpu_s(), time.perf_counter()
    time.sleep(5 * settle_s)
    idle = (server_cpu_s() - before) / (time.perf_counter() - at)  # its own services' polling

    def server_share(fn, settle: float) -> tuple[float, float]:
        """(wall seconds of ``fn``, the server's CPU seconds for it, once settled)"""
        cpu, at = server_cpu_s(), time.perf_counter()
        fn()
        wall = time.perf_counter() - at
        time.sleep(settle)
        return wall, server_cpu_s() - cpu - idle * (time.perf_counter() - at)

    flows, flow_cpu, task_cpu = [], [], []
    for _ in range(runs):
        wall, cpu = server_share(empty, settle_s)
        flows.append(wall)
        flow_cpu.append(cpu)
    for _ in range(3):
        task_cpu.append(server_share(tasks, settle_s)[1])
    empty_cpu = statistics.median(flow_cpu)
    lifecycles = {name: server_share(lambda side=side, name=name: side(spec, f"floor-{name}"), 4 * settle_s)[1]
                  for name, side in (("direct", direct), ("flow", flowed))}
    return {"empty_flow_s": statistics.median(flows), "noop_task_s": statistics.median(per_task),
            "server_cpu_ms": {"idle_per_s": round(idle * 1000, 1), "empty_flow": round(empty_cpu * 1000, 1),
                              "noop_task": round((statistics.median(task_cpu) - empty_cpu) / FLOOR_TASKS * 1000, 1),
                              "direct_lifecycle": round(lifecycles["direct"] * 1000, 1),
                              "flow_lifecycle": round(lifecycles["flow"] * 1000, 1)}}


def with_noop_steps(spec):
    """The spec with three no-op steps: after preprocess, after evaluate, after deploy."""
    from voxelflow.spec.config import validate_spec

    data = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["steps"] = [{"id": f"noop_{i}", "uses": "benchmarks.noop_step:noop", "after": after}
                     for i, after in enumerate(["preprocess", "evaluate", "deploy"])]
    return validate_spec(data, "step_overhead")


def step_overhead(spec, flowed, pairs: int, stage_s: dict[str, list[float]]) -> dict | None:
    """The demo flow with three no-op steps ÷ without, ``pairs`` times in alternating order: the median ratio.

    Also printed, as a diagnostic: the same ratio with each run's preprocessing time taken out (the start of its
    local Dask cluster varies by seconds from run to run, more than three steps cost)."""
    if pairs <= 0:
        return None
    stepped = with_noop_steps(spec)
    ratios, plain_s, stepped_s, steady = [], [], [], []
    for i in range(pairs):
        got: dict[str, float] = {}
        pre: dict[str, float] = {}
        for name in (["plain", "steps"] if i % 2 == 0 else ["steps", "plain"]):
            stage_s.clear()
            got[name], _ = flowed(spec if name == "plain" else stepped, f"steps-{name}-{i}")
            pre[name] = sum(stage_s.get("preprocess", []))
        plain_s.append(got["plain"])
        stepped_s.append(got["steps"])
        ratios.append(got["steps"] / got["plain"])
        steady.append((got["steps"] - pre["steps"]) / (got["plain"] - pre["plain"]))
        print(f"step pair {i + 1}: without steps {got['plain']:.1f} s, with three no-op steps {got['steps']:.1f} s",
              flush=True)
    return {"metric": "step_overhead", "value": round(statistics.median(ratios), 4), "goal": 1.02,
            "higher_is_better": False, "paired_ratios": [round(r, 3) for r in ratios],
            "without_s": [round(t, 2) for t in plain_s], "with_s": [round(t, 2) for t in stepped_s],
            "ratio_without_preprocess": round(statistics.median(steady), 4),
            "paired_ratios_without_preprocess": [round(r, 3) for r in steady]}


def cached_rerun(spec, flowed, reruns: int, stage_s: dict[str, list[float]], reused: list[list[str]]) -> dict | None:
    """The demo flow run once on a fresh home, then ``reruns`` times unchanged on that home (reuse on): the
    median rerun ÷ the first run. Each rerun must have reused preprocessing, training and evaluation (else the
    figure would not be a cached rerun's); the stages that still ran (ingest, promote, deploy) are timed."""
    if reruns <= 0:
        return None
    stage_s.clear()
    first, _ = flowed(spec, "cached", fresh=True)
    again, left = [], collections.defaultdict(list)
    for i in range(reruns):
        stage_s.clear()
        seconds, _ = flowed(spec, "cached", fresh=False)
        if reused[-1] != ["preprocess", "train", "evaluate"]:
            raise RuntimeError(f"rerun {i + 1} reused {reused[-1]}, not preprocess, train and evaluate: "
                               "it is no cached rerun")
        again.append(seconds)
        for stage, values in stage_s.items():
            left[stage].append(sum(values))
        print(f"cached rerun {i + 1}: {seconds:.1f} s (first run {first:.1f} s)", flush=True)
    return {"metric": "cached_rerun_ratio", "value": round(statistics.median(again) / first, 4), "goal": 0.15,
            "higher_is_better": False, "first_s": round(first, 2), "rerun_s": [round(t, 2) for t in again],
            "rerun_stage_s": {k: round(statistics.median(v), 2) for k, v in left.items()}}


def report(times: dict[str, list[float]], stages: dict[str, dict[str, list[float]]], floor: dict[str, float] | None,
           tasks: float) -> None:
    print(f"{'stage (median s)':<18} {'direct':>8} {'flow':>8}")
    for stage in stages["flow"]:
        d = statistics.median(stages["direct"].get(stage, [0.0]))
        f = statistics.median(stages["flow"][stage])
        print(f"{stage:<18} {d:8.2f} {f:8.2f}")
    direct = statistics.median(times["direct"])
    ratio = statistics.median(times["flow"]) / direct
    paired = [f / d for f, d in zip(times["flow"], times["direct"])]
    extra = {}
    if floor:
        floor_s = floor["empty_flow_s"] + tasks * floor["noop_task_s"]
        extra = {"floor_ratio": round(1 + floor_s / direct, 4), "empty_flow_ms": round(floor["empty_flow_s"] * 1000, 1),
                 "noop_task_ms": round(floor["noop_task_s"] * 1000, 2), "tasks": tasks,
                 "server_cpu_ms": floor["server_cpu_ms"]}
        print(f"Prefect's floor here: an empty flow {floor['empty_flow_s'] * 1000:.1f} ms, a no-op task "
              f"{floor['noop_task_s'] * 1000:.2f} ms; {tasks:g} tasks a lifecycle: {floor_s:.3f} s over a direct "
              f"{direct:.2f} s: Prefect's own calls alone give {1 + floor_s / direct:.4f}")
        c = floor["server_cpu_ms"]
        print(f"the Prefect server's CPU (ms, idle {c['idle_per_s']} ms a second taken out): an empty flow "
              f"{c['empty_flow']}, a no-op task {c['noop_task']}, a lifecycle direct {c['direct_lifecycle']}, through "
              f"the flow {c['flow_lifecycle']} (on the same {os.cpu_count()} cores as the lifecycle)")
    print(json.dumps({
        "metric": "orchestration_overhead",
        "value": round(ratio, 4),
        "goal": 1.05,
        "higher_is_better": False,
        "direct_s": [round(t, 2) for t in times["direct"]],
        "flow_s": [round(t, 2) for t in times["flow"]],
        "paired_ratios": [round(r, 3) for r in paired],
        **extra,
    }))


if __name__ == "__main__":
    main()
