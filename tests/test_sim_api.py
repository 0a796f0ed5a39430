"""The simulator's own behaviour: shapes, boot, status changes, faults, control surface."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from vastd.sim import SimCloud, start_sim_api
from vastd.sim.api import matches

KEY = "sim-test-key-42"
AUTH = {"Authorization": f"Bearer {KEY}"}


class FakeHosts:
    """A HostProvider that records starts and stops instead of running sshd."""

    def __init__(self) -> None:
        self.started: dict[int, list[str]] = {}
        self.stopped: list[int] = []
        self.live: set[int] = set()
        self.next_port = 40000

    async def start_host(self, instance_id: int, authorized_keys: list[str]) -> tuple[str, int]:
        self.started[instance_id] = list(authorized_keys)
        self.live.add(instance_id)
        self.next_port += 1
        return "127.0.0.1", self.next_port

    async def stop_host(self, instance_id: int) -> None:
        self.stopped.append(instance_id)
        self.live.discard(instance_id)


Sim = tuple[SimCloud, str, aiohttp.ClientSession, FakeHosts]


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    hosts = FakeHosts()
    cloud = SimCloud(
        api_key=KEY, boot_delay_s=0.1, host_provider=hosts, account_keys=["ssh-ed25519 ACCOUNT"]
    )
    runner, url = await start_sim_api(cloud)
    async with aiohttp.ClientSession(url, headers=AUTH) as http:
        yield cloud, url, http, hosts
    await runner.cleanup()
    await cloud.aclose()


async def call(http: aiohttp.ClientSession, method: str, path: str, **kw: Any) -> Any:
    async with http.request(method, path, **kw) as resp:
        resp.raise_for_status()
        return await resp.json()


async def test_content_type_is_exactly_application_json(sim: Sim) -> None:
    """Answers carry 'application/json' with no charset, as the vastai CLI demands."""
    _, _, http, _ = sim
    requests: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", "/api/v1/instances/", None),
        ("POST", "/api/v0/bundles/", {}),
        ("GET", "/api/v0/instances/1/?owner=me", None),
        ("DELETE", "/api/v0/instances/1/", {}),
    ]
    for method, path, body in requests:
        async with http.request(method, path, json=body) as resp:
            assert resp.headers["Content-Type"] == "application/json"


async def test_requests_need_the_bearer_key(sim: Sim) -> None:
    """No key or a wrong key gets 401; a key in the URL does not count."""
    _, url, _, _ = sim
    async with aiohttp.ClientSession(url) as anon:
        async with anon.get("/api/v1/instances/") as resp:
            assert resp.status == 401
        async with anon.get(f"/api/v1/instances/?api_key={KEY}") as resp:
            assert resp.status == 401
        async with anon.get("/api/v0/users/current", headers={"Authorization": "Bearer x"}) as r:
            assert r.status == 401
        async with anon.get("/_sim/stats") as resp:
            assert resp.status == 200


async def test_rented_instance_boots_null_loading_running(sim: Sim) -> None:
    """A rent creates an instance that goes null -> loading -> running with an endpoint."""
    cloud, _, http, hosts = sim
    offer_id = next(iter(cloud.offers))
    answer = await call(
        http, "PUT", f"/api/v0/asks/{offer_id}/", json={"image": "img", "disk": 20, "label": "v"}
    )
    assert answer["success"] is True
    instance_id = answer["new_contract"]
    row = (await call(http, "GET", f"/api/v0/instances/{instance_id}/?owner=me"))["instances"]
    assert row["actual_status"] is None and row["intended_status"] == "running"
    assert row["ssh_host"] is None
    seen: list[str | None] = [None]

    def running() -> bool:
        status = cloud.instances[instance_id]["actual_status"]
        if seen[-1] != status:
            seen.append(status)
        return bool(status == "running")

    await cloud.wait_for(running, timeout_s=5)
    assert seen == [None, "loading", "running"]
    row = cloud.instances[instance_id]
    port = hosts.next_port
    assert (row["ssh_host"], row["ssh_port"]) == ("127.0.0.1", port)
    assert row["ports"] == {"22/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
    assert hosts.started[instance_id] == ["ssh-ed25519 ACCOUNT"]
    assert row["label"] == "v" and row["disk_space"] == 20.0
    assert isinstance(row["start_date"], float) and row["extra_env"] == []
    assert cloud.offers[offer_id]["rented"] is True


async def test_status_changes_stop_and_restart_hosts(sim: Sim) -> None:
    """offline/exited stop the SSH host; running again starts one; stop/start via API."""
    cloud, _, http, hosts = sim
    instance_id = await cloud.add_instance(label="vastd")
    assert instance_id in hosts.live
    await cloud.set_status(instance_id, "offline")
    assert cloud.instances[instance_id]["actual_status"] == "offline"
    assert instance_id not in hosts.live
    await cloud.set_status(instance_id, "running")
    assert instance_id in hosts.live
    await cloud.set_status(instance_id, "unknown")  # no heartbeat: the host may still live
    assert instance_id in hosts.live
    await call(http, "PUT", f"/api/v0/instances/{instance_id}/", json={"state": "stopped"})
    row = cloud.instances[instance_id]
    assert row["actual_status"] == "stopped" and row["intended_status"] == "stopped"
    assert instance_id not in hosts.live
    await call(http, "PUT", f"/api/v0/instances/{instance_id}/", json={"state": "running"})
    await cloud.wait_for_status(instance_id, "running")
    assert instance_id in hosts.live


async def test_vanish_and_destroy(sim: Sim) -> None:
    """A vanished instance leaves every listing; destroy frees the offer and the host."""
    cloud, _, http, hosts = sim
    gone = await cloud.add_instance(label="vastd")
    kept = await cloud.add_instance(label="vastd")
    await cloud.vanish(gone)
    listed = await call(http, "GET", "/api/v1/instances/")
    assert [r["id"] for r in listed["instances"]] == [kept]
    shown = await call(http, "GET", f"/api/v0/instances/{gone}/?owner=me")
    assert shown == {"instances": None}
    assert gone in hosts.stopped
    offer_id = next(iter(cloud.offers))
    rented = await call(http, "PUT", f"/api/v0/asks/{offer_id}/", json={"image": "i"})
    await call(http, "DELETE", f"/api/v0/instances/{rented['new_contract']}/", json={})
    assert cloud.offers[offer_id]["rented"] is False
    assert cloud.stats["rent"] == 1 and cloud.stats["destroy"] == 1


async def test_attach_key_is_recorded(sim: Sim) -> None:
    """An attached key is kept on the instance and given to its host at the next boot."""
    cloud, _, http, hosts = sim
    instance_id = await cloud.add_instance()
    await call(
        http, "POST", f"/api/v0/instances/{instance_id}/ssh/", json={"ssh_key": "ssh-ed25519 K"}
    )
    assert cloud.ssh_keys[instance_id] == ["ssh-ed25519 K"]
    await call(http, "PUT", f"/api/v0/instances/reboot/{instance_id}/", json={})
    await cloud.wait_for_status(instance_id, "running")
    assert hosts.started[instance_id] == ["ssh-ed25519 ACCOUNT", "ssh-ed25519 K"]


async def test_listing_pages_filters_and_orders(sim: Sim) -> None:
    """v1 listing: label filters (incl. unlabelled), order_by desc, opaque next_token."""
    cloud, _, http, _ = sim
    ids = [await cloud.add_instance(label="a" if i % 2 else None) for i in range(30)]
    params = {
        "select_filters": json.dumps({"label": {"in": [None]}}),
        "order_by": json.dumps([{"col": "id", "dir": "desc"}]),
        "limit": "10",
    }
    first = await call(http, "GET", "/api/v1/instances/", params=params)
    assert first["total_instances"] == 15
    assert [r["id"] for r in first["instances"]] == sorted(ids[0::2], reverse=True)[:10]
    second = await call(
        http, "GET", "/api/v1/instances/", params={**params, "after_token": first["next_token"]}
    )
    assert [r["id"] for r in second["instances"]] == sorted(ids[0::2], reverse=True)[10:]
    assert second["next_token"] is None


async def test_deprecated_v0_listing_answers_empty(sim: Sim) -> None:
    """Like the real API since 2026, the v0 list answers an empty body."""
    _, _, http, _ = sim
    async with http.get("/api/v0/instances/") as resp:
        assert resp.status == 200 and await resp.read() == b""


async def test_offer_filters_accept_cli_string_values(sim: Sim) -> None:
    """Filter values arriving as strings are coerced to the field's type."""
    _, _, http, _ = sim
    body = {
        "verified": {"eq": True},
        "rentable": {"eq": "true"},
        "reliability": {"gt": "0.97"},
        "num_gpus": {"in": ["1", "2"]},
        "gpu_name": {"notin": ["A100 SXM4"]},
        "order": [["dph_total", "desc"]],
        "type": "on-demand",
        "limit": 5,
        "allocated_storage": 10.0,
    }
    offers = (await call(http, "POST", "/api/v0/bundles/", json=body))["offers"]
    assert 0 < len(offers) <= 5
    for o in offers:
        assert o["verified"] and o["reliability"] > 0.97 and o["num_gpus"] in (1, 2)
        assert o["gpu_name"] != "A100 SXM4"
    assert [o["dph_total"] for o in offers] == sorted(
        (o["dph_total"] for o in offers), reverse=True
    )
    bids = (await call(http, "POST", "/api/v0/bundles/", json={"type": "bid"}))["offers"]
    assert all(o["is_bid"] and o["dph_total"] == o["min_bid"] for o in bids)


def test_matches_operators() -> None:
    """Each filter operator compares as the API does, None never ordered."""
    row = {"a": 5, "s": "RTX 4090", "b": False, "n": None}
    assert matches(row, {"a": {"gte": "5", "lt": 6}, "s": {"eq": "RTX 4090"}})
    assert matches(row, {"b": {"eq": "false"}, "a": {"neq": 4}, "n": {"eq": None}})
    assert not matches(row, {"n": {"gt": 1}})
    assert not matches(row, {"s": {"in": ["RTX 3090"]}})
    assert matches(row, {"s": {"notin": ["RTX 3090"]}})
    with pytest.raises(ValueError, match="operator"):
        matches(row, {"a": {"like": 1}})


async def test_faults_count_down_and_switch_off(sim: Sim) -> None:
    """A counted fault fires N times then stops; an unlimited one until cleared."""
    cloud, _, http, _ = sim
    cloud.faults.add(endpoint="list_instances", status=503, count=2, retry_after="3")
    statuses = []
    for _ in range(3):
        async with http.get("/api/v1/instances/") as resp:
            statuses.append((resp.status, resp.headers.get("Retry-After")))
    assert statuses == [(503, "3"), (503, "3"), (200, None)]
    fault_id = cloud.faults.add(endpoint="*", method="DELETE", status=500, count=None)
    for _ in range(2):
        async with http.delete("/api/v0/instances/1/") as resp:
            assert resp.status == 500
    async with http.get("/api/v1/instances/") as resp:
        assert resp.status == 200  # method filter: GETs pass
    cloud.faults.remove(fault_id)
    async with http.delete("/api/v0/instances/1/") as resp:
        assert resp.status == 404
    cloud.faults.add(endpoint="list_instances", status=500, probability=0.0, count=None)
    async with http.get("/api/v1/instances/") as resp:
        assert resp.status == 200
    cloud.faults.clear()
    assert cloud.faults.list() == []


async def test_destroy_fails_n_times_then_succeeds(sim: Sim) -> None:
    """fail-N-then-succeed: the first destroys answer 500 and do nothing."""
    cloud, _, http, hosts = sim
    instance_id = await cloud.add_instance()
    cloud.faults.add(endpoint="destroy", status=500, count=2)
    for expected in (500, 500, 200):
        async with http.delete(f"/api/v0/instances/{instance_id}/", json={}) as resp:
            assert resp.status == expected
    assert instance_id not in cloud.instances and instance_id in hosts.stopped


async def test_rent_fault_after_effect_creates_the_instance(sim: Sim) -> None:
    """A rent fault with after_effect answers 500 although the instance exists."""
    cloud, _, http, _ = sim
    cloud.faults.add(endpoint="rent", status=500, after_effect=True)
    async with http.put(f"/api/v0/asks/{next(iter(cloud.offers))}/", json={"image": "i"}) as r:
        assert r.status == 500
    assert len(cloud.instances) == 1 and cloud.stats["rent"] == 1


async def test_malformed_body_faults(sim: Sim) -> None:
    """empty, html and wrong_shape bodies are served as asked."""
    cloud, _, http, _ = sim
    cloud.faults.add(endpoint="list_instances", status=200, body="empty")
    cloud.faults.add(endpoint="list_instances", status=200, body="html")
    cloud.faults.add(endpoint="list_instances", status=200, body="wrong_shape")
    async with http.get("/api/v1/instances/") as resp:
        assert await resp.read() == b""
    async with http.get("/api/v1/instances/") as resp:
        assert resp.content_type == "text/html"
    assert await call(http, "GET", "/api/v1/instances/") == {"instances": "x", "offers": "x"}


async def test_control_surface_over_http(sim: Sim) -> None:
    """Another process can add instances, set status, vanish, fault and read calls."""
    cloud, url, http, hosts = sim
    async with aiohttp.ClientSession(url) as ctl:  # no API key needed for /_sim/
        added = await call(ctl, "POST", "/_sim/instances", json={"label": "vastd"})
        instance_id = added["id"]
        assert cloud.instances[instance_id]["actual_status"] == "running"
        await call(
            ctl, "POST", f"/_sim/instances/{instance_id}/status", json={"actual_status": "exited"}
        )
        assert cloud.instances[instance_id]["actual_status"] == "exited"
        assert instance_id not in hosts.live
        fault = await call(ctl, "POST", "/_sim/faults", json={"endpoint": "rent", "status": 502})
        assert (await call(ctl, "GET", "/_sim/faults"))["faults"][0]["id"] == fault["id"]
        async with ctl.post("/_sim/faults", json={"nope": 1}) as resp:
            assert resp.status == 400
        await call(ctl, "DELETE", f"/_sim/faults/{fault['id']}")
        assert cloud.faults.list() == []
        offer = await call(ctl, "POST", "/_sim/offers", json={"gpu_name": "H100", "dph_total": 2})
        assert cloud.offers[offer["id"]]["gpu_name"] == "H100"
        await call(http, "GET", "/api/v1/instances/")
        calls = (await call(ctl, "GET", "/_sim/calls"))["calls"]
        assert calls[-1]["endpoint"] == "list_instances" and calls[-1]["status"] == 200
        stats = await call(ctl, "GET", "/_sim/stats")
        assert stats["GET list_instances"] == 1
        await call(ctl, "POST", f"/_sim/instances/{instance_id}/vanish")
        state = await call(ctl, "GET", "/_sim/state")
        assert state["instances"] == [] and len(state["offers"]) == len(cloud.offers)
        assert (await call(ctl, "DELETE", "/_sim/calls"))["calls"] == []


async def test_without_host_provider_instances_get_a_fake_endpoint() -> None:
    """With no provider a running instance still has a loopback endpoint."""
    cloud = SimCloud(boot_delay_s=0)
    try:
        instance_id = await cloud.add_instance()
        row = cloud.instances[instance_id]
        assert row["ssh_host"] == "127.0.0.1" and isinstance(row["ssh_port"], int)
    finally:
        await cloud.aclose()
