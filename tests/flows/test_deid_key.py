"""Where a flow run finds the DICOM de-identification key: the environment first, else a Prefect Secret
block on the session's real server; only a DICOM ingest with de-identification on asks for it."""

from __future__ import annotations

import uuid

import pytest

from voxelflow.spec.config import DataSpec


@pytest.fixture
def block(prefect_api, monkeypatch, tmp_path):
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    name = f"deid-{uuid.uuid4().hex[:12]}"
    monkeypatch.delenv("VOXELFLOW_DEID_KEY", raising=False)
    monkeypatch.setenv("VOXELFLOW_DEID_KEY_BLOCK", name)
    monkeypatch.setenv("VOXELFLOW_HOME", str(tmp_path / "home"))
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        yield name, Secret


DICOM = DataSpec(source="/nowhere", layout="dicom")


def test_the_key_comes_from_the_secret_block_when_the_environment_has_none(block, monkeypatch):
    from tasks.settings import run_settings

    name, secret = block
    assert run_settings(DICOM).deid_key is None  # no block yet: the ingest will refuse, naming both places
    secret(value="from-the-block").save(name)
    assert run_settings(DICOM).deid_key.get_secret_value() == "from-the-block"
    monkeypatch.setenv("VOXELFLOW_DEID_KEY", "from-the-environment")
    assert run_settings(DICOM).deid_key.get_secret_value() == "from-the-environment"


def test_only_a_dicom_ingest_with_de_identification_on_reads_the_block(block):
    from tasks.settings import run_settings

    name, secret = block
    secret(value="from-the-block").save(name)
    assert run_settings(DataSpec(source="/nowhere", layout="decathlon")).deid_key is None
    off = DataSpec(source="/nowhere", layout="dicom", deidentify="none", deidentify_acknowledged="already done")
    assert run_settings(off).deid_key is None
    assert run_settings(None).deid_key is None
