"""The provider interface's neutral types, and vast.ai's rows and statuses mapped onto them."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from structlog.testing import capture_logs

from vastd.core.ssh import Endpoint
from vastd.instances import discovery
from vastd.instances.discovery import parse_instance_data
from vastd.instances.provider import ApiState, CloudProvider, ProviderInstance
from vastd.instances.vast_api import VastClient
from vastd.instances.vast_provider import (
    INTENT_ENV,
    STATUS_MAP,
    VastProvider,
    api_state,
    instance_from_info,
    intent_of,
    offer_from_dict,
)

# Every `actual_status` reference/vast_api.md documents, and what vastd must do about it.
DOCUMENTED = {
    None: ApiState.PENDING,
    "created": ApiState.PENDING,
    "loading": ApiState.PENDING,
    "scheduling": ApiState.PENDING,
    "rebooting": ApiState.PENDING,
    "running": ApiState.RUNNING,
    "frozen": ApiState.FROZEN,
    "stopped": ApiState.STOPPED,
    "exited": ApiState.GONE,
    "unknown": ApiState.GONE,
    "offline": ApiState.GONE,
}


@pytest.mark.parametrize(("status", "state"), DOCUMENTED.items())
def test_every_documented_status_has_its_state(status: str | None, state: ApiState) -> None:
    """The one map gives each documented vast.ai status the state the fleet acts on."""
    assert api_state(status) is state


@pytest.mark.parametrize(
    ("status", "state"),
    [
        (" Running", ApiState.RUNNING),
        ("rUnNiNg\n", ApiState.RUNNING),
        ("EXITED", ApiState.GONE),
        ("\tOffline  ", ApiState.GONE),
        ("Stopped", ApiState.STOPPED),
        ("  ", ApiState.PENDING),
        ("", ApiState.PENDING),
    ],
)
def test_status_case_and_spaces_are_ignored(status: str, state: ApiState) -> None:
    """Case and surrounding whitespace do not change the reading."""
    assert api_state(status) is state


def test_an_unrecognised_status_is_pending_and_logged_once() -> None:
    """A new word from vast.ai waits (PENDING) instead of destroying; it is logged once."""
    word = f"hibernating-{uuid.uuid4().hex[:6]}"
    with capture_logs() as logs:
        assert api_state(word) is ApiState.PENDING
        assert api_state(word) is ApiState.PENDING
    assert [(e["event"], e["status"]) for e in logs] == [("api_status_unrecognised", word)]


def test_the_statuses_once_read_as_lost_all_read_as_gone() -> None:
    """The four sets the modules kept before the map (exited/offline/unknown as lost or
    failed) all map to GONE, and InstanceInfo reads its status through the map."""
    for status in ("exited", "offline", "unknown"):
        assert api_state(status) is ApiState.GONE
        assert discovery.parse_instance_data({"id": 1, "actual_status": status}).is_lost
    assert discovery.parse_instance_data({"id": 1, "actual_status": " Running "}).is_running
    assert set(STATUS_MAP) - {""} == {s for s in DOCUMENTED if s}


ROW: dict[str, Any] = {
    "id": 4242,
    "label": "vastd",
    "actual_status": "running",
    "ssh_host": "ssh5.vast.ai",
    "ssh_port": 12345,
    "public_ipaddr": "203.0.113.9",
    "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40123"}]},
    "machine_id": 777,
    "gpu_name": "RTX 4090",
    "num_gpus": 2,
    "dph_total": 0.61,
    "end_date": 1_900_000_000.0,
    "is_bid": True,
    "extra_env": [["TZ", "UTC"], [INTENT_ENV, "intent-1"]],
}


def test_an_instance_row_becomes_a_provider_instance() -> None:
    """Every field is carried over in neutral form: string ids, Endpoints, the intent tag."""
    inst = instance_from_info(parse_instance_data(ROW))
    assert inst == ProviderInstance(
        id="4242",
        label="vastd",
        state=ApiState.RUNNING,
        raw_status="running",
        proxy=Endpoint("ssh5.vast.ai", 12345),
        direct=Endpoint("203.0.113.9", 40123),
        dph=0.61,
        machine_id="777",
        gpu_name="RTX 4090",
        num_gpus=2,
        intent="intent-1",
        end_date=1_900_000_000.0,
        interruptible=True,
    )
    assert inst.endpoints == [Endpoint("203.0.113.9", 40123), Endpoint("ssh5.vast.ai", 12345)]


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "-0.5", '"cheap"', "true"])
def test_bad_numbers_in_an_instance_row_become_none(bad: str) -> None:
    """NaN, inf, negatives, strings and bools (json.loads takes NaN) are None, not numbers."""
    text = json.dumps({**ROW, "dph_total": 0, "end_date": 0, "num_gpus": 0})
    text = text.replace('"dph_total": 0', f'"dph_total": {bad}')
    text = text.replace('"end_date": 0', f'"end_date": {bad}')
    text = text.replace('"num_gpus": 0', f'"num_gpus": {bad}')
    inst = instance_from_info(parse_instance_data(json.loads(text)))
    assert (inst.dph, inst.end_date, inst.num_gpus) == (None, None, None)


def test_a_sparse_instance_row_has_nothing_made_up() -> None:
    """A provisioning row: PENDING, no endpoints, and a missing price is None (not 0.0)."""
    inst = instance_from_info(
        parse_instance_data({"id": 1, "actual_status": None, "ssh_port": 0, "ssh_host": "h"})
    )
    assert inst.state is ApiState.PENDING and inst.raw_status is None
    assert inst.proxy is None and inst.direct is None and inst.endpoints == []
    assert inst.dph is None and inst.intent is None and not inst.interruptible


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({INTENT_ENV: "abc"}, "abc"),
        ([[INTENT_ENV, "abc"]], "abc"),
        ([("X", "1"), (INTENT_ENV, "abc")], "abc"),
        ([[INTENT_ENV, ""]], None),
        ([[INTENT_ENV, 5]], None),
        ([["OTHER", "abc"]], None),
        ([[INTENT_ENV, "abc", "extra"]], None),
        ("VASTD_INTENT=abc", None),
        (None, None),
    ],
)
def test_intent_tag_is_read_from_every_env_shape(env: Any, expected: str | None) -> None:
    """The intent tag in `extra_env` (a dict or a list of pairs), nothing else."""
    assert intent_of({"id": 1, "extra_env": env}) == expected


OFFER: dict[str, Any] = {
    "id": 4_000_001,
    "machine_id": 20_001,
    "dph_total": 0.42,
    "min_bid": 0.25,
    "gpu_name": "RTX 4090",
    "num_gpus": 1,
    "end_date": None,
    "reliability": 0.99,
}


def test_an_offer_row_becomes_an_offer() -> None:
    """Ids as strings, prices as numbers; what the fleet does not use stays behind."""
    offer = offer_from_dict(OFFER)
    assert offer is not None
    assert (offer.id, offer.machine_id, offer.dph, offer.min_bid) == (
        "4000001",
        "20001",
        0.42,
        0.25,
    )
    assert (offer.gpu_name, offer.num_gpus, offer.end_date) == ("RTX 4090", 1, None)


@pytest.mark.parametrize("dph", ["NaN", "Infinity", "-1", "null", '"0.3"x'])
def test_an_offer_without_a_valid_price_is_skipped_with_a_reason(dph: str) -> None:
    """json.loads accepts NaN and Infinity: such an offer is dropped and the reason logged."""
    text = json.dumps(OFFER).replace('"dph_total": 0.42', f'"dph_total": {dph}')
    row = json.loads(text) if "x" not in dph else {**OFFER, "dph_total": "0.3x"}
    with capture_logs() as logs:
        assert offer_from_dict(row) is None
    [event] = logs
    assert event["event"] == "offer_skipped" and event["offer"] == 4_000_001
    assert "dph_total" in event["reason"]


@pytest.mark.parametrize("offer_id", [None, True, "4000001", 1.5, -3])
def test_an_offer_without_an_integer_id_is_skipped(offer_id: Any) -> None:
    """An offer that cannot be rented by id is dropped, with the reason logged."""
    with capture_logs() as logs:
        assert offer_from_dict({**OFFER, "id": offer_id}) is None
    assert [e["reason"] for e in logs] == ["no integer id"]


def test_bad_optional_offer_numbers_become_none() -> None:
    """A NaN minimum bid, a fractional GPU count or an infinite end date are None."""
    row = json.loads(
        json.dumps(OFFER)
        .replace('"min_bid": 0.25', '"min_bid": NaN')
        .replace('"end_date": null', '"end_date": Infinity')
    )
    offer = offer_from_dict({**row, "num_gpus": 1.5, "machine_id": "m"})
    assert offer is not None and offer.dph == 0.42
    assert (offer.min_bid, offer.end_date, offer.num_gpus, offer.machine_id) == (
        None,
        None,
        None,
        None,
    )


async def test_vast_provider_has_every_cloud_provider_operation() -> None:
    """VastProvider has the Protocol's methods (mypy checks the signatures in vast_provider)."""
    client = VastClient("http://127.0.0.1:9", "k" * 8)
    provider = VastProvider(client)
    try:
        assert isinstance(provider, CloudProvider)
    finally:
        await provider.aclose()
