"""VastClient and discovery against the simulator on 127.0.0.1."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import structlog

from vastd.instances.discovery import (
    InstanceInfo,
    discover_active_instances,
    filter_instances_by_criteria,
    parse_instance_data,
)
from vastd.instances.vast_api import (
    VastClient,
    encode_query,
    parse_offer_query,
    parse_order,
    parse_retry_after,
)
from vastd.sim import Fault, SimCloud, start_sim_api
from vastd.utils.exceptions import APIShapeError, VastAIError

KEY = "test-secret-key-0123456789"


class RecordingSleep:
    """A `sleep` that only records the delays asked for."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay_s: float) -> None:
        self.delays.append(delay_s)


@pytest.fixture
async def sim() -> AsyncIterator[tuple[SimCloud, str]]:
    cloud = SimCloud(api_key=KEY, boot_delay_s=0.02)
    runner, url = await start_sim_api(cloud)
    yield cloud, url
    await runner.cleanup()
    await cloud.aclose()


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
async def client(sim: tuple[SimCloud, str], sleep: RecordingSleep) -> AsyncIterator[VastClient]:
    async with VastClient(sim[1], KEY, max_retries=3, sleep=sleep, timeout_s=5) as c:
        yield c


def calls_to(cloud: SimCloud, endpoint: str) -> list[dict[str, Any]]:
    return [c for c in cloud.calls if c["endpoint"] == endpoint]


async def test_pagination_fetches_every_page(sim: tuple[SimCloud, str], client: VastClient) -> None:
    """60 instances come back complete and in id order over three pages of 25."""
    cloud, _ = sim
    ids = [await cloud.add_instance(label="vastd") for _ in range(60)]
    rows = await client.list_instances()
    assert [r["id"] for r in rows] == ids
    pages = calls_to(cloud, "list_instances")
    assert len(pages) == 3
    assert "after_token" not in pages[0]["url"]
    assert all("after_token=" in p["url"] for p in pages[1:])
    assert "limit=25" in pages[0]["url"]


async def test_query_values_are_json_encoded_then_quoted() -> None:
    """Query strings match the official client: non-strings as JSON, then URL-quoted."""
    assert encode_query({"select_filters": {}}) == "select_filters=%7B%7D"
    assert encode_query({"owner": "me", "limit": 25}) == "owner=me&limit=25"


async def test_label_filter_server_and_client_side(
    sim: tuple[SimCloud, str], client: VastClient
) -> None:
    """Only instances whose label equals the one asked for are returned."""
    cloud, _ = sim
    mine = await cloud.add_instance(label="vastd")
    await cloud.add_instance(label="other")
    await cloud.add_instance(label=None)
    assert [r["id"] for r in await client.list_instances("vastd")] == [mine]
    # A server that ignores select_filters must not leak foreign instances.
    cloud.faults.add(
        endpoint="list_instances",
        status=200,
        json_body={"instances": [{"id": 1, "label": "vastd"}, {"id": 2, "label": "vastd2"}]},
    )
    assert [r["id"] for r in await client.list_instances("vastd")] == [1]


async def test_retry_after_seconds_is_honoured(
    sim: tuple[SimCloud, str], client: VastClient, sleep: RecordingSleep
) -> None:
    """A 429 with Retry-After: 7 waits exactly 7 s each time, then succeeds."""
    cloud, _ = sim
    await cloud.add_instance()
    cloud.faults.add(endpoint="list_instances", status=429, retry_after="7", count=2)
    with structlog.testing.capture_logs() as logs:
        rows = await client.list_instances()
    assert len(rows) == 1
    assert sleep.delays == [7.0, 7.0]
    retries = [e for e in logs if e["event"] == "api_retry"]
    assert [e["attempt"] for e in retries] == [1, 2]
    assert all(e["status"] == 429 and e["path"] == "/api/v1/instances/" for e in retries)
    assert all(e["method"] == "GET" and e["delay_s"] == 7.0 for e in retries)
    assert KEY not in repr(logs)


async def test_retry_after_is_capped_and_accepts_dates() -> None:
    """Retry-After as an HTTP date or a huge number gives a wait of at most 60 s."""
    now = time.time()
    assert parse_retry_after("3600") == 60.0
    assert parse_retry_after("2.5") == 2.5
    date = email.utils.formatdate(now + 30, usegmt=True)
    delay = parse_retry_after(date, now=now)
    assert delay is not None and 28 <= delay <= 30
    assert parse_retry_after("garbage") is None
    assert parse_retry_after(None) is None


async def test_429_without_retry_after_uses_jittered_backoff(
    sim: tuple[SimCloud, str], sleep: RecordingSleep
) -> None:
    """Without Retry-After the waits are full-jitter within base*2^n, capped."""
    _, url = sim
    sim[0].faults.add(endpoint="list_instances", status=429, count=4)
    async with VastClient(
        url, KEY, max_retries=5, backoff_base_s=1.0, backoff_max_s=3.0, sleep=sleep
    ) as c:
        assert await c.list_instances() == []
    assert len(sleep.delays) == 4
    for attempt, delay in enumerate(sleep.delays):
        assert 0 <= delay <= min(3.0, 2**attempt)


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_5xx_burst_then_success(
    sim: tuple[SimCloud, str], client: VastClient, sleep: RecordingSleep, status: int
) -> None:
    """A short burst of gateway errors is retried until the answer comes."""
    sim[0].faults.add(endpoint="list_instances", status=status, count=3)
    assert await client.list_instances() == []
    assert len(sleep.delays) == 3
    assert len(calls_to(sim[0], "list_instances")) == 4


async def test_5xx_past_max_retries_raises(
    sim: tuple[SimCloud, str], client: VastClient, sleep: RecordingSleep
) -> None:
    """After max_retries retries the client gives up with VastAIError(status)."""
    sim[0].faults.add(endpoint="list_instances", status=503, count=None)
    with pytest.raises(VastAIError) as info:
        await client.list_instances()
    assert info.value.status == 503
    assert len(calls_to(sim[0], "list_instances")) == 4  # 1 + max_retries
    assert KEY not in str(info.value)


async def test_500_and_4xx_are_not_retried(
    sim: tuple[SimCloud, str], client: VastClient, sleep: RecordingSleep
) -> None:
    """An internal error or a client error fails at once."""
    sim[0].faults.add(endpoint="list_instances", status=500)
    with pytest.raises(VastAIError) as info:
        await client.list_instances()
    assert info.value.status == 500
    sim[0].faults.add(endpoint="list_instances", status=400, error="invalid_args")
    with pytest.raises(VastAIError) as info:
        await client.list_instances()
    assert info.value.status == 400 and "invalid_args" in str(info.value)
    assert sleep.delays == []


async def test_search_quota_exceeded_is_not_retried(
    sim: tuple[SimCloud, str], client: VastClient, sleep: RecordingSleep
) -> None:
    """The daily search quota 429 is final: one request, no wait."""
    sim[0].faults.add(
        endpoint="search_offers", status=429, error="search_quota_exceeded", retry_after="1"
    )
    with pytest.raises(VastAIError) as info:
        await client.search_offers("gpu_name=RTX_4090")
    assert info.value.status == 429 and "quota" in str(info.value)
    assert len(calls_to(sim[0], "search_offers")) == 1
    assert sleep.delays == []


@pytest.mark.parametrize(
    "fault",
    [
        {"body": "empty", "status": 200},
        {"body": "html", "status": 200},
        {"body": "wrong_shape", "status": 200},
        {"body": "raw", "raw_body": "null", "status": 200},
        {"status": 200, "json_body": {"instances": None}},
        {"status": 200, "json_body": {"next_token": None}},
        {"status": 200, "json_body": {"instances": [1, 2]}},
        # past Python's 4300-digit limit json.loads raises a plain ValueError
        {"body": "raw", "raw_body": '{"instances": [], "n": ' + "9" * 5000 + "}", "status": 200},
        {"body": "raw", "raw_body": "[" * 100_000, "status": 200},  # RecursionError
    ],
    ids=[
        "empty",
        "html",
        "wrong-shape",
        "null",
        "instances-null",
        "no-instances",
        "not-rows",
        "5000-digit-int",
        "too-deep",
    ],
)
async def test_malformed_list_is_an_error_never_empty(
    sim: tuple[SimCloud, str], client: VastClient, fault: dict[str, Any]
) -> None:
    """A body that is not {'instances': [...]} raises APIShapeError instead of []."""
    await sim[0].add_instance()
    sim[0].faults.add(endpoint="list_instances", **fault)
    with pytest.raises(APIShapeError):
        await client.list_instances()


async def test_a_lone_surrogate_escape_in_an_answer_is_replaced(
    sim: tuple[SimCloud, str], client: VastClient
) -> None:
    """Valid JSON, but "\\udcff" decodes to a str no UTF-8 JSON can hold: kept in a
    record it failed every save of the snapshot and stopped the daemon. A pair (an
    escaped emoji) is a character like any other."""
    body = '{"instances": [{"id": 7, "gpu_name": "RTX\\udcff\\ud800", "label": "\\ud83d\\ude00"}]}'
    sim[0].faults.add(endpoint="list_instances", body="raw", raw_body=body, status=200, count=None)
    [row] = await client.list_instances()
    assert row["gpu_name"] == "RTX\ufffd\ufffd"
    assert row["label"] == "\U0001f600"
    json.dumps(row, ensure_ascii=False).encode("utf-8")


async def test_malformed_second_page_fails_the_whole_listing(
    sim: tuple[SimCloud, str], client: VastClient
) -> None:
    """A bad page after good ones is an error, not a partial list."""
    for _ in range(30):
        await sim[0].add_instance()
    original = sim[0].faults.pick

    def empty_after_first_page(endpoint: str, method: str) -> Fault | None:
        if endpoint == "list_instances" and len(calls_to(sim[0], "list_instances")) > 1:
            return Fault(status=200, body="empty")
        return original(endpoint, method)

    sim[0].faults.pick = empty_after_first_page  # type: ignore[method-assign]
    with pytest.raises(APIShapeError):
        await client.list_instances()


async def test_rent_is_never_retried_after_a_500(
    sim: tuple[SimCloud, str], client: VastClient, sleep: RecordingSleep
) -> None:
    """A rent answered 500 after creating the instance is sent once; the label finds it."""
    cloud, _ = sim
    offer = next(o for o in cloud.offers.values() if o["verified"])
    cloud.faults.add(endpoint="rent", status=500, after_effect=True)
    with pytest.raises(VastAIError):
        await client.rent(offer["id"], image="img", disk_gb=10, label="vastd-x")
    assert len(calls_to(cloud, "rent")) == 1
    assert sleep.delays == []
    found = await client.list_instances("vastd-x")
    assert len(found) == 1 and found[0]["machine_id"] == offer["machine_id"]


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_rent_is_not_retried_on_gateway_errors(
    sim: tuple[SimCloud, str], client: VastClient, status: int
) -> None:
    """A gateway error on a rent is ambiguous: one PUT, then VastAIError."""
    cloud, _ = sim
    cloud.faults.add(endpoint="rent", status=status, count=None)
    with pytest.raises(VastAIError) as info:
        await client.rent(next(iter(cloud.offers)), image="img", disk_gb=10, label="vastd")
    assert info.value.status == status
    assert len(calls_to(cloud, "rent")) == 1


async def test_rent_timeout_is_not_retried(sim: tuple[SimCloud, str]) -> None:
    """A rent whose answer never comes raises after one PUT; the instance exists."""
    cloud, url = sim
    cloud.faults.add(endpoint="rent", status=None, delay_s=5, after_effect=True)
    async with VastClient(url, KEY, timeout_s=0.3, sleep=RecordingSleep()) as c:
        with pytest.raises(VastAIError, match="may have reached"):
            await c.rent(next(iter(cloud.offers)), image="img", disk_gb=10, label="lost")
    assert len(calls_to(cloud, "rent")) == 1
    assert [i["label"] for i in cloud.instances.values()] == ["lost"]


async def test_rent_429_is_retried_and_rents_once(
    sim: tuple[SimCloud, str], client: VastClient, sleep: RecordingSleep
) -> None:
    """A rate-limited rent created nothing, so it is retried; one instance results."""
    cloud, _ = sim
    cloud.faults.add(endpoint="rent", status=429, retry_after="1", count=2)
    offer_id = next(iter(cloud.offers))
    instance_id = await client.rent(offer_id, image="img", disk_gb=12, label="vastd")
    assert sleep.delays == [1.0, 1.0]
    assert list(cloud.instances) == [instance_id]
    assert cloud.stats["rent"] == 1


async def test_rent_sends_the_official_body(sim: tuple[SimCloud, str], client: VastClient) -> None:
    """The rent body carries image, disk, label, env and onstart; the instance gets them."""
    cloud, _ = sim
    offer_id = next(iter(cloud.offers))
    instance_id = await client.rent(
        offer_id, image="vastai/base", disk_gb=25, label="vastd", env={"A": "1"}, onstart="true"
    )
    row = cloud.instances[instance_id]
    assert row["image_uuid"] == "vastai/base" and row["disk_space"] == 25
    assert row["extra_env"] == [["A", "1"]] and row["onstart"] == "true"
    assert cloud.offers[offer_id]["rented"] is True
    with pytest.raises(VastAIError) as info:  # an offer rents once
        await client.rent(offer_id, image="vastai/base", disk_gb=25, label="vastd")
    assert info.value.status == 400


async def test_connection_refused_is_retried_then_raises(sleep: RecordingSleep) -> None:
    """Nothing listening: idempotent calls and rents retry, then VastAIError."""
    from vastd.sim.api import unused_port

    url = f"http://127.0.0.1:{unused_port()}"
    async with VastClient(url, KEY, max_retries=2, sleep=sleep) as c:
        with pytest.raises(VastAIError) as info:
            await c.list_instances()
        assert KEY not in str(info.value)
        with pytest.raises(VastAIError):
            await c.rent(1, image="i", disk_gb=1, label="l")
    assert len(sleep.delays) == 4  # connecting failed: the rent never left


async def test_the_key_never_appears_in_urls_or_errors(
    sim: tuple[SimCloud, str], client: VastClient
) -> None:
    """The key travels only in the Authorization header."""
    cloud, url = sim
    await cloud.add_instance()
    await client.list_instances("vastd")
    await client.search_offers("num_gpus>=1")
    await client.show_instance(1)
    assert cloud.calls and all(KEY not in c["url"] for c in cloud.calls)
    async with VastClient(url, "wrong-key-xyz", sleep=RecordingSleep()) as bad:
        with pytest.raises(VastAIError) as info:
            await bad.list_instances()
    assert info.value.status == 401 and "wrong-key-xyz" not in str(info.value)
    assert KEY not in repr(client)


async def test_search_offers_with_query_syntax(
    sim: tuple[SimCloud, str], client: VastClient
) -> None:
    """The CLI query syntax filters offers; defaults hide unverified; -field sorts desc."""
    cloud, _ = sim
    offers = await client.search_offers(
        "gpu_name in [RTX_3090,RTX_4090] reliability>0.95", order="-dph_total"
    )
    assert offers
    assert all(o["gpu_name"] in ("RTX 3090", "RTX 4090") for o in offers)
    assert all(o["reliability"] > 0.95 and o["verified"] and not o["rented"] for o in offers)
    prices = [o["dph_total"] for o in offers]
    assert prices == sorted(prices, reverse=True)
    cheap = await client.search_offers("dph_total<=0.3", order="dph_total", limit=2)
    assert len(cheap) <= 2 and all(o["dph_total"] <= 0.3 for o in cheap)
    unverified = await client.search_offers("verified=false")
    expected = {o["id"] for o in cloud.offers.values() if not o["verified"]}
    assert {o["id"] for o in unverified} == expected


async def test_default_fleet_query_finds_offers(client: VastClient) -> None:
    """The config's default offer query matches some simulated offers."""
    query = (
        "gpu_name in [RTX_3090,RTX_4090] reliability>0.98 dph_total<=0.5 verified=true "
        "direct_port_count>=1"
    )
    assert await client.search_offers(query)


async def test_search_offers_shape_error(sim: tuple[SimCloud, str], client: VastClient) -> None:
    """An offers answer without a list of offers raises APIShapeError."""
    sim[0].faults.add(endpoint="search_offers", status=200, body="wrong_shape")
    with pytest.raises(APIShapeError):
        await client.search_offers("")


async def test_instance_lifecycle_calls(sim: tuple[SimCloud, str], client: VastClient) -> None:
    """Label, stop, start, reboot, attach key and destroy act on the instance."""
    cloud, _ = sim
    instance_id = await client.rent(next(iter(cloud.offers)), image="i", disk_gb=10, label="a")
    await cloud.wait_for_status(instance_id, "running")
    await client.set_label(instance_id, "b")
    row = await client.show_instance(instance_id)
    assert row is not None and row["label"] == "b"
    await client.stop_instance(instance_id)
    assert cloud.instances[instance_id]["actual_status"] == "stopped"
    await client.start_instance(instance_id)
    await cloud.wait_for_status(instance_id, "running")
    await client.reboot_instance(instance_id)
    await cloud.wait_for_status(instance_id, "running")
    await client.attach_ssh_key(instance_id, "ssh-ed25519 AAAA test\n")
    assert cloud.ssh_keys[instance_id] == ["ssh-ed25519 AAAA test"]
    assert await client.destroy_instance(instance_id) is True
    assert await client.show_instance(instance_id) is None
    assert await client.destroy_instance(instance_id) is False
    with pytest.raises(VastAIError) as info:
        await client.set_label(instance_id, "c")
    assert info.value.status == 404


async def test_idempotent_calls_retry_5xx(
    sim: tuple[SimCloud, str], client: VastClient, sleep: RecordingSleep
) -> None:
    """Destroy, label and state changes are retried through gateway errors."""
    cloud, _ = sim
    instance_id = await cloud.add_instance()
    cloud.faults.add(endpoint="update_instance", status=502, count=2)
    await client.set_label(instance_id, "z")
    cloud.faults.add(endpoint="destroy", status=503, count=2)
    assert await client.destroy_instance(instance_id) is True
    assert len(sleep.delays) == 4 and instance_id not in cloud.instances


async def test_lazy_session_and_aclose(sim: tuple[SimCloud, str]) -> None:
    """The session opens on first use and aclose() can be called twice."""
    c = VastClient(sim[1], KEY)
    assert await c.show_instance(5) is None
    await c.aclose()
    await c.aclose()


# -- parse_offer_query ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", {}),
        ("gpu_name=RTX_4090", {"gpu_name": {"eq": "RTX 4090"}}),
        ("num_gpus=1", {"num_gpus": {"eq": 1}}),
        ("num_gpus==2", {"num_gpus": {"eq": 2}}),
        ("reliability>0.98", {"reliability": {"gt": 0.98}}),
        ("dph_total<=0.5", {"dph_total": {"lte": 0.5}}),
        ("dph_total < 0.5", {"dph_total": {"lt": 0.5}}),
        ("direct_port_count>=1", {"direct_port_count": {"gte": 1}}),
        ("num_gpus!=3", {"num_gpus": {"neq": 3}}),
        ("verified=true", {"verified": {"eq": True}}),
        ("verified=False", {"verified": {"eq": False}}),
        (
            "gpu_name in [RTX_3090,RTX_4090]",
            {"gpu_name": {"in": ["RTX 3090", "RTX 4090"]}},
        ),
        ("geolocation notin [CN,VN]", {"geolocation": {"notin": ["CN", "VN"]}}),
        ("geolocation nin [CN]", {"geolocation": {"notin": ["CN"]}}),
        ("geolocation not in [CN]", {"geolocation": {"notin": ["CN"]}}),
        ('gpu_name in ["RTX 4090", "RTX 3090"]', {"gpu_name": {"in": ["RTX 4090", "RTX 3090"]}}),
        ("machine_id in [302,402]", {"machine_id": {"in": [302, 402]}}),
        ("dph_total>0.1 dph_total<0.5", {"dph_total": {"gt": 0.1, "lt": 0.5}}),
        ("dph<0.4", {"dph_total": {"lt": 0.4}}),
        ("cuda_vers>=12.1", {"cuda_max_good": {"gte": 12.1}}),
        ("gpu_ram>=24", {"gpu_ram": {"gte": 24000.0}}),
        ("driver_version>=535.86.05", {"driver_version": {"gte": 535086005}}),
        ("gpu_name=any num_gpus=1", {"num_gpus": {"eq": 1}}),
        (
            "gpu_name in [RTX_3090,RTX_4090] reliability>0.98 dph_total<=0.5 verified=true "
            "direct_port_count>=1",
            {
                "gpu_name": {"in": ["RTX 3090", "RTX 4090"]},
                "reliability": {"gt": 0.98},
                "dph_total": {"lte": 0.5},
                "verified": {"eq": True},
                "direct_port_count": {"gte": 1},
            },
        ),
    ],
)
def test_parse_offer_query(query: str, expected: dict[str, Any]) -> None:
    """The CLI's query syntax becomes the API's filter dict with typed values."""
    assert parse_offer_query(query) == expected


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("gpu_name", "operator"),
        ("gpu_name=>RTX", "operator"),
        ("bogus_field=1", "unknown offer field"),
        ("num_gpus>any", "wildcard"),
        ("gpu_name in []", "cannot parse|missing|empty"),
        ("gpu_ram>=lots", "needs a number"),
        ("driver_version=1.2", "driver_version"),
        ("reliability>0.9 ; rm", "cannot parse|operator"),
        ("num_gpus>=" + "9" * 400, "out of range"),  # float() gives inf, int(inf) overflows
        ("dph_total<=1e400", "out of range"),
        ("gpu_ram>=1e306", "in range"),  # finite, but inf once in MB
    ],
)
def test_parse_offer_query_rejects_bad_input(query: str, message: str) -> None:
    """Invalid queries raise ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=message):
        parse_offer_query(query)


def test_parse_order() -> None:
    """Order strings follow the CLI: '-' marks descending, aliases resolve."""
    assert parse_order("dph_total") == [["dph_total", "asc"]]
    assert parse_order("-reliability,dph") == [["reliability", "desc"], ["dph_total", "asc"]]
    assert parse_order("score-") == [["score", "desc"]]


# -- discovery -----------------------------------------------------------------------


def test_parse_instance_data_full_and_sparse() -> None:
    """Rows become InstanceInfo; missing optional fields are None; ids are required."""
    raw = {
        "id": 7, "label": "vastd", "actual_status": "running", "ssh_host": "ssh4.vast.ai",
        "ssh_port": 12345, "public_ipaddr": "1.2.3.4 ",
        "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40123"}]},
        "dph_total": "0.31", "start_date": 1700000000.5, "machine_id": 9, "num_gpus": 1,
    }  # fmt: skip
    info = parse_instance_data(raw)
    assert info.proxy_endpoint == ("ssh4.vast.ai", 12345)
    assert info.direct_endpoint == ("1.2.3.4", 40123)
    assert info.is_running and not info.is_lost and info.dph_total == 0.31
    assert info.raw == raw and "raw" not in repr(info)
    assert info == parse_instance_data({**raw, "gpu_util": 55})  # raw excluded from eq
    sparse = parse_instance_data({"id": 8, "actual_status": None})
    assert sparse.proxy_endpoint is None and sparse.direct_endpoint is None
    assert not sparse.is_running and sparse.dph_total == 0.0
    for status in ("exited", "offline", "unknown"):
        assert parse_instance_data({"id": 1, "actual_status": status}).is_lost
    for bad in ({}, {"id": "7"}, {"id": None}, {"id": True}):
        with pytest.raises(APIShapeError):
            parse_instance_data(bad)


def test_filter_instances_by_criteria() -> None:
    """Criteria match by equality or by a callable predicate, on fields or raw keys."""
    rows = [
        {"id": 1, "label": "a", "dph_total": 0.2, "gpu_util": 5},
        {"id": 2, "label": "a", "dph_total": 0.9},
        {"id": 3, "label": "b", "dph_total": 0.1},
    ]
    pick: Callable[[Any], bool] = lambda v: v < 0.5  # noqa: E731
    assert [i.id for i in filter_instances_by_criteria(rows, {"label": "a"})] == [1, 2]
    assert [i.id for i in filter_instances_by_criteria(rows, {"dph_total": pick})] == [1, 3]
    assert [i.id for i in filter_instances_by_criteria(rows, {"gpu_util": 5})] == [1]
    infos: list[InstanceInfo] = [parse_instance_data(r) for r in rows]
    assert len(filter_instances_by_criteria(infos, {})) == 3


async def test_discovery_functions(sim: tuple[SimCloud, str], client: VastClient) -> None:
    """Active = labelled, running, with an endpoint; one instance is shown by id, or None."""
    cloud, _ = sim
    running = await cloud.add_instance(label="vastd")
    await cloud.add_instance(label="vastd", actual_status="loading")
    await cloud.add_instance(label="other")
    offline = await cloud.add_instance(label="vastd")
    await cloud.set_status(offline, "offline")
    active = await discover_active_instances(client, "vastd")
    assert [i.id for i in active] == [running]
    assert active[0].proxy_endpoint is not None and active[0].direct_endpoint is not None
    row = await client.show_instance(offline)
    assert row is not None and parse_instance_data(row).is_lost
    assert await client.show_instance(999) is None


async def test_rows_without_any_label_field_are_a_shape_error(
    sim: tuple[SimCloud, str], client: VastClient
) -> None:
    """Rows that lost their `label` field (API drift) are an error, never "none are ours"."""
    cloud, _ = sim
    drifted = {"instances": [{"id": 7, "actual_status": "running"}], "next_token": None}
    cloud.faults.add(endpoint="list_instances", status=200, json_body=drifted, count=2)
    with pytest.raises(APIShapeError, match="label"):
        await client.list_instances(label="vastd")
    assert [r["id"] for r in await client.list_instances()] == [7]
