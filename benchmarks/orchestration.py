"""Orchestration overhead: the demo lifecycle through Prefect ÷ the same library functions called directly.

Both run in this process on the same synthetic data, each on a fresh VOXELFLOW_HOME, after one
warm-up pass of each, in alternating order, with a Prefect server already up; the ratio of the
medians is printed. Last line: one JSON object (metric, value, goal, higher_is_better).
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
    """Time each library stage wherever it is called from: the direct chain or a Prefect task."""
    import importlib

    from voxelflow import pipeline

    names = ["ingest_stage", "preprocess_stage", "start_run", "train_stage", "evaluate_stage",
             "register_stage", "deploy_stage"]
    modules = [pipeline] + [importlib.import_module(f"tasks.{m}")
                            for m in ("ingest", "preprocess", "train", "evaluate", "registry", "deploy")]
    for name in names:
        original = getattr(pipeline, name)

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
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.lifecycle import lifecycle
    from flows.server import local_prefect_server
    from voxelflow import pipeline
    from voxelflow.config import Settings, load_spec
    from voxelflow.synthetic import make_decathlon

    spec = load_spec(REPO / "deployments/specs/demo.yaml", sets=args.set)
    work = Path(tempfile.mkdtemp(prefix="voxelflow-bench-"))
    data = make_decathlon(work / "incoming", n_cases=12)
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"source": str(data)})})

    stage_s: dict[str, list[float]] = collections.defaultdict(list)
    clock_stages(stage_s)

    def fresh_home(tag: str) -> Settings:
        # a new folder each time: MLflow caches its SQLite engine per URI, so a deleted database
        # under the same path would be stale
        return Settings(home=work / tag)

    def direct(run_spec, tag: str) -> tuple[float, float]:
        settings = fresh_home(tag)
        start = time.perf_counter()
        result = pipeline.run(run_spec, settings)
        return time.perf_counter() - start, result.metrics["dice"]

    def flowed(run_spec, tag: str) -> tuple[float, float]:
        os.environ["VOXELFLOW_HOME"] = str(fresh_home(tag).home)
        start = time.perf_counter()
        result = lifecycle(run_spec)
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
                side(warm, f"warm-{name}")
            for i in range(args.repeats):
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
            APILogHandler().flush()  # ship the last run's logs before the server stops
    shutil.rmtree(work, ignore_errors=True)
    print(f"{'stage (median s)':<18} {'direct':>8} {'flow':>8}")
    for stage in stages["flow"]:
        d = statistics.median(stages["direct"].get(stage, [0.0]))
        f = statistics.median(stages["flow"][stage])
        print(f"{stage:<18} {d:8.2f} {f:8.2f}")
    ratio = statistics.median(times["flow"]) / statistics.median(times["direct"])
    paired = [f / d for f, d in zip(times["flow"], times["direct"])]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(json.dumps({
        "metric": "orchestration_overhead",
        "value": round(ratio, 4),
        "goal": 1.05,
        "higher_is_better": False,
        "direct_s": [round(t, 2) for t in times["direct"]],
        "flow_s": [round(t, 2) for t in times["flow"]],
        "paired_ratios": [round(r, 3) for r in paired],
    }))


if __name__ == "__main__":
    main()
