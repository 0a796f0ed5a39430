"""history.jsonl (CONTRACT §10): finished jobs leave state.json only once their final record
is appended and fsynced; a truncated line or an unwritable history loses nothing; the
index of finished names agrees with a full read; a v1 snapshot is migrated on load."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.ctxfactory import SimEnv
from vastd.core import history as history_mod
from vastd.core import state as st
from vastd.core.files import JobFolder, Layout
from vastd.core.history import HistoryIndex, iter_history, read_history_records
from vastd.core.state import (
    InstanceRecord,
    InstanceStatus,
    JobRecord,
    JobState,
    OrphanRun,
    StateStore,
    load_state,
)
from vastd.orchestration.recovery import save_recovery
from vastd.orchestration.workflow import accept_inbox_file, recover_after_restart
from vastd.status import build_status, load_snapshot_readonly
from vastd.views import JobView, refused_files

CSV = "a,b\n1,2\n"
DATA = Path(__file__).parent / "data"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[SimEnv]:
    async with SimEnv(tmp_path) as e:
        yield e


def new_store(root: Path) -> StateStore:
    layout = Layout(root)
    layout.ensure()
    store = StateStore(layout.state_file)
    store.instances["101"] = InstanceRecord(id="101", status=InstanceStatus.READY)
    return store


def queue(store: StateStore, job_id: str) -> None:
    store.layout.job_file(JobFolder.QUEUED, job_id).write_text(CSV)
    st.add_job(store, job_id, f"{job_id}.csv", rows=1)


def finish(store: StateStore, job_id: str, *, ok: bool = True) -> None:
    """Run the job through the transitions to done (or failed)."""
    queue(store, job_id)
    job = st.mark_job_assigned(store, job_id, "101")
    assert job is not None
    st.mark_job_exited(store, job_id, exit_code=0 if ok else 1, error=None)
    if ok:
        st.mark_job_completed(
            store, job_id, instance_id="101", run_id=job.run_id, result_files=["r.parquet"]
        )
    else:
        st.mark_job_failed(store, job_id, reason="bad results", exit_code=1)


def history_ids(store: StateStore) -> list[str]:
    return [d["id"] for d in iter_history(store.history_path)]


def saved_ids(store: StateStore) -> set[str]:
    return set(load_state(store.path).jobs)


# --- write-ahead ---------------------------------------------------------------------------
async def test_a_finished_job_is_appended_and_fsynced_before_it_leaves_the_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The append (with its fsync) happens while the job is still in memory and on disk;
    only then does it leave memory, and the next save leaves it out of state.json."""
    store = new_store(tmp_path)
    finish(store, "a")
    queue(store, "b")
    assert await store.flush()
    seen: list[tuple[bool, bool]] = []
    real_append, real_fsync = history_mod.append_history_async, history_mod.os.fsync
    fsynced: list[int] = []

    async def append(path: Path, lines: list[bytes]) -> None:
        seen.append(("a" in store.jobs, "a" in saved_ids(store)))
        await real_append(path, lines)

    def fsync(fd: int) -> None:
        fsynced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr("vastd.core.snapshot.append_history_async", append)
    monkeypatch.setattr(history_mod.os, "fsync", fsync)
    assert await store.retire_finished() == 1
    assert seen == [(True, True)]
    assert fsynced, "the history append was not fsynced"
    assert history_ids(store) == ["a"]
    assert "a" not in store.jobs and "a" in saved_ids(store)  # until the next save
    assert await store.flush()
    assert saved_ids(store) == {"b"}
    [line] = (tmp_path / "history.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert (record["state"], record["result_files"]) == ("done", ["r.parquet"])
    assert store.counts()["done"] == 1 and store.job_state("a") is JobState.DONE
    found = store.record("a")
    assert found is not None and found.result_files == ["r.parquet"]
    assert store.record("b") is store.jobs["b"] and store.record("nope") is None


async def test_an_unwritable_history_keeps_the_job_in_the_snapshot(tmp_path: Path) -> None:
    """history.jsonl cannot be written (here: a folder in its place): the job stays in
    state.json, the error is reported once, and a later retirement moves it."""
    store = new_store(tmp_path)
    finish(store, "a", ok=False)
    store.history_path.mkdir()
    with capture_logs() as logs:
        assert await store.retire_finished() == 0
        assert await store.retire_finished() == 0
    assert [e["event"] for e in logs].count("history_write_failed") == 1
    assert store.history_error is not None
    assert await store.flush()
    assert saved_ids(store) == {"a"}
    store.history_path.rmdir()
    assert await store.retire_finished() == 1
    assert store.history_error is None
    assert await store.flush()
    assert saved_ids(store) == set() and history_ids(store) == ["a"]


async def test_a_record_changed_during_the_append_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job accepted again while its line was being appended keeps its new record."""
    store = new_store(tmp_path)
    finish(store, "a", ok=False)
    real = history_mod.append_history_async

    async def append(path: Path, lines: list[bytes]) -> None:
        await real(path, lines)
        queue(store, "a")  # resubmitted meanwhile (as the event loop could)

    monkeypatch.setattr("vastd.core.snapshot.append_history_async", append)
    assert await store.retire_finished() == 0
    assert store.jobs["a"].state is JobState.QUEUED
    assert "a" not in store.history


async def test_a_failed_job_with_an_orphaned_run_stays_until_the_orphan_is_settled(
    tmp_path: Path,
) -> None:
    """An orphaned run may still complete a failed job: its record stays in state.json
    until the orphan is dropped, then goes to history."""
    store = new_store(tmp_path)
    finish(store, "a", ok=False)
    store.jobs["a"].orphans.append(OrphanRun(instance="102", run="00aa00aa00aa00aa"))
    assert await store.retire_finished() == 0
    assert "a" in store.jobs
    st.drop_orphan(store, store.jobs["a"], "102")
    assert await store.retire_finished() == 1
    assert "a" not in store.jobs


# --- reading ---------------------------------------------------------------------------------
def test_a_truncated_last_line_is_skipped_with_a_warning_and_the_next_append_is_whole(
    tmp_path: Path,
) -> None:
    """A crash mid-append leaves half a line: reading skips it (warning), the next append
    starts on a new line so no good line is lost."""
    store = new_store(tmp_path)
    finish(store, "a")
    finish(store, "b", ok=False)
    store.retire_now()
    text = store.history_path.read_bytes()
    store.history_path.write_bytes(text + b'{"id": "c", "state": "do')
    with capture_logs() as logs:
        index = HistoryIndex.load(store.history_path)
    assert sorted(index.entries) == ["a", "b"]
    skipped = [e for e in logs if e["event"] == "history_line_skipped"]
    assert len(skipped) == 1 and skipped[0]["truncated"] is True
    finish(store, "d")
    store.retire_now()
    with capture_logs():
        assert sorted(read_history_records(store.history_path)) == ["a", "b", "d"]


async def test_restart_loads_the_index_and_the_snapshot_wins_over_an_older_line(
    tmp_path: Path,
) -> None:
    """A restarted store knows the finished names from history; a name in state.json
    (accepted again) counts as what state.json says."""
    store = new_store(tmp_path)
    finish(store, "a")
    finish(store, "b", ok=False)
    assert await store.retire_finished() == 2
    queue(store, "a")  # rerun accepted
    assert await store.flush()
    again = StateStore.open(store.path)
    assert again.job_state("a") is JobState.QUEUED
    assert again.job_state("b") is JobState.FAILED
    assert "a" not in again.history and "b" in again.history
    assert again.counts() == {"queued": 1, "running": 0, "collecting": 0, "done": 0, "failed": 1}


async def test_the_index_agrees_with_a_full_read_after_random_work(tmp_path: Path) -> None:
    """After many finishes, resubmissions and retirements (some retirements skipped, some
    restarts), the index and its counts equal a full read of history.jsonl minus the
    names in the snapshot."""
    rng = random.Random(9)
    store = new_store(tmp_path)
    names = [f"j{i}" for i in range(25)]
    for _ in range(200):
        name = rng.choice(names)
        state = store.job_state(name)
        if state is None or state in st.FINISHED:
            if state is None or rng.random() < 0.5:
                if state is not None:
                    (tmp_path / "done" / f"{name}.csv").unlink(missing_ok=True)
                finish(store, name, ok=rng.random() < 0.7)
            else:
                queue(store, name)
        if rng.random() < 0.3:
            await store.retire_finished()
            await store.flush()
        if rng.random() < 0.05:
            await store.flush()
            store = StateStore.open(store.path)
            store.instances.setdefault("101", InstanceRecord(id="101", status=InstanceStatus.READY))
        full = read_history_records(store.history_path)
        expected = {k: v.state for k, v in full.items() if k not in store.jobs}
        assert {k: e.state for k, e in store.history.entries.items()} == expected
        assert store.history.done == sum(s is JobState.DONE for s in expected.values())
        assert store.history.failed == sum(s is JobState.FAILED for s in expected.values())
        scan = {s.value: 0 for s in JobState}
        for k in set(full) | set(store.jobs):
            job_state = store.jobs[k].state if k in store.jobs else full[k].state
            scan[job_state.value] += 1
        assert store.counts() == scan


# --- duplicates and resubmission ---------------------------------------------------------------
async def test_a_done_name_in_history_only_is_refused(env: SimEnv) -> None:
    """Duplicate refusal uses the index: the done/ file removed, a done job whose record is
    in history only is still refused as a duplicate."""
    await env.start(instances=0)
    ctx = env.context(env.settings(), api=False)
    finish_ctx(ctx.store, "old")
    assert await ctx.store.retire_finished() == 1
    ctx.layout.job_file(JobFolder.DONE, "old").unlink()
    (ctx.layout.inbox / "old.csv").write_text(CSV)
    with capture_logs() as logs:
        await accept_inbox_file(ctx, ctx.layout.inbox / "old.csv")
    assert "old" not in ctx.store.jobs
    assert (ctx.layout.failed / "old.dup-1.csv").exists()
    assert any(e["event"] == "job_duplicate_refused" for e in logs)


async def test_a_failed_name_in_history_only_is_resubmitted_and_its_failure_cleared(
    env: SimEnv,
) -> None:
    """A failed job whose record is in history only, resubmitted: a new queued record, the
    name leaves the index, and its failed/ files go once that is saved."""
    await env.start(instances=0)
    ctx = env.context(env.settings(), api=False)
    finish_ctx(ctx.store, "bad", ok=False)
    assert await ctx.store.retire_finished() == 1
    assert (ctx.layout.failed / "bad.csv").exists()
    (ctx.layout.inbox / "bad.csv").write_text(CSV)
    await accept_inbox_file(ctx, ctx.layout.inbox / "bad.csv")
    job = ctx.store.jobs["bad"]
    assert job.state is JobState.QUEUED and job.attempts == 0
    assert "bad" not in ctx.store.history
    assert not (ctx.layout.failed / "bad.csv").exists()
    assert not (ctx.layout.failed / "bad.error.json").exists()


async def test_a_name_refused_at_acceptance_then_accepted_leaves_no_refusal_behind(
    env: SimEnv,
) -> None:
    """A file refused at acceptance (no job record), then a good file of that name: the
    refusal's failed/ files go once the new job is queued on disk, so `vastd jobs` shows
    the name once, not also as refused."""
    await env.start(instances=0)
    ctx = env.context(env.settings(), api=False)
    (ctx.layout.inbox / "fixed.csv").write_text("a,b\n")  # a header, no data rows
    with capture_logs():
        await accept_inbox_file(ctx, ctx.layout.inbox / "fixed.csv")
    assert "fixed" not in ctx.store.jobs
    assert (ctx.layout.failed / "fixed.error.json").exists()
    (ctx.layout.inbox / "fixed.csv").write_text(CSV)
    await accept_inbox_file(ctx, ctx.layout.inbox / "fixed.csv")
    assert ctx.store.jobs["fixed"].state is JobState.QUEUED
    assert sorted(p.name for p in ctx.layout.failed.iterdir()) == []
    assert ctx.store.jobs["fixed"].earlier_failed_stem is None  # cleared: it may retire
    views = {j.id: JobView.of(j) for j in ctx.store.jobs.values()}
    assert refused_files(ctx.layout, views) == []


async def test_a_refused_name_accepted_before_a_crash_clears_the_refusal_once_saved(
    env: SimEnv,
) -> None:
    """A good file of a name refused earlier, moved into queued/ when SIGKILL came before
    the save: adopted at restart as the refusal's successor. The refusal's failed/ files
    stay until the adopted record is on disk (a crash before that must not lose them),
    then go."""
    await env.start(instances=0)
    settings = env.settings()
    ctx = env.context(settings, api=False)
    (ctx.layout.inbox / "fixed.csv").write_text("a,b\n")  # a header, no data rows
    with capture_logs():
        await accept_inbox_file(ctx, ctx.layout.inbox / "fixed.csv")
    refusal = sorted(p.name for p in ctx.layout.failed.iterdir())
    assert refusal == ["fixed.csv", "fixed.error.json"]
    ctx.layout.job_file(JobFolder.QUEUED, "fixed").write_text(CSV)  # accepted; no save
    await env.close_context(ctx)
    ctx2 = env.context(settings, api=False)
    with capture_logs():
        recover_after_restart(ctx2)
    assert ctx2.store.jobs["fixed"].earlier_failed_stem == "fixed"
    assert sorted(p.name for p in ctx2.layout.failed.iterdir()) == refusal  # not saved yet
    await save_recovery(ctx2)
    assert list(ctx2.layout.failed.iterdir()) == []
    await env.close_context(ctx2)
    ctx3 = env.context(settings, api=False)
    with capture_logs():
        recover_after_restart(ctx3)
    assert list(ctx3.layout.failed.iterdir()) == []
    assert ctx3.store.jobs["fixed"].earlier_failed_stem is None
    views = {j.id: JobView.of(j) for j in ctx3.store.jobs.values()}
    assert refused_files(ctx3.layout, views) == []


async def test_a_rerun_of_a_done_name_found_at_restart_replaces_a_refusal_of_it(
    env: SimEnv,
) -> None:
    """on_duplicate = "rerun": a done name (in history only), then a bad file of it
    refused, then a good one moved into queued/ just before SIGKILL. The restart takes
    the good file as the rerun, and the refusal's files go once that record is saved."""
    await env.start(instances=0)
    settings = env.settings(job={"on_duplicate": "rerun"})
    ctx = env.context(settings, api=False)
    finish_ctx(ctx.store, "again")
    assert await ctx.store.retire_finished() == 1
    assert await ctx.store.flush()
    (ctx.layout.inbox / "again.csv").write_text("a,b\n")  # a header, no data rows
    with capture_logs():
        await accept_inbox_file(ctx, ctx.layout.inbox / "again.csv")
    assert sorted(p.name for p in ctx.layout.failed.iterdir()) == [
        "again.csv",
        "again.error.json",
    ]
    ctx.layout.job_file(JobFolder.QUEUED, "again").write_text(CSV)  # accepted; no save
    await env.close_context(ctx)
    ctx2 = env.context(settings, api=False)
    with capture_logs():
        recover_after_restart(ctx2)
    job = ctx2.store.jobs["again"]
    assert job.state is JobState.QUEUED and job.keep_previous
    assert job.earlier_failed_stem == "again"
    await save_recovery(ctx2)
    assert list(ctx2.layout.failed.iterdir()) == []


async def test_a_done_name_in_history_accepted_before_a_crash_is_refused_at_restart(
    env: SimEnv,
) -> None:
    """A file in queued/ for a done name whose record is in history only (accepted, then
    SIGKILL before the save): refused as a duplicate at restart, never run again."""
    await env.start(instances=0)
    settings = env.settings()
    ctx = env.context(settings, api=False)
    finish_ctx(ctx.store, "old")
    assert await ctx.store.retire_finished() == 1
    assert await ctx.store.flush()
    ctx.layout.job_file(JobFolder.QUEUED, "old").write_text(CSV)
    await env.close_context(ctx)
    ctx2 = env.context(settings, api=False)
    with capture_logs():
        recover_after_restart(ctx2)
    assert "old" not in ctx2.store.jobs
    assert (ctx2.layout.failed / "old.dup-1.csv").exists()


def test_the_stores_name_views_cover_snapshot_and_history(tmp_path: Path) -> None:
    """`active_ids` and `done_ids` (what acceptance checks names against) answer from the
    snapshot and the history index without building a set."""
    store = new_store(tmp_path)
    finish(store, "x")
    store.retire_now()
    assert "x" in store.done_ids and "x" not in store.active_ids
    queue(store, "y")
    assert "y" in store.active_ids and "y" not in store.done_ids
    finish(store, "z", ok=False)
    assert "z" not in store.done_ids and "z" not in store.active_ids


async def test_a_done_name_in_history_is_accepted_as_a_rerun(env: SimEnv) -> None:
    """With on_duplicate = "rerun", a done name whose record is in history only is
    accepted as a new run that keeps the earlier results."""
    await env.start(instances=0)
    ctx = env.context(env.settings(job={"on_duplicate": "rerun"}), api=False)
    finish_ctx(ctx.store, "old")
    assert await ctx.store.retire_finished() == 1
    (ctx.layout.inbox / "old.csv").write_text(CSV)
    await accept_inbox_file(ctx, ctx.layout.inbox / "old.csv")
    job = ctx.store.jobs["old"]
    assert job.state is JobState.QUEUED and job.keep_previous
    assert "old" not in ctx.store.history and ctx.store.counts()["done"] == 0


def finish_ctx(store: StateStore, job_id: str, *, ok: bool = True) -> None:
    store.instances.setdefault("101", InstanceRecord(id="101", status=InstanceStatus.READY))
    finish(store, job_id, ok=ok)


# --- migration ---------------------------------------------------------------------------------
def v1_root(tmp_path: Path) -> Path:
    """A root holding tests/data/state_v1.json, written by b859f46's code
    (tests/data/make_state_v1.py)."""
    root = tmp_path / "root"
    Layout(root).ensure()
    shutil.copy(DATA / "state_v1.json", root / "state.json")
    return root


def test_a_v1_snapshot_is_migrated_on_load(tmp_path: Path) -> None:
    """Finished jobs without orphaned runs go to history.jsonl, the rest stay; the old
    file is kept as state.json.v1; state.json is rewritten as version 2."""
    root = v1_root(tmp_path)
    original = (root / "state.json").read_bytes()
    before = json.loads(original)
    with capture_logs() as logs:
        store = StateStore.open(root / "state.json")
    assert (root / "state.json.v1").read_bytes() == original
    saved = json.loads((root / "state.json").read_text())
    assert saved["version"] == 2
    assert sorted(saved["jobs"]) == ["failed_orphan_c", "queued_d", "running_e"]
    assert sorted(history_ids(store)) == ["done_a", "done_f", "failed_b"]
    assert saved["history"]["done"] == 2 and saved["history"]["failed"] == 1
    # every field the v1 file had, unchanged (fields added since take their defaults)
    assert sorted(saved["instances"]) == sorted(before["instances"])
    for iid, inst in before["instances"].items():
        assert {k: saved["instances"][iid][k] for k in inst} == inst
    assert saved["followups"] == before["followups"]
    for job_id in ("done_a", "failed_b"):
        record = read_history_records(store.history_path)[job_id].model_dump(mode="json")
        # every field the v1 file had, unchanged (fields added since take their defaults)
        assert {k: record[k] for k in before["jobs"][job_id]} == before["jobs"][job_id]
    counted: dict[str, Any] = {s.value: 0 for s in JobState}
    for job in before["jobs"].values():
        counted[job["state"]] += 1
    assert store.counts() == counted
    [event] = [e for e in logs if e["event"] == "state_migrated"]
    assert (event["from_version"], event["to_history"]) == (1, 3)
    # Opened again: nothing more to migrate, nothing appended twice.
    StateStore.open(root / "state.json")
    assert sorted(history_ids(store)) == ["done_a", "done_f", "failed_b"]


def test_status_reads_a_v1_snapshot_without_writing_and_counts_history(tmp_path: Path) -> None:
    """`vastd status` on a v1 root (no daemon ran the new code) changes nothing; after
    migration it counts finished jobs from the snapshot's summary, not history.jsonl."""
    root = v1_root(tmp_path)
    layout = Layout(root)
    status = build_status(layout, load_snapshot_readonly(layout))
    assert status["jobs"] == {"queued": 1, "running": 1, "collecting": 0, "done": 2, "failed": 2}
    assert not (root / "state.json.v1").exists() and not (root / "history.jsonl").exists()
    StateStore.open(layout.state_file)
    (root / "history.jsonl").write_text("not read by status\n")
    status = build_status(layout, load_snapshot_readonly(layout))
    assert status["jobs"] == {"queued": 1, "running": 1, "collecting": 0, "done": 2, "failed": 2}
    assert status["total_jobs"] == 6


def test_the_index_loaded_from_a_file_agrees_with_a_full_parse(tmp_path: Path) -> None:
    """The quick loader (only the index's fields validated) keeps the last line of each
    name, skips what is not a finished job's line, and counts as a full parse does."""
    path = tmp_path / "history.jsonl"
    lines = []
    for n in range(30):
        job = JobRecord(id=f"j{n}", file_name=f"j{n}.csv", seq=n)
        job.state = JobState.DONE if n % 3 else JobState.FAILED
        job.dispatched_at, job.finished_at = 100.0 + n, 110.0 + 2 * n
        job.failed_stem = f"j{n}.dup-1" if n % 3 == 0 else None
        lines.append(job.model_dump_json())
    again = JobRecord(id="j1", file_name="j1.csv", state=JobState.FAILED, failed_stem="j1")
    lines += [
        again.model_dump_json(),  # the same name finished again: this line counts
        '{"file_name": "no id"}',
        "not json at all",
        '{"id": 7, "state": "done"}',
        JobRecord(id="q", file_name="q.csv").model_dump_json(),  # queued: not vastd's line
        '{"id": "j2", "state": "done", "finished_at": 5',  # cut short
    ]
    path.write_text("\n".join(lines))
    with capture_logs() as logs:
        index = HistoryIndex.load(path)
    skipped = [e for e in logs if e["event"] == "history_line_skipped"]
    assert [e["line"] for e in skipped] == [32, 33, 34, 36]
    assert [e["truncated"] for e in skipped] == [False, False, False, True]
    full = read_history_records(path)
    finished = {k: v for k, v in full.items() if v.state in (JobState.DONE, JobState.FAILED)}
    assert set(index.entries) == set(finished)
    assert index.done == sum(v.state is JobState.DONE for v in finished.values())
    assert index.failed == sum(v.state is JobState.FAILED for v in finished.values())
    assert index.get("j1") == ("failed", "j1", None)
    assert index.get("j3") == ("failed", "j3.dup-1", None)
    timed = [v for v in finished.values() if v.state is JobState.DONE]
    assert index.done_timed == len(timed)
    assert index.done_duration_s == pytest.approx(
        sum((v.finished_at or 0) - (v.dispatched_at or 0) for v in timed)
    )
