"""`vastd check-config --online`: the API key against the API, SSH to one labelled instance.

Each check gives one line: (ok, text). Nothing is changed anywhere: the API calls are
reads, the SSH check runs `true`; no host key is pinned (a TOFU check accepts any key).
"""

from __future__ import annotations

from vastd.core.ssh import Endpoint, SSHPool
from vastd.instances.provider import ApiState, ProviderInstance
from vastd.instances.vast_api import VastClient
from vastd.instances.vast_provider import VastProvider
from vastd.utils.config import Settings
from vastd.utils.exceptions import SSHConnectionError, VastAIError
from vastd.utils.logging import register_secret

Check = tuple[bool, str]


def _endpoints(inst: ProviderInstance, mode: str) -> list[Endpoint]:
    """The endpoints `[ssh] endpoint` allows, in the daemon's order."""
    if mode == "proxy":
        return [inst.proxy] if inst.proxy else []
    if mode == "direct":
        return [inst.direct] if inst.direct else []
    return inst.endpoints


async def online_checks(settings: Settings) -> list[Check]:
    api_key = settings.api_key()
    if not api_key:
        return [(False, "vast.api_key: no API key to try")]
    register_secret(api_key)
    url = settings.vast.api_url
    client = VastClient(url, api_key, timeout_s=settings.vast.request_timeout_s, max_retries=1)
    provider = VastProvider(client)
    checks: list[Check] = []
    try:
        try:
            user = await client.current_user()
        except VastAIError as exc:
            return [(False, f"vast.api_key: {url} refused it: {exc}")]
        who = user.get("username") or user.get("id") or "?"
        checks.append((True, f"vast.api_key: accepted by {url} (account {who})"))
        try:
            instances = await provider.list_instances(settings.vast.label)
        except VastAIError as exc:
            checks.append((False, f"vast: cannot list instances: {exc}"))
            return checks
        running = [i for i in instances if i.state is ApiState.RUNNING and i.endpoints]
        if not running:
            checks.append(
                (True, f"ssh: skipped, no running instance labelled {settings.vast.label!r}")
            )
            return checks
        inst = running[0]
        endpoints = _endpoints(inst, settings.ssh.endpoint)
        if not endpoints:
            checks.append(
                (False, f"ssh: instance {inst.id} has no {settings.ssh.endpoint} endpoint")
            )
            return checks
        pool = SSHPool(settings.ssh, connect_attempts=1)
        try:
            conn = await pool.get(inst.id, endpoints)
            result = await conn.run("true", timeout_s=settings.ssh.command_timeout_s)
            if result.exit_status != 0:
                raise SSHConnectionError(f"`true` exited {result.exit_status}")
            checks.append((True, f"ssh: {settings.ssh.user}@instance {inst.id}: OK"))
        except SSHConnectionError as exc:
            checks.append((False, f"ssh: {settings.ssh.user}@instance {inst.id}: {exc}"))
        finally:
            await pool.aclose()
    finally:
        await client.aclose()
    return checks
