"""Candidates: what a 3-candidate grid costs against its own parts, and against three separate lifecycles.

``sweep_overhead``: the wall time of one lifecycle of the demo with a 3-candidate grid (learning rates)
÷ (the three candidates' training and validation seconds, as that run measured them, + the lifecycle's
other stages: ingest, preprocess, the MLflow run, evaluation, registration, deployment), goal ≤ 1.10.
With ``max_parallel`` above 1 the candidates overlap, so the figure can fall below 1.

``sweep_speedup``: three separate lifecycles, one per candidate (each its own home: its own ingest,
preprocessing and champion scoring), ÷ the 3-candidate lifecycle; goal ≥ 1.5.

All in this process on the same synthetic data (``pipeline.run``, no orchestrator: the candidates' cost,
not Prefect's, is measured), after one warm-up lifecycle, the sweep first and the separate ones after it.
Each metric ends as one JSON line (metric, value, goal, higher_is_better).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OTHER_STAGES = ("ingest", "preprocess", "start_run", "evaluate", "register", "deploy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="0.01,0.003,0.001", help="the grid's train.learning_rate values")
    parser.add_argument("--max-parallel", type=int, default=2, help="candidates.max_parallel")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--set", action="append", default=[], help="spec override key.path=value")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    warnings.simplefilter("ignore")

    from benchmarks.orchestration import clock_stages
    from voxelflow import pipeline
    from voxelflow.data.synthetic import make_decathlon
    from voxelflow.spec.config import Settings, load_spec

    rates = [float(r) for r in args.rates.split(",")]
    work = Path(tempfile.mkdtemp(prefix="voxelflow-sweep-"))
    data = make_decathlon(work / "incoming", n_cases=args.cases)
    base = [*args.set, f"data.source={data}"]
    grid = json.dumps({"grid": {"train.learning_rate": rates}, "select": {"metric": "dice"},
                       "max_parallel": args.max_parallel})
    stage_s: dict[str, list[float]] = collections.defaultdict(list)
    clock_stages(stage_s)

    def run(sets: list[str], tag: str):
        stage_s.clear()
        spec = load_spec(REPO / "deployments/specs/demo.yaml", sets=[*base, *sets])
        start = time.perf_counter()
        result = pipeline.run(spec, Settings(home=work / tag))
        return time.perf_counter() - start, result

    run(["train.epochs=1", "promote.gates.min_dice=0"], "warm")  # lazy imports and caches, paid once
    sweep_s, result = run([f"candidates={grid}"], "sweep")
    rows = result.candidates
    parts = sum(r["seconds"] for r in rows) + sum(sum(stage_s[k]) for k in OTHER_STAGES)
    print(f"sweep: {sweep_s:.1f} s wall; candidates " + ", ".join(
        f"{r['overrides']} {r['seconds']:.1f} s ({r['status']}{', chosen' if r['chosen'] else ''})" for r in rows)
        + "; other stages " + ", ".join(f"{k} {sum(stage_s[k]):.1f} s" for k in OTHER_STAGES), flush=True)
    separate = []
    for i, rate in enumerate(rates):
        seconds, _ = run([f"train.learning_rate={rate}"], f"separate-{i}")
        separate.append(seconds)
        print(f"separate lifecycle, learning rate {rate:g}: {seconds:.1f} s", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{len(rates)} candidates, max_parallel {args.max_parallel}, {args.cases} cases")
    print(json.dumps({"metric": "sweep_overhead", "value": round(sweep_s / parts, 3), "goal": 1.10,
                      "higher_is_better": False}))
    print(json.dumps({"metric": "sweep_speedup", "value": round(sum(separate) / sweep_s, 3), "goal": 1.5,
                      "higher_is_better": True}))


if __name__ == "__main__":
    main()
