"""The instance listing of one cycle, shared: discovery takes it, destroy checks reuse it.

vast.ai limits requests per endpoint, and the listing is the heaviest one. Discovery
lists once per `[vast] poll_interval_s`; a destroy being confirmed needs a listing
taken after its DELETE, and reuses discovery's when that one is recent enough instead
of listing again (only the first check after a DELETE may have to list on its own).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from vastd.instances.provider import CloudProvider, ProviderInstance


@dataclass
class SharedListing:
    """The latest successful `list_instances(label)` and when its request was sent."""

    taken_at: float | None = None
    label: str | None = None
    instances: list[ProviderInstance] = field(default_factory=list)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    async def fetch(self, cloud: CloudProvider, label: str | None) -> list[ProviderInstance]:
        """A fresh listing (VastAIError propagates: a failed listing is never "none")."""
        async with self._lock:
            return await self._fetch(cloud, label)

    async def since(
        self, cloud: CloudProvider, label: str | None, newer_than: float
    ) -> list[ProviderInstance]:
        """A listing whose request was sent at or after `newer_than`: the shared one when it
        is, else a fresh one (which then serves the others)."""
        async with self._lock:
            if self.taken_at is not None and self.taken_at >= newer_than and self.label == label:
                return self.instances
            return await self._fetch(cloud, label)

    async def _fetch(self, cloud: CloudProvider, label: str | None) -> list[ProviderInstance]:
        started = time.time()
        instances = await cloud.list_instances(label)
        self.taken_at, self.label, self.instances = started, label, instances
        return instances
