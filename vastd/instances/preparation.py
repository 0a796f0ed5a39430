"""Instance preparation: the `[[prepare]]` steps, run in order, then a marker.

Each step runs its `check`; only when the check fails does `install` run, and then
the check must pass. The marker `<remote root>/<instance id>/prepared` holds a hash
of the steps, so a prepared instance is not prepared again unless the steps change.
The seed's torch/density-engine specific checks are `[[prepare]]` steps in the
config (see config.example.toml), not code.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Sequence

from vastd.core.remote_layout import instance_root
from vastd.core.ssh import CommandResult, SSHConnection
from vastd.utils.config import PrepareStep
from vastd.utils.exceptions import PreparationError
from vastd.utils.logging import get_logger

log = get_logger("vastd.preparation")
ERROR_TEXT_MAX = 1000  # of a remote error text kept in a record, the snapshot and the log


def _clip(text: str, limit: int = ERROR_TEXT_MAX) -> str:
    """The end of a remote error text (where the error usually is), at most `limit` chars."""
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]


MARK = "__VASTD_BEGIN__"


def steps_hash(steps: Sequence[PrepareStep]) -> str:
    """A stable hash of what preparation does (names, checks, installs)."""
    body = json.dumps(
        [{"name": s.name, "check": s.check, "install": s.install} for s in steps],
        sort_keys=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def marker_path(remote_root: str, instance_id: str) -> str:
    return f"{instance_root(remote_root, instance_id)}/prepared"


async def read_marker(
    conn: SSHConnection, remote_root: str, instance_id: str, *, timeout_s: float
) -> str | None:
    """The hash in the instance's marker, or None; also creates the instance's folder."""
    root = shlex.quote(instance_root(remote_root, instance_id))
    marker = shlex.quote(marker_path(remote_root, instance_id))
    result = await conn.run(
        f"mkdir -p {root}/jobs && echo {MARK} && cat {marker} 2>/dev/null; true",
        timeout_s=timeout_s,
    )
    if MARK not in result.stdout:
        raise PreparationError(f"cannot create {root} on the instance: {_clip(result.stderr)}")
    after = result.stdout.split(MARK, 1)[1].strip()
    return after or None


async def run_step(conn: SSHConnection, step: PrepareStep) -> CommandResult | None:
    """Run one step; None when its check already passed, else the install's result."""
    if step.check:
        check = await conn.run(step.check, timeout_s=step.timeout_s)
        if check.ok:
            return None
    if not step.install:
        raise PreparationError(f"step {step.name!r}: check failed and there is no install")
    install = await conn.run(step.install, timeout_s=step.timeout_s)
    if not install.ok:
        tail = (install.stderr or install.stdout).strip().splitlines()[-5:]
        raise PreparationError(
            f"step {step.name!r}: install exited {install.exit_status}: " + _clip(" | ".join(tail))
        )
    if step.check:
        again = await conn.run(step.check, timeout_s=step.timeout_s)
        if not again.ok:
            raise PreparationError(f"step {step.name!r}: check still fails after install")
    return install


async def verify_instance_readiness(
    conn: SSHConnection,
    steps: Sequence[PrepareStep],
    remote_root: str,
    instance_id: str,
    *,
    timeout_s: float = 30.0,
) -> bool:
    """True when the instance's marker matches the current steps."""
    marker = await read_marker(conn, remote_root, instance_id, timeout_s=timeout_s)
    return marker == steps_hash(steps)


async def prepare_instance_for_jobs(
    conn: SSHConnection,
    steps: Sequence[PrepareStep],
    remote_root: str,
    instance_id: str,
    *,
    timeout_s: float = 30.0,
) -> str:
    """Prepare an instance unless its marker says it is; returns the steps' hash.

    Raises PreparationError (an instance problem) or SSHConnectionError (unreachable).
    """
    wanted = steps_hash(steps)
    if await verify_instance_readiness(conn, steps, remote_root, instance_id, timeout_s=timeout_s):
        return wanted
    for step in steps:
        ran = await run_step(conn, step)
        log.info(
            "prepare_step_done",
            instance=instance_id,
            step=step.name,
            installed=ran is not None,
        )
    path = shlex.quote(marker_path(remote_root, instance_id))
    tmp = shlex.quote(marker_path(remote_root, instance_id) + ".tmp")
    result = await conn.run(f"echo {wanted} > {tmp} && mv {tmp} {path}", timeout_s=timeout_s)
    if not result.ok:
        raise PreparationError(f"cannot write the preparation marker: {_clip(result.stderr)}")
    return wanted
