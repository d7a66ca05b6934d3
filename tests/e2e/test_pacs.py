"""The hospital loop for real, nobody typing: series C-STOREd to `voxelflow receive`, or held by a PACS that
`voxelflow watch dicomweb+...` polls, end as a SEG and an SR stored in Orthanc that reference them (an unlabelled
series), or as a de-identified ingested case (a labelled one); then the identity grep.

A real Prefect server, `voxelflow up` (its ``predict-arrived`` deployment), a process worker, real Orthanc PACSes
(tests/orthanc.py: the destination, and a second one as the DICOMweb source) and a demo model: the tiny UNet,
registered as champion in the home's MLflow once for the module (untrained: what it segments does not matter, that
the SEG equals its mask does). Skips where Orthanc is not installed.
"""

from __future__ import annotations

import copy
import io
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import yaml

from flows.server import free_port
from tests.conftest import BIN, REPO, client_env, run_cli
from tests.e2e.test_arrival import FAST_WORKER, three_sides
from tests.services import prefect_worker, stop, wait_until
from tests.unit.test_clinical import received
from tests.unit.test_dicom_results import seg_mask
from tests.unit.test_predict import NETWORK, spec_data
from tests.unit.test_receive import send

pytestmark = pytest.mark.slow
MODEL = "pacs-demo"


def register_demo(home: Path, spec) -> str:
    """The demo model: the tiny UNet (seeded, untrained) registered and made champion in ``home``'s MLflow."""
    import torch

    from voxelflow.learn.train import build_network, state_dict_bytes
    from voxelflow.release import registry
    from voxelflow.spec.config import Settings

    settings = Settings(home=home, mlflow_tracking_uri=None)
    config = {"network": copy.deepcopy(NETWORK), "transforms": copy.deepcopy(spec.preprocess.transforms),
              "spatial_size": [16, 16, 16], "precision": "fp32",
              "sliding_window": {"roi_size": [16, 16, 16], "overlap": 0.25, "sw_batch_size": 4, "mode": "constant"}}
    torch.manual_seed(1)
    uri = settings.tracking_uri
    run_id = registry.start_run(uri, settings.artifact_root, spec, {"dataset_digest": "0" * 16})
    model_uri = registry.log_model(uri, run_id, config, state_dict_bytes(build_network(copy.deepcopy(NETWORK))))
    registry.promote(uri, MODEL, registry.register(uri, model_uri, MODEL, run_id, {}))
    return uri


@pytest.fixture(scope="module")
def loop(prefect_api, orthanc, tmp_path_factory):
    from voxelflow.data import synthetic
    from voxelflow.pipeline import Context, ingest_stage
    from voxelflow.spec.config import DataSpec, Settings, validate_spec

    tmp = tmp_path_factory.mktemp("pacs")
    src, folders, identity = received(tmp, 3, 1)  # series 0 labelled (data.source's labels.json), 1 and 2 not
    name = f"pacs-{uuid.uuid4().hex[:8]}"
    data = spec_data(name, src)
    data["data"].update(layout="dicom", accept={"modalities": ["CT"], "min_slices": 8})
    data["promote"]["model_name"] = MODEL
    data["train"].update(epochs=2, val_every=1)
    # the pipeline's dataset before the PACS sends anything: four cases on three sides, so that one more received
    # labelled series (past triggers.dataset_updated.min_new_cases) makes a lifecycle that runs to its end
    earlier = synthetic.make_decathlon(tmp / "earlier", n_cases=4, size=16)
    data["evaluate"].update(three_sides(earlier, tmp / "scratch"))
    data["triggers"] = {"unlabelled": {"predict": True}, "dataset_updated": {"min_new_cases": 1}}
    (tmp / "spec.yaml").write_text(yaml.safe_dump(data))
    env = {**client_env(prefect_api, tmp), **FAST_WORKER, "VOXELFLOW_DICOM_CALLERS": "SCANNER@127.0.0.1",
           "VOXELFLOW_DICOM_DESTINATION": orthanc.dicom_url, "VOXELFLOW_DEID_KEY": f"key-{uuid.uuid4().hex}"}
    uri = register_demo(tmp / "home", validate_spec(data, name))
    before = ingest_stage(DataSpec(source=str(earlier), layout="decathlon"),
                          Context(Settings(home=tmp / "home"), name)).case_ids
    pool = run_cli(["prefect", "work-pool", "create", "voxelflow-process", "--type", "process"], env)
    assert pool.returncode == 0 or "already exists" in pool.stdout, pool.stdout + pool.stderr
    up = run_cli(["voxelflow", "up", str(tmp / "spec.yaml")], env)
    assert up.returncode == 0 and f"predict-arrived/{name}" in up.stdout, up.stdout + up.stderr
    with prefect_worker("voxelflow-process", env, tmp / "worker.log", REPO):
        yield {"tmp": tmp, "env": env, "name": name, "folders": folders, "identity": identity, "uri": uri,
               "api": prefect_api, "earlier": before}


def background(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "a") as fh:
        return subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=REPO, stdout=fh,
                                stderr=subprocess.STDOUT)


def runs(loop: dict, flow: str = "predict-arrived") -> list:
    """The runs of ``flow`` (predict-arrived, lifecycle) deployed for the module's pipeline."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: loop["api"]}), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
                                     deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[loop["name"]])))


def results_for(pacs, series_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """The SEG and SR objects the PACS holds that reference ``series_uid``, by modality."""
    out: dict[str, list[pydicom.Dataset]] = {"SEG": [], "SR": []}
    for s in pacs.get("/series?expand"):
        modality = s["MainDicomTags"].get("Modality")
        if modality in out:
            for i in s["Instances"]:
                ds = pydicom.dcmread(io.BytesIO(httpx.get(f"{pacs.http_url}/instances/{i}/file", timeout=30).content))
                if series_uid in str(ds):
                    out[modality].append(ds)
    return out


def settled(loop: dict, count: int, timeout: float = 120, flow: str = "predict-arrived") -> list:
    """Wait until ``count`` runs of ``flow`` exist and all are final; returns them."""
    found: list = []

    def done() -> bool:
        nonlocal found
        found = runs(loop, flow)
        return len(found) >= count and all(r.state and r.state.is_final() for r in found)

    wait_until(done, timeout, f"{count} {flow} runs")
    return found


def expected_mask(loop: dict, folder: Path) -> np.ndarray:
    from voxelflow.data import dicom
    from voxelflow.release import registry

    with tempfile.TemporaryDirectory() as tmp:
        segmenter = registry.load_version(loop["uri"], MODEL, "1", Path(tmp))
    files = sorted(folder.glob("*.dcm"))
    volume = dicom.stack([dicom.parse(f.read_bytes(), f.name) for f in files], 10**9)
    return segmenter.segment(volume.array, volume.affine)


def assert_identity_nowhere(loop: dict, values: list[str], logs: list[Path]) -> None:
    """No identifying value in the home (the spool's series gone), Prefect's databases and homes, or the logs."""
    from voxelflow.serving import clinical
    from voxelflow.spec.config import Settings

    home = loop["tmp"] / "home"
    assert clinical.spool_of(Settings(home=home), loop["name"]).series() == []  # acknowledged: deleted
    prefect_homes = [p for p in loop["tmp"].parent.glob("prefect-home*") if p.is_dir()]
    assert prefect_homes, "the Prefect server's home (its database) was not found"
    places = [home, loop["tmp"] / "prefect-client", *prefect_homes]
    files = [p for place in places for p in place.rglob("*") if p.is_file()] + logs
    assert any(p.name.startswith("voxelflow.db") for p in files) and any(p.suffix == ".db" for p in files)
    for path in files:
        blob = path.read_bytes()
        leaked = [v for v in values if v.encode() in blob]
        assert not leaked, f"{path}: {leaked}"


def uids_of(folder: Path) -> list[str]:
    first = pydicom.dcmread(sorted(folder.glob("*.dcm"))[0])
    return [str(first.StudyInstanceUID), str(first.SeriesInstanceUID),
            *(str(pydicom.dcmread(f).SOPInstanceUID) for f in folder.glob("*.dcm"))]


def test_series_sent_to_receive_come_back_as_seg_and_sr_or_are_ingested(loop, orthanc):
    import highdicom as hd

    tmp, folders = loop["tmp"], loop["folders"]
    port = free_port()
    log = tmp / "receive.log"
    receiver = background(["voxelflow", "receive", "--spec", str(tmp / "spec.yaml"), "--port", str(port),
                           "--settle", "1"], loop["env"], log)
    try:
        wait_until(lambda: "receiving DICOM" in log.read_text(), 60, "voxelflow receive", receiver, log)
        files = [p for f in folders[:2] for p in sorted(f.glob("*.dcm"))]  # labelled and unlabelled, one association
        sent = send(port, files, ae_title="SCANNER")
        assert sent["established"] and sent["statuses"] == [0] * len(files), sent
        finished = settled(loop, 2)
    finally:
        stop(receiver)
    logs = log.read_text() + (tmp / "worker.log").read_text()
    assert all(r.state.is_completed() for r in finished), f"{[r.state for r in finished]}\n{logs[-4000:]}"

    unlabelled = uids_of(folders[1])[1]
    stored = results_for(orthanc, unlabelled)
    assert (len(stored["SEG"]), len(stored["SR"])) == (1, 1), logs[-3000:]
    seg = hd.seg.segread(io.BytesIO(orthanc.file(str(stored["SEG"][0].SOPInstanceUID))))
    originals = [pydicom.dcmread(f) for f in sorted(folders[1].glob("*.dcm"))]
    assert {str(o.SOPInstanceUID) for o in originals} == {u for _, _, u in seg.get_source_image_uids()}
    assert str(seg.StudyInstanceUID) == str(originals[0].StudyInstanceUID)
    assert np.array_equal(seg_mask(seg, originals), expected_mask(loop, folders[1]))

    # the labelled series: one de-identified case, and the dataset it grew announced for the lifecycle
    from voxelflow.core.db import connect
    from voxelflow.data.ingest import read_ledger
    from voxelflow.spec.config import Settings

    ledger = [r for r in read_ledger(connect(Settings(home=tmp / "home").database), loop["name"])
              if r["case_id"] not in loop["earlier"]]
    assert len(ledger) == len(list(folders[0].glob("*.dcm"))) + 1 and {r["state"] for r in ledger} == {"ingested"}
    assert len({r["case_id"] for r in ledger}) == 1
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline, events = time.monotonic() + 15, []
    with temporary_settings(updates={PREFECT_API_URL: loop["api"]}), get_client(sync_client=True) as client:
        while not events and time.monotonic() < deadline:  # the server stores an accepted event a moment later
            events = client.request("POST", "/events/filter", json={"filter": {
                "event": {"name": ["voxelflow.dataset.updated"]},
                "resource": {"id": [f"voxelflow.dataset.{loop['name']}"]}}}).json()["events"]
            time.sleep(0 if events else 0.5)
    assert [e["payload"]["new_cases"] for e in events] == [len(loop["earlier"]) + 1], events

    # past triggers.dataset_updated.min_new_cases: the pipeline's lifecycle, started by that event, from the
    # dataset the ingest recorded (the source is not ingested again) to its end
    (life,) = settled(loop, 1, 300, "lifecycle")
    logs = log.read_text() + (tmp / "worker.log").read_text()
    assert life.state.is_completed(), f"{life.state}\n{logs[-4000:]}"
    assert life.parameters["dataset"] == events[0]["payload"]["dataset_digest"]
    from voxelflow.core import audit

    trail = [e for e in audit.entries(connect(Settings(home=tmp / "home").database))
             if e["details"].get("pipeline") == loop["name"] and e["event"] in ("data.ingested", "data.recorded")]
    assert [e["event"] for e in trail][-1] == "data.recorded", trail  # and no ingest of the source after it
    assert trail[-1]["details"]["dataset_digest"] == life.parameters["dataset"]
    assert trail[-1]["details"]["cases"] == len(loop["earlier"]) + 1

    identifying = [*loop["identity"].values(), *uids_of(folders[0]), *uids_of(folders[1])]
    assert_identity_nowhere(loop, identifying, [log, tmp / "worker.log"])


def test_orthanc_as_the_source_through_the_dicomweb_watcher_exactly_once_across_a_restart(loop, orthanc):
    from tests.orthanc import running_orthanc

    tmp = loop["tmp"]
    _, (late,), late_identity = received(tmp / "late", 1, 0, seed=40)
    series = {f: uids_of(f)[1] for f in (loop["folders"][2], late)}
    before = len(runs(loop))
    log = tmp / "watch.log"
    with running_orthanc(tmp / "source-pacs") as source:
        def upload(folder: Path) -> None:
            for f in sorted(folder.glob("*.dcm")):
                httpx.post(f"{source.http_url}/instances", content=f.read_bytes(), timeout=30).raise_for_status()

        def watcher() -> subprocess.Popen:
            return background(["voxelflow", "watch", source.dicomweb_url, "--spec", str(tmp / "spec.yaml"),
                               "--settle", "1", "--poll", "0.5"], loop["env"], log)

        upload(loop["folders"][2])
        proc = watcher()
        try:
            wait_until(lambda: results_for(orthanc, series[loop["folders"][2]])["SEG"], 120, "the first SEG",
                       proc, log)
        finally:
            stop(proc)
        upload(late)  # arrives while no watcher runs: the restarted one fetches it, and only it
        proc = watcher()
        try:
            wait_until(lambda: results_for(orthanc, series[late])["SEG"], 120, "the second SEG", proc, log)
            finished = settled(loop, before + 2)
        finally:
            stop(proc)
    logs = log.read_text() + (tmp / "worker.log").read_text()
    assert len(finished) == before + 2, logs[-3000:]  # one run per series: none repeated after the restart
    assert all(r.state.is_completed() for r in finished), logs[-3000:]
    for folder, uid in series.items():
        stored = results_for(orthanc, uid)
        assert (len(stored["SEG"]), len(stored["SR"])) == (1, 1), (folder, logs[-3000:])
    assert log.read_text().count("announced") == 2, log.read_text()
    assert_identity_nowhere(loop, [*loop["identity"].values(), *late_identity.values(), *uids_of(loop["folders"][2]),
                                   *uids_of(late)],
                            [log, tmp / "worker.log"])

