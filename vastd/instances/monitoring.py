"""Instance health over the pooled SSH connection: disk, memory, GPU.

One command per instance per check (`probe_instance`) gathers the free disk of the
remote root (`df -Pk`), `/proc/meminfo` and, when `nvidia-smi` exists, GPU
utilisation per GPU with its index (the instance's GPUs for one job per GPU,
core/gpus.py); the pure seed functions (`check_disk_space`, `check_memory_usage`,
`get_instance_utilization`, `detect_instance_issues`) read that one answer.

Policy (`monitor_instance_status`, in orchestration/health.py): an instance whose free disk is below
`[fleet] min_free_disk_gb` is DRAINING (the dispatcher gives jobs to READY instances
only) until the disk recovers; one whose probe fails HEALTH_FAILURES_MAX times in a
row is DRAINING too. The fleet destroys an owned DRAINING instance once it holds no
job, and the scaling rule rents its replacement. Instances vastd does not own are
only drained, never touched.
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vastd.core.files import utc_iso
from vastd.core.records import InstanceRecord  # not core.state: `vastd status` stays light
from vastd.utils.logging import get_logger

if TYPE_CHECKING:  # `vastd status` uses this module and needs no SSH
    from vastd.core.ssh import SSHConnection

log = get_logger("vastd.monitoring")

MARKER = "__VASTD_HEALTH_5e1c__"
HEALTH_FAILURES_MAX = 3
HEALTH_TIMEOUT_S = 20.0
LOW_MEMORY_FRACTION = 0.05
DRAIN_LOW_DISK = "low disk"
DRAIN_UNHEALTHY = "unhealthy"
HEALTH_DRAINS = frozenset({DRAIN_LOW_DISK, DRAIN_UNHEALTHY})
MOUNT_TEXT_MAX = 256
_DF_RE = re.compile(r"\s(\d+)\s+(\d+)\s+(\d+)\s+(\d+)%\s+(.+)$")


@dataclass(frozen=True)
class DiskSpaceInfo:
    path: str
    total_gb: float
    free_gb: float


@dataclass(frozen=True)
class MemoryInfo:
    total_mb: float
    available_mb: float

    @property
    def used_fraction(self) -> float:
        return 1.0 - self.available_mb / self.total_mb if self.total_mb else 0.0


@dataclass(frozen=True)
class GpuUtilization:
    index: int
    utilization_pct: float | None
    memory_used_mb: float | None
    memory_total_mb: float | None


@dataclass(frozen=True)
class UtilizationMetrics:
    """GPU figures; `gpu_present` False when the instance has no nvidia-smi."""

    gpu_present: bool
    gpus: tuple[GpuUtilization, ...] = ()
    error: str | None = None

    @property
    def mean_utilization_pct(self) -> float | None:
        values = [g.utilization_pct for g in self.gpus if g.utilization_pct is not None]
        return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class Issue:
    kind: str  # low_disk, low_memory, gpu_error, probe_failed, unreachable
    message: str
    critical: bool = False


@dataclass(frozen=True)
class InstanceProbe:
    """The sections of one probe's answer, each the raw text after its header."""

    sections: dict[str, str]


@dataclass
class HealthStatus:
    instance_id: str
    reachable: bool
    disk: DiskSpaceInfo | None = None
    memory: MemoryInfo | None = None
    utilization: UtilizationMetrics | None = None
    issues: list[Issue] = field(default_factory=list)
    checked_at: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        """Probed and nothing critical found."""
        return self.reachable and not any(i.critical for i in self.issues)

    @property
    def probe_failed(self) -> bool:
        return not self.reachable or any(i.kind == "probe_failed" for i in self.issues)


# --- the one command --------------------------------------------------------------------------
def health_command(remote_root: str) -> str:
    """The shell probe: marker, then [df], [mem], [gpu] sections."""
    root = shlex.quote(remote_root)
    return (
        f"printf '\\n%s\\n' {MARKER}; "
        f'd={root}; while [ ! -d "$d" ]; do d=$(dirname "$d"); done; '
        f"echo '[df]'; df -Pk \"$d\" 2>/dev/null | tail -n 1; "
        "echo '[mem]'; grep -E '^(MemTotal|MemAvailable):' /proc/meminfo 2>/dev/null; "
        "echo '[gpu]'; if command -v nvidia-smi >/dev/null 2>&1; then "
        "nvidia-smi --query-gpu=index,utilization.gpu,memory.used,memory.total "
        "--format=csv,noheader,nounits 2>&1 || echo 'error: nvidia-smi failed'; "
        "else echo absent; fi; echo '[end]'"
    )


def parse_probe(stdout: str) -> InstanceProbe:
    """Split a probe's output after the marker (a login shell may print junk first)."""
    _, found, after = stdout.rpartition(MARKER + "\n")
    if not found:
        raise ValueError("health probe marker missing from the output")
    sections: dict[str, str] = {}
    current: str | None = None
    lines: list[str] = []
    for line in after.splitlines():
        if line.startswith("[") and line.endswith("]"):
            if current is not None:
                sections[current] = "\n".join(lines).strip()
            current, lines = line[1:-1], []
        elif current is not None:
            lines.append(line)
    if "end" not in sections and current != "end":
        raise ValueError("health probe output is truncated")
    return InstanceProbe(sections)


async def probe_instance(
    conn: SSHConnection, remote_root: str, *, timeout_s: float
) -> InstanceProbe:
    """Run the one health command; SSHConnectionError or ValueError when it fails."""
    result = await conn.run(health_command(remote_root), timeout_s=timeout_s)
    return parse_probe(result.stdout)


# --- the seed's primitives (pure, on one probe) -----------------------------------------------
def check_disk_space(probe: InstanceProbe) -> DiskSpaceInfo | None:
    match = _DF_RE.search(probe.sections.get("df", ""))
    if match is None:
        return None
    total_kb, _, avail_kb, _, mount = match.groups()
    # The host prints the mount point: it goes into a drain reason and the log, so bounded.
    path = mount.strip()[:MOUNT_TEXT_MAX]
    return DiskSpaceInfo(path, int(total_kb) / 1024**2, int(avail_kb) / 1024**2)


def check_memory_usage(probe: InstanceProbe) -> MemoryInfo | None:
    values: dict[str, float] = {}
    for line in probe.sections.get("mem", "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) / 1024
    if "MemTotal" not in values:
        return None
    return MemoryInfo(values["MemTotal"], values.get("MemAvailable", values["MemTotal"]))


def _num(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def get_instance_utilization(probe: InstanceProbe) -> UtilizationMetrics:
    """nvidia-smi's `index, utilization.gpu, memory.used, memory.total` lines, one a GPU.

    A line that is not four fields with a whole-number index (nvidia-smi's own error
    text, say) makes the answer an error: the GPUs read so far are kept, and the
    instance's known GPU list is left as it was. "[N/A]" values read as None.
    """
    text = probe.sections.get("gpu", "absent").strip()
    if text == "absent" or not text:
        return UtilizationMetrics(gpu_present=False)
    gpus: list[GpuUtilization] = []
    for line in text.splitlines():
        parts = line.split(",")
        index = parts[0].strip()
        if len(parts) != 4 or not index.isdigit():
            return UtilizationMetrics(gpu_present=True, gpus=tuple(gpus), error=text[:200])
        gpus.append(GpuUtilization(int(index), *(_num(p) for p in parts[1:])))
    return UtilizationMetrics(gpu_present=True, gpus=tuple(gpus))


def detect_instance_issues(probe: InstanceProbe, *, min_free_disk_gb: float) -> list[Issue]:
    issues: list[Issue] = []
    disk = check_disk_space(probe)
    if disk is None:
        issues.append(Issue("probe_failed", "df gave no answer", critical=True))
    elif disk.free_gb < min_free_disk_gb:
        issues.append(
            Issue(
                "low_disk",
                f"{disk.free_gb:.2f} GB free on {disk.path} < {min_free_disk_gb:g} GB",
                critical=True,
            )
        )
    mem = check_memory_usage(probe)
    if mem is not None and mem.total_mb and mem.available_mb / mem.total_mb < LOW_MEMORY_FRACTION:
        issues.append(Issue("low_memory", f"{mem.available_mb:.0f} MB available"))
    util = get_instance_utilization(probe)
    if util.error:
        issues.append(Issue("gpu_error", util.error))
    return issues


def get_instance_summary(inst: InstanceRecord) -> dict[str, Any]:
    """One instance in a few plain fields: its entry in `vastd status`."""
    return {
        "id": inst.id,
        "state": inst.status.value,
        "api_status": inst.api_status,
        "current_jobs": list(inst.current_jobs),
        "dph": inst.dph,
        "gpu": inst.gpu_name,
        "owned": inst.owned,
        "last_seen": utc_iso(inst.last_seen),
        "last_contact": utc_iso(inst.last_contact),
        "prepare_error": inst.prepare_error,
    }
