"""``data.deidentify: none``: refused without an acknowledgement, warned about at every run, and really off."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from tests.unit.test_dicom import KEY, SECRETS, write_series
from tests.unit.test_ingest import home
from voxelflow.core import audit
from voxelflow.data.ingest import ingest, read_ledger
from voxelflow.spec.config import DataSpec, SpecError, validate_spec

ACK = "These scans were de-identified at the source hospital under protocol 2024-17."
OFF = {"deidentify": "none", "deidentify_acknowledged": ACK}


def spec(**data) -> dict:
    """The demo spec with ``data`` keys over its data section."""
    base = yaml.safe_load((Path(__file__).resolve().parents[2] / "deployments/specs/demo.yaml").read_text())
    return {**base, "data": {**base["data"], **data}}


def test_the_default_is_the_basic_profile():
    assert DataSpec(source="x").deidentify == "basic-profile"
    assert validate_spec(spec()).data.deidentify == "basic-profile"


@pytest.mark.parametrize("ack", [None, "", "   "])
def test_none_is_refused_at_load_without_an_acknowledgement(ack):
    data = {"deidentify": "none"} if ack is None else {"deidentify": "none", "deidentify_acknowledged": ack}
    with pytest.raises(SpecError) as err:
        validate_spec(spec(**data), "spec.yaml")
    message = str(err.value)
    assert message.startswith("spec.yaml: data: ")
    assert "deidentify: none" in message and "deidentify_acknowledged" in message


def test_an_acknowledgement_without_none_is_refused():
    with pytest.raises(SpecError, match="deidentify_acknowledged applies only with deidentify: none"):
        validate_spec(spec(deidentify_acknowledged=ACK))


def test_an_unknown_value_is_refused():
    with pytest.raises(SpecError, match="data.deidentify"):
        validate_spec(spec(deidentify="dicom-basic-profile-please"))


def test_none_with_an_acknowledgement_loads():
    data = validate_spec(spec(**OFF)).data
    assert (data.deidentify, data.deidentify_acknowledged) == ("none", ACK)


def test_every_run_with_none_warns_and_is_audited(tmp_path, caplog):
    src = tmp_path / "src"
    write_series(src, [0.0, 2.0, 4.0])
    layout, db = home(tmp_path)
    data = DataSpec(source=str(src), layout="dicom", **OFF)
    reports = []
    with caplog.at_level(logging.WARNING, logger="voxelflow.data.ingest"):
        for _ in range(2):  # the second run finds nothing new and still warns
            reports.append(ingest(data, layout, db, str(src)))  # no key needed: nothing is remapped
    warned = [r for r in caplog.records if r.name == "voxelflow.data.ingest" and "NOT de-identified" in r.getMessage()]
    assert len(warned) == 2 and ACK in warned[0].getMessage()
    assert all(len(r.warnings) == 1 and "NOT de-identified" in r.warnings[0] for r in reports)
    assert len(reports[0].ingested) == 1 and reports[1].seen == 3
    records = [e for e in audit.entries(db) if e["event"] == "data.deidentify_off"]
    assert len(records) == 2 and records[0]["details"]["acknowledged"] == ACK
    assert audit.verify(db).ok


def test_the_default_does_not_warn(tmp_path, caplog):
    src = tmp_path / "src"
    write_series(src, [0.0, 2.0, 4.0])
    layout, db = home(tmp_path)
    with caplog.at_level(logging.WARNING, logger="voxelflow.data.ingest"):
        report = ingest(DataSpec(source=str(src), layout="dicom"), layout, db, str(src), deid_key=KEY)
    assert not report.warnings and not [r for r in caplog.records if r.name == "voxelflow.data.ingest"]
    assert not [e for e in audit.entries(db) if e["event"] == "data.deidentify_off"]


def quarantined_series(tmp_path: Path, **data) -> tuple[Path, list[dict]]:
    """A series with a missing slice (quarantined, so its DICOM bytes are kept) ingested with ``data``."""
    src = tmp_path / "src"
    write_series(src, [0.0, 2.0, 6.0, 8.0])
    layout, db = home(tmp_path)
    ingest(DataSpec(source=str(src), layout="dicom", **data), layout, db, str(src), deid_key=KEY)
    return tmp_path / "home", read_ledger(db, "p")


def kept_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("quarantine/*")) if p.is_file())


def test_with_none_identifying_values_survive_in_what_is_kept(tmp_path):
    root, rows = quarantined_series(tmp_path, **OFF)
    assert {(r["state"], r["reason"]) for r in rows} == {("quarantined", "missing-slices")}
    kept = kept_bytes(root)
    assert SECRETS["PatientName"].encode() in kept and SECRETS["PatientID"].encode() in kept
    sources = {p.read_bytes() for p in (tmp_path / "src").iterdir()}
    assert {p.read_bytes() for p in root.rglob("quarantine/*")} == sources  # byte for byte as they arrived


def test_with_the_default_they_do_not(tmp_path):
    root, rows = quarantined_series(tmp_path)
    assert {(r["state"], r["reason"]) for r in rows} == {("quarantined", "missing-slices")}
    kept = kept_bytes(root)
    assert kept  # the quarantine keeps the series, de-identified
    for value in SECRETS.values():
        assert value.encode() not in kept, value


@pytest.fixture
def prefect_here(prefect_api):
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield prefect_api


def test_the_ingest_flow_says_it_in_the_run_log(prefect_here, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.ingest import ingest as ingest_flow

    monkeypatch.setenv("VOXELFLOW_HOME", str(tmp_path / "home"))
    src = tmp_path / "src"
    write_series(src, [0.0, 2.0, 4.0])
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec(source=str(src), layout="dicom", **OFF)))
    state = ingest_flow(str(spec_path), return_state=True)
    assert state.is_completed() and state.result()["ingested"] == 1
    APILogHandler().flush()  # ship the run's logs before reading them
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[state.state_details.flow_run_id])))
    warned = [entry for entry in logs if "NOT de-identified" in entry.message]
    assert len(warned) == 1 and warned[0].level == logging.WARNING and ACK in warned[0].message


def test_with_none_burned_in_annotation_is_still_refused(tmp_path):
    """Identity in the pixels is not something an acknowledgement about tags can cover."""
    from pydicom.uid import generate_uid

    src = tmp_path / "src"
    write_series(src / "burned", [0.0, 2.0, 4.0], series=generate_uid(), burned=True)
    layout, db = home(tmp_path)
    ingest(DataSpec(source=str(src), layout="dicom", **OFF), layout, db, str(src), deid_key=KEY)
    assert {(r["state"], r["reason"]) for r in read_ledger(db, "p")} == {("quarantined", "burned-in-annotation")}
