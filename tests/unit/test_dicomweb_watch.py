"""Orthanc as the source (tests/orthanc.py): a series stored in the PACS is found over QIDO-RS, fetched over
WADO-RS into the spool (content-hash names, hashed study and series) and announced once, also across a
watcher restart and after an announcement that failed; nothing but hashes reaches the cursor or the event."""

from __future__ import annotations

import io
import json

import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.orthanc import Orthanc
from voxelflow.core import transient
from voxelflow.core.db import connect
from voxelflow.core.settings import Settings
from voxelflow.data.dicomweb_watch import DicomwebWatcher, dicomweb_spool, http_root
from voxelflow.data.spool import hashed
from voxelflow.data.watch import get_cursor


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", dicom_send_timeout_s=10)


def store_series(pacs: Orthanc, n: int, study: str | None = None, series: str | None = None) -> dict[str, str]:
    """``n`` instances of one series (pydicom's CT_small with fresh UIDs) stored in ``pacs`` over its REST API."""
    uids = {"study": study or generate_uid(), "series": series or generate_uid(), "sops": []}
    for i in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uids["study"], uids["series"], generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        httpx.post(f"{pacs.http_url}/instances", content=buf.getvalue(), timeout=30).raise_for_status()
        uids["sops"].append(ds.SOPInstanceUID)
    return uids


def watcher(pacs: Orthanc, settings: Settings, heard: list, settle_s: float = 1.0) -> DicomwebWatcher:
    spool = dicomweb_spool(settings.store_url, "demo", settings.root)
    return DicomwebWatcher(pacs.dicomweb_url, connect(settings.database), "demo", spool, heard.append, settings,
                           settle_s=settle_s)


def test_source_urls():
    assert http_root("dicomweb+http://127.0.0.1:8042/dicom-web/") == "http://127.0.0.1:8042/dicom-web"
    assert http_root("dicomweb+https://pacs.example.org/dicom-web") == "https://pacs.example.org/dicom-web"
    for bad, says in {"http://pacs/dicom-web": "dicomweb\\+http\\(s\\)://host/path",
                      "dicomweb+https://u:s3cr3t-pw@pacs/x": "carries no credentials",
                      "dicomweb+http://pacs/x?token=s3cr3t-pw": "no query", "dicomweb+http://pacs:99999/x": "bad port"
                      }.items():
        with pytest.raises(ValueError, match=says) as caught:
            http_root(bad)
        assert "s3cr3t-pw" not in str(caught.value)


def test_a_series_in_the_pacs_is_fetched_into_the_spool_and_announced_exactly_once(orthanc, settings):
    orthanc.clear()
    first = store_series(orthanc, 3)
    heard: list = []
    w = watcher(orthanc, settings, heard)
    assert w.step(at=0.0) == [] and heard == []  # seen, not settled
    (arrival,) = w.step(at=1.0)
    assert heard == [arrival] and arrival.payload()["count"] == 3
    key = f"spool/demo/{hashed(first['study'])}/{hashed(first['series'])}"
    assert arrival.source == w.spool.store.url_of(key)
    fetched = [pydicom.dcmread(w.spool.store.path(o["key"]))
               for o in w.spool.objects(key)]
    assert sorted(ds.SOPInstanceUID for ds in fetched) == sorted(first["sops"])  # identified, in the spool only
    said = json.dumps([arrival.payload(), get_cursor(w.db, w.cursor)])
    for value in [first["study"], first["series"], *first["sops"], "CompressedSamples", "1CT1"]:
        assert value not in said
    assert w.step(at=5.0) == []

    # a restart: nothing again; a new series and a grown one are announced, only with what is new
    again = watcher(orthanc, settings, heard)
    assert again.step(at=10.0) == [] and again.step(at=20.0) == []
    second = store_series(orthanc, 2)
    store_series(orthanc, 1, first["study"], first["series"])
    assert again.step(at=30.0) == []
    news = again.step(at=31.0)
    assert sorted(a.payload()["count"] for a in news) == [1, 2]
    assert {a.source.rsplit("/", 1)[1] for a in news} == {hashed(first["series"]), hashed(second["series"])}
    assert len(heard) == 3 and watcher(orthanc, settings, heard).step(at=40.0) == []


def test_an_announcement_that_failed_is_repeated_under_the_same_id(orthanc, settings):
    orthanc.clear()
    store_series(orthanc, 2)
    tried: list = []

    def refuse(arrival):
        tried.append(arrival)
        raise ConnectionError("the event API is away")

    w = watcher(orthanc, settings, [], settle_s=0.0)
    w.emit = refuse
    with pytest.raises(ConnectionError):
        w.step()
    heard: list = []
    (arrival,) = watcher(orthanc, settings, heard, settle_s=0.0).step()  # a restart after the failure
    assert arrival.id == tried[0].id and heard == [arrival]
    assert watcher(orthanc, settings, heard, settle_s=0.0).step() == []


def test_a_pacs_that_is_away_fails_the_poll_as_transient(settings, tmp_path):
    pacs = Orthanc(tmp_path / "pacs")  # never started
    w = watcher(pacs, settings, [])
    with pytest.raises(Exception) as caught:
        w.step()
    assert transient.is_transient(caught.value)


def test_voxelflow_watch_announces_a_pacs_series_to_prefect_once_across_a_restart(orthanc, prefect_env, tmp_path):
    import subprocess
    import time

    from tests.conftest import BIN, REPO
    from tests.services import stop, wait_until

    orthanc.clear()
    uids = store_series(orthanc, 2)
    env = {**prefect_env, "VOXELFLOW_HOME": str(tmp_path / "home")}
    command = [str(BIN / "voxelflow"), "watch", orthanc.dicomweb_url, "--spec", str(REPO / "deployments/specs/demo.yaml"),
               "--settle", "0", "--poll", "0.5"]
    logs = []
    for run in range(2):  # the second watcher finds the series in its cursor and announces nothing
        log = tmp_path / f"watch-{run}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda log=log: "watching" in log.read_text(), 60, "voxelflow watch", proc, log)
            if run == 0:
                wait_until(lambda log=log: "announced 2 objects" in log.read_text(), 60, "the announcement", proc, log)
            else:
                time.sleep(3)  # several polls
        finally:
            stop(proc)
        logs.append(log.read_text())
    assert logs[0].count("announced") == 1 and "announced" not in logs[1], logs
    series = f"spool/demo-spheres/{hashed(uids['study'])}/{hashed(uids['series'])}"
    events = httpx.post(f"{prefect_env['PREFECT_API_URL']}/events/filter", timeout=30, json={
        "filter": {"event": {"name": ["voxelflow.data.arrived"]},
                   "any_resource": {"id": ["voxelflow.dataset.demo-spheres"]}}, "limit": 50}).json()["events"]
    ours = [e for e in events if e["payload"]["source"].endswith(series)]
    assert len(ours) == 1 and ours[0]["payload"]["count"] == 2
    assert all(uid not in json.dumps(ours) for uid in [uids["study"], uids["series"], *uids["sops"]])


def test_a_failed_fetch_says_why_without_the_uids_in_its_url(orthanc, settings):
    from voxelflow.data.dicomweb_watch import DicomwebError, _Series

    orthanc.clear()
    gone = store_series(orthanc, 1)
    w = watcher(orthanc, settings, [])
    orthanc.clear()  # deleted from the PACS between the listing and the fetch
    with pytest.raises(DicomwebError) as caught:
        w._take(_Series(gone["study"], gone["series"], 1))
    message = str(caught.value)
    assert message.startswith(f"fetching a series from {orthanc.dicomweb_url} (WADO-RS) failed: HTTPError (HTTP 404)")
    assert gone["study"] not in message and gone["series"] not in message and not transient.is_transient(caught.value)
    assert get_cursor(w.db, w.cursor) is None and list(w.spool.tmp.iterdir()) == []
