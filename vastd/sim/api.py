"""A local stand-in for the vast.ai REST API (CONTRACT §9), with fault injection.

`SimCloud` holds offers and instances in memory; `create_sim_app` serves them with
the official client's shapes (the `vastai` CLI works against it with `--url`).
Faults (`SimCloud.faults`) and a JSON control surface under `/_sim/` let tests,
in-process or from another process, inject 429/5xx, delays, malformed bodies and
instance failures at run time. Every API request is recorded in `SimCloud.calls`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import random
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any, Final, Protocol

from aiohttp import web

from vastd.utils.logging import get_logger

log = get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_STOP_HOST_STATUSES: Final = frozenset({"offline", "exited", "stopped"})
_BODY_KINDS: Final = frozenset({"json", "empty", "html", "wrong_shape", "raw"})
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


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """JSON with Content-Type exactly `application/json` (the vastai CLI insists)."""
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers=headers,
        content_type="application/json",
    )


@dataclass
class Fault:
    """One injected fault: which requests it hits and what they get instead.

    `endpoint` is a route name (`list_instances`, `show_instance`, `search_offers`,
    `rent`, `destroy`, `update_instance`, `reboot`, `attach_ssh`, `current_user`) or
    `*`. `count` hits then the fault removes itself (None: until cleared), each with
    `probability`. `status` None only delays. `after_effect`: do the real work first,
    then answer the fault (a rent that creates the instance but answers 500).
    `body`: json (`{"success": false, "error": error}`), empty, html, wrong_shape, raw.
    """

    endpoint: str = "*"
    method: str | None = None
    status: int | None = 500
    count: int | None = 1
    probability: float = 1.0
    retry_after: str | None = None
    error: str | None = None
    body: str = "json"
    raw_body: str | None = None
    json_body: Any = None
    delay_s: float = 0.0
    after_effect: bool = False
    id: int = 0
    hits: int = 0


class Faults:
    """The switchable set of faults; all changes take effect on the next request."""

    def __init__(self, seed: int = 0) -> None:
        self._rules: list[Fault] = []
        self._next_id = 1
        self._rng = random.Random(seed)

    def add(self, **kwargs: Any) -> int:
        """Add a fault (fields of `Fault`); return its id."""
        known = {f.name for f in fields(Fault)} - {"id", "hits"}
        unknown = set(kwargs) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        rule = Fault(**kwargs)
        if rule.body not in _BODY_KINDS:
            raise ValueError(f"body must be one of {sorted(_BODY_KINDS)}")
        rule.id, self._next_id = self._next_id, self._next_id + 1
        self._rules.append(rule)
        return rule.id

    def remove(self, fault_id: int) -> None:
        self._rules = [r for r in self._rules if r.id != fault_id]

    def clear(self) -> None:
        self._rules.clear()

    def list(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self._rules]

    def pick(self, endpoint: str, method: str) -> Fault | None:
        """The first fault that fires for this request, counting it down."""
        for rule in self._rules:
            if rule.endpoint not in ("*", endpoint):
                continue
            if rule.method is not None and rule.method.upper() != method:
                continue
            if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                continue
            rule.hits += 1
            if rule.count is not None:
                rule.count -= 1
                if rule.count <= 0:
                    self.remove(rule.id)
            return rule
        return None


def fault_response(rule: Fault) -> web.Response:
    headers = {"Retry-After": rule.retry_after} if rule.retry_after is not None else None
    status = rule.status or 200
    if rule.body == "empty":
        return web.Response(body=b"", status=status, headers=headers)
    if rule.body == "html":
        html = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
        return web.Response(body=html, status=status, headers=headers, content_type="text/html")
    if rule.body == "raw":
        raw = (rule.raw_body or "").encode()
        return web.Response(body=raw, status=status, headers=headers)
    if rule.body == "wrong_shape":
        return json_response({"instances": "x", "offers": "x"}, status, headers)
    if rule.json_body is not None:
        return json_response(rule.json_body, status, headers)
    error = rule.error or ("rate_limited" if status == 429 else "server_error")
    return json_response({"success": False, "error": error, "msg": error}, status, headers)


# -- filters as the API applies them: {"field": {"op": value}}, values maybe strings --


def _coerce(value: Any, like: Any) -> Any:
    if isinstance(like, bool):
        if isinstance(value, str):
            return value.strip().lower() in ("true", "1")
        return bool(value)
    if isinstance(like, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            return value
    if isinstance(like, str) and value is not None:
        return str(value)
    return value


def _cmp(a: Any, b: Any) -> int:
    if a == b:
        return 0
    if a is None:
        return -1
    if b is None:
        return 1
    try:
        return -1 if a < b else 1
    except TypeError:
        return -1 if str(a) < str(b) else 1


def matches(row: dict[str, Any], filters: dict[str, Any]) -> bool:
    """Whether a row passes every `{"field": {"op": value}}` filter."""
    for name, cond in filters.items():
        if not isinstance(cond, dict):
            cond = {"eq": cond}
        actual = row.get(name)
        for op, wanted in cond.items():
            if op in ("in", "notin"):
                items = wanted if isinstance(wanted, list) else [wanted]
                found = any(_coerce(w, actual) == actual for w in items)
                if found != (op == "in"):
                    return False
                continue
            target = _coerce(wanted, actual)
            if op == "eq":
                ok = actual == target
            elif op == "neq":
                ok = actual != target
            elif op in ("gt", "gte", "lt", "lte"):
                if actual is None or target is None:
                    return False
                c = _cmp(actual, target)
                ok = {"gt": c > 0, "gte": c >= 0, "lt": c < 0, "lte": c <= 0}[op]
            else:
                raise ValueError(f"unknown operator {op!r}")
            if not ok:
                return False
    return True


def sort_rows(rows: list[dict[str, Any]], order: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    order = list(order)

    def compare(a: dict[str, Any], b: dict[str, Any]) -> int:
        for col, direction in order:
            c = _cmp(a.get(col), b.get(col))
            if c:
                return c if direction == "asc" else -c
        return 0

    return sorted(rows, key=functools.cmp_to_key(compare))


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
            "ask_id": offer.get("id"), "template_id": None,
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
        row = self.instances.pop(instance_id, None)
        if row is None:
            return False
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


# -- HTTP ------------------------------------------------------------------------

CLOUD_KEY: Final = web.AppKey("sim_cloud", SimCloud)


def _error(status: int, error: str, msg: str) -> web.Response:
    return json_response({"success": False, "error": error, "msg": msg}, status)


def _encode_token(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps({"values": values}).encode()).decode()


def _decode_token(token: str) -> list[Any]:
    values = json.loads(base64.urlsafe_b64decode(token.encode()))["values"]
    if not isinstance(values, list):
        raise ValueError("bad token")
    return values


def _json_param(request: web.Request, name: str, default: Any) -> Any:
    raw = request.query.get(name)
    return default if raw is None or raw == "" else json.loads(raw)


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    data = await request.json()
    if not isinstance(data, dict):
        raise ValueError("body is not a JSON object")
    return data


def _cloud(request: web.Request) -> SimCloud:
    return request.app[CLOUD_KEY]


def _instance_id(request: web.Request) -> int:
    return int(request.match_info["id"])


@web.middleware
async def _record_auth_faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    cloud = _cloud(request)
    if request.path.startswith("/_sim/"):
        return await handler(request)
    endpoint = request.match_info.route.name or "unknown"
    entry: dict[str, Any] = {
        "method": request.method,
        "path": request.path,
        "url": str(request.rel_url),
        "endpoint": endpoint,
        "status": None,
    }
    cloud.calls.append(entry)
    cloud.stats[f"{request.method} {endpoint}"] += 1
    if request.headers.get("Authorization") != f"Bearer {cloud.api_key}":
        entry["status"] = 401
        return _error(401, "auth_error", "Invalid user key")
    try:
        rule = cloud.faults.pick(endpoint, request.method)
        if rule is None:
            response = await handler(request)
        elif rule.after_effect:
            real = await handler(request)
            await asyncio.sleep(rule.delay_s)
            response = fault_response(rule) if rule.status is not None else real
        else:
            await asyncio.sleep(rule.delay_s)
            response = fault_response(rule) if rule.status is not None else await handler(request)
    except web.HTTPException as exc:
        entry["status"] = exc.status
        raise
    except (ValueError, KeyError, TypeError) as exc:
        response = _error(400, "bad_request", f"{type(exc).__name__}: {exc}")
    entry["status"] = response.status
    return response


_CURRENT_USER: Final[dict[str, Any]] = {
    "id": 1, "username": "sim", "email": "sim@example.invalid", "fullname": "vastd sim",
    "credit": 1000.0, "balance": 0.0, "can_pay": True, "host_agreement_accepted": False,
    "has_billing": True, "ssh_key": None, "user": "sim",
}  # fmt: skip


async def _current_user(request: web.Request) -> web.Response:
    return json_response(_CURRENT_USER)


async def _list_instances(request: web.Request) -> web.Response:
    cloud = _cloud(request)
    filters = _json_param(request, "select_filters", {})
    order_by = _json_param(request, "order_by", [{"col": "id", "dir": "asc"}])
    limit = max(1, min(int(request.query.get("limit", "25")), 25))
    order = [(str(o["col"]), str(o.get("dir", "asc"))) for o in order_by]
    if "id" not in [c for c, _ in order]:
        order.append(("id", "asc"))
    rows = sort_rows([r for r in cloud.instances.values() if matches(r, filters)], order)
    total = len(rows)
    token = request.query.get("after_token")
    if token:
        after = _decode_token(token)

        def is_after(row: dict[str, Any]) -> bool:
            for (col, direction), value in zip(order, after, strict=True):
                c = _cmp(row.get(col), value)
                if c:
                    return (c > 0) == (direction == "asc")
            return False

        rows = [r for r in rows if is_after(r)]
    page = rows[:limit]
    next_token = _encode_token([page[-1].get(c) for c, _ in order]) if len(rows) > limit else None
    return json_response(
        {
            "instances": [dict(r) for r in page],
            "next_token": next_token,
            "total_instances": total,
            "label_counts": dict(Counter(str(r.get("label")) for r in cloud.instances.values())),
        }
    )


async def _list_instances_v0(request: web.Request) -> web.Response:
    # Deprecated on the real API: since 2026 it answers an empty body (skypilot#10517).
    return web.Response(body=b"", status=200, content_type="application/json")


async def _show_instance(request: web.Request) -> web.Response:
    row = _cloud(request).instances.get(_instance_id(request))
    return json_response({"instances": dict(row) if row is not None else None})


async def _update_instance(request: web.Request) -> web.Response:
    cloud, instance_id = _cloud(request), _instance_id(request)
    if instance_id not in cloud.instances:
        return _error(404, "no_such_instance", f"Instance {instance_id} not found.")
    body = await _body(request)
    if "label" in body:
        cloud.set_label(instance_id, body["label"])
    if "state" in body:
        await cloud.set_state(instance_id, str(body["state"]))
    return json_response({"success": True})


async def _destroy(request: web.Request) -> web.Response:
    instance_id = _instance_id(request)
    if not await _cloud(request).destroy(instance_id):
        return _error(404, "no_such_instance", f"Instance {instance_id} not found.")
    return json_response({"success": True})


async def _reboot(request: web.Request) -> web.Response:
    cloud, instance_id = _cloud(request), _instance_id(request)
    if instance_id not in cloud.instances:
        return _error(404, "no_such_instance", f"Instance {instance_id} not found.")
    await cloud.reboot(instance_id)
    return json_response({"success": True})


async def _attach_ssh(request: web.Request) -> web.Response:
    cloud, instance_id = _cloud(request), _instance_id(request)
    if instance_id not in cloud.instances:
        return _error(404, "no_such_instance", f"Instance {instance_id} not found.")
    key = str((await _body(request)).get("ssh_key") or "").strip()
    if not key:
        return _error(400, "invalid_args", "ssh_key is required")
    await cloud.attach_key(instance_id, key)
    return json_response({"success": True, "msg": "SSH key attached"})


async def _search_offers(request: web.Request) -> web.Response:
    return json_response({"offers": _cloud(request).search(await _body(request))})


async def _rent(request: web.Request) -> web.Response:
    cloud, offer_id = _cloud(request), _instance_id(request)
    body = await _body(request)
    if not body.get("image") and not body.get("template_hash_id"):
        return _error(400, "invalid_args", "an image or a template is required")
    try:
        instance_id = cloud.rent(offer_id, body)
    except KeyError:
        return _error(400, "no_such_ask", f"Offer {offer_id} is not available.")
    return json_response({"success": True, "new_contract": instance_id})


# -- control surface for tests (no auth: loopback only) --------------------------


async def _ctl_state(request: web.Request) -> web.Response:
    return json_response(_cloud(request).snapshot())


async def _ctl_calls(request: web.Request) -> web.Response:
    cloud = _cloud(request)
    if request.method == "DELETE":
        cloud.calls.clear()
    return json_response({"calls": cloud.calls})


async def _ctl_stats(request: web.Request) -> web.Response:
    return json_response(dict(_cloud(request).stats))


async def _ctl_faults(request: web.Request) -> web.Response:
    faults = _cloud(request).faults
    if request.method == "POST":
        try:
            fault_id = faults.add(**await _body(request))
        except (TypeError, ValueError) as exc:
            return _error(400, "bad_fault", str(exc))
        return json_response({"id": fault_id})
    if request.method == "DELETE":
        if "id" in request.match_info:
            faults.remove(int(request.match_info["id"]))
        else:
            faults.clear()
    return json_response({"faults": faults.list()})


async def _ctl_add_instance(request: web.Request) -> web.Response:
    instance_id = await _cloud(request).add_instance(**await _body(request))
    return json_response({"id": instance_id})


async def _ctl_add_offer(request: web.Request) -> web.Response:
    return json_response({"id": _cloud(request).add_offer(**await _body(request))})


async def _ctl_status(request: web.Request) -> web.Response:
    body = await _body(request)
    try:
        await _cloud(request).set_status(
            _instance_id(request), body.get("actual_status"), stop_host=body.get("stop_host")
        )
    except KeyError:
        return _error(404, "no_such_instance", "no such instance")
    return json_response({"success": True})


async def _ctl_vanish(request: web.Request) -> web.Response:
    await _cloud(request).vanish(_instance_id(request))
    return json_response({"success": True})


def create_sim_app(cloud: SimCloud) -> web.Application:
    """The simulator's aiohttp application serving `cloud`."""
    app = web.Application(middlewares=[_record_auth_faults])
    app[CLOUD_KEY] = cloud
    r = app.router
    r.add_get("/api/v0/users/current", _current_user, name="current_user")
    r.add_get("/api/v0/users/current/", _current_user)
    r.add_get("/api/v1/instances/", _list_instances, name="list_instances")
    r.add_get("/api/v0/instances/", _list_instances_v0, name="list_instances_v0")
    r.add_get(r"/api/v0/instances/{id:\d+}/", _show_instance, name="show_instance")
    r.add_put(r"/api/v0/instances/{id:\d+}/", _update_instance, name="update_instance")
    r.add_delete(r"/api/v0/instances/{id:\d+}/", _destroy, name="destroy")
    r.add_put(r"/api/v0/instances/reboot/{id:\d+}/", _reboot, name="reboot")
    r.add_post(r"/api/v0/instances/{id:\d+}/ssh/", _attach_ssh, name="attach_ssh")
    r.add_post("/api/v0/bundles/", _search_offers, name="search_offers")
    r.add_put(r"/api/v0/asks/{id:\d+}/", _rent, name="rent")
    r.add_get("/_sim/state", _ctl_state)
    r.add_route("*", "/_sim/calls", _ctl_calls)
    r.add_get("/_sim/stats", _ctl_stats)
    r.add_route("*", "/_sim/faults", _ctl_faults)
    r.add_delete(r"/_sim/faults/{id:\d+}", _ctl_faults)
    r.add_post("/_sim/instances", _ctl_add_instance)
    r.add_post("/_sim/offers", _ctl_add_offer)
    r.add_post(r"/_sim/instances/{id:\d+}/status", _ctl_status)
    r.add_post(r"/_sim/instances/{id:\d+}/vanish", _ctl_vanish)
    return app


async def start_sim_api(
    cloud: SimCloud, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve `cloud` on host:port (0: any free port); returns (runner, base URL).

    Stop with `await runner.cleanup()` and then `await cloud.aclose()`.
    """
    runner = web.AppRunner(
        create_sim_app(cloud), handler_cancellation=True, shutdown_timeout=1.0, access_log=None
    )
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound_port = int(runner.addresses[0][1])
    return runner, f"http://{host}:{bound_port}"
