"""benchmarks/serve.py's saturation client (RawClient) against a real HTTP/1.1 server on loopback: every answer read
whole on one keep-alive connection, a body larger than its buffer, the status as sent, a closed connection reopened;
and its drift diagnostic (local_window_ratios): a machine that slows down for a while is taken out, a slow request
is not."""

from __future__ import annotations

import http.server
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from serve import RawClient, local_window_ratios, percentile  # noqa: E402


class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.connection not in Echo.connections:
            Echo.connections.append(self.connection)
        status = 200 if self.headers.get("X-API-Key") == "k" else 401
        answer = body * 3  # larger than what came, and than the client's first buffer
        self.send_response(status)
        self.send_header("Content-Length", str(len(answer)))
        if body.startswith(b"close"):
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Echo.connections = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_answers_are_read_whole_on_one_connection(server):
    body = bytes(range(256)) * 4096 * 3  # 3 MiB: its answer, 9 MiB, is past the first buffer
    client = RawClient(server, "/v1/segment", {"X-API-Key": "k", "Content-Type": "application/x-npy"}, body)
    try:
        assert [client.post() for _ in range(5)] == [200] * 5
        assert len(Echo.connections) == 1  # kept alive: no answer was left half read
    finally:
        client.close()
    refused = RawClient(server, "/v1/segment", {"X-API-Key": "wrong"}, b"x")
    assert refused.post() == 401
    refused.close()


def test_a_closed_connection_is_opened_again(server):
    client = RawClient(server, "/v1/segment", {"X-API-Key": "k"}, b"close me")
    assert [client.post() for _ in range(3)] == [200] * 3
    assert len(Echo.connections) == 3


def test_local_window_takes_out_a_drift_but_not_a_slow_request():
    # the machine runs 70 pairs at 50 ms, then 50 at 80 ms; HTTP costs 5 % more, and two requests 40 % more
    local = [0.050] * 70 + [0.080] * 50
    remote = [x * 1.05 for x in local]
    remote[20] = local[20] * 1.40
    remote[100] = local[100] * 1.40
    whole = percentile(remote, 0.99) / sorted(local)[len(local) // 2]
    assert whole > 1.6  # the drift alone fails a 1.3 goal over the whole run
    got = local_window_ratios(local, remote)
    assert got["http_p50"] == pytest.approx(1.05)
    assert got["in_process_p99"] == pytest.approx(1.0, abs=0.01)
    assert got["http_p99"] == pytest.approx(1.40)  # the slow requests are still the tail
