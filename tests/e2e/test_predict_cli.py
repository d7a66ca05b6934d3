"""`voxelflow predict SOURCE --out DEST`: real NIfTI files (one of them truncated), the tiny model registered
in MLflow on SQLite (tests/unit/test_predict.py makes it once per session), masks and volumes.csv written, a
rerun that skips, and bad requests refused with one line before anything is written.

The command runs in this process (typer's CliRunner: the same code, arguments, environment, exit codes and
output streams): a fresh process would spend most of the test importing MONAI. That the console script
knows the command is checked in a subprocess, which imports nothing heavy to answer --help.
"""

from __future__ import annotations

import csv
import io
import json
import os

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import run_cli
from tests.unit.test_predict import MODEL, make_source, spec_data, tiny_registry


@pytest.fixture
def setup(tmp_path_factory, tmp_path):
    uri = tiny_registry(tmp_path_factory)
    source = make_source(tmp_path / "incoming", (False, True, False))
    (source / "patient_03").mkdir()
    full = (source / "patient_00" / "image.nii.gz").read_bytes()
    (source / "patient_03" / "image.nii.gz").write_bytes(full[: len(full) // 2])  # truncated: quarantined
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_data("cli-predict", source)))
    env = {**os.environ, "VOXELFLOW_HOME": str(tmp_path / "home"), "VOXELFLOW_MLFLOW_TRACKING_URI": uri}
    return source, spec, env, tmp_path / "masks"


def test_the_console_script_has_the_command():
    proc = run_cli(["voxelflow", "predict", "--help"], dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "--out" in proc.stdout and "NAME@ALIAS" in proc.stdout


def test_predict_writes_masks_and_volumes_and_a_rerun_skips(setup):
    source, spec, env, dest = setup
    proc = CliRunner().invoke(app, ["predict", str(source), "--out", str(dest), "--spec", str(spec), "--json"],
                              env=env)
    assert proc.exit_code == 0, proc.output
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {k: counts[k] for k in ("version", "predicted", "skipped", "failed", "labelled", "quarantined")} == {
        "version": "1", "predicted": 2, "skipped": 0, "failed": 0, "labelled": 1, "quarantined": 1}
    assert "quarantined truncated" in proc.stdout and "label 1 (mL)" in proc.stdout
    assert "predict" in proc.stderr  # the progress bar
    folder = dest / f"{MODEL}-v1"
    rows = list(csv.DictReader(io.StringIO((folder / "volumes.csv").read_text())))
    assert len(rows) == 2 and all(float(r["label_1_ml"]) > 0 for r in rows)
    assert sorted(p.name for p in folder.glob("*.nii.gz")) == sorted(r["mask"] for r in rows)
    assert "patient" not in (folder / "volumes.csv").read_text()  # case ids, never source names

    again = CliRunner().invoke(app, ["predict", str(source), "--out", str(dest), "--spec", str(spec), "--json"],
                               env=env)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.strip().splitlines()[-1])["skipped"] == 2
    assert "0 segmented, 2 already segmented by version 1" in " ".join(again.stdout.split())


@pytest.mark.parametrize("args,code,message", [
    (["--model", f"{MODEL}@nightly"], 1, f"model '{MODEL}' has no 'nightly' alias yet"),
    (["--model", "two words"], 2, "expected NAME, NAME@ALIAS or NAME/VERSION"),
    (["--out", "{source}/masks"], 1, "lies inside the source"),
])
def test_bad_requests_fail_with_one_line_and_write_nothing(setup, args, code, message):
    source, spec, env, dest = setup
    args = [a.replace("{source}", str(source)) for a in args]
    out = ["--out", str(dest)] if "--out" not in args else []
    result = CliRunner().invoke(app, ["predict", str(source), *out, "--spec", str(spec), *args], env=env)
    assert result.exit_code == code, result.output
    assert message in " ".join(result.stderr.split())
    assert not dest.exists() and not (source / "masks").exists()
