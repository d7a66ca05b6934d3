"""Orchestration overhead: the demo lifecycle through Prefect ÷ the same library functions called directly.

Both run in this process on the same synthetic data, each on a fresh VOXELFLOW_HOME, alternating
(direct, flow, direct, flow, ...) with a Prefect server already up; the ratio of the medians is
printed. Last line: one JSON object (metric, value, goal, higher_is_better).
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="spec override key.path=value")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from prefect.logging import disable_run_logger  # noqa: F401 - imported now so both sides start warm
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

    def fresh_home(tag: str) -> Settings:
        home = work / tag
        shutil.rmtree(home, ignore_errors=True)
        return Settings(home=home)

    times: dict[str, list[float]] = {"direct": [], "flow": []}
    with local_prefect_server(work / "prefect") as api:
        with temporary_settings({PREFECT_API_URL: api, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            for i in range(args.repeats):
                settings = fresh_home("direct")
                start = time.perf_counter()
                direct = pipeline.run(spec, settings)
                times["direct"].append(time.perf_counter() - start)

                settings = fresh_home("flow")
                os.environ["VOXELFLOW_HOME"] = str(settings.home)
                start = time.perf_counter()
                flowed = lifecycle(spec)
                times["flow"].append(time.perf_counter() - start)
                print(f"repeat {i + 1}: direct {times['direct'][-1]:.1f} s (dice {direct.metrics['dice']:.3f}), "
                      f"flow {times['flow'][-1]:.1f} s (dice {flowed['metrics']['dice']:.3f})", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    ratio = statistics.median(times["flow"]) / statistics.median(times["direct"])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(json.dumps({
        "metric": "orchestration_overhead",
        "value": round(ratio, 4),
        "goal": 1.05,
        "higher_is_better": False,
        "direct_s": [round(t, 2) for t in times["direct"]],
        "flow_s": [round(t, 2) for t in times["flow"]],
    }))


if __name__ == "__main__":
    main()
