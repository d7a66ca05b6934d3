"""The service behind a gateway, on a real uvicorn on 127.0.0.1: X-Forwarded-For counts only from a
trusted proxy, failed requests are throttled per client after the key lookup, a valid key is never
refused for other requests' failures, and the throttles' bucket maps stay bounded."""

from __future__ import annotations

import httpx
import pytest

from voxelflow.core import audit
from voxelflow.serving.serve import KeyStore, ModelHolder, Server, Throttle, create_app, proxy_options

BAD = 300


class Quick:
    """A segmenter that answers at once: these tests are about who gets in, not about masks."""

    def segment(self, volume, affine):
        return (volume > 0.5).astype("uint8")


@pytest.fixture
def app_and_keys(db):
    keys = KeyStore(db)
    holder = ModelHolder(lambda: (Quick(), "1"))
    holder.reload()
    return create_app(holder, keys, db=db, failed_rate=0.01), keys  # no token comes back during a test


def bad_key_flood(http: httpx.Client, headers: dict[str, str] | None = None) -> list[int]:
    return [http.get("/v1/model", headers={"X-API-Key": f"vf_guess-{i}", **(headers or {})}).status_code
            for i in range(BAD)]


def test_behind_a_trusted_proxy_one_clients_bad_keys_do_not_lock_out_another(app_and_keys):
    app, keys = app_and_keys
    valid = keys.create("clinic-b", ["viewer"])
    with Server(app, trusted_proxies="127.0.0.1/32") as server, httpx.Client(base_url=server.url) as http:
        statuses = bad_key_flood(http, {"X-Forwarded-For": "203.0.113.7"})  # client A, through the gateway
        assert statuses[:10] == [401] * 10 and statuses[-1] == 429  # A is throttled ...
        b = {"X-Forwarded-For": "198.51.100.9"}
        assert http.get("/v1/model", headers={"X-API-Key": valid, **b}).status_code == 200  # ... B is not
        assert http.get("/v1/model", headers={"X-API-Key": "vf_wrong", **b}).status_code == 401  # nor B's failures
    actors = {e["actor"] for e in audit.entries(keys.db)}
    assert actors == {"203.0.113.7", "198.51.100.9"}  # denials name the client, not the gateway


def test_from_one_address_without_a_proxy_a_valid_key_still_gets_in_after_300_bad_ones(app_and_keys):
    app, keys = app_and_keys
    valid = keys.create("clinic", ["viewer"])
    with Server(app) as server, httpx.Client(base_url=server.url) as http:
        statuses = bad_key_flood(http)
        assert set(statuses[10:]) == {429}  # the failures of this address are throttled
        response = http.get("/v1/model", headers={"X-API-Key": valid})
        assert response.status_code == 200 and response.json()["version"] == "1"
        assert http.get("/v1/model", headers={"X-API-Key": "vf_wrong"}).status_code == 429  # still cooling down


@pytest.mark.parametrize("trusted", ["", "10.0.0.0/8"])
def test_an_untrusted_peers_x_forwarded_for_is_ignored(app_and_keys, trusted):
    """A local client cannot choose the address it is throttled under by sending X-Forwarded-For."""
    app, keys = app_and_keys
    with Server(app, trusted_proxies=trusted) as server, httpx.Client(base_url=server.url) as http:
        statuses = [http.get("/v1/model", headers={"X-API-Key": "vf_guess", "X-Forwarded-For": f"192.0.2.{i % 250}"})
                    .status_code for i in range(40)]
    assert statuses[:10] == [401] * 10 and set(statuses[10:]) == {429}  # all counted against 127.0.0.1
    assert {e["actor"] for e in audit.entries(keys.db)} == {"127.0.0.1"}


def test_the_bucket_map_stays_under_its_bound_after_100000_addresses():
    throttle = Throttle(rate=1.0, burst=1, max_callers=1000)
    for i in range(100_000):
        assert throttle.allow(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}") == 0.0
        assert len(throttle) <= 1000
    assert throttle.allow("10.1.134.159") > 0  # the most recent callers are remembered (address 99999)
    assert throttle.allow("10.0.0.0") == 0.0  # the oldest were forgotten


def test_the_bucket_maps_size_is_a_metric(db):
    keys = KeyStore(db)
    holder = ModelHolder(lambda: (Quick(), "1"))
    holder.reload()
    viewer = keys.create("prometheus", ["viewer"])
    app = create_app(holder, keys, db=db, failed_rate=0.01, max_clients=50)
    with Server(app, trusted_proxies="127.0.0.0/8") as server, httpx.Client(base_url=server.url) as http:
        for i in range(120):
            http.get("/v1/model", headers={"X-API-Key": "vf_guess", "X-Forwarded-For": f"192.0.2.{i}"})
        text = http.get("/metrics", headers={"X-API-Key": viewer}).text
    assert 'voxelflow_throttle_buckets{kind="failed"} 50.0' in text
    assert 'voxelflow_throttle_buckets{kind="key"} 1.0' in text


def test_proxy_options_trust_nothing_by_default_and_name_the_setting_on_a_bad_cidr():
    assert proxy_options("") == {"proxy_headers": False, "forwarded_allow_ips": []}
    assert proxy_options(" 10.0.0.0/8, 192.168.1.5 ") == {"proxy_headers": True,
                                                          "forwarded_allow_ips": ["10.0.0.0/8", "192.168.1.5/32"]}
    with pytest.raises(ValueError, match="VOXELFLOW_SERVE_TRUSTED_PROXIES.*'10.0.0.300/8'"):
        proxy_options("10.0.0.300/8")
    with pytest.raises(ValueError, match="VOXELFLOW_SERVE_TRUSTED_PROXIES.*any client"):
        proxy_options("*")
