"""The CLI's contract: --help lists every command; failures are one line and a non-zero exit."""

from __future__ import annotations

import os

from tests.conftest import REPO, run_cli


def test_help_lists_every_command():
    proc = run_cli(["voxelflow", "--help"], dict(os.environ))
    assert proc.returncode == 0
    for command in ("demo", "run", "validate", "ledger", "serve", "keys", "audit", "version"):
        assert command in proc.stdout


def test_bad_spec_fails_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "deployments/specs/demo.yaml").read_text().replace("epochs:", "epocs:"))
    proc = run_cli(["voxelflow", "run", str(bad)], {**os.environ, "VOXELFLOW_HOME": str(tmp_path)})
    assert proc.returncode == 2
    assert "train.epocs: unknown key" in proc.stderr
    assert str(bad) in proc.stderr.replace("\n", "")


def test_validate_merges_overlay_and_set():
    proc = run_cli(["voxelflow", "validate", "deployments/specs/demo.yaml", "--overlay",
                    "deployments/params/quick.yaml", "--set", "train.batch_size=4"], dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "epochs: 8" in proc.stdout and "batch_size: 4" in proc.stdout


def test_audit_verify_detects_tampering(tmp_path):
    from sqlalchemy import update

    from voxelflow import audit
    from voxelflow.config import Settings
    from voxelflow.db import audit_log, connect

    db = connect(Settings(home=tmp_path).database)
    audit.append(db, "model.promoted", "tester", version="1")
    audit.append(db, "model.promoted", "tester", version="2")
    env = {**os.environ, "VOXELFLOW_HOME": str(tmp_path)}
    assert run_cli(["voxelflow", "audit", "verify"], env).returncode == 0
    with db.transaction() as conn:
        conn.execute(update(audit_log).where(audit_log.c.seq == 0).values(details='{"version": "9"}'))
    proc = run_cli(["voxelflow", "audit", "verify"], env)
    assert proc.returncode == 1 and "record 0" in proc.stderr
