"""A password in every configured URL (database, MLflow, store) appears in no CLI output, log record or audit
entry after forced failures: MLflow unreachable, a store that cannot be reached or named.

The database is PostgreSQL (``VOXELFLOW_TEST_DATABASE_URL``); its URL carries a password the trust-auth test
server accepts and ignores, so the commands get as far as MLflow and the store."""

from __future__ import annotations

import logging
import os
import socket

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import REPO, run_cli

# built, not spelled out, so that no traceback's source line shows them
DB_SECRET, ML_SECRET, STORE_SECRET = ("db-" + "Pa55word"), ("ml-" + "Pa55word"), ("store-" + "Pa55word")
SECRETS = (DB_SECRET, ML_SECRET, STORE_SECRET)
DEMO = REPO / "deployments" / "specs" / "demo.yaml"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


@pytest.fixture
def secret_env(pg_url, tmp_path) -> dict[str, str]:
    db_url = make_url(pg_url).set(password=DB_SECRET).render_as_string(hide_password=False)
    return {**os.environ, "VOXELFLOW_HOME": str(tmp_path / "home"), "VOXELFLOW_DATABASE_URL": db_url,
            "VOXELFLOW_MLFLOW_TRACKING_URI": f"http://vf:{ML_SECRET}@127.0.0.1:{closed_port()}",
            "VOXELFLOW_STORE": f"http://st:{STORE_SECRET}@127.0.0.1:{closed_port()}/bucket",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2", "PYTHONWARNINGS": "ignore"}


def assert_clean(where: str, text_: str) -> None:
    leaked = [s for s in SECRETS if s in text_]
    assert not leaked, f"{where} shows {leaked}: {text_[-2000:]}"


def test_no_password_in_cli_output_or_audit_after_failures(secret_env, tmp_path):
    from voxelflow.data.synthetic import make_decathlon

    source = make_decathlon(tmp_path / "incoming", n_cases=1, size=16)
    commands = [
        (["voxelflow", "keys", "create", "tester"], 0),  # the database works with its password in the URL
        (["voxelflow", "rollback", "demo-spheres", "--reason", "drill"], 1),  # MLflow unreachable
        (["voxelflow", "approve", "demo-spheres", "1", "--override", "drill"], 1),
        (["voxelflow", "lineage", "demo-spheres"], 1),
        (["voxelflow", "ingest", str(source), "--layout", "decathlon"], 1),  # the store is unreachable
        (["voxelflow", "keys", "list"], 0),
    ]
    for args, code in commands:
        proc = run_cli(args, secret_env, timeout=300)
        assert proc.returncode == code, (args, proc.stdout[-500:], proc.stderr[-1500:])
        assert_clean(" ".join(args[:2]), proc.stdout + proc.stderr)
    bad_store = {**secret_env, "VOXELFLOW_STORE": f"nosuchfs://st:{STORE_SECRET}@example/bucket"}
    proc = run_cli(["voxelflow", "ingest", str(source), "--layout", "decathlon"], bad_store, timeout=300)
    assert proc.returncode == 1 and "error:" in proc.stderr
    assert_clean("ingest with an unknown store", proc.stdout + proc.stderr)

    engine = create_engine(secret_env["VOXELFLOW_DATABASE_URL"])
    with engine.connect() as conn:
        audit = conn.execute(text("SELECT event, actor, details FROM audit_log")).all()
        ledger = conn.execute(text("SELECT object, detail FROM ledger")).all()
    engine.dispose()
    assert any(event == "keys.created" for event, _, _ in audit)
    assert_clean("the audit log", repr(audit))
    assert_clean("the ledger", repr(ledger))


def test_no_password_in_log_records_or_errors(secret_env, caplog, monkeypatch):
    """In process: a registry error, the warning about a run whose status cannot be recorded, a retry's reason."""
    from voxelflow import pipeline
    from voxelflow.core import transient
    from voxelflow.release import registry
    from voxelflow.spec.config import Settings

    for name in ("VOXELFLOW_DATABASE_URL", "VOXELFLOW_MLFLOW_TRACKING_URI", "VOXELFLOW_STORE",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, secret_env[name])
    settings = Settings(home=secret_env["VOXELFLOW_HOME"])
    caplog.set_level(logging.DEBUG)
    with pytest.raises(registry.RegistryError) as caught:
        registry.alias_version(settings.tracking_uri, "demo-spheres")
    assert_clean("RegistryError", str(caught.value) + repr(caught.value.__cause__))
    assert_clean("retry reason", transient.reason(caught.value))

    class Ctx:  # only what closing_run reads
        tracking_uri = settings.tracking_uri

    with pytest.raises(ValueError, match="the stage failed"), pipeline.closing_run(Ctx, "0" * 32):
        raise ValueError(f"the stage failed near {settings.tracking_uri}")
    assert "could not mark MLflow run" in caplog.text
    assert_clean("the log", caplog.text + "".join(str(r.msg) for r in caplog.records))
