"""Instance health: one probe command over the pooled SSH connection (disk, memory, GPU when
nvidia-smi exists), and the drain policy (low disk: no new jobs; repeated failures: drained)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vastd.core import state as st
from vastd.core.files import Layout
from vastd.core.ssh import SSHPool
from vastd.core.state import InstanceRecord, InstanceStatus, StateStore
from vastd.instances import monitoring as mon
from vastd.orchestration import health as hl
from vastd.orchestration.context import Context, build_context
from vastd.utils.config import Settings

DF = (
    "Filesystem     1024-blocks     Used Available Capacity Mounted on\n"
    "/dev/sda1        41152736 20576368  18476368      53% /workspace\n"
)


def probe_text(df: str = DF, gpu: str = "absent", junk: str = "Welcome!\n") -> str:
    return (
        f"{junk}\n{mon.MARKER}\n[df]\n{df.splitlines()[-1]}\n[mem]\n"
        "MemTotal:       16384000 kB\nMemAvailable:    8192000 kB\n"
        f"[gpu]\n{gpu}\n[end]\n"
    )


def test_probe_parsing_skips_login_junk_and_reads_each_section() -> None:
    """Junk before the marker is ignored; df, meminfo and nvidia-smi lines are parsed."""
    probe = mon.parse_probe(probe_text(gpu="0, 87, 1024, 24564\n1, [N/A], 0, 24564"))
    disk = mon.check_disk_space(probe)
    assert disk is not None and disk.path == "/workspace"
    assert disk.free_gb == pytest.approx(18476368 / 1024**2)
    mem = mon.check_memory_usage(probe)
    assert mem is not None and mem.total_mb == pytest.approx(16000) and mem.used_fraction == 0.5
    util = mon.get_instance_utilization(probe)
    assert util.gpu_present and len(util.gpus) == 2
    assert util.gpus[0].utilization_pct == 87 and util.gpus[1].utilization_pct is None
    assert util.mean_utilization_pct == 87
    assert mon.detect_instance_issues(probe, min_free_disk_gb=5) == []


def test_absent_nvidia_smi_is_skipped_and_low_disk_is_an_issue() -> None:
    """No nvidia-smi: no GPU figures and no issue; free disk under the floor is critical."""
    probe = mon.parse_probe(probe_text())
    assert not mon.get_instance_utilization(probe).gpu_present
    issues = mon.detect_instance_issues(probe, min_free_disk_gb=100)
    assert [i.kind for i in issues] == ["low_disk"] and issues[0].critical
    bad = mon.parse_probe(probe_text(gpu="NVIDIA-SMI has failed"))
    assert [i.kind for i in mon.detect_instance_issues(bad, min_free_disk_gb=1)] == ["gpu_error"]


def test_nvidia_smi_lines_give_each_gpu_its_index() -> None:
    """The index column is each GPU's own (not its line number): what one job per GPU
    places jobs on; "[N/A]" and "[Not Supported]" values read as None, the GPU kept."""
    probe = mon.parse_probe(
        probe_text(gpu="0, 0, 5, 81559\n2, [N/A], [N/A], 81559\n3, 100, [Not Supported], 81559")
    )
    util = mon.get_instance_utilization(probe)
    assert util.error is None
    assert [g.index for g in util.gpus] == [0, 2, 3]
    assert util.gpus[1] == mon.GpuUtilization(2, None, None, 81559)
    assert util.gpus[2].memory_used_mb is None and util.gpus[2].utilization_pct == 100
    assert util.mean_utilization_pct == 50


def test_an_nvidia_smi_error_line_is_an_error_not_a_gpu() -> None:
    """An error line after good ones (the driver failing mid-answer), a line without the
    index column (an older query) or a non-numeric index: an error, no GPU made up."""
    text = (
        "0, 10, 5, 81559\nUnable to determine the device handle for GPU0000:41:00.0: Unknown Error"
    )
    util = mon.get_instance_utilization(mon.parse_probe(probe_text(gpu=text)))
    assert util.error is not None and "Unknown Error" in util.error
    assert [g.index for g in util.gpus] == [0]
    for bad in ("87, 1024, 24564", "GPU-0, 1, 2, 3", "error: nvidia-smi failed"):
        util = mon.get_instance_utilization(mon.parse_probe(probe_text(gpu=bad)))
        assert util.error is not None and util.gpus == (), bad
    assert "index,utilization.gpu,memory.used,memory.total" in mon.health_command("/r")


def test_a_huge_mount_point_from_the_host_is_kept_short() -> None:
    """A host whose df prints a 1 MB mount point: the low-disk issue (a drain reason, in
    the snapshot and the log) holds a bounded text."""
    df = f"/dev/sda1 41152736 41152000 736 99% /{'m' * 1_000_000}\n"
    issues = mon.detect_instance_issues(mon.parse_probe(probe_text(df=df)), min_free_disk_gb=1)
    assert [i.kind for i in issues] == ["low_disk"]
    assert len(issues[0].message) < mon.MOUNT_TEXT_MAX + 100


def test_truncated_or_markerless_output_is_a_probe_failure() -> None:
    """Output without the marker or the end section is refused (ValueError)."""
    with pytest.raises(ValueError):
        mon.parse_probe("Welcome\n[df]\n")
    with pytest.raises(ValueError):
        mon.parse_probe(f"{mon.MARKER}\n[df]\n{DF}")


def test_instance_summary_is_its_status_entry() -> None:
    """get_instance_summary gives what `vastd status` shows of an instance, times in ISO UTC."""
    inst = InstanceRecord(
        id="7",
        status=InstanceStatus.READY,
        api_status="running",
        current_jobs=["j"],
        dph=0.5,
        gpu_name="RTX 4090",
        owned=True,
        last_seen=1_800_000_000.9,
    )
    assert mon.get_instance_summary(inst) == {
        "id": "7",
        "state": "ready",
        "api_status": "running",
        "current_jobs": ["j"],
        "dph": 0.5,
        "gpu": "RTX 4090",
        "owned": True,
        "last_seen": "2027-01-15T08:00:00Z",
        "last_contact": None,
        "prepare_error": None,
    }


@pytest.fixture
def make_ctx(
    tmp_path: Path, ssh_pool: Callable[..., SSHPool], client_key: Any
) -> Callable[[], Context]:
    """Factory: a Context without an API whose SSH pool reaches sim hosts as `root`."""

    def make() -> Context:
        settings = Settings(
            paths={"root": str(tmp_path / "vastd")},
            vast={"api_key": "k", "api_key_file": None},
            ssh={"key_file": str(client_key.path), "connect_timeout_s": 2.0},
            remote={"root": str(tmp_path / "remote" / "deep" / "folder")},
        )
        layout = Layout(settings.paths.root)
        layout.ensure()
        return build_context(
            settings, store=StateStore(layout.state_file), pool=ssh_pool(), api=None
        )

    return make


def add_instance(ctx: Context, host: Any, **values: Any) -> InstanceRecord:
    inst = InstanceRecord(
        id=host.instance_id,
        label="vastd",
        status=InstanceStatus.READY,
        ssh_host=host.host,
        ssh_port=host.port,
        **values,
    )
    ctx.store.instances[inst.id] = inst
    return inst


async def test_health_check_runs_one_command_and_reads_gpus(
    make_ctx: Callable[[], Context],
    sim_host: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Against a live SSH host with a fake nvidia-smi on PATH: one command, disk of the remote
    root's nearest existing folder, memory and GPU figures."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '0, 42, 100, 24564'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    host = await sim_host("h1", login_banner="motd junk\n")
    ctx = make_ctx()
    inst = add_instance(ctx, host)
    before = host.connections_total
    health = await hl.check_instance_health(ctx, inst)
    assert health.ok and health.disk is not None and health.disk.free_gb > 0
    assert health.memory is not None and health.memory.total_mb > 0
    assert health.utilization is not None and health.utilization.mean_utilization_pct == 42
    assert host.connections_total == before + 1


async def test_low_disk_drains_until_it_recovers(
    make_ctx: Callable[[], Context],
    sim_host: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Below the free-disk floor an instance is DRAINING (dispatch skips it); once the disk
    is above the floor again it is READY."""
    host = await sim_host("h2")
    ctx = make_ctx()
    inst = add_instance(ctx, host)
    ctx.settings.fleet.min_free_disk_gb = 1e9
    assert await hl.monitor_instance_status(ctx, inst) is InstanceStatus.DRAINING
    assert inst.drain_reason == mon.DRAIN_LOW_DISK
    assert st.get_idle_instances(ctx.store) == []
    ctx.settings.fleet.min_free_disk_gb = 0.0
    statuses = await hl.health_once(ctx)
    assert statuses == {inst.id: InstanceStatus.READY}
    assert inst.drain_reason is None and inst.disk_free_gb


async def test_repeated_health_failures_drain_the_instance(
    make_ctx: Callable[[], Context], sim_host: Callable[..., Any]
) -> None:
    """An instance whose probe fails HEALTH_FAILURES_MAX times in a row is drained."""
    host = await sim_host("h3")
    ctx = make_ctx()
    inst = add_instance(ctx, host, owned=True)
    await host.kill()
    for _ in range(mon.HEALTH_FAILURES_MAX - 1):
        assert await hl.monitor_instance_status(ctx, inst) is InstanceStatus.READY
    assert await hl.monitor_instance_status(ctx, inst) is InstanceStatus.DRAINING
    assert inst.drain_reason == mon.DRAIN_UNHEALTHY
    assert inst.health_failures == mon.HEALTH_FAILURES_MAX
