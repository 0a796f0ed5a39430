"""vast.ai as a CloudProvider: the one status map, intent tags, bids, rows -> neutral types.

Everything vast.ai-specific the fleet used to read off raw rows lives here:
`api_state` is the single place an `actual_status` string is interpreted;
`intent_of` reads the `VASTD_INTENT` tag from an instance's `extra_env`; numbers
are checked at this boundary (json.loads accepts NaN and Infinity): finite, >= 0 and
within a sane range (`_checked`), else None and logged (`api_number_rejected`), so
nothing else stores them; an offer without a usable price is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

from vastd.core.ssh import Endpoint
from vastd.instances.discovery import InstanceInfo, parse_instance_data
from vastd.instances.provider import CloudProvider, Offer, ProviderInstance
from vastd.instances.vast_api import VastClient
from vastd.instances.vast_status import STATUS_MAP as STATUS_MAP
from vastd.instances.vast_status import api_state as api_state
from vastd.utils.logging import get_logger

log = get_logger("vastd.vast_provider")

INTENT_ENV: Final = "VASTD_INTENT"  # the env var a rent is tagged with (as lifecycle.py)
RUNTYPE: Final = "ssh_direc ssh_proxy"  # what the official CLI sends for `--ssh --direct`
MAX_DPH: Final = 1000.0  # $/h: no machine on vast.ai costs this; a larger figure is a bad row
MAX_GPUS: Final = 64  # GPUs in one machine


def _number(value: Any) -> float | None:
    """A finite number >= 0, else None (bools, strings of garbage, NaN and inf included)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # (an int past float's range overflows)
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _count(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number == int(number) else None


def _checked(
    row: Mapping[str, Any],
    key: str,
    where: str,
    *,
    upper: float | None = None,
    integer: bool = False,
) -> Any:
    """`row[key]` as a finite number >= 0 (an int when `integer`), at most `upper`; else
    None. A value that is there but fails is logged; a missing one (None) is not."""
    value = row.get(key)
    number: float | int | None = _count(value) if integer else _number(value)
    if number is not None and upper is not None and number > upper:
        number = None
    if number is None and value is not None:
        log.warning("api_number_rejected", field=key, value=repr(value)[:40], where=where)
    return number


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return text or None


def _endpoint(host: str | None, port: int | None) -> Endpoint | None:
    if not host or port is None or not 0 < port < 65536:
        return None
    return Endpoint(host, port)


def intent_of(raw: Mapping[str, Any]) -> str | None:
    """The `VASTD_INTENT` an instance was rented with, from its `extra_env` (a dict or pairs)."""
    env = raw.get("extra_env")
    pairs: list[Any] = []
    if isinstance(env, dict):
        pairs = list(env.items())
    elif isinstance(env, list):
        pairs = [p for p in env if isinstance(p, list | tuple) and len(p) == 2]
    for key, value in pairs:
        if key == INTENT_ENV and isinstance(value, str) and value:
            return value
    return None


def instance_from_info(info: InstanceInfo) -> ProviderInstance:
    """A ProviderInstance from discovery's InstanceInfo; bad numbers become None."""
    raw = info.raw
    where = f"instance {info.id}"
    return ProviderInstance(
        id=str(info.id),
        label=info.label,
        state=api_state(info.actual_status),
        raw_status=info.actual_status,
        proxy=_endpoint(info.ssh_host, info.ssh_port),
        direct=_endpoint(info.public_ipaddr, info.direct_ssh_port),
        # InstanceInfo turns a missing price into 0.0 and keeps NaN: read the row (if any).
        dph=_checked(raw, "dph_total", where, upper=MAX_DPH) if raw else _number(info.dph_total),
        machine_id=_text(_checked(raw, "machine_id", where, integer=True))
        if raw
        else _text(info.machine_id),
        gpu_name=info.gpu_name,
        num_gpus=_checked(raw, "num_gpus", where, upper=MAX_GPUS, integer=True)
        if raw
        else _count(info.num_gpus),
        intent=intent_of(raw),
        end_date=_checked(raw, "end_date", where),
        interruptible=raw.get("is_bid") is True,
    )


def offer_from_dict(row: Mapping[str, Any]) -> Offer | None:
    """An Offer from a `POST /bundles/` row; None (reason logged) without an id or a price."""
    offer_id = row.get("id")
    if not isinstance(offer_id, int) or isinstance(offer_id, bool) or offer_id < 0:
        log.warning("offer_skipped", offer=repr(offer_id), reason="no integer id")
        return None
    where = f"offer {offer_id}"
    dph = _number(row.get("dph_total"))
    if not dph or dph > MAX_DPH:  # (a 0 is no price: nothing rents for free; no second line)
        log.warning("offer_skipped", offer=offer_id, reason=f"dph_total {row.get('dph_total')!r}")
        return None
    return Offer(
        id=str(offer_id),
        machine_id=_text(_checked(row, "machine_id", where, integer=True)),
        dph=dph,
        min_bid=_checked(row, "min_bid", where, upper=MAX_DPH),
        gpu_name=_text(row.get("gpu_name")),
        num_gpus=_checked(row, "num_gpus", where, upper=MAX_GPUS, integer=True),
        end_date=_checked(row, "end_date", where),
    )


def _vast_id(instance_id: str) -> int:
    """vast.ai ids are integers; anything else is a caller's mistake."""
    try:
        return int(instance_id)
    except ValueError:
        raise ValueError(f"not a vast.ai instance id: {instance_id!r}") from None


class VastProvider:
    """CloudProvider over VastClient (the only caller of vast.ai); closes the client."""

    def __init__(self, client: VastClient) -> None:
        self.client = client

    async def list_instances(self, label: str | None) -> list[ProviderInstance]:
        rows = await self.client.list_instances(label)
        return [instance_from_info(parse_instance_data(r)) for r in rows]

    async def show_instance(self, instance_id: str) -> ProviderInstance | None:
        row = await self.client.show_instance(_vast_id(instance_id))
        return instance_from_info(parse_instance_data(row)) if row is not None else None

    async def search_offers(
        self,
        query: str,
        *,
        order: str,
        limit: int,
        disk_gb: float,
        interruptible: bool = False,
    ) -> list[Offer]:
        rows = await self.client.search_offers(
            query,
            order=order,
            limit=limit,
            disk_gb=disk_gb,
            offer_type="bid" if interruptible else "on-demand",
        )
        return [o for o in map(offer_from_dict, rows) if o is not None]

    async def rent(
        self,
        offer: Offer,
        *,
        image: str,
        disk_gb: float,
        label: str,
        intent: str,
        bid_dph: float | None = None,
        onstart: str | None = None,
    ) -> str:
        if bid_dph is not None and _number(bid_dph) is None:
            raise ValueError(f"bid_dph must be finite and >= 0, not {bid_dph!r}")
        new_id = await self.client.rent(
            int(offer.id),
            image=image,
            disk_gb=disk_gb,
            label=label,
            env={INTENT_ENV: intent},
            onstart=onstart,
            price=bid_dph,
            runtype=RUNTYPE,
        )
        return str(new_id)

    async def destroy(self, instance_id: str) -> bool:
        return await self.client.destroy_instance(_vast_id(instance_id))

    async def attach_ssh_key(self, instance_id: str, public_key: str) -> None:
        await self.client.attach_ssh_key(_vast_id(instance_id), public_key)

    async def set_bid(self, instance_id: str, dph: float) -> None:
        if _number(dph) is None:
            raise ValueError(f"a bid must be finite and >= 0, not {dph!r}")
        # The official client's change_bid; VastClient has no method for it yet, so this
        # goes through its request helper (same retries, redaction and errors).
        path = f"/api/v0/instances/bid_price/{_vast_id(instance_id)}/"
        await self.client._simple("PUT", path, {"client_id": "me", "price": dph})

    async def start(self, instance_id: str) -> None:
        await self.client.start_instance(_vast_id(instance_id))

    async def reboot(self, instance_id: str) -> None:
        await self.client.reboot_instance(_vast_id(instance_id))

    async def aclose(self) -> None:
        await self.client.aclose()


def _conforms(provider: VastProvider) -> CloudProvider:
    return provider  # mypy checks here that VastProvider implements CloudProvider
