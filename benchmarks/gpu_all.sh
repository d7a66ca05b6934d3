#!/usr/bin/env bash
# The GPU checks in one go, within 6 minutes on one GPU: benchmarks/gpu_train.py (samples/s, busy
# fraction and bf16 MFU of voxelflow's own training loop, and the slowdown of train.deterministic on
# the same run: what exact resume on CUDA costs), benchmarks/gpu_preprocess.py (a
# LocalCUDACluster against the CPU cluster of the same node) and the tests marked gpu; a short
# table of the metrics comes last. Each part has a time limit of its own; one that fails or runs
# out of time is reported in the table and the others still run.
#
#   bash benchmarks/gpu_all.sh fetch   # where a package index is reachable: the wheels a bare GPU
#                                      # machine lacks (MONAI, Dask, dask-cuda, Zarr, pydantic, ...) into .whl/
#   bash benchmarks/gpu_all.sh         # on the GPU machine, from the repository root or anywhere:
#                                      # installs .whl/ offline (when it is there) and runs the checks
#
# The GPU machine needs Python 3.12 with torch, numpy, xarray, pandas and pytest; nothing here
# imports Prefect or MLflow. Without a GPU every part still runs (the benchmarks print null
# metrics with their reason, the gpu tests skip), so the script can be tried anywhere.
# PYTHON picks the interpreter (default python3); WHEELS_SCRIPT the wheel fetcher.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
# what the scripts and the gpu tests import beyond the fetcher's list, pinned as pyproject.toml pins them
EXTRA=(pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types typing-inspection
       python-dotenv "pyyaml>=6,<7" "httpx>=0.28,<1" httpcore h11 anyio sniffio certifi idna typing-extensions
       click psutil sortedcontainers  # distributed's own
       # the service's gpu tests: FastAPI's test client, the key database (SQLAlchemy, Alembic), metrics
       fastapi==0.150.0 starlette==1.10.0 annotated-doc prometheus-client sqlalchemy==2.1.9 greenlet
       alembic mako markupsafe opentelemetry-api importlib-metadata zipp isal)
PINS=(zarr==3.1.6)  # pyproject.toml's pins, where the fetcher takes the newest

if [ "${1:-}" = fetch ]; then
  fetcher=${WHEELS_SCRIPT:-../shared/gpu/wheels.sh}
  [ -f "$fetcher" ] || { echo "no wheel fetcher at $fetcher (set WHEELS_SCRIPT)" >&2; exit 2; }
  bash "$fetcher" "${EXTRA[@]}" || exit
  for pin in "${PINS[@]}"; do
    rm -f .whl/"${pin%%=*}"-*.whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d .whl "$pin" || exit
  done
  du -sh .whl
  exit 0
fi

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
begin=$SECONDS
if compgen -G ".whl/*.whl" >/dev/null; then
  site="$logs/site"
  echo "== installing $(ls .whl/*.whl | wc -l) wheels from .whl/ (offline)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "could not install the wheels in .whl/" >&2; exit 1; }
  export PYTHONPATH="$site:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "== no .whl/ here: using what $PY has (bash benchmarks/gpu_all.sh fetch brings the rest)"
  export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning,ignore::DeprecationWarning}

part() {  # part NAME SECONDS COMMAND...: runs it under its limit, its output shown and kept
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (at most ${limit} s)"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$logs/$name.log"
  rc=${PIPESTATUS[0]}
  echo "$name $rc $((SECONDS - start))" >> "$logs/parts"
  echo "== $name: exit $rc after $((SECONDS - start)) s"
}

"$PY" -c "import torch; print('== torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" 2>&1
part gpu_train 140 "$PY" benchmarks/gpu_train.py
part gpu_preprocess 120 "$PY" benchmarks/gpu_preprocess.py --cases 16 --repeats 2
mapfile -t gpu_tests < <(grep -rlE "pytest\.mark\.gpu" tests --include='test_*.py' | sort)
# a file whose imports this machine lacks is reported and the others still run
part gpu_tests 80 "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors "${gpu_tests[@]}"

"$PY" - "$logs" "$((SECONDS - begin))" <<'EOF'
import json, sys
from pathlib import Path

logs, total = Path(sys.argv[1]), sys.argv[2]
rows = []
for name in ("gpu_train", "gpu_preprocess"):
    log = logs / f"{name}.log"
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("{") and '"metric"' in line:
            m = json.loads(line)
            if name == "gpu_train" and m["metric"] not in ("gpu_samples_per_s", "gpu_busy_fraction", "gpu_mfu_bf16",
                                                           "gpu_deterministic_slowdown"):
                continue  # the other networks and sizes: printed above
            value, goal = m["value"], m["goal"]
            met = "-" if value is None or goal is None else (
                "yes" if (value >= goal if m["higher_is_better"] else value <= goal) else "no")
            note = m.get("reason") or m.get("skipped") or "; ".join(filter(None, (m.get("gpu"), m.get("note"))))
            rows.append((m["metric"], "null" if value is None else f"{value:g}", "-" if goal is None else f"{goal:g}",
                         met, note))
tests = logs / "gpu_tests.log"
summary = [line for line in tests.read_text(errors="replace").splitlines() if " in " in line and
           any(w in line for w in ("passed", "skipped", "failed", "error", "deselected"))] if tests.exists() else []
rows.append(("gpu tests", summary[-1].strip("= ") if summary else "no summary", "-", "-", ""))
parts = [line.split() for line in (logs / "parts").read_text().splitlines()]
print("\n| metric | value | goal | met | note |\n| --- | --- | --- | --- | --- |")
for row in rows:
    print("| " + " | ".join(row) + " |")
print("\nparts: " + ", ".join(f"{n} exit {rc}{' (timed out)' if rc in ('124', '137') else ''} in {s} s"
                             for n, rc, s in parts) + f"; {total} s in all")
EOF
