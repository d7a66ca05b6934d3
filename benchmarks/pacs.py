"""The hospital loop's latency: a 64-slice CT series C-STOREd to ``voxelflow receive`` -> its SEG stored in Orthanc.

Everything runs as installed (README, "The hospital loop"): a Prefect server, ``voxelflow up`` (the
``predict-arrived`` deployment), a process worker with the shipped polling (as benchmarks/arrival.py),
``voxelflow receive`` with its defaults (``--settle`` 2 s) and a real Orthanc (tests/orthanc.py) as the
destination, ``VOXELFLOW_DICOM_DESTINATION=dicom://...``. The model is the demo spec's network
(deployments/specs/demo.yaml, untrained: the time does not depend on the weights) registered as champion.

``pacs_roundtrip_s``: from the answer to the series' last C-STORE to Orthanc listing a SEG series that
references it (polled every 0.1 s). The first series warms nothing up but the server's caches (each flow
run is a process of its own, as in production); ``--rounds`` series are timed after it and the median is
printed as one JSON line (metric, value, goal, higher_is_better), with the rounds on a second line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]
BIN = Path(sys.executable).parent
SHIPPED_WORKER = {"PREFECT_WORKER_QUERY_SECONDS": "0.5", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
GOAL_S = 15.0


def cli(args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    if done.returncode and "already exists" not in done.stdout:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def register_demo(home: Path, spec) -> None:
    import torch

    from voxelflow.learn.train import build_network, state_dict_bytes
    from voxelflow.release import registry
    from voxelflow.spec.config import Settings

    settings = Settings(home=home, mlflow_tracking_uri=None)
    network = copy.deepcopy(spec.train.network)
    size = next(v["spatial_size"] for t in spec.preprocess.transforms for v in t.values() if "spatial_size" in v)
    config = {"network": network, "transforms": copy.deepcopy(spec.preprocess.transforms), "spatial_size": size,
              "precision": "fp32", "sliding_window": {"roi_size": size, "overlap": 0.25, "sw_batch_size": 4,
                                                      "mode": "constant"}}
    torch.manual_seed(0)
    uri = settings.tracking_uri
    run_id = registry.start_run(uri, settings.artifact_root, spec, {"dataset_digest": "0" * 16})
    model_uri = registry.log_model(uri, run_id, config, state_dict_bytes(build_network(copy.deepcopy(network))))
    registry.promote(uri, spec.promote.model_name, registry.register(uri, model_uri, spec.promote.model_name,
                                                                     run_id, {}))


def series(dest: Path, seed: int) -> tuple[list[Path], str]:
    """One 64-slice CT series (64 x 64 pixels); its files and SeriesInstanceUID."""
    import pydicom

    from voxelflow.data import synthetic

    synthetic.make_dicom(dest, n_cases=1, size=64, seed=seed)
    files = sorted(p for p in dest.rglob("*.dcm"))
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def send(port: int, files: list[Path]) -> float:
    """C-STORE the files in one association; the monotonic time of the last one's answer."""
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="VOXELFLOW")
    if not assoc.is_established:
        raise SystemExit("voxelflow receive refused the association")
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:
        status = assoc.send_c_store(ds)
        if int(status.Status) != 0:
            raise SystemExit(f"C-STORE answered {int(status.Status):#06x}")
    last = time.monotonic()
    assoc.release()
    return last


def seg_stored(pacs, series_uid: str, seen: set[str]) -> bool:
    import httpx

    for s in pacs.get("/series?expand"):
        if s["ID"] in seen or s["MainDicomTags"].get("Modality") != "SEG":
            continue
        for i in s["Instances"]:
            tags = httpx.get(f"{pacs.http_url}/instances/{i}/simplified-tags", timeout=10).json()
            refs = tags.get("ReferencedSeriesSequence") or []
            if any(r.get("SeriesInstanceUID") == series_uid for r in refs):
                seen.add(s["ID"])
                return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="timed series after the first")
    args = parser.parse_args()
    import yaml

    from flows.server import free_port, local_prefect_server
    from tests.orthanc import Orthanc
    from voxelflow.spec.config import validate_spec

    work = Path(tempfile.mkdtemp(prefix="voxelflow-bench-pacs-"))
    pacs = Orthanc(work / "orthanc").start()
    try:
        with local_prefect_server(work / "prefect-server") as api_url:
            data = yaml.safe_load((ROOT / "deployments/specs/demo.yaml").read_text())
            data["name"] = "bench-pacs"
            data["data"] = {"source": str(work / "labelled"), "layout": "dicom"}
            data["train"]["precision"] = "fp32"
            data["triggers"] = {"unlabelled": {"predict": True}}
            (work / "labelled").mkdir()
            (work / "spec.yaml").write_text(yaml.safe_dump(data))
            env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(work / "prefect-client"),
                   "VOXELFLOW_HOME": str(work / "home"), "PYTHONWARNINGS": "ignore", **SHIPPED_WORKER,
                   "VOXELFLOW_DICOM_CALLERS": "SCANNER@127.0.0.1", "VOXELFLOW_DICOM_DESTINATION": pacs.dicom_url,
                   "VOXELFLOW_DEID_KEY": "bench-key"}
            register_demo(work / "home", validate_spec(data, "bench-pacs"))
            cli(["prefect", "work-pool", "create", "voxelflow-process", "--type", "process"], env)
            cli(["voxelflow", "up", str(work / "spec.yaml")], env)
            port = free_port()
            with open(work / "worker.log", "w") as wlog, open(work / "receive.log", "w") as rlog:
                worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "voxelflow-process",
                                           "--type", "process"], env=env, cwd=ROOT, stdout=wlog,
                                          stderr=subprocess.STDOUT)
                receiver = subprocess.Popen([str(BIN / "voxelflow"), "receive", "--spec", str(work / "spec.yaml"),
                                             "--port", str(port)], env=env, cwd=ROOT, stdout=rlog,
                                            stderr=subprocess.STDOUT)
                try:
                    deadline = time.monotonic() + 120
                    while "receiving DICOM" not in (work / "receive.log").read_text():
                        if time.monotonic() > deadline or receiver.poll() is not None:
                            raise SystemExit((work / "receive.log").read_text()[-2000:])
                        time.sleep(0.2)
                    seen: set[str] = set()
                    times = []
                    for r in range(args.rounds + 1):
                        files, uid = series(work / f"series{r}", seed=100 + r)
                        last = send(port, files)
                        deadline = last + 300
                        while not seg_stored(pacs, uid, seen):
                            if time.monotonic() > deadline:
                                raise SystemExit("no SEG in Orthanc after 300 s:\n"
                                                 + (work / "worker.log").read_text()[-3000:])
                            time.sleep(0.1)
                        times.append(time.monotonic() - last)
                finally:
                    for proc in (receiver, worker):
                        proc.terminate()
                        proc.wait(timeout=30)
    finally:
        pacs.stop()
    value = statistics.median(times[1:]) if len(times) > 1 else times[0]
    print(json.dumps({"metric": "pacs_roundtrip_s", "value": round(value, 2), "goal": GOAL_S,
                      "higher_is_better": False}))
    print(json.dumps({"rounds_s": [round(t, 2) for t in times], "first_is_warmup": True, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
