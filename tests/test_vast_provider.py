"""VastProvider against the simulator on 127.0.0.1: list, show, search, rent, destroy and more."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from vastd.core.ssh import Endpoint
from vastd.instances.provider import ApiState
from vastd.instances.vast_api import VastClient
from vastd.instances.vast_provider import INTENT_ENV, VastProvider
from vastd.sim import SimCloud, create_sim_app
from vastd.utils.exceptions import VastAIError

KEY = "test-secret-key-0123456789"


class Sim:
    """The simulated cloud and a provider talking to it."""

    def __init__(self, cloud: SimCloud, provider: VastProvider) -> None:
        self.cloud = cloud
        self.provider = provider


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    """The simulator's app and a provider talking to it."""
    cloud = SimCloud(api_key=KEY, boot_delay_s=0.02)
    app = create_sim_app(cloud)
    holder: list[Sim] = []
    runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    provider = VastProvider(VastClient(url, KEY, max_retries=0, timeout_s=5))
    holder.append(Sim(cloud, provider))
    yield holder[0]
    await provider.aclose()
    await runner.cleanup()
    await cloud.aclose()


async def test_list_returns_our_labelled_instances_in_neutral_form(sim: Sim) -> None:
    """Only `label`'s instances, with states mapped and endpoints as Endpoints."""
    ours = await sim.cloud.add_instance(label="vastd")
    lost = await sim.cloud.add_instance(label="vastd", actual_status="offline")
    await sim.cloud.add_instance(label="someone-else")
    listed = await sim.provider.list_instances("vastd")
    assert [i.id for i in listed] == [str(ours), str(lost)]
    running, gone = listed
    assert running.state is ApiState.RUNNING and running.raw_status == "running"
    assert running.direct is not None and running.proxy is not None
    assert isinstance(running.direct, Endpoint) and running.dph is not None
    assert gone.state is ApiState.GONE and gone.raw_status == "offline"
    assert len(await sim.provider.list_instances(None)) == 3


async def test_search_rent_show_destroy_round_trip(sim: Sim) -> None:
    """Rent the cheapest offer tagged with an intent; it boots; destroy; it is gone."""
    offers = await sim.provider.search_offers("", order="dph_total", limit=5, disk_gb=20)
    assert 0 < len(offers) <= 5
    assert [o.dph for o in offers] == sorted(o.dph for o in offers)
    offer = offers[0]
    new_id = await sim.provider.rent(
        offer, image="vastai/base", disk_gb=20, label="vastd", intent="intent-42"
    )
    [call] = [c for c in sim.cloud.calls if c["endpoint"] == "rent"]
    assert call["path"] == f"/api/v0/asks/{offer.id}/"
    row = sim.cloud.instances[int(new_id)]
    assert row["extra_env"] == [[INTENT_ENV, "intent-42"]] and row["is_bid"] is False

    shown = await sim.provider.show_instance(new_id)
    assert shown is not None and shown.intent == "intent-42" and shown.label == "vastd"
    assert shown.machine_id == offer.machine_id and shown.dph == offer.dph
    await sim.cloud.wait_for_status(int(new_id), "running")
    shown = await sim.provider.show_instance(new_id)
    assert shown is not None and shown.state is ApiState.RUNNING and shown.endpoints

    assert await sim.provider.destroy(new_id) is True
    assert await sim.provider.show_instance(new_id) is None
    assert await sim.provider.destroy(new_id) is False  # already gone: a 404, not an error
    assert await sim.provider.list_instances("vastd") == []


async def test_an_interruptible_rent_bids_and_a_bid_can_change(sim: Sim) -> None:
    """A bid search prices offers at the minimum bid; the rent carries the bid; set_bid."""
    [offer] = await sim.provider.search_offers(
        "", order="dph_total", limit=1, disk_gb=10, interruptible=True
    )
    assert offer.min_bid is not None and offer.dph == offer.min_bid
    bid = round(offer.dph * 1.2, 4)
    new_id = await sim.provider.rent(
        offer, image="img", disk_gb=10, label="vastd", intent="i", bid_dph=bid
    )
    shown = await sim.provider.show_instance(new_id)
    assert shown is not None and shown.interruptible and shown.dph == bid
    await sim.provider.set_bid(new_id, 0.5)
    [call] = [c for c in sim.cloud.calls if c["endpoint"] == "set_bid"]
    assert call["method"] == "PUT" and call["path"] == f"/api/v0/instances/bid_price/{new_id}/"
    assert call["status"] == 200 and sim.cloud.instances[int(new_id)]["dph_total"] == 0.5
    with pytest.raises(ValueError, match="bid"):
        await sim.provider.set_bid(new_id, float("nan"))
    with pytest.raises(ValueError, match="bid_dph"):
        await sim.provider.rent(
            offer, image="img", disk_gb=10, label="vastd", intent="i", bid_dph=float("inf")
        )


async def test_offers_with_nan_prices_are_skipped(sim: Sim) -> None:
    """A NaN price survives the JSON round trip; the provider drops that offer, logged.
    A price of 0 is no price either (rented, it would count as free in the budget)."""
    bad = sim.cloud.add_offer(dph_total=float("nan"), gpu_name="NaN GPU")
    free = sim.cloud.add_offer(dph_total=0.0, gpu_name="Free GPU")
    sim.cloud.add_offer(dph_total=0.01, min_bid=float("inf"), gpu_name="Cheap GPU")
    with capture_logs() as logs:
        offers = await sim.provider.search_offers("", order="dph_total", limit=100, disk_gb=10)
    assert {str(bad), str(free)}.isdisjoint({o.id for o in offers})
    [cheap] = [o for o in offers if o.gpu_name == "Cheap GPU"]
    assert cheap.min_bid is None and cheap.dph == 0.01
    assert sorted(e["offer"] for e in logs if e["event"] == "offer_skipped") == [bad, free]


@pytest.mark.parametrize("field", ["dph_total", "num_gpus", "machine_id"])
async def test_an_integer_past_float_range_is_a_rejected_field_not_a_crash(
    sim: Sim, field: str
) -> None:
    """JSON integers have no size limit and float(10**400) raises OverflowError: such a
    field is rejected (None, logged) and the rest of the row and of the answer is used."""
    first = await sim.cloud.add_instance(label="vastd")
    second = await sim.cloud.add_instance(label="vastd")
    rows = await sim.provider.client.list_instances("vastd")
    bad = {**rows[0], field: 10**400}
    sim.cloud.faults.add(
        endpoint="list_instances", status=200, json_body={"instances": [bad, rows[1]]}
    )
    with capture_logs() as logs:
        one, two = await sim.provider.list_instances("vastd")
    assert (one.id, two.id) == (str(first), str(second))
    assert one.state is ApiState.RUNNING and one.proxy is not None
    wanted = {"dph_total": one.dph, "num_gpus": one.num_gpus, "machine_id": one.machine_id}
    assert wanted[field] is None
    assert two.dph is not None and two.num_gpus is not None and two.machine_id is not None
    assert [e["field"] for e in logs if e["event"] == "api_number_rejected"] == [field]

    offers = await sim.provider.client.search_offers("", limit=3)
    sim.cloud.faults.add(
        endpoint="search_offers",
        status=200,
        json_body={"offers": [{**o, field: 10**400} for o in offers[:2]] + offers[2:]},
    )
    got = await sim.provider.search_offers("", order="dph_total", limit=3, disk_gb=10)
    if field == "dph_total":  # no usable price: skipped
        assert [o.id for o in got] == [str(o["id"]) for o in offers[2:]]
    else:
        assert len(got) == 3 and getattr(got[0], field) is None


async def test_ssh_key_start_and_reboot_reach_the_instance(sim: Sim) -> None:
    """attach_ssh_key registers the key; a stopped instance starts again; reboot re-boots."""
    iid = await sim.cloud.add_instance(label="vastd")
    await sim.provider.attach_ssh_key(str(iid), "ssh-ed25519 AAAA test\n")
    assert sim.cloud.ssh_keys[iid] == ["ssh-ed25519 AAAA test"]

    await sim.provider.client.stop_instance(iid)
    shown = await sim.provider.show_instance(str(iid))
    assert shown is not None and shown.state is ApiState.STOPPED
    await sim.provider.start(str(iid))
    await sim.cloud.wait_for_status(iid, "running")

    await sim.provider.reboot(str(iid))
    shown = await sim.provider.show_instance(str(iid))
    assert shown is not None and shown.raw_status in ("rebooting", "loading", "running")
    assert shown.state in (ApiState.PENDING, ApiState.RUNNING)
    await sim.cloud.wait_for_status(iid, "running")


async def test_errors_stay_vast_errors_and_bad_ids_are_refused(sim: Sim) -> None:
    """A refused call raises VastAIError with its status; a non-numeric id is a ValueError."""
    offer = (await sim.provider.search_offers("", order="dph_total", limit=1, disk_gb=10))[0]
    await sim.provider.rent(offer, image="img", disk_gb=10, label="vastd", intent="a")
    with pytest.raises(VastAIError) as refused:
        await sim.provider.rent(offer, image="img", disk_gb=10, label="vastd", intent="b")
    assert refused.value.status is not None and 400 <= refused.value.status < 500
    with pytest.raises(ValueError, match="instance id"):
        await sim.provider.show_instance("i-abc")
