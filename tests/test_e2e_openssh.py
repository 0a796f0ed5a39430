"""End to end through REAL OpenSSH: the daemon as a subprocess, instances as real sshds.

Each test starts a simulated vast.ai account (tests/openssh_cluster.py) whose
instances are `sshd` processes on 127.0.0.1 (user vastdtest, /bin/sh), runs
`python -m vastd run` against it, and judges only what the daemon leaves on disk
(folders, results, error files, state.json, the remote root) and in its JSON logs.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.helpers import saved_jobs
from tests.openssh_cluster import (
    DaemonProcess,
    OpenSSHCloud,
    drop_into_inbox,
    processes_of_user,
    submit,
)
from tests.sshd import TEST_USER
from vastd.sim.cluster import load_make_jobs

pytestmark = [pytest.mark.e2e, pytest.mark.sshd, pytest.mark.timeout(150)]

PARAMS = ("eta", "lam", "var0", "alpha", "gamma", "beta", "p")


# --- helpers ----------------------------------------------------------------------------------
def read_state(root: Path) -> dict[str, Any]:
    """state.json, its jobs completed by history.jsonl (where finished jobs go)."""
    data: dict[str, Any] = json.loads((root / "state.json").read_text())
    data["jobs"] = saved_jobs(root)
    return data


def csv_rows(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def check_garch_result(result_dir: Path, source_csv: Path) -> None:
    """log.txt plus exactly one parquet whose rows match the input CSV row by row."""
    names = sorted(p.name for p in result_dir.iterdir())
    parquets = [n for n in names if n.endswith(".parquet")]
    assert "log.txt" in names, names
    assert len(parquets) == 1, names
    table = pq.read_table(result_dir / parquets[0]).to_pydict()
    rows = csv_rows(source_csv)
    assert sorted(set(table["job_row"])) == list(range(len(rows)))
    for i, job_row in enumerate(table["job_row"]):
        for name in PARAMS:
            # The worker stores parameters as float32.
            assert math.isclose(table[name][i], rows[job_row][name], rel_tol=1e-6, abs_tol=1e-7), (
                source_csv.name,
                job_row,
                name,
            )
    assert "Row 0:" in (result_dir / "log.txt").read_text()


def remote_job_dirs(cloud: OpenSSHCloud) -> list[Path]:
    """Job folders left anywhere under the remote root."""
    return [p for p in cloud.remote_root.glob("*/jobs/*")]


def dispatched_to(proc: DaemonProcess, job: str | None = None) -> list[str]:
    return [
        str(e["instance"])
        for e in proc.find("job_dispatched")
        if job is None or e.get("job") == job
    ]


def live_group_members(pgid: int) -> list[int]:
    """Pids in process group `pgid` that are not zombies (this machine's pid 1 reaps none)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


# --- (a) the real workload ------------------------------------------------------------------------
@pytest.mark.slow
async def test_thirty_garch_jobs_on_three_openssh_instances(
    tmp_path: Path, openssh_cloud: Any, daemon: Any
) -> None:
    """30 GARCH job files submitted with `vastd submit` all end in done/ with one run each.

    Each results/<job>/ holds log.txt and exactly one parquet whose distinct job_row
    values equal the CSV's rows and whose parameter columns equal the CSV's per row;
    failed/ is empty, state.json says done and runs == 1 for all, every instance's
    current_jobs is empty, no remote job folder is left, every labelled instance took
    jobs and an unlabelled instance in the same account was never touched. The API
    key appears neither in the logs nor in the snapshot.
    """
    cloud = await openssh_cloud(tmp_path, instances=3)
    foreign = await cloud.cloud.add_instance(label="other-work")
    root = tmp_path / "vastd"
    cfg = cloud.write_config(tmp_path / "config.toml", cloud.config(root))
    sources = load_make_jobs()(tmp_path / "jobs", 30, 5, 11, prefix="garch_test_job")

    proc = daemon(cloud, cfg, tmp_path / "daemon.log")
    await proc.wait_event("daemon_started", 30)
    await asyncio.to_thread(submit, cfg, sources)
    await proc.wait_until(lambda: len(proc.find("job_done")) >= 30, 120, "30 job_done events")
    assert await proc.stop() == 0

    ids = [s.stem for s in sources]
    assert sorted(p.name for p in (root / "done").iterdir()) == sorted(s.name for s in sources)
    assert list((root / "failed").iterdir()) == []
    for folder in ("inbox", "queued", "running"):
        assert [p for p in (root / folder).iterdir() if not p.name.startswith(".")] == []
    for src in sources:
        check_garch_result(root / "results" / src.stem, src)

    state = read_state(root)
    assert {j: state["jobs"][j]["state"] for j in ids} == dict.fromkeys(ids, "done")
    assert all(state["jobs"][j]["runs"] == 1 for j in ids), {
        j: state["jobs"][j]["runs"] for j in ids
    }
    assert all(inst["current_jobs"] == [] for inst in state["instances"].values())
    assert str(foreign) not in state["instances"]
    assert remote_job_dirs(cloud) == []

    used = set(dispatched_to(proc))
    assert used == {str(i) for i in cloud.instance_ids}
    assert not (cloud.remote_root / str(foreign)).exists()
    events = proc.events()
    assert all({"timestamp", "level", "event"} <= e.keys() for e in events)
    assert not [e for e in events if e["level"] in ("error", "critical")]
    assert cloud.api_key not in proc.log_path.read_text()
    assert cloud.api_key not in (root / "state.json").read_text()


# --- (b) failure, retry, failed/ ------------------------------------------------------------------
async def test_failing_job_retried_on_another_instance_then_failed(
    tmp_path: Path, openssh_cloud: Any, daemon: Any
) -> None:
    """A job whose `[[job.patterns]]` vars make the worker exit 1 is retried once elsewhere.

    With max_attempts = 2: job_retry then job_failed in the logs, the two runs on
    different instances, the file in failed/ beside `<name>.error.json` holding job,
    reason, attempts == 2, last_exit_code == 1, the worker's stderr in log_tail and
    `at`. A job not matching the pattern runs normally.
    """
    cloud = await openssh_cloud(tmp_path, instances=3)
    root = tmp_path / "vastd"
    data = cloud.config(
        root,
        job={"max_attempts": 2, "patterns": [{"glob": "garch_bad_*", "vars": {"num_sim": "-1"}}]},
    )
    cfg = cloud.write_config(tmp_path / "config.toml", data)
    make_jobs = load_make_jobs()
    bad = make_jobs(tmp_path / "jobs", 1, 3, 5, prefix="garch_bad_job")[0]
    good = make_jobs(tmp_path / "jobs", 1, 3, 6, prefix="garch_test_job")[0]

    proc = daemon(cloud, cfg, tmp_path / "daemon.log")
    await proc.wait_event("daemon_started", 30)
    drop_into_inbox(root, bad)
    drop_into_inbox(root, good)
    await proc.wait_event("job_failed", 60, job=bad.stem)
    await proc.wait_event("job_done", 60, job=good.stem)
    assert await proc.stop() == 0

    order = [e["event"] for e in proc.events() if e.get("job") == bad.stem]
    assert order.index("job_retry") < order.index("job_failed")
    runs_on = dispatched_to(proc, bad.stem)
    assert len(runs_on) == 2 and runs_on[0] != runs_on[1], runs_on

    assert (root / "failed" / bad.name).is_file()
    error = json.loads((root / "failed" / f"{bad.stem}.error.json").read_text())
    assert set(error) == {"job", "reason", "attempts", "last_exit_code", "log_tail", "at"}
    assert error["job"] == bad.stem
    assert error["attempts"] == 2
    assert error["last_exit_code"] == 1
    assert "--num_sim must be >= 2" in error["log_tail"]
    assert error["reason"] and error["at"]
    state = read_state(root)
    assert state["jobs"][bad.stem]["state"] == "failed"
    assert state["jobs"][good.stem]["state"] == "done"
    check_garch_result(root / "results" / good.stem, good)
    assert not (root / "results" / bad.stem).exists()
    assert remote_job_dirs(cloud) == []


# --- (c) timeout kills the whole process group ----------------------------------------------------
async def test_timed_out_job_leaves_no_process_behind(
    tmp_path: Path, openssh_cloud: Any, daemon: Any
) -> None:
    """A job past `[job] timeout_s` is failed and its whole remote process group killed.

    The command backgrounds a child `sleep 300` and then sleeps itself; after
    job_failed, the group read from the remote `pid` file has no live member
    (`os.killpg(pgid, 0)` raises, or only zombies remain: pid 1 here reaps none) and
    no `sleep 300` of vastdtest runs in the
    cluster's folders. The error file says exit code 124.
    """
    cloud = await openssh_cloud(tmp_path, instances=1)
    root = tmp_path / "vastd"
    data = cloud.config(
        root,
        job={
            "command": "test -f {input} && {{ sleep 300 & sleep 299; }}",
            "timeout_s": 3,
            "max_attempts": 1,
        },
    )
    cfg = cloud.write_config(tmp_path / "config.toml", data)
    job = load_make_jobs()(tmp_path / "jobs", 1, 2, 3, prefix="sleepy_job")[0]
    pid_file = cloud.remote_root / str(cloud.instance_ids[0]) / "jobs" / job.stem / "pid"

    proc = daemon(cloud, cfg, tmp_path / "daemon.log")
    await proc.wait_event("daemon_started", 30)
    drop_into_inbox(root, job)
    await proc.wait_until(lambda: pid_file.is_file() and pid_file.read_text().strip(), 30, "pid")
    pgid = int(pid_file.read_text())
    started = await proc.wait_event("job_started", 10, job=job.stem)
    assert started["pgid"] == pgid
    await proc.wait_until(
        lambda: processes_of_user(TEST_USER, "sleep 300", cloud.world), 10, "child sleep"
    )
    assert len(live_group_members(pgid)) >= 3  # wrapper, command shell, both sleeps
    await proc.wait_event("job_failed", 30, job=job.stem)

    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        pass
    else:
        assert live_group_members(pgid) == []
    assert processes_of_user(TEST_USER, "sleep 300", cloud.world) == []
    assert processes_of_user(TEST_USER, "sleep 299", cloud.world) == []
    assert await proc.stop() == 0
    assert proc.find("job_timed_out", job=job.stem)
    error = json.loads((root / "failed" / f"{job.stem}.error.json").read_text())
    assert error["last_exit_code"] == 124
    assert error["attempts"] == 1
    assert read_state(root)["jobs"][job.stem]["state"] == "failed"


# --- (d) quoting -----------------------------------------------------------------------------------
async def test_vars_with_quotes_and_dollars_reach_the_command_verbatim(
    tmp_path: Path, openssh_cloud: Any, daemon: Any
) -> None:
    """A `[job.vars]` value full of quotes, `$`, `$(...)`, backticks, `;` and `{job}` is one argv word.

    The command `printf '%s' {msg} > {output_dir}/msg.txt` (validate = "none",
    result_glob = "out/*") yields a downloaded msg.txt holding exactly the value, and
    none of the embedded commands ran (no CANARY file anywhere).
    """
    cloud = await openssh_cloud(tmp_path, instances=1)
    canary = cloud.scratch / "CANARY"
    msg = f'it\'s "$HOME" $(touch {canary}1) ; `touch {canary}2` && touch {canary}3 {{job}} \\n'
    root = tmp_path / "vastd"
    data = cloud.config(
        root,
        job={
            "command": "printf '%s' {msg} > {output_dir}/msg.txt",
            "vars": {"msg": msg},
            "validate": "none",
            "result_glob": "out/*",
        },
    )
    cfg = cloud.write_config(tmp_path / "config.toml", data)
    job = load_make_jobs()(tmp_path / "jobs", 1, 2, 3, prefix="quoted_job")[0]

    proc = daemon(cloud, cfg, tmp_path / "daemon.log")
    await proc.wait_event("daemon_started", 30)
    drop_into_inbox(root, job)
    await proc.wait_event("job_done", 30, job=job.stem)
    assert await proc.stop() == 0

    assert (root / "results" / job.stem / "msg.txt").read_text() == msg
    home = Path(os.path.expanduser(f"~{TEST_USER}"))
    leaked = [p for base in (cloud.world, home) for p in base.rglob("CANARY*")]
    assert leaked == []


# --- (e) preparation survives restarts ------------------------------------------------------------
def counted_prepare_step(cloud: OpenSSHCloud) -> dict[str, Any]:
    """A step whose install appends the instance's sshd port to a counter file."""
    port = '"${SSH_CONNECTION##* }"'
    scratch = cloud.scratch
    return {
        "name": "counted install",
        "check": f"test -f {scratch}/prepared.{port}",
        "install": f"echo {port} >> {scratch}/installs && touch {scratch}/prepared.{port}",
        "timeout_s": 30,
    }


async def test_preparation_runs_once_per_instance_across_restarts(
    tmp_path: Path, openssh_cloud: Any, daemon: Any
) -> None:
    """`[[prepare]]` installs run once per instance; a restarted daemon does not repeat them.

    First run: three instances prepared (already = false), jobs done, SIGTERM. Second
    run: instance_prepared with already = true for each, no prepare step runs, more
    jobs done; the install counter holds one line per instance throughout.
    """
    cloud = await openssh_cloud(tmp_path, instances=3)
    root = tmp_path / "vastd"
    cfg = cloud.write_config(
        tmp_path / "config.toml", cloud.config(root, prepare=[counted_prepare_step(cloud)])
    )
    jobs = load_make_jobs()(tmp_path / "jobs", 6, 2, 9, prefix="garch_test_job")
    counter = cloud.scratch / "installs"
    ports = sorted(str(cloud.server(i).port) for i in cloud.instance_ids)

    first = daemon(cloud, cfg, tmp_path / "daemon1.log")
    await first.wait_event("daemon_started", 30)
    for job in jobs[:3]:
        drop_into_inbox(root, job)
    await first.wait_until(lambda: len(first.find("job_done")) >= 3, 60, "3 jobs done")
    await first.wait_until(lambda: len(first.find("instance_prepared")) >= 3, 30, "prepared")
    assert await first.stop() == 0
    assert [e["already"] for e in first.find("instance_prepared")] == [False] * 3
    assert sorted(counter.read_text().split()) == ports

    second = daemon(cloud, cfg, tmp_path / "daemon2.log")
    await second.wait_until(lambda: len(second.find("instance_prepared")) >= 3, 30, "prepared")
    for job in jobs[3:]:
        drop_into_inbox(root, job)
    await second.wait_until(lambda: len(second.find("job_done")) >= 3, 60, "3 more jobs done")
    assert await second.stop() == 0

    assert {e["instance"] for e in second.find("instance_prepared")} == {
        str(i) for i in cloud.instance_ids
    }
    assert all(e["already"] is True for e in second.find("instance_prepared"))
    assert second.find("prepare_step_done") == []
    assert sorted(counter.read_text().split()) == ports
    state = read_state(root)
    assert all(state["jobs"][j.stem]["state"] == "done" for j in jobs)
    assert all(state["jobs"][j.stem]["runs"] == 1 for j in jobs)


# --- (f) host key pinning --------------------------------------------------------------------------
@pytest.mark.slow
async def test_changed_host_key_is_refused_after_restart(
    tmp_path: Path, openssh_cloud: Any, daemon: Any
) -> None:
    """A host key pinned on first contact is enforced after a restart of the daemon.

    First run pins the three instances' keys in state.json. One sshd then restarts
    with a new host key; the restarted daemon logs host_key_mismatch for it, gives it
    no job and keeps the old pinned key, while the other two instances run every job.
    """
    cloud = await openssh_cloud(tmp_path, instances=3)
    root = tmp_path / "vastd"
    cfg = cloud.write_config(tmp_path / "config.toml", cloud.config(root))
    jobs = load_make_jobs()(tmp_path / "jobs", 4, 2, 13, prefix="garch_test_job")

    first = daemon(cloud, cfg, tmp_path / "daemon1.log")
    await first.wait_until(lambda: len(first.find("instance_prepared")) >= 3, 30, "prepared")
    assert await first.stop() == 0
    pinned = {i: read_state(root)["instances"][str(i)]["host_key"] for i in cloud.instance_ids}
    changed = cloud.instance_ids[1]
    assert pinned[changed] == cloud.server(changed).host_key_line

    await cloud.hosts.restart_host(changed, new_host_key=True)
    assert cloud.server(changed).host_key_line != pinned[changed]

    second = daemon(cloud, cfg, tmp_path / "daemon2.log")
    await second.wait_event("daemon_started", 30)
    for job in jobs:
        drop_into_inbox(root, job)
    await second.wait_until(lambda: len(second.find("job_done")) >= len(jobs), 60, "jobs done")
    await second.wait_event("host_key_mismatch", 30, instance=str(changed))
    assert await second.stop() == 0

    assert str(changed) not in dispatched_to(second)
    assert set(dispatched_to(second)) == {str(i) for i in cloud.instance_ids} - {str(changed)}
    state = read_state(root)
    assert state["instances"][str(changed)]["host_key"] == pinned[changed]
    assert state["instances"][str(changed)]["status"] != "ready"
    assert all(state["jobs"][j.stem]["state"] == "done" for j in jobs)
    assert not list((cloud.remote_root / str(changed) / "jobs").iterdir())
