"""The state snapshot: format, atomic writes under SIGKILL, fallback to the backup, coalescing,
failed writes, file modes and the seed's state functions."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import async_wait_for, clean_env, write_private_key
from vastd.core import snapshot as state_mod
from vastd.core import state as st
from vastd.core.state import (
    InstanceRecord,
    InstanceStatus,
    JobState,
    StateStore,
    get_available_jobs,
    get_idle_instances,
    load_state,
)
from vastd.utils.exceptions import StateManagementError

REPO = Path(__file__).resolve().parent.parent


def populated_store(path: Path) -> StateStore:
    """A store with two instances and three jobs in different states."""
    store = StateStore(path)
    store.instances["101"] = InstanceRecord(
        id="101",
        label="vastd",
        status=InstanceStatus.READY,
        ssh_host="127.0.0.1",
        ssh_port=2222,
        host_key="ssh-ed25519 AAAAC3Nz",
        prepared_hash="abc",
        dph=0.25,
    )
    store.instances["102"] = InstanceRecord(id="102", status=InstanceStatus.PREPARING, dph=0.5)
    for name in ("a", "b", "c"):
        st.add_job(store, f"job_{name}", f"job_{name}.csv", rows=10)
    # records only (persistence tests): set as a dispatch would
    job_a = store.jobs["job_a"]
    job_a.state, job_a.instance, job_a.run_id = JobState.RUNNING, "101", "00ff00ff00ff00ff"
    store.instances["101"].current_jobs.append("job_a")
    store.jobs["job_a"].pgid = 4242
    store.jobs["job_b"].attempts = 2
    return store


def temp_files(folder: Path) -> list[str]:
    # (.vastd.lock is the daemon's root lock, not a temp file)
    return sorted(
        p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".vastd.lock"
    )


# --- format and round trip -------------------------------------------------------------------
async def test_round_trip_keeps_jobs_and_instances(tmp_path: Path) -> None:
    """What is flushed is what open() returns: every job and instance field survives."""
    store = populated_store(tmp_path / "state.json")
    assert await store.flush()
    loaded = StateStore.open(tmp_path / "state.json")
    assert loaded.snapshot.jobs == store.snapshot.jobs
    assert loaded.snapshot.instances == store.snapshot.instances
    assert loaded.snapshot.next_seq == 4
    assert loaded.jobs["job_a"].state is JobState.RUNNING
    assert loaded.jobs["job_a"].instance == "101"
    assert loaded.instances["101"].current_jobs == ["job_a"]


async def test_file_format_is_the_contract(tmp_path: Path) -> None:
    """state.json holds version 2, saved_at, jobs and instances keyed by id (CONTRACT §7)."""
    store = populated_store(tmp_path / "state.json")
    await store.flush()
    data = json.loads((tmp_path / "state.json").read_text())
    assert data["version"] == 2
    assert isinstance(data["saved_at"], float)
    assert set(data["jobs"]) == {"job_a", "job_b", "job_c"}
    assert set(data["instances"]) == {"101", "102"}
    job = data["jobs"]["job_a"]
    assert job["state"] == "running"
    assert job["instance"] == "101"
    assert job["attempts"] == 0
    assert {"accepted_at", "dispatched_at", "started_at", "finished_at"} <= set(job)
    inst = data["instances"]["101"]
    for key in ("label", "ssh_host", "ssh_port", "host_key", "prepared_hash", "status", "dph"):
        assert key in inst
    assert inst["current_jobs"] == ["job_a"]


def test_missing_snapshot_is_a_fresh_start(tmp_path: Path) -> None:
    """Neither state.json nor its backup: an empty store, and nothing is written by opening."""
    store = StateStore.open(tmp_path / "state.json")
    assert store.jobs == {}
    assert store.instances == {}
    assert list(tmp_path.iterdir()) == []


async def test_files_are_private(tmp_path: Path) -> None:
    """state.json and state.json.bak are mode 0600 (they hold host keys and job names)."""
    store = populated_store(tmp_path / "state.json")
    await store.flush()
    st.add_job(store, "job_d", "job_d.csv", 1)
    await store.flush()
    for name in ("state.json", "state.json.bak"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name


# --- crash safety ----------------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from vastd.core.state import InstanceRecord, JobRecord, Snapshot, save_state

    path = Path(sys.argv[1])
    snap = Snapshot()
    for n in range(400):  # ~100 KiB per snapshot, so a kill often lands inside a write
        snap.jobs[f"job_{n:04d}"] = JobRecord(id=f"job_{n:04d}", file_name="x.csv", rows=n)
    snap.instances["1"] = InstanceRecord(id="1")
    i = 0
    while True:
        i += 1
        snap.next_seq = i
        save_state(snap.model_dump_json().encode(), path, path.with_name(path.name + ".bak"))
        print(i, flush=True)
    """
)


def test_sigkill_during_writes_never_leaves_a_partial_snapshot(tmp_path: Path) -> None:
    """A writer SIGKILLed at random moments, several times: open() always finds a whole
    snapshot, at least as new as the last write the writer reported finished."""
    path = tmp_path / "state.json"
    rng = random.Random(1234)
    for _round in range(5):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path)],
            stdout=subprocess.PIPE,
            text=True,
            env=clean_env(),
            cwd=REPO,
        )
        assert child.stdout is not None
        try:
            last_done = 0
            for _ in range(rng.randint(1, 25)):
                line = child.stdout.readline()
                assert line, "the writer died"
                last_done = int(line)
            # A random moment within the next write or two (a write takes ~2 ms here): the
            # delay picks where the kill lands, it does not wait for anything to settle.
            time.sleep(rng.uniform(0, 0.004))
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
        store = StateStore.open(path)
        assert len(store.jobs) == 400
        assert store.snapshot.next_seq >= last_done
        load_state(path)  # state.json itself is whole (not only the backup)


# --- fallback to the backup ------------------------------------------------------------------
CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "garbage": lambda p: p.write_bytes(b"\x00\xffnot json at all"),
    "empty": lambda p: p.write_bytes(b""),
    "wrong-version": lambda p: p.write_text(
        json.dumps({**json.loads(p.read_text()), "version": 99})
    ),
    "not-an-object": lambda p: p.write_text("[1, 2, 3]"),
    # not JSON: loaded, it was saved back as null into the file and its backup
    "nan": lambda p: p.write_text(p.read_text().replace('"spend_total":0.0', '"spend_total":NaN')),
    "bad-field": lambda p: p.write_text(
        json.dumps({**json.loads(p.read_text()), "jobs": {"x": {"state": "exploded"}}})
    ),
}


async def two_generations(path: Path) -> StateStore:
    """state.json.bak holds jobs {a}, state.json holds jobs {a, b}."""
    store = StateStore(path)
    st.add_job(store, "a", "a.csv", 1)
    assert await store.flush()
    st.add_job(store, "b", "b.csv", 1)
    assert await store.flush()
    return store


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
async def test_corrupt_snapshot_falls_back_to_backup(
    tmp_path: Path, corrupt: Callable[[Path], None]
) -> None:
    """A corrupt state.json: open() loads state.json.bak, i.e. the previous snapshot."""
    path = tmp_path / "state.json"
    await two_generations(path)
    corrupt(path)
    store = StateStore.open(path)
    assert set(store.jobs) == {"a"}


async def test_both_bad_refuses_to_start(tmp_path: Path) -> None:
    """state.json and its backup both corrupt: StateManagementError naming both, never empty."""
    path = tmp_path / "state.json"
    await two_generations(path)
    CORRUPTIONS["garbage"](path)
    CORRUPTIONS["truncated"](tmp_path / "state.json.bak")
    with pytest.raises(StateManagementError) as info:
        StateStore.open(path)
    assert "state.json:" in str(info.value)
    assert "state.json.bak:" in str(info.value)


class _Killed(BaseException):
    pass


@pytest.mark.parametrize("crash_at", [0, 1])  # before either rename, between them
def test_a_save_killed_at_any_step_never_leaves_the_backup_sharing_the_snapshots_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int
) -> None:
    """The backup is a hard link to the snapshot it replaces. A save killed between
    renaming that link to state.json.bak and renaming the new snapshot in left both names
    on one file: a state.json damaged then (`make chaos` truncates it) took its backup
    with it, and the daemon refused to start. Killed before either of its renames or
    between them, a save leaves two files, each readable: the last snapshot and the one
    before it, or the new one and an older one."""
    path = tmp_path / "state.json"
    backup = tmp_path / "state.json.bak"
    for n in range(2):
        state_mod.save_state(json.dumps({"n": n}).encode(), path, backup)
    real_replace = os.replace
    calls = 0

    def replace(src: Any, dst: Any) -> None:
        nonlocal calls
        if calls == crash_at:
            raise _Killed()
        calls += 1
        real_replace(src, dst)

    monkeypatch.setattr(state_mod.os, "replace", replace)
    with pytest.raises(_Killed):
        state_mod.save_state(json.dumps({"n": 2}).encode(), path, backup)
    monkeypatch.undo()
    assert not os.path.samefile(path, backup)
    now, before = json.loads(path.read_text())["n"], json.loads(backup.read_text())["n"]
    assert (now, before) in ((1, 0), (2, 0)), (now, before)


def test_corrupt_snapshot_without_backup_refuses(tmp_path: Path) -> None:
    """A corrupt state.json and no backup at all is refused too (not a fresh start)."""
    (tmp_path / "state.json").write_text("{")
    with pytest.raises(StateManagementError):
        StateStore.open(tmp_path / "state.json")


async def test_vastd_run_refuses_both_bad_snapshots(tmp_path: Path) -> None:
    """`vastd run` over two bad snapshots exits 2 with a clear message and touches neither."""
    root = tmp_path / "root"
    root.mkdir()
    await two_generations(root / "state.json")
    CORRUPTIONS["garbage"](root / "state.json")
    CORRUPTIONS["wrong-version"](root / "state.json.bak")
    names = ("state.json", "state.json.bak")
    before = {n: ((root / n).read_bytes(), (root / n).stat().st_mtime_ns) for n in names}
    config = tmp_path / "config.toml"
    key = tmp_path / "id_ed25519"  # `vastd run` refuses to start without a readable SSH key
    write_private_key(key)
    config.write_text(
        f'[paths]\nroot = "{root}"\n[vast]\napi_url = "http://127.0.0.1:9"\n'
        f'api_key_file = "{tmp_path / "none"}"\n[ssh]\nkey_file = "{key}"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vastd",
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env({"VASTD_VAST__API_KEY": "k-123456"}),
        cwd=REPO,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 1, err
    message = err.decode()
    assert "refusing to start" in message
    assert "Traceback" not in message + out.decode()
    after = {n: ((root / n).read_bytes(), (root / n).stat().st_mtime_ns) for n in names}
    assert after == before
    assert temp_files(root) == []


# --- coalescing ------------------------------------------------------------------------------
async def test_a_burst_of_changes_is_written_a_few_times(tmp_path: Path) -> None:
    """1,000 changes while run_saver() runs cost a handful of writes; the last has them all."""
    store = StateStore(tmp_path / "state.json", coalesce_s=0.1)
    saver = asyncio.create_task(store.run_saver())
    try:
        for n in range(1000):
            st.add_job(store, f"j{n}", f"j{n}.csv", 1)
            await asyncio.sleep(0)  # the saver may run between changes
        await async_wait_for(lambda: not store.dirty and store.writes > 0, 10)
    finally:
        saver.cancel()
        await asyncio.gather(saver, return_exceptions=True)
    assert 1 <= store.writes <= 5
    on_disk = load_state(tmp_path / "state.json")
    assert len(on_disk.jobs) == 1000


async def test_run_saver_writes_what_was_dirty_before_it_started(tmp_path: Path) -> None:
    """Changes made before the saver task starts are written by it too."""
    store = StateStore(tmp_path / "state.json", coalesce_s=0.0)
    st.add_job(store, "early", "early.csv", 1)
    saver = asyncio.create_task(store.run_saver())
    try:
        await async_wait_for(lambda: store.writes == 1, 10)
    finally:
        saver.cancel()
        await asyncio.gather(saver, return_exceptions=True)
    assert "early" in load_state(tmp_path / "state.json").jobs


async def test_flush_without_changes_writes_nothing(tmp_path: Path) -> None:
    """flush() on a clean store does not write (no needless I/O)."""
    store = StateStore(tmp_path / "state.json")
    assert await store.flush()
    assert store.writes == 0
    assert not (tmp_path / "state.json").exists()


# --- failed writes ---------------------------------------------------------------------------
def _disk_full(*_args: Any, **_kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["write", "replace"])
async def test_failed_write_keeps_previous_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """ENOSPC while writing the temp file or renaming it: the previous snapshot stays whole,
    no temp file is left, the store stays dirty, and a later flush writes the change."""
    path = tmp_path / "state.json"
    store = StateStore(path)
    st.add_job(store, "a", "a.csv", 1)
    assert await store.flush()
    previous = path.read_bytes()
    st.add_job(store, "b", "b.csv", 1)

    real_replace = os.replace

    def failing_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if Path(dst) == path:
            _disk_full()
        real_replace(src, dst, *args, **kwargs)

    with monkeypatch.context() as patch:
        if where == "write":
            patch.setattr(state_mod.os, "write", _disk_full)
            patch.setattr(state_mod.os, "writev", _disk_full)  # a save in pieces
        else:
            patch.setattr(state_mod.os, "replace", failing_replace)
        assert await store.flush() is False
    assert path.read_bytes() == previous
    assert set(load_state(path).jobs) == {"a"}
    assert temp_files(tmp_path) == []
    assert store.dirty
    assert store.write_failures == 1
    assert await store.flush() is True
    assert set(load_state(path).jobs) == {"a", "b"}
    assert not store.dirty


# --- the seed's state functions --------------------------------------------------------------
def test_get_available_jobs_in_acceptance_order_honouring_not_before(tmp_path: Path) -> None:
    """Queued jobs come in acceptance order (not name order); a job backing off is skipped
    until its not_before has passed; running/done jobs never come."""
    store = StateStore(tmp_path / "state.json")
    for name in ("zeta", "alpha", "mid", "late", "gone"):
        st.add_job(store, name, f"{name}.csv", 1)
    store.jobs["mid"].not_before = 1000.0
    store.jobs["late"].state = JobState.RUNNING
    store.jobs["gone"].state = JobState.DONE
    assert [j.id for j in get_available_jobs(store, now=999.0)] == ["zeta", "alpha"]
    assert [j.id for j in get_available_jobs(store, now=1000.0)] == ["zeta", "alpha", "mid"]


def test_get_idle_instances(tmp_path: Path) -> None:
    """Only READY instances with a free slot are idle."""
    store = StateStore(tmp_path / "state.json")
    store.instances["1"] = InstanceRecord(id="1", status=InstanceStatus.READY)
    store.instances["2"] = InstanceRecord(id="2", status=InstanceStatus.READY, current_jobs=["x"])
    store.instances["3"] = InstanceRecord(id="3", status=InstanceStatus.UNREACHABLE)
    store.instances["4"] = InstanceRecord(id="4", status=InstanceStatus.PREPARING)
    assert [i.id for i in get_idle_instances(store)] == ["1"]
    assert [i.id for i in get_idle_instances(store, jobs_per_instance=2)] == ["1", "2"]
