"""End to end: how a job's life ends, and what a name that comes back again does.

Black-box regressions for the job state machine (CONTRACT §3, §5, §10 "Resubmitting a
name"), through REAL OpenSSH like tests/test_e2e_openssh.py: the daemon is `python -m
vastd run` as a subprocess, instances are sshd processes on 127.0.0.1
(tests/openssh_cluster.py), and only what the daemon leaves on disk (the root's
folders, results/, state.json or history.jsonl, the remote root) and in its JSON log
is judged. Jobs that must stay running wait behind a gate file (as tests/ctxfactory.py
GATE), so the test, not the clock, decides when they finish.

The first file of each test is put into the inbox before the daemon starts: its
start-up scan takes it. A file renamed in within the same timestamp tick as its
last write (ctime == mtime) in the instant between that scan and the inotify watch
being in place would otherwise wait for the 30 s rescan.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import math
import os
import pwd
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.openssh_cluster import DaemonProcess, OpenSSHCloud, drop_into_inbox, submit
from tests.sshd import TEST_USER
from vastd.sim.cluster import load_make_jobs

pytestmark = [pytest.mark.e2e, pytest.mark.sshd, pytest.mark.timeout(90)]

PARAMS = ("eta", "lam", "var0", "alpha", "gamma", "beta", "p")
# A gated job waits until its instance's folder (<remote root>/<instance id>/) holds `go`;
# the command runs in <remote root>/<instance id>/jobs/<job>/ (same gate as ctxfactory.GATE).
GATE = "until [ -e ../../go ]; do sleep 0.05; done"


# --- helpers ----------------------------------------------------------------------------------
def read_state(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / "state.json").read_text())
    return data


def final_record(root: Path, job_id: str) -> dict[str, Any]:
    """The job's record: from state.json while it is there, else its last history.jsonl line."""
    record: dict[str, Any] | None = read_state(root)["jobs"].get(job_id)
    history = root / "history.jsonl"
    if record is None and history.exists():
        for line in history.read_text().splitlines():
            entry = json.loads(line)
            if job_id in (entry.get("id"), entry.get("job")):
                record = entry
    assert record is not None, f"no record of {job_id} in state.json or history.jsonl"
    return record


def make_job(folder: Path, name: str, rows: int, seed: int) -> Path:
    """A valid GARCH job file named `<name>.csv` with `rows` rows drawn from `seed`."""
    made = load_make_jobs()(folder / f"gen-{seed}-{rows}", 1, rows, seed)[0]
    path = folder / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(made.read_bytes())
    return path


def csv_rows(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def check_results_for(result_dir: Path, source_csv: Path) -> None:
    """results/<job>/ holds log.txt and one parquet whose rows are exactly `source_csv`'s."""
    names = sorted(p.name for p in result_dir.iterdir() if p.is_file())
    parquets = [n for n in names if n.endswith(".parquet")]
    assert "log.txt" in names, names
    assert len(parquets) == 1, names
    table = pq.read_table(result_dir / parquets[0]).to_pydict()
    rows = csv_rows(source_csv)
    assert sorted(set(table["job_row"])) == list(range(len(rows))), (
        f"results hold rows {sorted(set(table['job_row']))}, {source_csv.name} has {len(rows)}"
    )
    for i, job_row in enumerate(table["job_row"]):
        for name in PARAMS:
            # The worker stores parameters as float32.
            assert math.isclose(table[name][i], rows[job_row][name], rel_tol=1e-6, abs_tol=1e-7), (
                source_csv.name,
                job_row,
                name,
            )


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every regular file below `folder`, by path relative to it."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def dispatched_to(proc: DaemonProcess, job: str) -> list[str]:
    return [str(e["instance"]) for e in proc.find("job_dispatched", job=job)]


def job_events(proc: DaemonProcess, job: str) -> list[str]:
    return [str(e["event"]) for e in proc.events() if e.get("job") == job]


def open_gate(cloud: OpenSSHCloud, instance_id: int | str) -> None:
    """Let GATE-d jobs on this instance go on."""
    folder = cloud.remote_root / str(instance_id)
    if not folder.exists():
        folder.mkdir()
        chown_tree(folder, TEST_USER)  # the instance's own folder: vastdtest writes in it
    (folder / "go").touch()


def chown_tree(path: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    for p in [path, *path.rglob("*")]:
        os.chown(p, pw.pw_uid, pw.pw_gid, follow_symlinks=False)


# --- 1. a done name comes back ------------------------------------------------------------------
async def test_done_name_resubmitted_is_refused_and_results_untouched(
    tmp_path: Path, openssh_cloud: Any, daemon: Any
) -> None:
    """A file named like a done job is refused as `<job>.dup-<n>.csv`; the done job is untouched.

    X runs to done. Two more files named X.csv (other content) dropped into the inbox
    go to failed/X.dup-1.csv and failed/X.dup-2.csv, each beside its `.error.json`
    whose job is X and whose reason says X is done; `job_duplicate_refused` is logged
    with job = X; X is never dispatched again; results/X/ stays byte-identical and
    done/X.csv still holds the first file.
    """
    cloud = await openssh_cloud(tmp_path, instances=1)
    root = tmp_path / "vastd"
    cfg = cloud.write_config(tmp_path / "config.toml", cloud.config(root))
    first = make_job(tmp_path / "a", "dup_job", rows=2, seed=21)
    again = make_job(tmp_path / "b", "dup_job", rows=3, seed=22)
    job = first.stem
    failed = root / "failed"

    await asyncio.to_thread(submit, cfg, [first])
    proc = daemon(cloud, cfg, tmp_path / "daemon.log")
    await proc.wait_event("job_done", 30, job=job)
    await proc.wait_until(lambda: (root / "done" / first.name).is_file(), 10, "done/X.csv")
    check_results_for(root / "results" / job, first)
    before = tree_hashes(root / "results" / job)
    assert any(name.endswith(".parquet") for name in before), before

    for n in (1, 2):
        drop_into_inbox(root, again)
        dup = failed / f"{job}.dup-{n}.csv"
        await proc.wait_until(
            lambda dup=dup: dup.is_file() or len(proc.find("job_accepted", job=job)) > 1,
            20,
            f"{dup.name} (or X accepted again)",
        )
        assert dup.is_file(), (
            f"drop {n} of a done name was not refused; failed/ = "
            f"{sorted(p.name for p in failed.iterdir())}; X's events: {job_events(proc, job)}"
        )
        error = json.loads((failed / f"{job}.dup-{n}.error.json").read_text())
        assert error["job"] == job
        assert "done" in error["reason"].lower(), error["reason"]
        assert dup.read_bytes() == again.read_bytes()
        await proc.wait_until(
            lambda n=n: len(proc.find("job_duplicate_refused", job=job)) >= n,
            5,
            f"job_duplicate_refused #{n}",
        )
    assert await proc.stop() == 0

    assert tree_hashes(root / "results" / job) == before
    assert (root / "done" / first.name).read_bytes() == first.read_bytes()
    assert sorted(p.name for p in failed.iterdir()) == sorted(
        f"{job}.dup-{n}{ext}" for n in (1, 2) for ext in (".csv", ".error.json")
    )
    assert [p for p in (root / "inbox").iterdir() if not p.name.startswith(".")] == []
    assert len(proc.find("job_dispatched", job=job)) == 1
    assert len(proc.find("job_done", job=job)) == 1
    assert final_record(root, job)["state"] == "done"


# --- 2. on_duplicate = "rerun" never collects the old run ----------------------------------------
async def test_rerun_never_collects_the_old_run(
    tmp_path: Path, openssh_cloud: Any, daemon: Any
) -> None:
    """With `on_duplicate = "rerun"`, a done name runs again, from scratch, with its new input.

    X (input A, 2 rows) runs to done; the command keeps a copy of its remote job folder
    and notes where that folder was (<remote root>/<instance id>/jobs/X/ today). Once
    the daemon removed it, the copy is put back there, complete with `exit_code` 0 and
    A's parquet, so a finished old run's folder sits where the rerun could find it.
    X.csv with input B (3 other rows) is then dropped: the job ends done again,
    results/X/ holds B's results (row count and parameters), results/X/previous-1/
    holds exactly the first run's files plus its input (the earlier done/X.csv), done/X.csv
    is input B, and the rerun's job_done says runs >= 1.
    """
    cloud = await openssh_cloud(tmp_path, instances=1)
    saved = cloud.scratch / "first-run"
    where = cloud.scratch / "first-run.where"
    # Only the first successful run keeps a copy of its folder (the wrapper writes
    # exit_code after the command, so the copy has none; the test adds it).
    keep, note = shlex.quote(str(saved)), shlex.quote(str(where))
    command = (
        f"{cloud.job_command()} && "
        f"{{{{ [ -e {keep} ] || {{{{ pwd > {note} && cp -a . {keep}; }}}}; }}}}"
    )
    root = tmp_path / "vastd"
    data = cloud.config(root, job={"command": command, "on_duplicate": "rerun"})
    cfg = cloud.write_config(tmp_path / "config.toml", data)
    input_a = make_job(tmp_path / "a", "rerun_job", rows=2, seed=31)
    input_b = make_job(tmp_path / "b", "rerun_job", rows=3, seed=32)
    job = input_a.stem
    results = root / "results" / job

    drop_into_inbox(root, input_a)
    proc = daemon(cloud, cfg, tmp_path / "daemon.log")
    await proc.wait_event("job_done", 30, job=job)
    assert saved.is_dir() and list(saved.glob("*.parquet")), sorted(os.listdir(saved))
    remote_dir = Path(where.read_text().strip())
    assert remote_dir.is_relative_to(cloud.remote_root / str(cloud.instance_ids[0]))
    await proc.wait_until(lambda: not remote_dir.exists(), 15, "remote clean-up of the first run")
    check_results_for(results, input_a)
    first_run = tree_hashes(results)

    # The old run's folder is back, finished (exit code 0) with A's parquet in it.
    for parent in reversed(remote_dir.parents):
        if not parent.exists():
            parent.mkdir()
            chown_tree(parent, TEST_USER)
    subprocess.run(["cp", "-a", str(saved), str(remote_dir)], check=True)
    (remote_dir / "ended_at").write_text(f"{int(time.time())}\n")
    (remote_dir / "exit_code").write_text("0\n")
    chown_tree(remote_dir, TEST_USER)

    drop_into_inbox(root, input_b)
    await proc.wait_until(lambda: len(proc.find("job_done", job=job)) >= 2, 30, "the rerun done")
    assert await proc.stop() == 0

    check_results_for(results, input_b)
    assert (results / "previous-1").is_dir(), sorted(os.listdir(results))
    earlier_input = {input_a.name: hashlib.sha256(input_a.read_bytes()).hexdigest()}
    assert tree_hashes(results / "previous-1") == {**first_run, **earlier_input}
    assert (root / "done" / input_b.name).read_bytes() == input_b.read_bytes()
    rerun_done = proc.find("job_done", job=job)[-1]
    assert rerun_done["runs"] >= 1, rerun_done
    assert final_record(root, job)["state"] == "done"
    assert final_record(root, job)["runs"] >= 1


# --- 3. host key changed while the daemon was down -----------------------------------------------
async def test_host_key_changed_while_down_requeues_running_job(
    tmp_path: Path, openssh_cloud: Any, daemon: Any
) -> None:
    """A running job whose instance comes back with a new host key runs elsewhere, not an attempt.

    Two instances, one job a slot. Gated job X starts on instance A; the daemon is
    stopped; A's sshd restarts with a new host key; the daemon starts again. Expected:
    `instance_drained` for A, X dispatched to the other instance (whose gate is open)
    and done there with valid results, attempts 0 in its final record, no
    job_retry/job_failed, and host_key_mismatch logged a bounded number of times.
    """
    cloud = await openssh_cloud(tmp_path, instances=2)
    root = tmp_path / "vastd"
    command = f"{GATE}; {cloud.job_command()}"
    data = cloud.config(root, job={"command": command, "jobs_per_instance": 1})
    cfg = cloud.write_config(tmp_path / "config.toml", data)
    source = make_job(tmp_path / "a", "hostkey_job", rows=2, seed=41)
    job = source.stem

    drop_into_inbox(root, source)
    first = daemon(cloud, cfg, tmp_path / "daemon1.log")
    started = await first.wait_event("job_started", 30, job=job)
    await first.wait_until(lambda: len(first.find("instance_prepared")) >= 2, 30, "2 prepared")
    on = str(started["instance"])
    other = next(str(i) for i in cloud.instance_ids if str(i) != on)
    open_gate(cloud, other)  # only the run on `on` stays behind its gate
    assert await first.stop() == 0
    assert read_state(root)["jobs"][job]["state"] == "running"

    await cloud.hosts.restart_host(int(on), new_host_key=True)

    second = daemon(cloud, cfg, tmp_path / "daemon2.log")
    await second.wait_event("daemon_started", 30)
    await second.wait_event("instance_drained", 20, instance=on)
    await second.wait_event("job_done", 30, job=job)
    assert await second.stop() == 0

    assert dispatched_to(second, job) == [other]
    assert not second.find("job_retry", job=job) and not second.find("job_failed", job=job)
    assert (root / "done" / source.name).is_file()
    check_results_for(root / "results" / job, source)
    record = final_record(root, job)
    assert record["state"] == "done"
    assert record["attempts"] == 0, record
    mismatches = [e for e in first.events() + second.events() if e["event"] == "host_key_mismatch"]
    assert len(mismatches) < 5, f"{len(mismatches)} host_key_mismatch events"


# --- 4. the job file vanished from running/ -------------------------------------------------------
async def test_job_file_removed_from_running_is_not_stuck(
    tmp_path: Path, openssh_cloud: Any, daemon: Any
) -> None:
    """A running job whose running/X.csv was deleted by hand still ends, once, with its results.

    Gated X runs; running/X.csv is removed; the gate opens. The run's results are
    valid, so X ends done in bounded time: results/X/ holds its parquet,
    `results_collected` is logged exactly once and `collection_deferred` at most once
    for X, and its final record says done.
    """
    cloud = await openssh_cloud(tmp_path, instances=1)
    iid = cloud.instance_ids[0]
    root = tmp_path / "vastd"
    data = cloud.config(root, job={"command": f"{GATE}; {cloud.job_command()}"})
    cfg = cloud.write_config(tmp_path / "config.toml", data)
    source = make_job(tmp_path / "a", "vanished_job", rows=2, seed=51)
    job = source.stem

    drop_into_inbox(root, source)
    proc = daemon(cloud, cfg, tmp_path / "daemon.log")
    await proc.wait_event("job_started", 30, job=job)
    running_file = root / "running" / source.name
    assert running_file.is_file()
    running_file.unlink()
    open_gate(cloud, iid)

    await proc.wait_until(
        lambda: (
            proc.find("job_done", job=job) or len(proc.find("collection_deferred", job=job)) > 1
        ),
        30,
        "job_done (or repeated collection_deferred)",
    )
    assert await proc.stop() == 0

    deferred = proc.find("collection_deferred", job=job)
    assert len(deferred) <= 1, [e.get("error") for e in deferred]
    assert len(proc.find("results_collected", job=job)) == 1, job_events(proc, job)
    assert len(proc.find("job_done", job=job)) == 1
    check_results_for(root / "results" / job, source)
    assert final_record(root, job)["state"] == "done"
    assert not (root / "running" / source.name).exists()


# --- 5. a failed name comes back ------------------------------------------------------------------
async def test_failed_name_resubmitted_cleans_failed_files(
    tmp_path: Path, openssh_cloud: Any, daemon: Any
) -> None:
    """A name that failed for good is accepted again; its old failed/ files go once it runs.

    X with input A (eta <= 2: the worker exits 1) fails with max_attempts = 1
    (failed/X.csv beside X.error.json). X.csv with a valid input B is then dropped: it
    ends done with B's results, and failed/ no longer holds X.csv, X.error.json or
    any dup file of X.
    """
    cloud = await openssh_cloud(tmp_path, instances=1)
    root = tmp_path / "vastd"
    cfg = cloud.write_config(tmp_path / "config.toml", cloud.config(root, job={"max_attempts": 1}))
    input_b = make_job(tmp_path / "b", "second_chance_job", rows=2, seed=61)
    job = input_b.stem
    input_a = tmp_path / "a" / input_b.name
    input_a.parent.mkdir(parents=True)
    rows = input_b.read_text().splitlines()
    # eta is the first column; the worker refuses eta <= 2 ("need eta > 2 ...").
    input_a.write_text(
        "\n".join([rows[0], *("1.5," + r.split(",", 1)[1] for r in rows[1:])]) + "\n"
    )
    failed = root / "failed"

    drop_into_inbox(root, input_a)
    proc = daemon(cloud, cfg, tmp_path / "daemon.log")
    await proc.wait_event("job_failed", 30, job=job)
    assert (failed / input_a.name).read_bytes() == input_a.read_bytes()
    assert (failed / f"{job}.error.json").is_file()

    drop_into_inbox(root, input_b)
    await proc.wait_event("job_done", 30, job=job)
    assert await proc.stop() == 0

    assert (root / "done" / input_b.name).read_bytes() == input_b.read_bytes()
    check_results_for(root / "results" / job, input_b)
    left = sorted(p.name for p in failed.iterdir())
    assert left == [], f"failed/ still holds {left} after X was accepted again and done"
    assert final_record(root, job)["state"] == "done"
