"""Where vastd writes on an instance (docs/ARCHITECTURE.md: "Remote layout"): every path below `<remote root>/<instance id>/`.

Per job: `<remote root>/<instance id>/jobs/<safe job>/` (names shortened by
`safe_name`, never pasted into a shell unquoted). The preparation marker sits at
`<remote root>/<instance id>/prepared`.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from vastd.core.files import safe_name

LOG_NAME = "log.txt"
OUT_NAME = "out"


@dataclass(frozen=True)
class RemoteJobPaths:
    """Absolute remote paths of one job's folder and the files in it."""

    instance_root: str
    job_dir: str
    input: str
    out_dir: str
    log: str
    pid: str
    attempt: str
    started_at: str
    ended_at: str
    exit_code: str
    timed_out: str
    boot_key: str


def _component(name: str, what: str) -> str:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"{what} {name!r} cannot be a remote folder name")
    return name


def instance_root(remote_root: str, instance_id: str) -> str:
    """`<remote root>/<instance id>`: everything vastd writes on an instance lives below."""
    root = remote_root.rstrip("/") or ""
    if not remote_root.startswith("/"):
        raise ValueError(f"remote root {remote_root!r} must be absolute")
    return f"{root}/{_component(safe_name(instance_id), 'instance id')}"


def remote_job_paths(remote_root: str, instance_id: str, job_id: str) -> RemoteJobPaths:
    """The remote paths of a job on an instance (names shortened by `safe_name`)."""
    inst = instance_root(remote_root, instance_id)
    job_dir = f"{inst}/jobs/{_component(safe_name(job_id), 'job id')}"
    return RemoteJobPaths(
        instance_root=inst,
        job_dir=job_dir,
        input=f"{job_dir}/{_component(safe_name(job_id, '.csv'), 'job id')}",
        out_dir=f"{job_dir}/{OUT_NAME}",
        log=f"{job_dir}/{LOG_NAME}",
        pid=f"{job_dir}/pid",
        attempt=f"{job_dir}/attempt",
        started_at=f"{job_dir}/started_at",
        ended_at=f"{job_dir}/ended_at",
        exit_code=f"{job_dir}/exit_code",
        timed_out=f"{job_dir}/timed_out",
        boot_key=f"{job_dir}/boot_key",
    )


def is_job_dir_of(paths: RemoteJobPaths) -> bool:
    """True when `paths.job_dir` is exactly one folder below `<instance root>/jobs`."""
    job_dir = paths.job_dir
    return (
        posixpath.normpath(job_dir) == job_dir
        and posixpath.dirname(job_dir) == f"{paths.instance_root}/jobs"
        and posixpath.basename(job_dir) not in ("", ".", "..")
        and paths.instance_root.startswith("/")
    )
