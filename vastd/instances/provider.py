"""The cloud provider interface: what the fleet needs from a GPU cloud, in neutral words.

Orchestration speaks only this: `ApiState` instead of status strings, `ProviderInstance`
and `Offer` instead of API rows, ids as strings. A provider module (vast_provider.py)
translates its cloud's vocabulary, at its boundary, into these.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from vastd.core.ssh import Endpoint


class ApiState(StrEnum):
    """What the cloud says an instance is doing, reduced to what vastd does about it.

    PENDING: on its way (provisioning, pulling the image, rebooting): wait, within
    the boot deadline. RUNNING: billed and usable once SSH answers. FROZEN: billed but
    unusable: drain it after a grace. STOPPED: the disk still bills; for an
    interruptible instance it means outbid (preempted). GONE: the container exited,
    the host went offline or stopped answering: lost once confirmed, may never run
    again. A status a provider does not recognise is PENDING (see vast_provider).
    """

    PENDING = "pending"
    RUNNING = "running"
    FROZEN = "frozen"
    STOPPED = "stopped"
    GONE = "gone"


@dataclass(frozen=True)
class ProviderInstance:
    """One of our instances as the cloud reports it; numbers are finite and >= 0 or None."""

    id: str
    label: str | None
    state: ApiState
    raw_status: str | None  # the cloud's own word for the state, for logs and `status`
    proxy: Endpoint | None  # the SSH endpoint through the cloud's proxy
    direct: Endpoint | None  # the SSH endpoint on the host's public address
    dph: float | None  # $/hour billed now
    machine_id: str | None
    gpu_name: str | None
    num_gpus: int | None
    intent: str | None  # the rent intent it was tagged with, if vastd rented it
    end_date: float | None  # epoch s when the host's offer ends, if it says
    interruptible: bool = False  # rented at a bid: STOPPED means outbid

    @property
    def endpoints(self) -> list[Endpoint]:
        """Every SSH endpoint it has, direct first."""
        return [e for e in (self.direct, self.proxy) if e is not None]


@dataclass(frozen=True)
class Offer:
    """A rentable machine; `dph` is what renting it costs now (the minimum bid for a bid search)."""

    id: str
    machine_id: str | None
    dph: float
    min_bid: float | None
    gpu_name: str | None
    num_gpus: int | None
    end_date: float | None


def machine_number(machine_id: str | None) -> int | None:
    """A provider's machine id as the snapshot keeps it (a number), or None."""
    return int(machine_id) if machine_id is not None and machine_id.isdigit() else None


@runtime_checkable
class CloudProvider(Protocol):
    """The operations the fleet needs from a cloud.

    Errors raise VastAIError (the cloud API's boundary in utils/exceptions.py). For
    `rent`, `status` 400-499 means refused (nothing was created); any other failure
    may have created the instance: reconcile by listing `label` and reading `intent`.
    A failed or unexpected listing raises; it is never read as "no instances".
    """

    async def list_instances(self, label: str | None) -> list[ProviderInstance]:
        """Every own instance carrying `label` (all of them when None)."""
        ...

    async def show_instance(self, instance_id: str) -> ProviderInstance | None:
        """One own instance, or None when the cloud says it does not exist."""
        ...

    async def search_offers(
        self,
        query: str,
        *,
        order: str,
        limit: int,
        disk_gb: float,
        interruptible: bool = False,
    ) -> list[Offer]:
        """Offers matching `query` (the provider's syntax, from config), in `order`."""
        ...

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
        """Rent `offer` tagged with `intent`, at `bid_dph` when interruptible; the new id.

        Never retried once the request may have reached the cloud.
        """
        ...

    async def destroy(self, instance_id: str) -> bool:
        """Destroy an instance; False when it was already gone. Confirm with show_instance."""
        ...

    async def attach_ssh_key(self, instance_id: str, public_key: str) -> None:
        """Register an SSH public key on the instance through the API."""
        ...

    async def set_bid(self, instance_id: str, dph: float) -> None:
        """Change an interruptible instance's bid to `dph` $/hour."""
        ...

    async def start(self, instance_id: str) -> None:
        """Ask a stopped instance to run again."""
        ...

    async def reboot(self, instance_id: str) -> None:
        """Restart an instance's container."""
        ...

    async def aclose(self) -> None:
        """Release the provider's connections."""
        ...
