"""uvicorn for the inference service: which peers may name the client (trusted proxies), and a server thread."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Any

SETTING = "VOXELFLOW_SERVE_TRUSTED_PROXIES"


def trusted_networks(value: str) -> list[str]:
    """The comma-separated CIDRs (or addresses) of ``value`` as networks; a bad entry names the setting."""
    networks = []
    for item in (part.strip() for part in (value or "").split(",")):
        if not item:
            continue
        if item == "*":
            raise ValueError(f"{SETTING}: '*' would let any client choose the address it is throttled and "
                             "audited under; list the gateway's CIDRs")
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"{SETTING}: {item!r} is not a CIDR or an IP address") from None
    return networks


def proxy_options(trusted_proxies: str) -> dict[str, Any]:
    """uvicorn's proxy settings: ``X-Forwarded-For`` counts only from a peer in ``trusted_proxies``.

    With none listed the header is ignored from every peer, 127.0.0.1 included (uvicorn's own
    default trusts 127.0.0.1, so it is always passed explicitly).
    """
    networks = trusted_networks(trusted_proxies)
    return {"proxy_headers": bool(networks), "forwarded_allow_ips": networks}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a background thread, for the lifecycle's smoke test and the tests."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, trusted_proxies: str = "") -> None:
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        # log_config=None: uvicorn's own (a dictConfig) would close every handler the process has, among them
        # Prefect's API log handler in a flow run, whose close waited about 5 s for its queue in the deploy stage
        self._server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning",
                                                     log_config=None,
                                                     **proxy_options(trusted_proxies)))
        self._thread = threading.Thread(target=self._server.run, name="voxelflow-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"inference service did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
