"""The store's kept JSON and job index (core/tracking.py): they agree with a full dump
and a full scan after any sequence of transitions; a save dumps only the records that
changed; a change made in place, which the store cannot hear of, fails the check."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from vastd.core import state as st
from vastd.core import tracking
from vastd.core.files import JobFolder, Layout
from vastd.core.history import history_line
from vastd.core.records import Snapshot
from vastd.core.state import InstanceRecord, InstanceStatus, JobRecord, JobState, StateStore
from vastd.core.tracking import HELD, RecordTable

INSTANCES = ("i1", "i2", "i3")


def store_at(tmp_path: Path) -> StateStore:
    layout = Layout(tmp_path / "root")
    layout.ensure()
    store = StateStore(layout.state_file)
    for inst_id in INSTANCES:
        store.instances[inst_id] = InstanceRecord(id=inst_id, status=InstanceStatus.READY)
    return store


def accept(store: StateStore, job_id: str) -> JobRecord:
    store.layout.job_file(JobFolder.QUEUED, job_id).write_text("a,b\n1,2\n")
    return st.add_job(store, job_id, f"{job_id}.csv", 1)


def scan(store: StateStore) -> dict[str, object]:
    """What the index answers, computed the slow way from every record."""
    jobs = list(store.jobs.values())
    queued = sorted((j for j in jobs if j.state is JobState.QUEUED), key=lambda j: j.seq)
    return {
        "counts": {s.value: sum(j.state is s for j in jobs) for s in JobState},
        "held": {
            i: sorted(j.id for j in jobs if j.instance == i and j.state in HELD) for i in INSTANCES
        },
        "orphans": {
            i: sorted(j.id for j in jobs if any(o.instance == i for o in j.orphans))
            for i in INSTANCES
        },
        "queue": [j.id for j in queued],
        "running": sorted(j.id for j in jobs if j.state is JobState.RUNNING),
    }


def indexed(store: StateStore) -> dict[str, object]:
    counts = store.counts()
    counts["done"] -= store.history.done
    counts["failed"] -= store.history.failed
    return {
        "counts": counts,
        "held": {i: sorted(j.id for j in st.jobs_on_instance(store, i)) for i in INSTANCES},
        "orphans": {i: sorted(j.id for j in st.orphans_on(store, i)) for i in INSTANCES},
        "queue": [j.id for j in st.get_available_jobs(store, now=float("inf"))],
        "running": sorted(j.id for j in store.jobs_in(JobState.RUNNING)),
    }


def random_step(store: StateStore, rng: random.Random, names: list[str]) -> None:
    """One transition picked at random among those the job's state allows."""
    job_id = rng.choice(names)
    job = store.jobs.get(job_id)
    if job is None or job.state in st.FINISHED:
        if job is not None and rng.random() < 0.3:
            del store.jobs[job_id]  # as retirement to history does
            return
        accept(store, job_id)
        return
    inst = rng.choice(INSTANCES)
    if job.state is JobState.QUEUED:
        if rng.random() < 0.8:
            st.mark_job_assigned(store, job_id, inst)
            st.mark_job_started(store, job_id, run_id=job.run_id, pgid=7, new=True)
        else:
            st.mark_job_failed(store, job_id, reason="cancelled")
    elif job.state is JobState.RUNNING:
        pick = rng.random()
        if pick < 0.4:
            st.mark_job_exited(store, job_id, exit_code=0, error=None)
        elif pick < 0.7:
            st.requeue_job(
                store, job_id, reason="lost", orphan=rng.random() < 0.5, delay_s=0.0, avoid=[inst]
            )
        else:
            st.record_attempt_failure(
                store, job_id, reason="exit 1", exit_code=1, max_attempts=3, retry_delay_s=0
            )
    elif job.state is JobState.COLLECTING:
        if rng.random() < 0.7:
            st.mark_job_completed(
                store, job_id, instance_id=job.instance or inst, run_id=job.run_id, result_files=[]
            )
        else:
            st.record_attempt_failure(
                store, job_id, reason="bad results", exit_code=0, max_attempts=3, retry_delay_s=0
            )
    for orphaned in st.orphans_on(store, inst):
        if rng.random() < 0.2:
            st.drop_orphan(store, orphaned, inst)


@pytest.mark.parametrize("block", [tracking.BLOCK, 3])  # 3: a dozen jobs span blocks
@pytest.mark.parametrize("seed", range(6))
async def test_the_index_and_the_kept_json_agree_with_a_full_scan(
    tmp_path: Path, seed: int, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracking, "BLOCK", block)
    rng = random.Random(seed)
    store = store_at(tmp_path)
    names = [f"job_{n}" for n in range(12)]
    for step in range(400):
        random_step(store, rng, names)
        if step % 7 == 0:
            assert indexed(store) == scan(store), f"step {step}"
        if step % 10 == 0:
            data = store.serialize()
            fresh = json.loads(store.snapshot.model_dump_json())
            # what is written reads back as the whole snapshot (defaults left out)
            back = Snapshot.model_validate_json(data).model_dump(mode="json")
            assert back == fresh, f"step {step}"
    assert indexed(store) == scan(store)
    assert await store.flush()
    reloaded = StateStore.open(store.path)
    assert reloaded.snapshot.jobs == store.snapshot.jobs
    assert indexed(reloaded) == scan(reloaded) == scan(store)


def test_the_queue_keeps_acceptance_order_and_skips_backed_off_jobs(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    for name in ("a", "b", "c", "d"):
        accept(store, name)
    st.mark_job_assigned(store, "a", "i1")
    st.mark_job_assigned(store, "c", "i2")
    assert [j.id for j in st.get_available_jobs(store)] == ["b", "d"]
    st.requeue_job(store, "c", reason="lost")  # back in the queue, ahead of d
    st.requeue_job(store, "a", reason="retry", delay_s=3600)  # backed off
    assert [j.id for j in st.get_available_jobs(store)] == ["b", "c", "d"]
    assert [j.id for j in st.get_available_jobs(store, limit=2)] == ["b", "c"]
    assert [j.id for j in st.get_available_jobs(store, now=float("inf"))] == ["a", "b", "c", "d"]
    # A finished name accepted again queues behind everything accepted before it.
    st.mark_job_assigned(store, "b", "i3")
    st.mark_job_failed(store, "b", reason="broken")
    accept(store, "b")
    assert [j.id for j in st.get_available_jobs(store)] == ["c", "d", "b"]


def test_a_save_dumps_only_the_records_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VASTD_CHECK_STATE", raising=False)  # its full dumps would count
    store = store_at(tmp_path)
    for n in range(200):
        accept(store, f"job_{n}")
    store.serialize()
    dumped: list[str] = []

    class Counting:
        """JobRecord's serializer, counting the records it dumps."""

        def __init__(self, real: Any) -> None:
            self.real = real

        def to_json(self, record: JobRecord, **kwargs: Any) -> bytes:
            dumped.append(record.id)
            return bytes(self.real.to_json(record, **kwargs))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    monkeypatch.setattr(
        JobRecord, "__pydantic_serializer__", Counting(JobRecord.__pydantic_serializer__)
    )
    store.serialize()
    assert dumped == []
    accept(store, "late")  # a new job is dumped as it is accepted, not by the next save
    assert dumped == ["late"]
    dumped.clear()
    store.serialize()
    assert dumped == []
    st.mark_job_assigned(store, "job_7", "i1")
    data = store.serialize()
    assert dumped == ["job_7"]
    assert json.loads(data)["jobs"]["job_7"]["state"] == "running"
    assert json.loads(data)["instances"]["i1"]["current_jobs"] == ["job_7"]


def test_a_save_dumps_only_the_clean_ups_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of clean-ups wait while collections outrun them (the 100,000-job run
    had a backlog of them): a save dumps only those added or changed since the last
    one, and the snapshot read back holds them all as they are."""
    monkeypatch.delenv("VASTD_CHECK_STATE", raising=False)
    store = store_at(tmp_path)
    for n in range(600):
        st.add_followup(store, instance="i1", job=f"job_{n}", run=f"{n:016x}", reason="collected")
    store.serialize()
    dumped: list[str] = []
    real = st.FollowUp.__pydantic_serializer__

    class Counting:
        def to_json(self, record: Any, **kwargs: Any) -> bytes:
            dumped.append(record.id)
            return bytes(real.to_json(record, **kwargs))

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    monkeypatch.setattr(st.FollowUp, "__pydantic_serializer__", Counting())
    store.serialize()
    assert dumped == []
    fid = next(iter(store.snapshot.followups))
    st.followup_failed(store, fid, "exit 1, nothing on stderr", 30.0)
    gone = list(store.snapshot.followups)[-1]
    st.followup_done(store, gone)
    data = json.loads(store.serialize())
    assert dumped == [fid]
    assert len(data["followups"]) == 599 and gone not in data["followups"]
    assert data["followups"][fid]["attempts"] == 1
    assert data["followups"][fid]["last_error"] == "exit 1, nothing on stderr"
    assert set(data) == set(json.loads(store.snapshot.model_dump_json()))


async def test_a_str_that_is_not_utf8_in_a_record_does_not_fail_the_save(
    tmp_path: Path,
) -> None:
    """Whatever let a lone surrogate into a record (an API answer, a name's undecodable
    byte), the save writes it as U+FFFD instead of raising: a record that could not be
    dumped failed every save, and the saver's error stopped the daemon. The history
    line of a finished job is written the same way."""
    store = StateStore(tmp_path / "state.json")
    store.instances["1"] = InstanceRecord(id="1", gpu_name="RTX\udcff")
    store.mark_dirty()
    assert await store.flush()
    saved = json.loads((tmp_path / "state.json").read_bytes())
    assert saved["instances"]["1"]["gpu_name"] == "RTX\ufffd"
    job = JobRecord(id="j", file_name="j.csv", last_error="bad \ud800 text")
    assert b"bad \xef\xbf\xbd text" in history_line(job)


def test_a_record_changed_in_place_fails_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net the suite runs with: a change the store cannot see is caught."""
    monkeypatch.setenv("VASTD_CHECK_STATE", "1")
    store = store_at(tmp_path)
    job = accept(store, "a")
    store.serialize()
    job.avoid_instances.append("i1")  # in place: no assignment, so no notice
    with pytest.raises(AssertionError, match="changed without its store hearing"):
        store.serialize()
    job.avoid_instances = [*job.avoid_instances]  # assigned: seen
    store.serialize()


def test_every_way_of_changing_the_table_is_seen(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    accept(store, "a")
    accept(store, "b")
    assert isinstance(store.jobs, RecordTable)
    store.jobs.pop("a")
    store.jobs.update({"c": JobRecord(id="c", file_name="c.csv", seq=99)})
    store.jobs.setdefault("d", JobRecord(id="d", file_name="d.csv", seq=100))
    assert indexed(store) == scan(store)
    assert set(json.loads(store.serialize())["jobs"]) == {"b", "c", "d"}
    store.jobs.clear()
    assert store.counts()["queued"] == 0 and json.loads(store.serialize())["jobs"] == {}
    # A snapshot replaced wholesale is taken up again.
    store.snapshot = st.Snapshot(jobs={"e": JobRecord(id="e", file_name="e.csv")})
    assert [j.id for j in st.get_available_jobs(store)] == ["e"]
    assert set(json.loads(store.serialize())["jobs"]) == {"e"}


async def test_job_file_moves_are_fsynced_off_the_loop_before_the_save_that_records_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from vastd.core import files as files_mod
    from vastd.core import snapshot as snapshot_mod

    store = store_at(tmp_path)
    job = accept(store, "a")
    st.mark_job_assigned(store, "a", "i1")
    st.mark_job_exited(store, "a", exit_code=0, error=None)
    assert await store.flush()
    events: list[tuple[str, str, bool]] = []
    loop_thread = threading.get_ident()
    real_fsync, real_replace = files_mod.fsync_directory, snapshot_mod.os.replace

    def fsync(path: Path) -> None:
        events.append(("fsync", Path(path).name, threading.get_ident() == loop_thread))
        real_fsync(path)

    def replace(src: object, dst: object) -> None:
        events.append(("replace", Path(str(dst)).name, threading.get_ident() == loop_thread))
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(files_mod, "fsync_directory", fsync)
    monkeypatch.setattr(snapshot_mod, "fsync_directory", fsync)
    monkeypatch.setattr(snapshot_mod.os, "replace", replace)
    st.mark_job_completed(store, "a", instance_id="i1", run_id=job.run_id, result_files=[])
    assert store.layout.job_file(JobFolder.DONE, "a").exists()
    assert events == [], "the move fsynced its folders on the event loop"
    assert await store.flush()
    fsynced = {name for kind, name, _ in events if kind == "fsync"}
    assert {"done", "running"} <= fsynced
    first_state_write = next(i for i, e in enumerate(events) if e[:2] == ("replace", "state.json"))
    assert all(e[0] == "fsync" for e in events[:first_state_write] if e[1] in ("done", "running"))
    assert max(i for i, e in enumerate(events) if e[1] in ("done", "running")) < first_state_write
    assert not any(on_loop for _, _, on_loop in events), "the save's work ran on the loop"


async def test_a_folder_that_cannot_be_fsynced_fails_the_save_and_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vastd.core import snapshot as snapshot_mod
    from vastd.utils.exceptions import FileOperationError

    store = store_at(tmp_path)
    accept(store, "a")
    assert await store.flush()
    st.mark_job_assigned(store, "a", "i1")
    real = snapshot_mod.fsync_directory

    def broken(path: Path) -> None:
        raise FileOperationError(f"cannot fsync folder {path}: EIO")

    monkeypatch.setattr(snapshot_mod, "fsync_directory", broken)
    assert not await store.flush()
    assert "EIO" in (store.save_error or "")
    saved = json.loads(store.path.read_text())
    assert saved["jobs"]["a"]["state"] == "queued"  # the record did not get ahead of its file
    seen: list[str] = []

    def recording(path: Path) -> None:
        seen.append(Path(path).name)
        real(path)

    monkeypatch.setattr(snapshot_mod, "fsync_directory", recording)
    assert await store.flush()
    assert {"queued", "running"} <= set(seen)
    assert json.loads(store.path.read_text())["jobs"]["a"]["state"] == "running"


def test_a_save_joins_again_only_the_block_of_a_changed_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10 jobs in blocks of 4: a change to one job leaves the other blocks' joined bytes
    as they were (the very same objects), and the pieces make the full dump."""
    monkeypatch.setattr(tracking, "BLOCK", 4)
    store = store_at(tmp_path)
    for n in range(10):
        accept(store, f"job_{n}")
    jobs = store.jobs
    assert isinstance(jobs, RecordTable)
    before = jobs.body_parts()
    assert len(before) == 5  # three blocks, two commas
    st.mark_job_assigned(store, "job_5", "i1")
    after = jobs.body_parts()
    assert after[0] is before[0] and after[4] is before[4] and after[2] is not before[2]
    read_back = json.loads(b"{" + b"".join(after) + b"}")
    assert {k: JobRecord.model_validate(v) for k, v in read_back.items()} == dict(jobs)
    # an emptied block goes; a new key goes to the last block, in the table's order
    for n in (4, 5, 6, 7):
        del jobs[f"job_{n}"]
    accept(store, "job_new")
    parts = jobs.body_parts()
    assert len(parts) == 3
    assert list(json.loads(b"{" + b"".join(parts) + b"}")) == list(jobs)
    assert Snapshot.model_validate_json(store.serialize()) == store.snapshot


def test_a_snapshot_in_pieces_is_written_whole_whatever_the_writes_take(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_state writes pieces with writev, more of them than one call takes, and
    carries on after short writes."""
    from vastd.core import snapshot as snapshot_mod

    pieces = [bytes([65 + n % 26]) * (1 + n % 7) for n in range(3000)]
    real_writev, calls = snapshot_mod.os.writev, []

    def short_writev(fd: int, buffers: list[memoryview]) -> int:
        calls.append(len(buffers))
        return real_writev(fd, [b"".join(buffers)[:15]])  # a short write: 15 bytes at most

    monkeypatch.setattr(snapshot_mod.os, "writev", short_writev)
    target = tmp_path / "state.json"
    snapshot_mod.save_state(pieces, target)
    assert target.read_bytes() == b"".join(pieces)
    assert max(calls) == snapshot_mod._IOV_MAX and len(calls) >= len(b"".join(pieces)) // 15


def test_a_listing_that_changed_nothing_tells_the_store_of_last_seen_alone(
    tmp_path: Path,
) -> None:
    """Discovery lists every instance each poll: only the fields that changed are
    assigned, so an unchanged listing re-dumps one field's record, not a dozen notices."""
    from vastd.instances.provider import ApiState, Endpoint, ProviderInstance
    from vastd.orchestration.inventory import refresh_record

    store = store_at(tmp_path)
    inst = store.instances["i1"]
    info = ProviderInstance(
        id="i1",
        label="vastd",
        state=ApiState.RUNNING,
        raw_status="running",
        proxy=Endpoint("ssh4.vast.ai", 1234),
        direct=None,
        dph=0.5,
        machine_id="77",
        gpu_name="RTX 4090",
        num_gpus=2,
        intent=None,
        end_date=None,
    )
    refresh_record(inst, info, 100.0)
    assert (inst.ssh_host, inst.ssh_port, inst.dph, inst.machine_id) == (
        "ssh4.vast.ai",
        1234,
        0.5,
        77,
    )
    notices: list[str] = []
    inst.watch(lambda record: notices.append(record.id))
    refresh_record(inst, info, 101.0)
    assert notices == ["i1"] and inst.last_seen == 101.0
    moved = ProviderInstance(**{**info.__dict__, "proxy": Endpoint("ssh5.vast.ai", 99)})
    notices.clear()
    refresh_record(inst, moved, 102.0)
    assert len(notices) == 3 and (inst.ssh_host, inst.ssh_port) == ("ssh5.vast.ai", 99)


def test_a_job_is_written_without_its_defaults_but_the_outline_fields() -> None:
    """state.json's and history's job entries leave out the fields that hold their
    defaults (a queued job's was 750 bytes, most of them nulls), keep the snapshot's
    outline (state, attempts, runs, instance, timestamps) whatever their value, and read
    back as the same record."""
    outline = {"id", "file_name", "state", "attempts", "runs", "instance", "accepted_at"}
    outline |= {"dispatched_at", "started_at", "exited_at", "finished_at"}
    queued = JobRecord(id="job_q", file_name="job_q.csv", rows=3, seq=7)
    data = json.loads(tracking.dump_record(queued))
    assert set(data) == outline | {"rows", "seq"}
    assert (data["state"], data["attempts"], data["runs"], data["instance"]) == (
        "queued",
        0,
        0,
        None,
    )
    assert JobRecord.model_validate(data) == queued
    assert len(tracking.dump_record(queued)) < 0.4 * len(queued.model_dump_json())
    done = queued.model_copy(
        update={
            "state": JobState.DONE,
            "attempts": 1,
            "runs": 2,
            "instance": "i1",
            "run_id": "r1",
            "finished_at": 5.0,
            "result_files": ["r.parquet"],
            "avoid_instances": ["i0"],
        }
    )
    line = json.loads(history_line(done))
    assert set(line) == outline | {"rows", "seq", "run_id", "result_files", "avoid_instances"}
    assert line["state"] == "done" and line["started_at"] is None
    assert JobRecord.model_validate(line) == done


def test_accepted_at_is_written_even_when_it_equals_what_its_factory_gives_now() -> None:
    """accepted_at's default is a factory (time.time), which exclude_defaults calls at
    the dump and compares: a record dumped in the clock tick it was made in lost its
    acceptance time (read back as the time of the read). Made deterministic here with
    a factory that always gives the same time."""
    field = JobRecord.model_fields["accepted_at"]
    factory = field.default_factory
    field.default_factory = lambda: 5.0
    try:
        JobRecord.model_rebuild(force=True)
        job = JobRecord(id="a", file_name="a.csv")
        assert job.accepted_at == 5.0
        data = json.loads(tracking.dump_record(job))
    finally:
        field.default_factory = factory
        JobRecord.model_rebuild(force=True)
    assert data["accepted_at"] == 5.0
    assert JobRecord.model_validate(data) == job
