"""Sending DICOM results to a real PACS (Orthanc on loopback, tests/orthanc.py): C-STORE and STOW-RS land
the object; a refusal is not retried; a PACS that is down is retried, the result kept pending and sent by a
resend (the library's and ``voxelflow predict --resend``); a result is sent once per model version; the
database and the audit log hold the SOP Instance UID hashed, never in clear."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from tests.conftest import run_cli
from tests.orthanc import Orthanc
from voxelflow.core import audit
from voxelflow.core.db import connect, sends
from voxelflow.core.settings import Settings
from voxelflow.data.spool import hashed
from voxelflow.serving import dicom_send
from voxelflow.serving.dicom_send import Destination, DestinationError, Result

MODEL = "tiny-unet"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", dicom_send_backoff_s=0.05, dicom_send_timeout_s=10)


@pytest.fixture
def db(settings):
    return connect(settings.database)


def ct_instance(path) -> pydicom.Dataset:
    """pydicom's CT_small as a new instance of a new study (fresh UIDs), written to ``path``."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return ds


def segmentation(ct: pydicom.Dataset, path) -> pydicom.Dataset:
    """A highdicom Segmentation of ``ct`` (one segment, the pixels above the mean), written to ``path``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    mask = (ct.pixel_array > ct.pixel_array.mean()).astype(np.uint8)[None]
    algorithm = hd.AlgorithmIdentificationSequence(name=MODEL, version="1",
                                                   family=codes.cid7162.ArtificialIntelligence)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="spleen", segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Spleen, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    seg = hd.seg.Segmentation(
        source_images=[ct], pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="voxelflow", manufacturer_model_name=MODEL, software_versions="1",
        device_serial_number="1")
    seg.save_as(path)
    return seg


def sent_audits(db) -> list[dict]:
    return [e["details"] for e in audit.entries(db) if e["event"] == "dicom.sent"]


def rows(db) -> list[dict]:
    with db.transaction() as conn:
        return [r._asdict() for r in conn.execute(select(sends).order_by(sends.c.id))]


def assert_hashed_only(db, *uids: str) -> None:
    text = json.dumps([sent_audits(db), rows(db)], default=str)
    for uid in uids:
        assert uid not in text
    held = {a["sop_instance"] for a in sent_audits(db)} | {r["sop_instance"] for r in rows(db)}
    assert held <= {hashed(u) for u in uids} and all(len(h) == 24 for h in held)


# ---------------------------------------------------------------- destinations


def test_destinations_parse_and_bad_ones_are_refused_clearly():
    d = Destination.parse("dicom://PACS_1@pacs.example.org:11112")
    assert (d.scheme, d.ae_title, d.host, d.port, str(d)) == (
        "dicom", "PACS_1", "pacs.example.org", 11112, "dicom://PACS_1@pacs.example.org:11112")
    w = Destination.parse("dicomweb+https://pacs.example.org/dicom-web/")
    assert (w.http_url, str(w)) == ("https://pacs.example.org:443/dicom-web",
                                    "dicomweb+https://pacs.example.org:443/dicom-web")
    assert Destination.parse("dicomweb+http://127.0.0.1:8042/dicom-web").http_url == "http://127.0.0.1:8042/dicom-web"
    bad = {
        "ftp://pacs/x": "a destination is dicom://", "dicom://pacs:104": "names no AE title",
        "dicom://PACS@pacs": "names no port", "dicom://PACS@pacs:104/x": "has a path",
        "dicom://THIS_AE_TITLE_IS_TOO_LONG@pacs:104": "no AE title", "dicom://PACS@pacs:99999": "bad port",
        "dicomweb+http://pacs/x?token=abc": "no query", "": "a destination is dicom://",
    }
    for text, says in bad.items():
        with pytest.raises(DestinationError, match=says.replace("?", r"\?")):
            Destination.parse(text)
    for text in ("dicomweb+https://user:s3cr3t-pw@pacs/dicom-web", "dicom://AE:s3cr3t-pw@pacs:104",
                 "dicomweb+https://s3cr3t-pw@pacs/dicom-web"):
        with pytest.raises(DestinationError, match="carries no credentials") as caught:
            Destination.parse(text)
        assert "s3cr3t-pw" not in str(caught.value)


def test_dicom_status_classes():
    assert dicom_send._status_says(0x0000) == (True, False)
    assert dicom_send._status_says(0xB007) == (True, False)  # stored with a warning
    assert dicom_send._status_says(0xA700) == (False, True)  # out of resources: may pass
    assert dicom_send._status_says(0xA7FF) == (False, True)
    assert dicom_send._status_says(0xA900) == (False, False)  # data set does not match the SOP class
    assert dicom_send._status_says(0xC000) == (False, False)  # cannot understand


# ---------------------------------------------------------------- against Orthanc


def test_cstore_and_stow_land_in_orthanc_once_per_model_version(orthanc, settings, db, tmp_path):
    ct = ct_instance(tmp_path / "ct.dcm")
    seg = segmentation(ct, tmp_path / "seg.dcm")
    cstore = dicom_send.send_results(db, settings, orthanc.dicom_url, "demo", MODEL, "1",
                                     [Result("case-a", "sr", str(tmp_path / "ct.dcm"))])
    assert cstore.summary() == {"destination": orthanc.dicom_url, "sent": 1, "skipped": 0, "pending": 0,
                                "refused": 0}
    stow = dicom_send.send_results(db, settings, orthanc.dicomweb_url, "demo", MODEL, "1",
                                   [Result("case-a", "seg", str(tmp_path / "seg.dcm"))])
    assert (len(stow.sent), stow.sent[0]["attempts"]) == (1, 1)
    assert {ct.SOPInstanceUID, seg.SOPInstanceUID} <= orthanc.sop_instance_uids()
    stored = pydicom.dcmread(io.BytesIO(orthanc.file(seg.SOPInstanceUID)))  # what the PACS holds is the SEG
    assert stored.Modality == "SEG" and stored.SeriesInstanceUID == seg.SeriesInstanceUID
    assert np.array_equal(stored.pixel_array, seg.pixel_array)
    before = orthanc.get("/statistics")["TotalDiskSize"]

    # the same results of the same version: nothing sent, to either destination
    for url, kind, path in ((orthanc.dicom_url, "sr", "ct.dcm"), (orthanc.dicomweb_url, "seg", "seg.dcm")):
        again = dicom_send.send_results(db, settings, url, "demo", MODEL, "1", [Result("case-a", kind,
                                                                                         str(tmp_path / path))])
        assert (len(again.sent), len(again.skipped)) == (0, 1)
    assert len(sent_audits(db)) == 2 and orthanc.get("/statistics")["TotalDiskSize"] == before
    # another version's result is its own
    other = dicom_send.send_results(db, settings, orthanc.dicom_url, "demo", MODEL, "2",
                                    [Result("case-a", "sr", str(tmp_path / "ct.dcm"))])
    assert len(other.sent) == 1
    audits = sent_audits(db)
    assert [(a["destination"], a["status"], a["version"]) for a in audits] == [
        (orthanc.dicom_url, "sent", "1"), (orthanc.dicomweb_url, "sent", "1"), (orthanc.dicom_url, "sent", "2")]
    assert audits[0]["sop_instance"] == hashed(ct.SOPInstanceUID)
    assert_hashed_only(db, ct.SOPInstanceUID, seg.SOPInstanceUID, ct.StudyInstanceUID, ct.SeriesInstanceUID)


def test_a_refusal_is_not_retried(orthanc, settings, db, tmp_path):
    ct = ct_instance(tmp_path / "ct.dcm")
    naps: list[float] = []
    wrong_ae = f"dicom://NOT_ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    report = dicom_send.send_results(db, settings, wrong_ae, "demo", MODEL, "1",
                                     [Result("case-b", "sr", str(tmp_path / "ct.dcm"))], sleep=naps.append)
    assert (len(report.sent), len(report.pending), len(report.refused), naps) == (0, 0, 1, [])
    refused = report.refused[0]
    assert refused["attempts"] == 1
    assert refused["reason"] == (f"{wrong_ae} rejected the association (permanent): Called AE title not recognised")
    assert "1 refused" in dicom_send.describe(report) and "Called AE title" in dicom_send.unsent_message(report)
    # a 4xx from a DICOMweb server (no such root) is a refusal as well
    nowhere = f"dicomweb+{orthanc.http_url}/no-such-root"
    web = dicom_send.send_results(db, settings, nowhere, "demo", MODEL, "1",
                                  [Result("case-b", "sr", str(tmp_path / "ct.dcm"))], sleep=naps.append)
    assert len(web.refused) == 1 and naps == [] and "HTTP 404" in web.refused[0]["reason"]
    assert [r["state"] for r in rows(db)] == ["refused", "refused"]
    assert dicom_send.pending(db) == [] and ct.SOPInstanceUID not in orthanc.sop_instance_uids()
    assert_hashed_only(db, ct.SOPInstanceUID)


def test_a_rejection_is_a_refusal_even_when_the_pacs_closes_the_connection_at_once(orthanc, settings):
    # Orthanc sends A-ASSOCIATE-RJ and closes; about 1 association in 30 here, pynetdicom saw the closed
    # connection first and reported an abort (then retried as transient). The rejection is read from its PDU.
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    wrong_ae = Destination.parse(f"dicom://NOT_ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    said = []
    for _ in range(150):
        with pytest.raises(dicom_send.SendFailed) as failed:
            dicom_send._StoreScu(settings, wrong_ae, [ds])
        said.append((failed.value.transient, str(failed.value).rsplit(": ", 1)[-1]))
    assert set(said) == {(False, "Called AE title not recognised")}


def test_a_pacs_that_is_down_is_retried_then_kept_pending_and_sent_by_a_resend(settings, db, tmp_path):
    ct = ct_instance(tmp_path / "ct.dcm")
    seg = segmentation(ct, tmp_path / "seg.dcm")
    results = [Result("case-c", "sr", str(tmp_path / "ct.dcm")), Result("case-c", "seg", str(tmp_path / "seg.dcm"))]
    pacs = Orthanc(tmp_path / "pacs")
    naps: list[float] = []
    down = dicom_send.send_results(db, settings, pacs.dicom_url, "demo", MODEL, "1", results, sleep=naps.append)
    assert (len(down.sent), len(down.pending), len(down.refused)) == (0, 2, 0)
    assert naps == [0.05, 0.1]  # three attempts, backing off
    assert all(p["attempts"] == 3 and "could not associate" in p["reason"] for p in down.pending)
    web = dicom_send.send_results(db, settings, pacs.dicomweb_url, "demo", MODEL, "1", results[1:], sleep=naps.append)
    assert len(web.pending) == 1 and "could not reach" in web.pending[0]["reason"]
    assert len(dicom_send.pending(db)) == 3 and len(dicom_send.pending(db, destination=pacs.dicomweb_url)) == 1
    assert [a["status"] for a in sent_audits(db)] == ["pending"] * 3

    with pacs:
        # the library's resend, for one destination
        first = dicom_send.resend(db, settings, pacs.dicomweb_url)
        assert (len(first.sent), first.sent[0]["attempts"]) == (1, 4)
        # the command line's, for the rest
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VOXELFLOW_HOME": str(settings.home)}
        started = time.monotonic()
        done = run_cli(["voxelflow", "predict", "--resend"], env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "2 sent to recorded destinations" in done.stdout, done.stdout
        assert time.monotonic() - started < 60
        assert {ct.SOPInstanceUID, seg.SOPInstanceUID} <= pacs.sop_instance_uids()
        assert dicom_send.pending(db) == []
        assert run_cli(["voxelflow", "predict", "--resend"], env, timeout=120).stdout.startswith("0 sent")
    assert [r["state"] for r in rows(db)] == ["sent"] * 3
    assert_hashed_only(db, ct.SOPInstanceUID, seg.SOPInstanceUID)


def test_predict_refuses_a_bad_destination_before_doing_anything(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VOXELFLOW_HOME": str(tmp_path / "home")}
    done = run_cli(["voxelflow", "predict", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                    "--send", "dicomweb+https://someone:pa55word@pacs/dicom-web"], env, timeout=120)
    assert done.returncode == 2 and "carries no credentials" in done.stderr and "pa55word" not in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "home").exists()
    missing = run_cli(["voxelflow", "predict"], env, timeout=120)
    assert missing.returncode == 2 and "predict needs SOURCE and --out" in missing.stderr


def test_a_triggered_prediction_delivers_to_the_configured_destination(orthanc, settings, db, tmp_path):
    from types import SimpleNamespace

    assert dicom_send.deliver(db, settings, "demo", SimpleNamespace(version=None, predicted=[])) is None
    ct = ct_instance(tmp_path / "ct.dcm")
    seg = segmentation(ct, tmp_path / "seg.dcm")
    configured = settings.model_copy(update={"dicom_destination": orthanc.dicom_url})
    report = SimpleNamespace(model=MODEL, version="7", predicted=[
        {"case": "case-d", "mask": "x.nii.gz", "seg": str(tmp_path / "seg.dcm"), "sr": str(tmp_path / "ct.dcm")}])
    first = dicom_send.deliver(db, configured, "demo", report)
    assert first.summary() == {"destination": orthanc.dicom_url, "sent": 2, "skipped": 0, "pending": 0,
                               "refused": 0}
    assert {ct.SOPInstanceUID, seg.SOPInstanceUID} <= orthanc.sop_instance_uids()
    again = dicom_send.deliver(db, configured, "demo", report)  # a repeated event: nothing sent twice
    assert (len(again.sent), len(again.skipped)) == (0, 2)


# ---------------------------------------------------------------- against a pynetdicom Storage SCP


@pytest.fixture
def scp():
    """A pynetdicom Storage SCP on loopback answering C-STOREs with the statuses a test puts in ``statuses``
    (then success); ``start(ssl_context)`` starts it, over TLS when given one."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from flows.server import free_port

    class Scp:
        def __init__(self) -> None:
            self.statuses: list[int] = []
            self.stored: list[str] = []
            self.port = free_port()
            self.server = None

        def handle(self, event) -> int:
            status = self.statuses.pop(0) if self.statuses else 0x0000
            if status == 0x0000:
                self.stored.append(event.request.AffectedSOPInstanceUID)
            return status

        def start(self, ssl_context=None):
            ae = AE(ae_title="STORESCP")
            ae.supported_contexts = AllStoragePresentationContexts
            self.server = ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=ssl_context,
                                          evt_handlers=[(evt.EVT_C_STORE, self.handle)])
            return f"dicom://STORESCP@127.0.0.1:{self.port}"

    server = Scp()
    yield server
    if server.server is not None:
        server.server.shutdown()


def test_out_of_resources_is_retried_and_a_failure_status_is_not(scp, settings, db, tmp_path):
    url = scp.start()
    cts = [ct_instance(tmp_path / f"ct{i}.dcm") for i in range(3)]
    naps: list[float] = []
    scp.statuses = [0xA700]  # out of resources, once
    busy = dicom_send.send_results(db, settings, url, "demo", MODEL, "1",
                                   [Result("case-e", "sr", str(tmp_path / "ct0.dcm"))], sleep=naps.append)
    assert (len(busy.sent), busy.sent[0]["attempts"], naps, scp.stored) == (1, 2, [0.05], [cts[0].SOPInstanceUID])
    for i, status in ((1, 0xA900), (2, 0xC123)):  # does not match the SOP class; cannot understand
        scp.statuses = [status]
        refused = dicom_send.send_results(db, settings, url, "demo", MODEL, "1",
                                          [Result(f"case-{i}", "sr", str(tmp_path / f"ct{i}.dcm"))],
                                          sleep=naps.append)
        assert len(refused.refused) == 1 and refused.refused[0]["attempts"] == 1 and naps == [0.05]
        assert refused.refused[0]["reason"] == f"{url} answered the C-STORE with status 0x{status:04X}"
    assert scp.stored == [cts[0].SOPInstanceUID]
    assert_hashed_only(db, *(ct.SOPInstanceUID for ct in cts))


def test_cstore_over_tls_with_a_client_certificate(scp, settings, db, tmp_path):
    import ssl
    import subprocess

    def sh(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    sh("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=voxelflow test CA")
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        sh("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        sh("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
           "-out", f"{name}.pem", "-extfile", "san.ext")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.pem"))
    server.verify_mode = ssl.CERT_REQUIRED  # only a caller with a certificate of that CA
    server.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    url = scp.start(server)
    ct = ct_instance(tmp_path / "ct.dcm")
    tls = settings.model_copy(update={"dicom_send_tls_ca": str(tmp_path / "ca.pem"),
                                      "dicom_send_tls_cert": str(tmp_path / "client.pem"),
                                      "dicom_send_tls_key": str(tmp_path / "client.key")})
    report = dicom_send.send_results(db, tls, url, "demo", MODEL, "1", [Result("case-t", "sr", str(tmp_path / "ct.dcm"))])
    assert len(report.sent) == 1 and scp.stored == [ct.SOPInstanceUID]
    # without a client certificate the server refuses the handshake, which reads as a passing fault: pending
    plain = settings.model_copy(update={"dicom_send_tls_ca": str(tmp_path / "ca.pem"), "dicom_send_attempts": 1})
    again = dicom_send.send_results(db, plain, url, "demo", MODEL, "2", [Result("case-t", "sr", str(tmp_path / "ct.dcm"))])
    assert len(again.pending) == 1 and scp.stored == [ct.SOPInstanceUID]


def test_two_senders_at_once_send_a_result_once(scp, settings, db, tmp_path):
    import threading

    url = scp.start()
    ct_instance(tmp_path / "ct.dcm")
    reports, go = [], threading.Barrier(2)

    def sender() -> None:
        go.wait()
        reports.append(dicom_send.send_results(db, settings, url, "demo", MODEL, "1",
                                               [Result("case-x", "sr", str(tmp_path / "ct.dcm"))]))

    threads = [threading.Thread(target=sender) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted((len(r.sent), len(r.skipped)) for r in reports) == [(0, 1), (1, 0)]
    assert len(scp.stored) == 1 and len(rows(db)) == 1
