"""Lifecycle primitives against the simulated API: start/stop/restart, confirmed destroy,
and a rent that records its intent before the call and registers the SSH key through the API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import async_wait_for
from vastd.core import state as st
from vastd.core.files import Layout
from vastd.core.ssh import SSHPool
from vastd.core.state import InstanceRecord, InstanceStatus, StateStore
from vastd.instances import lifecycle as lc
from vastd.instances.provider import Offer
from vastd.instances.vast_api import VastClient
from vastd.instances.vast_provider import offer_from_dict
from vastd.orchestration import renting
from vastd.orchestration.context import Context, build_context
from vastd.sim.cluster import SimCluster
from vastd.utils.exceptions import VastAIError


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[SimCluster, Context]]:
    """A simulated account (hosts boot in 0.1 s) and a Context with an API client on it."""
    cluster = await SimCluster.start(tmp_path / "sim", n_offers=0, boot_delay_s=0.1)
    for i in range(3):
        cluster.cloud.add_offer(gpu_name="RTX 4090", dph_total=0.3 + i / 100, machine_id=900 + i)
    settings = cluster.settings(
        tmp_path / "vastd",
        fleet={"mode": "autoscale", "image": "sim/image", "disk_gb": 12, "bid_markup": 1.25},
    )
    layout = Layout(settings.paths.root)
    layout.ensure()
    store = StateStore.open(layout.state_file)
    api = VastClient(cluster.url, cluster.api_key, timeout_s=10, max_retries=1)
    ctx = build_context(settings, store=store, pool=SSHPool(settings.ssh), api=api)
    try:
        yield cluster, ctx
    finally:
        await ctx.aclose()
        await ctx.pool.aclose()
        await api.aclose()
        procs = [p for h in cluster.hosts.hosts.values() for p in h._procs]
        await cluster.aclose()
        await async_wait_for(lambda: all(p.returncode is not None for p in procs), 10)


def offer(cluster: SimCluster, index: int = 0) -> dict[str, Any]:
    return dict(sorted(cluster.cloud.offers.values(), key=lambda o: o["id"])[index])


def rentable(row: dict[str, Any]) -> Offer:
    """The offer as the provider hands it to the fleet (from the simulator's row)."""
    found = offer_from_dict(row)
    assert found is not None, row
    return found


async def test_terminate_destroys_and_confirms(env: tuple[SimCluster, Context]) -> None:
    """terminate destroys and confirms, and a second terminate of the gone instance is also
    confirmed."""
    cluster, ctx = env
    assert ctx.cloud is not None
    iid = await cluster.cloud.add_instance(label="vastd")
    assert await lc.terminate_instance(ctx.cloud, str(iid))
    assert iid not in cluster.cloud.instances
    assert await lc.terminate_instance(ctx.cloud, str(iid))


async def test_terminate_retries_a_failing_destroy_until_confirmed(
    env: tuple[SimCluster, Context],
) -> None:
    """Two HTTP 500 answers to DELETE, then success: terminate_instance retries (with back-off)
    and returns True only once the API no longer shows the instance; one attempt is False."""
    cluster, ctx = env
    assert ctx.cloud is not None
    iid = await cluster.cloud.add_instance(label="vastd")
    cluster.cloud.faults.add(endpoint="destroy", status=500, count=2)
    assert not await lc.terminate_instance(ctx.cloud, str(iid), attempts=1)
    assert await lc.terminate_instance(ctx.cloud, str(iid), attempts=3, backoff_s=0.01)
    assert iid not in cluster.cloud.instances
    statuses = [c["status"] for c in cluster.cloud.calls if c["endpoint"] == "destroy"]
    assert statuses == [500, 500, 200]


async def test_rent_saves_intent_before_the_call_and_attaches_the_key(
    env: tuple[SimCluster, Context],
) -> None:
    """The intent is on disk while the PUT is in flight; afterwards the owned BOOTING record is
    saved, the intent removed, the instance carries the label, image, disk and VASTD_INTENT,
    and the public key (never the API key) is attached through the API."""
    cluster, ctx = env
    cluster.cloud.faults.add(endpoint="rent", status=None, delay_s=0.5)
    rent = asyncio.create_task(renting.rent_instance(ctx, rentable(offer(cluster))))

    def intent_on_disk() -> bool:
        if not ctx.layout.state_file.exists():
            return False
        return bool(json.loads(ctx.layout.state_file.read_text())["rent_intents"])

    await async_wait_for(intent_on_disk, 5)
    assert cluster.cloud.instances == {}  # the PUT has not been answered yet
    inst = await rent
    row = cluster.cloud.instances[int(inst.id)]
    assert inst.owned and inst.status is InstanceStatus.BOOTING and inst.booting_since
    assert inst.dph == pytest.approx(0.3) and inst.machine_id == 900
    saved = json.loads(ctx.layout.state_file.read_text())
    assert saved["rent_intents"] == {} and saved["instances"][inst.id]["owned"]
    assert row["label"] == "vastd" and row["image_uuid"] == "sim/image"
    assert row["disk_space"] == 12 and not row["is_bid"]
    assert row["extra_env"] == [["VASTD_INTENT", inst.intent_id]]
    assert cluster.cloud.ssh_keys[int(inst.id)] == [cluster.public_key]
    assert inst.ssh_key_attached
    assert cluster.api_key not in json.dumps(row)


async def test_interruptible_rent_bids_min_bid_times_markup(
    env: tuple[SimCluster, Context],
) -> None:
    """With interruptible = true the rent carries a price of min_bid x bid_markup."""
    cluster, ctx = env
    ctx.settings.fleet.interruptible = True
    chosen = offer(cluster, 1)
    inst = await renting.rent_instance(ctx, rentable(chosen))
    row = cluster.cloud.instances[int(inst.id)]
    assert row["is_bid"] and row["dph_total"] == pytest.approx(chosen["min_bid"] * 1.25)
    assert inst.dph == pytest.approx(chosen["min_bid"] * 1.25)


async def test_refused_rent_drops_its_intent(env: tuple[SimCluster, Context]) -> None:
    """A rent the API refuses (HTTP 400: the offer is gone) raises and leaves no intent."""
    cluster, ctx = env
    gone = offer(cluster)
    cluster.cloud.offers[gone["id"]]["rented"] = True
    with pytest.raises(VastAIError):
        await renting.rent_instance(ctx, rentable(gone))
    assert ctx.store.snapshot.rent_intents == {}
    assert cluster.cloud.instances == {}


async def test_ambiguous_rent_failure_keeps_its_intent(env: tuple[SimCluster, Context]) -> None:
    """A 500 after the instance was created raises but keeps the intent for reconciliation."""
    cluster, ctx = env
    cluster.cloud.faults.add(endpoint="rent", status=500, after_effect=True)
    with pytest.raises(VastAIError):
        await renting.rent_instance(ctx, rentable(offer(cluster)))
    (intent,) = ctx.store.snapshot.rent_intents.values()
    assert intent["machine_id"] == 900 and len(cluster.cloud.instances) == 1


async def test_attached_key_reaches_a_running_sim_host(env: tuple[SimCluster, Context]) -> None:
    """A key attached through the API to a running instance is authorized on its SSH host."""
    cluster, ctx = env
    assert ctx.cloud is not None
    iid = await cluster.cloud.add_instance(label="vastd")
    await ctx.cloud.attach_ssh_key(str(iid), "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample extra")
    assert any("extra" in k for k in cluster.hosts.get(iid).authorized_keys)


async def test_instances_not_owned_are_never_destroyed(env: tuple[SimCluster, Context]) -> None:
    """The teardown step refuses an instance vastd did not rent, even a drained one; an
    owned one is destroyed and confirmed."""
    cluster, ctx = env
    iid = await cluster.cloud.add_instance(label="vastd")
    inst = InstanceRecord(id=str(iid), label="vastd", status=InstanceStatus.READY)
    ctx.store.instances[inst.id] = inst
    assert not renting.cleanup_failed_instance(ctx, inst, "requested", block=False)
    assert iid in cluster.cloud.instances and inst.status is InstanceStatus.READY
    st.drain_instance(ctx.store, inst, "requested", requeue_jobs=False)
    assert not renting.cleanup_failed_instance(ctx, inst, "requested", block=False)
    assert iid in cluster.cloud.instances and inst.status is InstanceStatus.DRAINING
    inst.owned = True
    assert renting.cleanup_failed_instance(ctx, inst, "requested", block=False)
    assert await renting.confirm_destroy(ctx, inst)
    assert iid not in cluster.cloud.instances and inst.status is InstanceStatus.DESTROYED
