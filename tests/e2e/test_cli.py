"""The CLI's contract: --help lists every command; failures are one line and a non-zero exit."""

from __future__ import annotations

import os

from tests.conftest import REPO, run_cli


def test_help_lists_every_command():
    proc = run_cli(["voxelflow", "--help"], dict(os.environ))
    assert proc.returncode == 0
    for command in ("demo", "run", "validate", "ingest", "ledger", "serve", "keys", "audit", "version"):
        assert command in proc.stdout


def test_bad_spec_fails_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "deployments/specs/demo.yaml").read_text().replace("epochs:", "epocs:"))
    proc = run_cli(["voxelflow", "run", str(bad)], {**os.environ, "VOXELFLOW_HOME": str(tmp_path)})
    assert proc.returncode == 2
    assert "train.epocs: unknown key" in proc.stderr
    assert str(bad) in proc.stderr.replace("\n", "")


def test_a_bad_setting_is_named_by_its_variable_not_its_value(tmp_path):
    env = {**os.environ, "VOXELFLOW_HOME": str(tmp_path), "VOXELFLOW_SERVE_PORT": "70123"}
    proc = run_cli(["voxelflow", "ledger"], env)
    assert proc.returncode == 1
    assert "VOXELFLOW_SERVE_PORT: Input should be less than or equal to 65535" in proc.stderr
    assert "70123" not in proc.stderr and "ValidationError" not in proc.stderr


def test_validate_merges_overlay_and_set():
    proc = run_cli(["voxelflow", "validate", "deployments/specs/demo.yaml", "--overlay",
                    "deployments/params/quick.yaml", "--set", "train.batch_size=4"], dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "epochs: 8" in proc.stdout and "batch_size: 4" in proc.stdout


def test_audit_verify_detects_tampering(tmp_path):
    from sqlalchemy import update

    from voxelflow.core import audit
    from voxelflow.core.db import audit_log, connect
    from voxelflow.spec.config import Settings

    db = connect(Settings(home=tmp_path).database)
    audit.append(db, "model.promoted", "tester", version="1")
    audit.append(db, "model.promoted", "tester", version="2")
    env = {**os.environ, "VOXELFLOW_HOME": str(tmp_path)}
    assert run_cli(["voxelflow", "audit", "verify"], env).returncode == 0
    with db.transaction() as conn:
        conn.execute(update(audit_log).where(audit_log.c.seq == 0).values(details='{"version": "9"}'))
    proc = run_cli(["voxelflow", "audit", "verify"], env)
    assert proc.returncode == 1 and "record 0" in proc.stderr


def test_ingest_and_ledger_as_json(tmp_path):
    """Counts in objects: arrived = ingested + duplicate + quarantined; a quarantine still exits 0."""
    import json

    from voxelflow.data.synthetic import make_decathlon

    src = make_decathlon(tmp_path / "incoming", n_cases=4, size=16)
    (src / "imagesTr" / "synth_001.nii.gz").write_bytes(b"not a volume")  # that case is quarantined
    env = {**os.environ, "VOXELFLOW_HOME": str(tmp_path / "home")}
    proc = run_cli(["voxelflow", "ingest", str(src), "--json"], env)
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (first["arrived"], first["ingested"], first["duplicate"], first["quarantined"]) == (8, 6, 0, 2)
    assert len(first["dataset_digest"]) == 16
    again = json.loads(run_cli(["voxelflow", "ingest", str(src), "--json"], env).stdout.strip().splitlines()[-1])
    assert (again["arrived"], again["already_seen"], again["dataset_digest"]) == (0, 8, first["dataset_digest"])

    rows = json.loads(run_cli(["voxelflow", "ledger", "--json"], env).stdout)
    assert len(rows) == 8 and {r["state"] for r in rows} == {"ingested", "quarantined"}
    quarantined = json.loads(run_cli(["voxelflow", "ledger", "--json", "--state", "quarantined"], env).stdout)
    assert len(quarantined) == 2 and {r["reason"] for r in quarantined} == {"unreadable"}
    bad = run_cli(["voxelflow", "ledger", "--state", "lost"], env)
    assert bad.returncode == 2 and "--state" in bad.stderr
    missing = run_cli(["voxelflow", "ingest", str(tmp_path / "nowhere")], env)
    assert missing.returncode == 1 and "does not exist" in " ".join(missing.stderr.split())
