"""Instance listing -> `InstanceInfo`: what vastd knows of an instance from the API."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vastd.instances.provider import ApiState
from vastd.instances.vast_api import VastClient
from vastd.instances.vast_status import api_state
from vastd.utils.exceptions import APIShapeError

# "unknown" is "no heartbeat": a candidate for lost, judged with a grace period upstream.


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _opt_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _opt_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):  # (an int past float's range overflows)
        return None


@dataclass(frozen=True)
class InstanceInfo:
    """One instance as the API reports it; `raw` keeps the full row."""

    id: int
    label: str | None = None
    actual_status: str | None = None
    intended_status: str | None = None
    cur_state: str | None = None
    status_msg: str | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    public_ipaddr: str | None = None
    direct_ssh_port: int | None = None
    machine_id: int | None = None
    host_id: int | None = None
    gpu_name: str | None = None
    num_gpus: int | None = None
    dph_total: float = 0.0
    start_date: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def state(self) -> ApiState:
        return api_state(self.actual_status)

    @property
    def is_running(self) -> bool:
        return self.state is ApiState.RUNNING

    @property
    def is_lost(self) -> bool:
        """Exited, offline or without heartbeat: may never run again."""
        return self.state is ApiState.GONE

    @property
    def proxy_endpoint(self) -> tuple[str, int] | None:
        if self.ssh_host and self.ssh_port:
            return (self.ssh_host, self.ssh_port)
        return None

    @property
    def direct_endpoint(self) -> tuple[str, int] | None:
        if self.public_ipaddr and self.direct_ssh_port:
            return (self.public_ipaddr, self.direct_ssh_port)
        return None

    @property
    def has_endpoint(self) -> bool:
        return self.proxy_endpoint is not None or self.direct_endpoint is not None


def _direct_port(ports: Any) -> int | None:
    if not isinstance(ports, Mapping):
        return None
    bindings = ports.get("22/tcp")
    if not isinstance(bindings, list) or not bindings or not isinstance(bindings[0], Mapping):
        return None
    return _opt_int(bindings[0].get("HostPort"))


def parse_instance_data(raw: Mapping[str, Any]) -> InstanceInfo:
    """Build an InstanceInfo from an API row; APIShapeError if it has no integer id."""
    if not isinstance(raw, Mapping):
        raise APIShapeError("an instance row is not an object")
    instance_id = raw.get("id")
    if not isinstance(instance_id, int) or isinstance(instance_id, bool):
        raise APIShapeError(f"an instance row has no integer id: {instance_id!r}")
    return InstanceInfo(
        id=instance_id,
        label=_opt_str(raw.get("label")),
        actual_status=_opt_str(raw.get("actual_status")),
        intended_status=_opt_str(raw.get("intended_status")),
        cur_state=_opt_str(raw.get("cur_state")),
        status_msg=_opt_str(raw.get("status_msg")),
        ssh_host=_opt_str(raw.get("ssh_host")),
        ssh_port=_opt_int(raw.get("ssh_port")),
        public_ipaddr=_opt_str(raw.get("public_ipaddr")),
        direct_ssh_port=_direct_port(raw.get("ports")),
        machine_id=_opt_int(raw.get("machine_id")),
        host_id=_opt_int(raw.get("host_id")),
        gpu_name=_opt_str(raw.get("gpu_name")),
        num_gpus=_opt_int(raw.get("num_gpus")),
        dph_total=_opt_float(raw.get("dph_total")) or 0.0,
        start_date=_opt_float(raw.get("start_date")),
        raw=dict(raw),
    )


async def fetch_instances_from_api(client: VastClient, label: str | None) -> list[dict[str, Any]]:
    """Raw rows of every instance carrying `label` (all of them when None)."""
    return await client.list_instances(label)


def filter_instances_by_criteria(
    instances: list[dict[str, Any]] | list[InstanceInfo], criteria: Mapping[str, Any]
) -> list[InstanceInfo]:
    """Keep instances whose attributes equal each criterion (or satisfy it, if callable)."""
    infos = [i if isinstance(i, InstanceInfo) else parse_instance_data(i) for i in instances]
    kept: list[InstanceInfo] = []
    for info in infos:
        for key, wanted in criteria.items():
            value = getattr(info, key) if hasattr(info, key) else info.raw.get(key)
            if callable(wanted):
                predicate: Callable[[Any], Any] = wanted
                if not predicate(value):
                    break
            elif value != wanted:
                break
        else:
            kept.append(info)
    return kept


async def discover_active_instances(client: VastClient, label: str) -> list[InstanceInfo]:
    """Labelled instances that run and have an SSH endpoint."""
    rows = await fetch_instances_from_api(client, label)
    return filter_instances_by_criteria(
        rows, {"label": label, "is_running": True, "has_endpoint": True}
    )
