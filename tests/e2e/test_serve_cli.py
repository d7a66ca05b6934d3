"""`voxelflow serve` as users start it: HTTPS with a configured certificate, keys managed from the CLI."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time

import httpx
import pytest

from flows.server import free_port
from tests.conftest import BIN, run_cli


def self_signed(tmp_path):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_with_a_self_signed_certificate_and_keys_from_the_cli(tmp_path):
    cert, key = self_signed(tmp_path)
    env = {**os.environ, "VOXELFLOW_HOME": str(tmp_path / "home"), "VOXELFLOW_SERVE_TLS_CERT": str(cert),
           "VOXELFLOW_SERVE_TLS_KEY": str(key)}
    viewer = run_cli(["voxelflow", "keys", "create", "grafana", "--role", "viewer", "--expires", "30"], env)
    assert viewer.returncode == 0, viewer.stderr
    viewer_key = viewer.stdout.strip()
    listed = run_cli(["voxelflow", "keys", "list"], env)
    assert "grafana" in listed.stdout and "viewer" in listed.stdout and viewer_key not in listed.stdout
    port = free_port()
    proc = subprocess.Popen([str(BIN / "voxelflow"), "serve", "--port", str(port), "--model", "nothing-yet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                live = httpx.get(f"{url}/health/live", verify=str(cert), timeout=2)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"serve did not come up: {proc.stdout.read() if proc.poll() is not None else ''}")
                time.sleep(0.3)
        assert live.status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2)
        assert httpx.get(f"{url}/health/ready", verify=str(cert)).status_code == 503  # no model yet: not ready
        assert httpx.get(f"{url}/metrics", verify=str(cert)).status_code == 401
        assert httpx.get(f"{url}/metrics", verify=str(cert), headers={"X-API-Key": viewer_key}).status_code == 200
        revoked = run_cli(["voxelflow", "keys", "revoke", "grafana"], env)
        assert revoked.returncode == 0
        # revoked in another process: refused once the service re-reads its copy of the keys (within 5 s)
        refused_by = time.monotonic() + 8
        while (status := httpx.get(f"{url}/metrics", verify=str(cert),
                                   headers={"X-API-Key": viewer_key}).status_code) != 401:
            assert status == 200 and time.monotonic() < refused_by, f"a revoked key still answered {status}"
            time.sleep(0.25)
        assert run_cli(["voxelflow", "keys", "revoke", "grafana"], env).returncode == 1
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    # each request is one JSON line of the service's log, with the key's name and never the key
    output = proc.stdout.read()
    logged = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    requests = [r for r in logged if "request_id" in r]
    assert any(r["route"] == "/metrics" and r["status"] == 401 and r["key"] is None for r in requests), requests
    assert any(r["route"] == "/metrics" and r["status"] == 200 and r["key"] == "grafana" for r in requests)
    assert all(len(r["request_id"]) >= 8 and r["ms"] >= 0 for r in requests)
    assert viewer_key not in output and '"GET /metrics' not in output  # uvicorn's own access lines are off


def serving(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`voxelflow serve` (no model yet) on a free port of 127.0.0.1, once /health/live answers."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "voxelflow"), "serve", "--port", str(port), "--model", "nothing-yet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{url}/health/live", timeout=2)
            return proc, url
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"serve did not come up: {proc.stdout.read() if proc.poll() is not None else ''}")
            time.sleep(0.3)


@pytest.mark.parametrize("trusted", [None, "127.0.0.1/32"])
def test_x_forwarded_for_counts_only_from_the_trusted_proxies_setting(tmp_path, trusted):
    """Without VOXELFLOW_SERVE_TRUSTED_PROXIES a local client's X-Forwarded-For is ignored (uvicorn alone would
    trust 127.0.0.1), so rotating it does not escape the failed-request throttle; from a listed proxy it names
    the client, and each client has a bucket of its own."""
    env = {**os.environ, "VOXELFLOW_HOME": str(tmp_path / "home")}
    env.pop("VOXELFLOW_SERVE_TRUSTED_PROXIES", None)
    if trusted:
        env["VOXELFLOW_SERVE_TRUSTED_PROXIES"] = trusted
    proc, url = serving(env)
    try:
        statuses = [httpx.get(f"{url}/metrics", headers={"X-API-Key": "vf_guess",
                                                          "X-Forwarded-For": f"192.0.2.{i}"}).status_code
                    for i in range(40)]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    if trusted:
        assert set(statuses) == {401}, statuses  # 40 clients, one failure each
    else:
        assert 429 in statuses, statuses  # one client, 127.0.0.1, over its burst of 10


def test_a_bad_trusted_proxy_entry_is_refused_naming_the_setting(tmp_path):
    env = {**os.environ, "VOXELFLOW_HOME": str(tmp_path / "home"), "VOXELFLOW_SERVE_TRUSTED_PROXIES": "10.0.0.0/33"}
    out = run_cli(["voxelflow", "serve", "--model", "nothing-yet"], env)
    assert out.returncode == 1
    assert "VOXELFLOW_SERVE_TRUSTED_PROXIES" in out.stderr and "10.0.0.0/33" in out.stderr
