"""The simulated vast.ai in memory: `SimCloud` with its offers, instances and their boot.

Offers are generated or added; renting one boots an instance (a live SSH host from a
`HostProvider`, see vastd/sim/hosts.py). Tests drive failures through `set_status`,
`vanish`, `faults` and the market's ways (`freeze`, `outbid`/`set_bid`, `set_price`,
`set_end_date`, `revoke_keys`); vastd/sim/api.py serves it over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol

from vastd.sim.faults import Faults
from vastd.sim.filters import matches, sort_rows
from vastd.sim.stale import StaleReads
from vastd.utils.logging import get_logger

# The logger name it had before the split from api.py: log lines stay the same.
log = get_logger("vastd.sim.api")

_STOP_HOST_STATUSES: Final = frozenset({"offline", "exited", "stopped"})
_OFFER_GPUS: Final = (
    ("RTX 3090", 24576, 0.20, 12.2),
    ("RTX 4090", 24564, 0.35, 12.4),
    ("RTX A5000", 24564, 0.25, 12.2),
    ("A100 SXM4", 81920, 1.10, 12.8),
)


class HostProvider(Protocol):
    """Starts a live SSH server for an instance (see vastd/sim/hosts.py)."""

    async def start_host(self, instance_id: int, authorized_keys: list[str]) -> tuple[str, int]:
        """(host, port) of a live SSH server for this instance."""
        ...

    async def stop_host(self, instance_id: int) -> None:
        """Stop the instance's SSH server (idempotent)."""
        ...


def unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class SimCloud:
    """vast.ai in memory: offers, instances, their boot, and the faults to inject."""

    def __init__(
        self,
        api_key: str = "sim-key",
        *,
        offers: Iterable[dict[str, Any]] | None = None,
        n_offers: int = 24,
        seed: int = 0,
        boot_delay_s: float = 0.2,
        host_provider: HostProvider | None = None,
        account_keys: Iterable[str] = (),
    ) -> None:
        self.api_key = api_key
        self.boot_delay_s = boot_delay_s
        self.host_provider = host_provider
        self.account_keys = list(account_keys)
        self.faults = Faults(seed)
        self.stale = StaleReads()  # lagging reads and destroys that do not take (stale.py)
        self.offers: dict[int, dict[str, Any]] = {}
        self.instances: dict[int, dict[str, Any]] = {}
        self.ssh_keys: dict[int, list[str]] = {}
        self.calls: list[dict[str, Any]] = []
        self.stats: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._next_instance_id = 10_000_001
        self._next_offer_id = 4_000_001
        self._hosts: set[int] = set()
        self._boots: dict[int, asyncio.Task[None]] = {}
        self._changed: asyncio.Event | None = None
        for offer in offers if offers is not None else self._generate_offers(n_offers):
            self.add_offer(**offer)

    # -- offers ----------------------------------------------------------------

    def _generate_offers(self, n: int) -> list[dict[str, Any]]:
        rng, out = self._rng, []
        for i in range(n):
            gpu, ram_mb, base_dph, cuda = _OFFER_GPUS[i % len(_OFFER_GPUS)]
            # The first offers always pass the default fleet query, so a demo can rent.
            good = i < len(_OFFER_GPUS)
            num = 1 if good else rng.choice((1, 1, 1, 2, 4))
            dph = round(base_dph * num * rng.uniform(0.8, 1.3), 4)
            out.append(
                {
                    "machine_id": 20_000 + i,
                    "host_id": 300 + i % 7,
                    "gpu_name": gpu,
                    "num_gpus": num,
                    "gpu_ram": ram_mb,
                    "dph_total": dph,
                    "min_bid": round(dph * 0.6, 4),
                    "reliability": round(rng.uniform(0.985 if good else 0.95, 0.9995), 4),
                    "direct_port_count": 20 if good else rng.choice((0, 1, 20, 100)),
                    "verified": good or rng.random() < 0.85,
                    "cuda_max_good": cuda,
                    "geolocation": rng.choice(("US", "SE", "TW", "DE")),
                }
            )
        return out

    def add_offer(self, **values: Any) -> int:
        """Add an offer; unspecified fields get plausible defaults. Returns its id."""
        offer_id = int(values.pop("id", self._next_offer_id))
        self._next_offer_id = max(self._next_offer_id, offer_id + 1)
        num = int(values.get("num_gpus", 1))
        dph = float(values.get("dph_total", 0.3))
        offer: dict[str, Any] = {
            "id": offer_id, "ask_contract_id": offer_id, "bundle_id": offer_id,
            "machine_id": 20_000 + offer_id % 10_000, "host_id": 300, "gpu_name": "RTX 4090",
            "num_gpus": num, "gpu_ram": 24564, "gpu_total_ram": 24564 * num,
            "cpu_ram": 64_000, "cpu_cores": 16, "cpu_cores_effective": 8.0,
            "disk_space": 200.0, "disk_bw": 2000.0, "dph_total": dph, "dph_base": dph,
            "min_bid": round(dph * 0.6, 4), "reliability": 0.99, "reliability2": 0.99,
            "verified": True, "verification": "verified", "rentable": True, "rented": False,
            "external": False, "direct_port_count": 20, "inet_up": 500.0, "inet_down": 900.0,
            "inet_up_cost": 0.0, "inet_down_cost": 0.0, "storage_cost": 0.1,
            "cuda_max_good": 12.4, "driver_version": "550.54.14", "compute_cap": 890,
            "dlperf": 50.0, "dlperf_per_dphtotal": 50.0 / max(dph, 1e-6), "total_flops": 80.0,
            "flops_per_dphtotal": 80.0 / max(dph, 1e-6), "geolocation": "US", "score": 100.0,
            "static_ip": True, "has_avx": 1, "pci_gen": 4.0, "pcie_bw": 25.0,
            "gpu_mem_bw": 900.0, "bw_nvlink": 0.0, "gpu_arch": "nvidia", "cpu_arch": "amd64",
            "gpu_frac": 1.0, "gpu_display_active": False, "gpu_max_power": 450.0,
            "gpu_max_temp": 90.0, "mobo_name": "sim", "ubuntu_version": "22.04",
            "vms_enabled": False, "duration": 30 * 86400.0, "public_ipaddr": "127.0.0.1",
            "is_bid": False, "cluster_id": None, "start_date": time.time(), "end_date": None,
        }  # fmt: skip
        offer.update(values)
        offer["id"] = offer_id
        self.offers[offer_id] = offer
        return offer_id

    def search(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """Offers matching a `POST /bundles/` body, ordered and limited."""
        special = {"order", "type", "limit", "allocated_storage", "disable_bundling"}
        filters = {k: v for k, v in body.items() if k not in special}
        # The marketplace never offers what is already rented, whatever the query.
        filters.setdefault("rented", {"eq": False})
        rows = [o for o in self.offers.values() if matches(o, filters)]
        order = [(str(f), str(d)) for f, d in body.get("order") or [["score", "desc"]]]
        rows = sort_rows(rows, [*order, ("id", "asc")])
        if body.get("type") == "bid":
            rows = [{**r, "is_bid": True, "dph_total": r["min_bid"]} for r in rows]
        if body.get("limit"):
            rows = rows[: int(body["limit"])]
        return [dict(r) for r in rows]

    # -- instances ---------------------------------------------------------------

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Wait until `predicate()` holds, re-checking on every change; TimeoutError after."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()

    async def wait_for_status(self, instance_id: int, status: str, timeout_s: float = 10.0) -> None:
        """Wait until an instance's actual_status is `status`."""
        await self.wait_for(
            lambda: self.instances.get(instance_id, {}).get("actual_status") == status, timeout_s
        )

    def _update(self, instance_id: int, **values: Any) -> None:
        inst = self.instances.get(instance_id)
        if inst is not None:
            inst.update(values)
            self._notify()

    async def _start_host(self, instance_id: int) -> tuple[str, int]:
        keys = [*self.account_keys, *self.ssh_keys.get(instance_id, [])]
        if self.host_provider is None:
            host, port = "127.0.0.1", unused_port()
        else:
            host, port = await self.host_provider.start_host(instance_id, keys)
        self._hosts.add(instance_id)
        return host, port

    async def _stop_host(self, instance_id: int) -> None:
        if instance_id in self._hosts:
            self._hosts.discard(instance_id)
            if self.host_provider is not None:
                await self.host_provider.stop_host(instance_id)

    def _endpoint_fields(self, host: str, port: int) -> dict[str, Any]:
        return {
            "ssh_host": host,
            "ssh_port": port,
            "public_ipaddr": host,
            "ports": {"22/tcp": [{"HostIp": host, "HostPort": str(port)}]},
            "direct_port_start": port,
            "direct_port_end": port,
        }

    async def _boot(self, instance_id: int) -> None:
        await asyncio.sleep(self.boot_delay_s / 2)
        self._update(instance_id, actual_status="loading", status_msg="Pulling image")
        host, port = await self._start_host(instance_id)
        await asyncio.sleep(self.boot_delay_s / 2)
        if instance_id not in self.instances:
            await self._stop_host(instance_id)
            return
        self._update(
            instance_id,
            actual_status="running",
            status_msg="success, running",
            **self._endpoint_fields(host, port),
        )

    def _spawn_boot(self, instance_id: int) -> None:
        self._cancel_boot(instance_id)
        task = asyncio.create_task(self._boot(instance_id), name=f"sim-boot-{instance_id}")
        self._boots[instance_id] = task
        task.add_done_callback(lambda t: self._boot_done(instance_id, t))

    def _boot_done(self, instance_id: int, task: asyncio.Task[None]) -> None:
        if self._boots.get(instance_id) is task:
            del self._boots[instance_id]
        if not task.cancelled() and task.exception() is not None:
            log.warning("sim_boot_failed", instance=instance_id, error=repr(task.exception()))
            self._update(instance_id, actual_status="exited", status_msg="boot failed")

    def _cancel_boot(self, instance_id: int) -> None:
        task = self._boots.pop(instance_id, None)
        if task is not None:
            task.cancel()

    def _new_row(self, instance_id: int, offer: dict[str, Any], **values: Any) -> dict[str, Any]:
        env = values.pop("env", None) or {}
        row: dict[str, Any] = {
            "id": instance_id, "label": None, "actual_status": None,
            "intended_status": "running", "cur_state": "running", "next_state": "running",
            "status_msg": "", "ssh_host": None, "ssh_port": None, "public_ipaddr": None,
            "ports": {}, "direct_port_start": None, "direct_port_end": None,
            "machine_id": offer.get("machine_id"), "host_id": offer.get("host_id"),
            "gpu_name": offer.get("gpu_name"), "num_gpus": offer.get("num_gpus"),
            "gpu_ram": offer.get("gpu_ram"), "gpu_util": 0.0, "gpu_temp": 35.0,
            "cpu_util": 0.0, "disk_space": 10.0, "disk_usage": 0.0, "mem_usage": 0.0,
            "dph_total": offer.get("dph_total"), "start_date": time.time(),
            "uptime_mins": 0.0, "image_uuid": "vastai/base", "onstart": None,
            "extra_env": [[k, v] for k, v in env.items() if not k.startswith("-")],
            "reliability2": offer.get("reliability"), "geolocation": offer.get("geolocation"),
            "is_bid": False, "min_bid": offer.get("min_bid"), "verification": "verified",
            "ask_id": offer.get("id"), "template_id": None, "end_date": offer.get("end_date"),
        }  # fmt: skip
        row.update(values)
        return row

    def rent(self, offer_id: int, body: dict[str, Any]) -> int:
        """Rent an offer as `PUT /asks/{id}/` does; KeyError if it is not rentable."""
        offer = self.offers.get(offer_id)
        if offer is None or offer["rented"] or not offer["rentable"]:
            raise KeyError(offer_id)
        offer["rented"] = True
        instance_id, self._next_instance_id = self._next_instance_id, self._next_instance_id + 1
        price = body.get("price")
        self.instances[instance_id] = self._new_row(
            instance_id,
            offer,
            label=body.get("label"),
            image_uuid=body.get("image"),
            disk_space=float(body.get("disk") or 10),
            onstart=body.get("onstart"),
            env=body.get("env") if isinstance(body.get("env"), dict) else {},
            is_bid=price is not None,
            dph_total=float(price) if price is not None else offer["dph_total"],
        )
        self.stats["rent"] += 1
        self._notify()
        self._spawn_boot(instance_id)
        return instance_id

    def set_label(self, instance_id: int, label: str | None) -> None:
        self._update(instance_id, label=label)

    async def add_instance(
        self, *, label: str | None = "vastd", actual_status: str | None = "running", **values: Any
    ) -> int:
        """Pre-create an instance (adopt fixtures); a running one gets a live host."""
        instance_id = int(values.pop("id", self._next_instance_id))
        self._next_instance_id = max(self._next_instance_id, instance_id + 1)
        offer = self.offers.get(int(values.pop("offer_id", 0))) or next(
            iter(self.offers.values()), {}
        )
        row = self._new_row(instance_id, offer, label=label, actual_status=actual_status)
        row.update(values)
        if actual_status == "running":
            row.update(self._endpoint_fields(*await self._start_host(instance_id)))
        self.instances[instance_id] = row
        self._notify()
        return instance_id

    async def destroy(self, instance_id: int) -> bool:
        """Destroy an instance; False if there is none."""
        if instance_id in self.instances and self.stale.take_ignored_destroy(instance_id):
            return True  # answered, did not take: it goes on running and billing
        row = self.instances.pop(instance_id, None)
        if row is None:
            return False
        self.stale.destroyed(instance_id, row)
        self._cancel_boot(instance_id)
        await self._stop_host(instance_id)
        offer = self.offers.get(row.get("ask_id") or -1)
        if offer is not None:
            offer["rented"] = False
        self.stats["destroy"] += 1
        self._notify()
        return True

    async def set_state(self, instance_id: int, state: str) -> None:
        """`PUT /instances/{id}/ {"state": ...}`: stop, or start again (boots anew)."""
        if state == "stopped":
            self._cancel_boot(instance_id)
            await self._stop_host(instance_id)
            self._update(
                instance_id, actual_status="stopped", intended_status="stopped", cur_state="stopped"
            )
        elif state == "running":
            self._update(instance_id, intended_status="running", cur_state="running")
            if self.instances[instance_id].get("actual_status") != "running":
                await self._stop_host(instance_id)
                self._spawn_boot(instance_id)
        else:
            raise ValueError(f"unknown state {state!r}")

    async def reboot(self, instance_id: int) -> None:
        self._cancel_boot(instance_id)
        await self._stop_host(instance_id)
        self._update(instance_id, actual_status="rebooting")
        self._spawn_boot(instance_id)

    async def attach_key(self, instance_id: int, key: str) -> None:
        """Record a key; a host provider with `add_authorized_key` gets it at once."""
        self.ssh_keys.setdefault(instance_id, []).append(key)
        add = getattr(self.host_provider, "add_authorized_key", None)
        if add is not None and instance_id in self._hosts:
            await add(instance_id, key)
        self._notify()

    async def set_status(
        self, instance_id: int, actual_status: str | None, *, stop_host: bool | None = None
    ) -> None:
        """Force a status (`offline`, `exited`, `stopped`...); those stop the SSH host."""
        if instance_id not in self.instances:
            raise KeyError(instance_id)
        self._cancel_boot(instance_id)
        if stop_host is None:
            stop_host = actual_status in _STOP_HOST_STATUSES
        if stop_host:
            await self._stop_host(instance_id)
        extra: dict[str, Any] = {}
        if actual_status == "running" and instance_id not in self._hosts:
            extra = self._endpoint_fields(*await self._start_host(instance_id))
        self._update(instance_id, actual_status=actual_status, **extra)

    # -- the market as vast.ai behaves (issue 10, items 10-14) -----------------------

    async def freeze(self, instance_id: int) -> None:
        """`frozen`: still listed and billed, but nothing on it answers."""
        await self.set_status(instance_id, "frozen", stop_host=True)

    async def outbid(self, instance_id: int, competing_dph: float) -> None:
        """Someone bids `competing_dph` on the machine: the instance is stopped until its
        bid (`set_bid`) is higher."""
        self._update(instance_id, outbid_by=float(competing_dph))
        await self.set_status(instance_id, "stopped", stop_host=True)

    async def set_bid(self, instance_id: int, price: float) -> None:
        """`PUT /instances/bid_price/{id}/`: the new bid is the price; one above the
        competing bid runs again (it boots anew: scheduling, loading, running)."""
        row = self.instances[instance_id]
        self.stats["set_bid"] += 1
        self._update(instance_id, dph_total=float(price), min_bid=float(price))
        competing = row.get("outbid_by")
        if competing is not None and float(price) > float(competing):
            self._update(instance_id, outbid_by=None, actual_status="scheduling")
            await self._stop_host(instance_id)
            self._spawn_boot(instance_id)

    def set_price(self, instance_id: int, dph: float) -> None:
        """The host raises (or lowers) the price of the running contract."""
        self._update(instance_id, dph_total=dph)

    def set_end_date(self, instance_id: int, end_date: float | None) -> None:
        """The host's offer (and so the rental) ends at `end_date` (epoch s)."""
        self._update(instance_id, end_date=end_date)

    def revoke_keys(self, instance_id: int) -> None:
        """The keys installed on the instance stop working (skypilot#10730); a key
        attached again through the API works again."""
        self.ssh_keys[instance_id] = []
        revoke = getattr(self.host_provider, "set_authorized_keys", None)
        if revoke is not None and instance_id in self._hosts:
            revoke(instance_id, [])
        self._notify()

    async def vanish(self, instance_id: int, *, stop_host: bool = True) -> None:
        """The instance disappears from every listing, as if vast.ai lost it."""
        self.instances.pop(instance_id, None)
        self._cancel_boot(instance_id)
        if stop_host:
            await self._stop_host(instance_id)
        self._notify()

    def snapshot(self) -> dict[str, Any]:
        return {
            "instances": list(self.instances.values()),
            "offers": list(self.offers.values()),
            "ssh_keys": {str(k): v for k, v in self.ssh_keys.items()},
            "hosts_running": sorted(self._hosts),
            "stats": dict(self.stats),
        }

    async def aclose(self) -> None:
        """Cancel boots and stop every host, even when one stop fails."""
        tasks = list(self._boots.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for instance_id in list(self._hosts):
            with contextlib.suppress(Exception):
                await self._stop_host(instance_id)
