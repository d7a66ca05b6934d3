"""The demo spec on its three sides: its first model is promoted, and a clearly better second one
unseats it through the paired relative gate on the demo's test cases."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from tests.conftest import client_env, run_cli

pytestmark = pytest.mark.slow


def test_a_clearly_better_second_model_is_promoted_on_the_test_side(prefect_api, tmp_path):
    from voxelflow.learn import evaluate
    from voxelflow.release import registry
    from voxelflow.spec.config import Settings

    env = client_env(prefect_api, tmp_path)
    home = tmp_path / "home"
    proc = run_cli(["voxelflow", "demo", "--data-only"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weak = run_cli(["voxelflow", "run", "deployments/specs/demo.yaml", "--set", "train.epochs=2",
                    "--set", "promote.gates.min_dice=0.0"], env)
    assert weak.returncode == 0, weak.stdout[-3000:] + weak.stderr[-3000:]
    strong = run_cli(["voxelflow", "run", "deployments/specs/demo.yaml"], env)
    assert strong.returncode == 0, strong.stdout[-3000:] + strong.stderr[-3000:]

    uri = Settings(home=home).tracking_uri
    mc = registry.client(uri)
    assert registry.alias_version(uri, "demo-spheres") == "2"
    assert registry.alias_version(uri, "demo-spheres", registry.PREVIOUS) == "1"
    v2 = mc.get_model_version("demo-spheres", "2")
    gate = v2.tags["voxelflow.gate.vs_champion_dice"]
    assert gate.startswith("pass: ") and "on 3 test cases" in gate, gate
    with tempfile.TemporaryDirectory() as tmp:
        split = json.loads(Path(mc.download_artifacts(v2.run_id, "split.json", tmp)).read_text())
        scores = json.loads(Path(mc.download_artifacts(v2.run_id, "test-scores.json", tmp)).read_text())
    assert (split["train"], split["val"], split["test"]) == evaluate.sides(
        split["train"] + split["val"] + split["test"], 0.25, 0.25)
    assert set(scores["candidate"]["dice"]) == set(scores["champion"]["dice"]) == set(split["test"])
    assert all(scores["candidate"]["dice"][c] > scores["champion"]["dice"][c] for c in split["test"])
