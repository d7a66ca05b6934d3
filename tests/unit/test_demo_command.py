"""`voxelflow demo --cases N`: fewer cases than the demo spec's split and gates need are refused before anything is
made; `--data-only` makes any number."""

from __future__ import annotations

import os

from typer.testing import CliRunner

from flows.cli import DEMO_MIN_CASES, app


def test_too_few_cases_for_the_lifecycle_are_refused_before_anything_is_made(tmp_path):
    env = {**os.environ, "VOXELFLOW_HOME": str(tmp_path / "home")}
    result = CliRunner().invoke(app, ["demo", "--cases", str(DEMO_MIN_CASES - 8)], env=env)
    assert result.exit_code == 2, result.output
    assert "at least 12 cases" in result.output and "--data-only" in result.output
    assert not (tmp_path / "home").exists()  # nothing synthesized, nothing half-made

    made = CliRunner().invoke(app, ["demo", "--cases", "4", "--data-only"], env=env)
    assert made.exit_code == 0, made.output
    assert len(list((tmp_path / "home" / "incoming" / "imagesTr").glob("*.nii.gz"))) == 4
