"""benchmarks/serve.py's saturation client (RawClient) against a real HTTP/1.1 server on loopback: every answer read
whole on one keep-alive connection, a body larger than its buffer, the status as sent, a closed connection reopened."""

from __future__ import annotations

import http.server
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from serve import RawClient  # noqa: E402


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
