"""Promotion that fails safe: registry errors raise, retries do not register twice, the champion moves by CAS."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from voxelflow.release import registry
from voxelflow.spec.config import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def mlflow_home(tmp_path):
    return Settings(home=tmp_path / "home", mlflow_tracking_uri=None)


def new_candidate(settings, spec, config, weights) -> tuple[str, str]:
    run_id = registry.start_run(settings.tracking_uri, settings.artifact_root, spec, {"dataset_digest": "d" * 16})
    return run_id, registry.log_model(settings.tracking_uri, run_id, config, weights)


# ---------------------------------------------------------------- failures are failures


def test_an_unreachable_registry_raises_instead_of_meaning_no_champion(monkeypatch, tmp_path):
    import socket

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(registry.RegistryError, match="cannot read m@champion"):
        registry.alias_version(f"http://127.0.0.1:{port}", "m")


class Failing(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = json.dumps({"error_code": "INTERNAL_ERROR", "message": "database unavailable"}).encode()
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_registry_that_errors_raises_after_retries(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(registry.RegistryError, match="database unavailable|500"):
            registry.alias_version(f"http://127.0.0.1:{server.server_address[1]}", "m")
    finally:
        server.shutdown()


def test_only_a_missing_model_or_alias_means_no_champion(mlflow_home, tiny_spec, tiny_model_config, tiny_weights):
    uri = mlflow_home.tracking_uri
    assert registry.alias_version(uri, "never-registered") is None
    run_id, model_uri = new_candidate(mlflow_home, tiny_spec, tiny_model_config, tiny_weights[0])
    registry.register(uri, model_uri, "m", run_id, {})
    assert registry.alias_version(uri, "m") is None  # registered, no champion yet


# ---------------------------------------------------------------- idempotent, CAS


def test_a_retried_registration_finds_its_version(mlflow_home, tiny_spec, tiny_model_config, tiny_weights):
    uri = mlflow_home.tracking_uri
    run_id, model_uri = new_candidate(mlflow_home, tiny_spec, tiny_model_config, tiny_weights[0])
    first = registry.register(uri, model_uri, "m", run_id, {"dataset_digest": "d" * 16})
    again = registry.register(uri, model_uri, "m", run_id, {"dataset_digest": "d" * 16})
    assert first == again == "1"
    assert len(registry.client(uri).search_model_versions("name = 'm'")) == 1
    assert registry.alias_version(uri, "m", registry.CHALLENGER) == "1"
    other_run, other_uri = new_candidate(mlflow_home, tiny_spec, tiny_model_config, tiny_weights[1])
    assert registry.register(uri, other_uri, "m", other_run, {}) == "2"
    assert registry.alias_version(uri, "m", registry.CHALLENGER) == "2"


def test_champion_moves_only_from_the_version_compared_with(mlflow_home, tiny_spec, tiny_model_config, tiny_weights):
    uri = mlflow_home.tracking_uri
    versions = []
    for w in tiny_weights:
        run_id, model_uri = new_candidate(mlflow_home, tiny_spec, tiny_model_config, w)
        versions.append(registry.register(uri, model_uri, "m", run_id, {}))
    assert registry.promote(uri, "m", versions[0], expected=None, check=True) is None
    with pytest.raises(registry.ChampionMoved) as moved:
        registry.promote(uri, "m", versions[1], expected=None, check=True)  # compared with "no champion"
    assert moved.value.current == "1"
    assert registry.alias_version(uri, "m") == "1"
    assert registry.promote(uri, "m", versions[1], expected="1", check=True) == "1"
    assert (registry.alias_version(uri, "m"), registry.alias_version(uri, "m", registry.PREVIOUS)) == ("2", "1")


# ---------------------------------------------------------------- two lifecycles racing

RACER = r"""
import json, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/src"]
from pathlib import Path
from voxelflow.release import registry
from voxelflow.spec.config import Settings, load_spec
from voxelflow.pipeline import Context, Evaluation, TrainOutcome, register_stage
home, dice, start_at = Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
spec = load_spec(Path(sys.argv[1]) / "deployments/specs/demo.yaml", sets=["promote.gates.min_dice=0.1"])
ctx = Context(Settings(home=home), spec.name)
weights_key = sys.argv[5]
config = json.loads(Path(sys.argv[6]).read_text())
run_id = registry.start_run(ctx.tracking_uri, ctx.settings.artifact_root, spec, {"dataset_digest": "d" * 16})
outcome = TrainOutcome(weights_key, config, [], 0, 0.0, None, "")
cases = [f"case-{i}" for i in range(6)]
evaluation = Evaluation({"dice": dice}, None, None, "", cases, ["dice"], 2,  # both saw no champion
                        candidate_cases={"dice": dict.fromkeys(cases, dice)})

def rescore(ctx, name, version, ev):  # the champion that appeared meanwhile, scored by its own record
    mv = registry.client(ctx.tracking_uri).get_model_version(name, version)
    return {"dice": dict.fromkeys(cases, float(mv.tags["voxelflow.val_dice"]))}

while time.time() < start_at:
    time.sleep(0.005)
tags = {"pipeline": spec.name, "dataset_digest": "d" * 16, "spec_digest": spec.digest()}
p = register_stage(spec.promote, ctx, run_id, outcome, evaluation, tags, rescore=rescore)
print(json.dumps({"dice": dice, "version": p.version, "promoted": p.promoted, "reasons": p.reasons}))
"""


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback, with its own SQLite store and artifact folder."""
    import socket

    from tests.services import stop, wait_until

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "mlflow-server.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        import httpx

        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 120, "mlflow server", proc, log)
        yield url
    finally:
        stop(proc)


@pytest.mark.parametrize("tracking", ["sqlite", "mlflow-server"])
def test_two_lifecycles_racing_leave_the_better_model_champion(tmp_path, tiny_model_config, tiny_weights, tracking,
                                                               request):
    import os
    import time

    from voxelflow.pipeline import Context, ensure_tracking

    home = tmp_path / "home"
    env = dict(os.environ)
    if tracking == "mlflow-server":  # every racer talks to one tracking server over HTTP
        env["VOXELFLOW_MLFLOW_TRACKING_URI"] = request.getfixturevalue("mlflow_server")
    ctx = Context(Settings(home=home, mlflow_tracking_uri=env.get("VOXELFLOW_MLFLOW_TRACKING_URI")), "demo-spheres")
    ctx.store.write_bytes("models/w.safetensors", tiny_weights[0])
    (tmp_path / "config.json").write_text(json.dumps(tiny_model_config))
    ensure_tracking(ctx)
    races = [(0.70, 0.90), (0.95, 0.80)] if tracking == "sqlite" else [(0.95, 0.80)]
    for dices in races:  # who wins the race differs; the outcome must not
        start = time.time() + 5
        procs = [subprocess.Popen([sys.executable, "-c", RACER, str(REPO), str(home), str(d), str(start),
                                   "models/w.safetensors", str(tmp_path / "config.json")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for d in dices]
        outs = [p.communicate(timeout=240) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    uri, name = ctx.tracking_uri, "demo-spheres"
    assert uri.startswith("http://") == (tracking == "mlflow-server")
    mc = registry.client(uri)
    versions = mc.search_model_versions(f"name = '{name}'")
    assert len(versions) == 2 * len(races)  # one per candidate, none twice
    by_dice = {float(v.tags["voxelflow.val_dice"]): str(v.version) for v in versions}
    assert registry.alias_version(uri, name) == by_dice[0.95]  # the best of them all
    assert {r["dice"] for r in results} == {0.95, 0.80}
    for v in versions:  # every decision is recorded on its version
        assert v.tags["voxelflow.decision"] in ("promoted", "rejected")
