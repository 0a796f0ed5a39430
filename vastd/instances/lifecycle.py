"""Instance lifecycle primitives over a CloudProvider: destroy (confirmed), the SSH key.

Policies written down here because they cost money when wrong (the steps that
apply them to the snapshot are orchestration/renting.py's):

- Renting is not idempotent. A rent intent is saved (flushed to disk) before the PUT
  and the instance is tagged with `VASTD_INTENT=<intent id>` in its env, so after a
  crash discovery recognises the instance as ours. An ambiguous failure (5xx,
  timeout, bad body) leaves the intent in place for discovery to reconcile; a 4xx
  (the request was refused) removes it.
- Teardown destroys, never stops: a stopped instance keeps billing its disk. A
  destroy is confirmed by asking the API for the instance afterwards.
- Only owned instances (rented by this vastd, or claimed through an intent) are ever
  destroyed by the fleet.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncssh

from vastd.instances.provider import CloudProvider
from vastd.utils.exceptions import VastAIError
from vastd.utils.logging import get_logger
from vastd.utils.supervise import Backoff

log = get_logger("vastd.lifecycle")

MACHINE_BLOCK_S = 6 * 3600.0  # a machine that failed to boot is avoided this long
DESTROY_BACKOFF_S = 1.0
DESTROY_BACKOFF_MAX_S = 60.0

_public_keys: dict[Path, str] = {}


# --- primitives -------------------------------------------------------------------------------
async def terminate_instance(
    cloud: CloudProvider,
    instance_id: str,
    *,
    attempts: int = 5,
    backoff_s: float = DESTROY_BACKOFF_S,
) -> bool:
    """Destroy an instance and confirm it is gone; True once confirmed.

    Each attempt sends the DELETE (a 404 means already gone) and then asks the API
    for the instance; only an answer without it counts. Attempts back off
    exponentially. False after `attempts` tries: the caller tries again later.
    """
    for attempt in range(max(1, attempts)):
        if attempt:
            await asyncio.sleep(
                Backoff(backoff_s, DESTROY_BACKOFF_MAX_S, jitter="none").delay_s(attempt - 1)
            )
        try:
            await cloud.destroy(instance_id)
            if await cloud.show_instance(instance_id) is None:
                return True
            log.info("instance_destroy_unconfirmed", instance=instance_id)
        except VastAIError as exc:
            log.warning(
                "instance_destroy_failed",
                instance=instance_id,
                error=str(exc),
                attempt=attempt + 1,
            )
    return False


def public_key_line(key_file: Path) -> str:
    """The OpenSSH public key line of `[ssh] key_file` (never the private key)."""
    cached = _public_keys.get(key_file)
    if cached is None:
        key = asyncssh.read_private_key(key_file)
        cached = key.export_public_key().decode().strip()
        _public_keys[key_file] = cached
    return cached
