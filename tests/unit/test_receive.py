"""voxelflow receive: a real pynetdicom SCU on 127.0.0.1 sends pydicom's test files to the Storage SCP.

Callers outside the allow-list are rejected and audited; every limit (PDU, instances, bytes, open
associations, spool bytes) aborts or rejects, drops what was sent and audits; instances land in the
spool under their content hash; a settled series is announced once, by hashes only; memory stays
bounded while an association streams far more than its byte limit (in a subprocess)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pynetdicom = pytest.importorskip("pynetdicom")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import CTImageStorage, Verification  # noqa: E402

from voxelflow.core import audit  # noqa: E402
from voxelflow.core.storage import Store  # noqa: E402
from voxelflow.data.receive import Limits, Receiver, parse_callers, tls_context  # noqa: E402
from voxelflow.data.spool import Spool, hashed  # noqa: E402
from voxelflow.data.watch import DATA_ARRIVED, DATA_REFERENCES, announcement_id  # noqa: E402

PATIENT = "Receive^Tessa^Quinn"
PATIENT_ID = "RCV-4711-PID"
ROOT = Path(__file__).resolve().parents[2]


def make_series(folder: Path, n: int, rows: int | None = None) -> dict:
    """``n`` CT instances of one new study and series, built from pydicom's CT_small.dcm; ``rows`` makes
    each a rows x rows 16-bit image (rows * rows * 2 bytes of pixels)."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    sops, paths = [], []
    for i in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.PatientName, ds.PatientID = PATIENT, PATIENT_ID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        if rows:
            ds.Rows = ds.Columns = rows
            ds.PixelData = (np.arange(rows * rows, dtype=np.uint16) + i).tobytes()
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sops.append(str(ds.SOPInstanceUID))
        paths.append(path)
    return {"study": study, "series": series, "sops": sops, "paths": paths}


def scu(ae_title: str = "SCU", **kw) -> AE:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for k, v in kw.items():
        setattr(ae, k, v)
    return ae


def send(port: int, paths, ae_title: str = "SCU", called: str = "VOXELFLOW", release: bool = True,
         ssl_context=None) -> dict:
    """C-STORE ``paths`` in one association: how it ended and each answer's status."""
    tls = (ssl_context, "localhost") if ssl_context else None
    assoc = scu(ae_title).associate("127.0.0.1", port, ae_title=called, tls_args=tls)
    if not assoc.is_established:
        return {"established": False, "rejected": assoc.is_rejected, "aborted": assoc.is_aborted, "statuses": []}
    statuses = []
    for p in paths:
        status = assoc.send_c_store(pydicom.dcmread(p))
        statuses.append(int(status.Status) if "Status" in status else None)
        if statuses[-1] is None or not assoc.is_established:
            break
    deadline = time.monotonic() + 3
    while statuses and statuses[-1] is None and not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.02)  # no answer: the abort is on its way
    aborted = assoc.is_aborted
    if release and assoc.is_established:
        assoc.release()
    return {"established": True, "rejected": False, "aborted": aborted, "statuses": statuses,
            "released": assoc.is_released}


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def events():
    return []


@pytest.fixture
def receiver(store, db, events):
    """A factory of started receivers on a free port (stopped afterwards)."""
    started = []

    def make(callers: str = "SCU", limits: Limits = Limits(), settle: float = 0.3, **kw) -> Receiver:
        r = Receiver(Spool(store, "rcv-test"), db, events.append, callers=callers, limits=limits, port=0,
                     settle_s=settle, network_timeout_s=10, **kw)
        started.append(r.start())
        return r

    yield make
    for r in started:
        r.stop()


def settle(r: Receiver, timeout: float = 10.0) -> list:
    """Step ``r`` until it announced something (or ``timeout``)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = r.step()
        if out:
            return out
        time.sleep(0.05)
    return []


def audited(db, event: str) -> list[dict]:
    return [e for e in audit.entries(db) if e["event"] == event]


def spooled(store: Store) -> list[str]:
    return store.files("spool/rcv-test")


# ---------------------------------------------------------------- the allow-list


def test_callers_parse_and_refuse_malformed():
    assert parse_callers(" PACS , CT1@127.0.0.1,") == [*parse_callers("PACS"), *parse_callers("CT1@127.0.0.1")]
    assert parse_callers("CT1@127.0.0.1")[0].host == "127.0.0.1"
    for bad in ("TOO-LONG-AE-TITLE-X", "@host", "CT1@", "A\\B"):
        with pytest.raises(ValueError, match="VOXELFLOW_DICOM_CALLERS"):
            parse_callers(bad)


def test_verification_answers(receiver):
    r = receiver()
    assoc = scu().associate("127.0.0.1", r.port, ae_title="VOXELFLOW")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_unknown_caller_is_rejected_and_audited(receiver, db, store, tmp_path):
    r = receiver(callers="PACS")
    case = make_series(tmp_path / "in", 1)
    out = send(r.port, case["paths"], ae_title="STRANGER")
    assert out["rejected"] and not out["established"]
    [entry] = audited(db, "dicom.association.rejected")
    assert entry["details"]["caller"] == hashed("STRANGER")
    assert "not in VOXELFLOW_DICOM_CALLERS" in entry["details"]["reason"]
    assert "STRANGER" not in json.dumps(entry)
    assert spooled(store) == []


def test_wrong_called_title_and_empty_list_are_rejected(receiver, db, tmp_path):
    r = receiver(callers="")
    assert send(r.port, [], ae_title="SCU")["rejected"]
    r.stop()
    r = receiver(callers="SCU")
    assert send(r.port, [], ae_title="SCU", called="OTHER")["rejected"]
    reasons = [e["details"]["reason"] for e in audited(db, "dicom.association.rejected")]
    assert reasons == ["no caller is allowed: VOXELFLOW_DICOM_CALLERS is empty",
                       "the called AE title is not this receiver's"]


def test_caller_allowed_only_from_another_host_is_rejected(receiver, db, store, tmp_path):
    case = make_series(tmp_path / "in", 1)
    r = receiver(callers="SCU@192.0.2.7")
    assert send(r.port, case["paths"])["rejected"]
    assert "only from another host" in audited(db, "dicom.association.rejected")[0]["details"]["reason"]
    r.stop()
    r = receiver(callers="SCU@127.0.0.1")
    out = send(r.port, case["paths"])
    assert out["statuses"] == [0] and out["released"]


# ---------------------------------------------------------------- storing and announcing


def test_series_is_spooled_by_content_hash_and_announced_once(receiver, db, store, events, tmp_path):
    case = make_series(tmp_path / "in", 3)
    r = receiver(settle=0.5)
    released = time.monotonic()
    out = send(r.port, case["paths"])
    assert out["statuses"] == [0, 0, 0] and out["released"]
    assert r.step() == []  # released a moment ago: not settled yet
    [arrival] = settle(r)
    assert time.monotonic() - released >= 0.5

    series_key = f"spool/rcv-test/{hashed(case['study'])}/{hashed(case['series'])}"
    files = spooled(store)
    assert len(files) == 3 and all(f.startswith(series_key + "/") for f in files)
    for f in files:  # named by the sha256 of their bytes, and the bytes are the instance sent
        data = store.read_bytes(f)
        assert f.rsplit("/", 1)[1] == hashlib.sha256(data).hexdigest() + ".dcm"
        assert pydicom.dcmread(store.path(f)).SOPInstanceUID in case["sops"]

    payload = arrival.payload()
    assert set(payload) <= DATA_REFERENCES and payload["count"] == 3
    assert payload["source"] == store.url_of(series_key)
    assert sorted(payload["objects"]) == sorted(store.url_of(f) for f in files)
    assert payload["versions"] == [o.rsplit("/", 1)[1].removesuffix(".dcm") for o in payload["objects"]]
    assert payload["bytes"] == sum(len(store.read_bytes(f)) for f in files)
    assert arrival.id == announcement_id(DATA_ARRIVED, r.cursor, [[f, v] for f, v in zip(
        sorted(files), payload["versions"])], {f: None for f in sorted(files)})
    assert events == [arrival]

    time.sleep(0.6)
    assert r.step() == []  # once
    [released_entry] = audited(db, "dicom.association.released")
    assert released_entry["details"]["instances"] == 3 and released_entry["details"]["new"] == 3

    # the same instances again: nothing new to announce; one more instance of the series: only it
    assert send(r.port, case["paths"])["statuses"] == [0, 0, 0]
    time.sleep(0.7)
    assert r.step() == []
    more = make_series(tmp_path / "more", 1)
    ds = pydicom.dcmread(more["paths"][0])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = case["study"], case["series"]
    ds.save_as(more["paths"][0], enforce_file_format=True)
    send(r.port, more["paths"])
    [second] = settle(r)
    assert second.payload()["count"] == 1 and second.source == arrival.source
    r.stop()

    # a restart announces nothing twice
    events.clear()
    r = receiver(settle=0.1)
    time.sleep(0.3)
    assert r.step() == [] and events == []

    # nothing identifying in the database, the audit log or the events: only in the spool
    values = [PATIENT, PATIENT_ID, case["study"], case["series"], *case["sops"], *more["sops"]]
    dbfile = Path(db.url.split("///", 1)[1]).read_bytes()
    everything = json.dumps([list(audit.entries(db)), arrival.payload(), second.payload()], default=str)
    for value in values:
        assert value.encode() not in dbfile and value not in everything
    outside = [f for f in store.files("") if not f.startswith("spool/")]
    assert all(value.encode() not in store.read_bytes(f) for f in outside for value in values)


def test_announcement_that_fails_is_retried_under_the_same_id(store, db, tmp_path):
    case = make_series(tmp_path / "in", 2)
    sent, fail = [], [True]

    def emit(arrival):
        sent.append(arrival.id)
        if fail[0]:
            raise ConnectionError("event bus away")

    with Receiver(Spool(store, "rcv-test"), db, emit, callers="SCU", port=0, settle_s=0.1) as r:
        send(r.port, case["paths"])
        time.sleep(0.3)
        with pytest.raises(ConnectionError):
            r.step()
        fail[0] = False
        assert len(r.step()) == 1
    assert len(sent) == 2 and sent[0] == sent[1]


def test_instance_that_is_not_readable_is_refused_and_the_rest_kept(receiver, store, tmp_path):
    case = make_series(tmp_path / "in", 2)
    r = receiver()
    assoc = scu().associate("127.0.0.1", r.port, ae_title="VOXELFLOW")
    ds = pydicom.dcmread(case["paths"][0])
    del ds.SeriesInstanceUID
    assert assoc.send_c_store(ds).Status == 0xC000
    assert assoc.send_c_store(pydicom.dcmread(case["paths"][1])).Status == 0
    assoc.release()
    assert len(settle(r)) == 1 and len(spooled(store)) == 1


# ---------------------------------------------------------------- limits


def _assert_dropped(db, store, r: Receiver, match: str) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not audited(db, "dicom.association.aborted"):
        time.sleep(0.05)
    [entry] = audited(db, "dicom.association.aborted")
    assert match in entry["details"]["reason"]
    assert spooled(store) == []
    assert [p for p in r.spool.staging.rglob("*") if p.is_file()] == []
    time.sleep(0.3)
    assert r.step() == []


def test_instances_over_the_limit_abort_and_drop(receiver, db, store, tmp_path):
    case = make_series(tmp_path / "in", 3)
    r = receiver(limits=Limits(max_instances=2))
    out = send(r.port, case["paths"])
    assert out["aborted"] and out["statuses"][:2] == [0, 0], out
    _assert_dropped(db, store, r, "VOXELFLOW_DICOM_MAX_INSTANCES (2)")
    assert audited(db, "dicom.association.aborted")[0]["details"]["dropped"] == 2


def test_bytes_over_the_limit_abort_and_drop(receiver, db, store, tmp_path):
    case = make_series(tmp_path / "in", 3)
    size = case["paths"][0].stat().st_size
    r = receiver(limits=Limits(max_bytes=int(size * 1.5)))
    out = send(r.port, case["paths"])
    assert out["aborted"] and out["statuses"][0] == 0
    _assert_dropped(db, store, r, "VOXELFLOW_DICOM_MAX_BYTES")


def test_spool_over_the_limit_aborts_and_drops(receiver, db, store, tmp_path):
    case = make_series(tmp_path / "in", 3)
    size = case["paths"][0].stat().st_size
    store.write_bytes("spool/other-pipeline/kept.bin", b"\0" * size)  # what the spool holds already counts
    r = receiver(limits=Limits(spool_max_bytes=int(size * 2.5)))
    out = send(r.port, case["paths"])
    assert out["aborted"]
    _assert_dropped(db, store, r, "VOXELFLOW_SPOOL_MAX_BYTES")
    assert store.exists("spool/other-pipeline/kept.bin")


def test_pdu_over_the_limit_aborts_before_it_is_read(receiver, db, store, tmp_path):
    case = make_series(tmp_path / "in", 2)
    r = receiver(limits=Limits(max_pdu=16384))
    assoc = scu().associate("127.0.0.1", r.port, ae_title="VOXELFLOW")
    assert assoc.acceptor.maximum_length == 16384  # what the receiver negotiated
    assert assoc.send_c_store(pydicom.dcmread(case["paths"][0])).Status == 0
    # a peer that ignores it: the header of a 1 GiB P-DATA-TF PDU, then nothing
    started = time.monotonic()
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 1 << 30))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not assoc.is_aborted:
        time.sleep(0.05)
    assert assoc.is_aborted and time.monotonic() - started < 5
    _assert_dropped(db, store, r, "over VOXELFLOW_DICOM_MAX_PDU (16384)")


def test_associations_over_the_limit_are_rejected(receiver, db, store, tmp_path):
    case = make_series(tmp_path / "in", 1)
    r = receiver(limits=Limits(max_associations=1))
    first = scu().associate("127.0.0.1", r.port, ae_title="VOXELFLOW")
    assert first.is_established
    assert send(r.port, case["paths"])["rejected"]
    [entry] = audited(db, "dicom.association.rejected")
    assert "VOXELFLOW_DICOM_MAX_ASSOCIATIONS (1)" in entry["details"]["reason"]
    first.release()
    time.sleep(0.2)
    assert send(r.port, case["paths"])["statuses"] == [0]  # room again


def test_peer_abort_drops_what_it_sent(receiver, db, store, tmp_path):
    case = make_series(tmp_path / "in", 2)
    r = receiver()
    assoc = scu().associate("127.0.0.1", r.port, ae_title="VOXELFLOW")
    assert assoc.send_c_store(pydicom.dcmread(case["paths"][0])).Status == 0
    assoc.abort()
    _assert_dropped(db, store, r, "aborted")


# ---------------------------------------------------------------- memory

_RECEIVER = """
import json, sys, threading
from voxelflow.core.db import Database
from voxelflow.core.storage import Store
from voxelflow.data.receive import Limits, Receiver
from voxelflow.data.spool import Spool

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

store, db, limit = Store(sys.argv[1]), Database(sys.argv[2]), int(sys.argv[3])
r = Receiver(Spool(store, "rcv-test"), db, lambda a: None, callers="SCU", port=0,
             limits=Limits(max_bytes=limit, max_pdu=262144)).start()
print(json.dumps({"port": r.port, "idle_kib": kib("VmRSS")}), flush=True)
sys.stdin.readline()
r.stop()
print(json.dumps({"peak_kib": kib("VmHWM"), "left": store.files("spool")}), flush=True)
"""


def test_memory_stays_bounded_while_an_association_streams_past_its_byte_limit(tmp_path, sqlite_url):
    """50 instances of 8 MiB (400 MiB) against a 300 MiB byte limit: the receiving process's peak RSS stays
    within 256 MiB of its idle RSS, the association is aborted and nothing is kept."""
    import numpy as np

    limit = 300 << 20
    proc = subprocess.Popen([sys.executable, "-c", _RECEIVER, str(tmp_path / "store"), sqlite_url, str(limit)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        started = json.loads(proc.stdout.readline())
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.PatientName = PATIENT
        ds.Rows = ds.Columns = 2048
        ds.PixelData = np.zeros(2048 * 2048, dtype=np.uint16).tobytes()  # 8 MiB per instance
        assoc = scu().associate("127.0.0.1", started["port"], ae_title="VOXELFLOW")
        assert assoc.is_established
        t0, sent = time.monotonic(), 0
        for _ in range(50):
            ds.SOPInstanceUID = generate_uid()
            status = assoc.send_c_store(ds)
            if not assoc.is_established or "Status" not in status:
                break
            sent += 1
        elapsed = time.monotonic() - t0
        deadline = time.monotonic() + 5
        while not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert assoc.is_aborted and 30 <= sent < 50
        proc.stdin.write("\n")
        proc.stdin.flush()
        ended = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    grown_mib = (ended["peak_kib"] - started["idle_kib"]) / 1024
    print(f"receive_rss_growth_mib={grown_mib:.1f} sent_mib={sent * 8} in {elapsed:.1f} s")
    assert grown_mib < 256
    assert ended["left"] == []  # neither in the series folders nor in staging


# ---------------------------------------------------------------- TLS


def _pki(folder: Path) -> dict[str, Path]:
    """A CA and a server and a client certificate it signed (openssl, P-256 keys)."""
    folder.mkdir()
    run = lambda *a: subprocess.run(["openssl", *a], cwd=folder, check=True, capture_output=True)  # noqa: E731
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for who in ("server", "client"):
        run("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={who}")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{who}.pem", "-days", "2", "-extfile", "san.ext")
    return {n: folder / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl is not on the PATH")
def test_tls_with_client_certificates(receiver, store, tmp_path):
    import ssl

    pki = _pki(tmp_path / "pki")
    with pytest.raises(ValueError, match="set together"):
        tls_context(str(pki["server.pem"]), None, None)
    r = receiver(ssl_context=tls_context(str(pki["server.pem"]), str(pki["server.key"]), str(pki["ca.pem"])))
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
    client.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
    case = make_series(tmp_path / "in", 1)
    assert send(r.port, case["paths"], ssl_context=client)["statuses"] == [0]
    assert len(settle(r)) == 1

    anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
    for ctx in (anonymous, None):  # no client certificate, no TLS at all: no association
        assert not send(r.port, case["paths"], ssl_context=ctx)["established"]


# ---------------------------------------------------------------- the command


def test_receive_command_announces_to_prefect(prefect_env, tmp_path):
    """``voxelflow receive`` in a subprocess: a series C-STOREd to it reaches the Prefect server as one
    voxelflow.data.arrived event about the spec's pipeline, with hashes only."""
    import queue

    import httpx

    env = {**prefect_env, "VOXELFLOW_DICOM_CALLERS": "SCU@127.0.0.1", "VOXELFLOW_DICOM_MAX_PDU": "65536"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "voxelflow"), "receive", "--spec",
                             str(ROOT / "deployments" / "specs" / "demo.yaml"), "--port", "0", "--settle", "0.3"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()

    def wait_for(text: str, timeout: float = 60) -> str:
        end = time.monotonic() + timeout
        seen = []
        while time.monotonic() < end:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if proc.poll() is not None:
                    break
                continue
            seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} from voxelflow receive: {''.join(seen)[-2000:]}")

    try:
        port = int(wait_for("receiving DICOM").split(" on 127.0.0.1:")[1].split(",")[0].split(" ")[0])
        case = make_series(tmp_path / "in", 3)
        assert send(port, case["paths"])["statuses"] == [0, 0, 0]
        wait_for("announced a series of 3 instances")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    api = prefect_env["PREFECT_API_URL"]
    deadline, mine = time.monotonic() + 15, []
    while not mine and time.monotonic() < deadline:  # the server stores accepted events a moment later
        found = httpx.post(f"{api}/events/filter", json={
            "filter": {"event": {"name": ["voxelflow.data.arrived"]}, "resource": {"id": ["voxelflow.dataset.demo-spheres"]},
                       "order": "DESC"}, "limit": 50}).json()["events"]
        mine = [e for e in found if e["payload"].get("source", "").startswith(str(tmp_path))]
        time.sleep(0 if mine else 0.5)
    assert len(mine) == 1 and mine[0]["payload"]["count"] == 3
    text = json.dumps(mine)
    for value in (PATIENT, case["study"], case["series"], *case["sops"]):
        assert value not in text
