"""The state machines (core/state.py): the transition tables walked, files moving with
their records, follow-up work recorded with the change that decides it, and the one
owner of `state`, `status` and the reasons (checked on the AST of vastd/)."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

from vastd.core import state as st
from vastd.core.files import JobFolder, Layout
from vastd.core.state import (
    INSTANCE_TRANSITIONS,
    JOB_TRANSITIONS,
    InstanceRecord,
    InstanceStatus,
    JobRecord,
    JobState,
    StateStore,
    load_state,
)
from vastd.utils.exceptions import FileOperationError, IllegalTransitionError

VASTD = Path(__file__).resolve().parent.parent / "vastd"


def store_at(tmp_path: Path) -> StateStore:
    layout = Layout(tmp_path / "root")
    layout.ensure()
    store = StateStore(layout.state_file)
    store.instances["i1"] = InstanceRecord(id="i1", status=InstanceStatus.READY)
    return store


def put_file(store: StateStore, folder: JobFolder, job_id: str) -> None:
    store.layout.job_file(folder, job_id).write_text("a,b\n1,2\n")


def job_in(store: StateStore, state: JobState, job_id: str = "j") -> JobRecord:
    """A job brought to `state` through the transitions themselves (files included)."""
    put_file(store, JobFolder.QUEUED, job_id)
    job = st.add_job(store, job_id, f"{job_id}.csv", 1)
    if state is JobState.QUEUED:
        return job
    st.mark_job_assigned(store, job_id, "i1")
    st.mark_job_started(store, job_id, run_id=job.run_id, pgid=4242, new=True)
    if state is JobState.RUNNING:
        return job
    if state is JobState.FAILED:
        return st.mark_job_failed(store, job_id, reason="broken")
    st.mark_job_exited(store, job_id, exit_code=0, error=None)
    if state is JobState.COLLECTING:
        return job
    return st.mark_job_completed(
        store, job_id, instance_id="i1", run_id=job.run_id, result_files=[]
    )


def to_state(store: StateStore, job: JobRecord, target: JobState) -> Callable[[], object]:
    """The named transition that takes a job to `target`."""
    if target is JobState.QUEUED:
        if job.state in st.FINISHED or job.state is JobState.QUEUED:
            return lambda: st.add_job(store, job.id, job.file_name, 1)
        return lambda: st.requeue_job(store, job.id, reason="test")
    if target is JobState.RUNNING:
        return lambda: st.mark_job_assigned(store, job.id, "i1")
    if target is JobState.COLLECTING:
        return lambda: st.mark_job_exited(store, job.id, exit_code=0, error=None)
    if target is JobState.DONE:
        return lambda: st.mark_job_completed(
            store, job.id, instance_id="i1", run_id=job.run_id, result_files=[]
        )
    return lambda: st.mark_job_failed(store, job.id, reason="test")


@pytest.mark.parametrize("source", list(JobState))
@pytest.mark.parametrize("target", list(JobState))
def test_every_job_transition_follows_the_table(
    tmp_path: Path, source: JobState, target: JobState
) -> None:
    """Each (state, target) pair: allowed by JOB_TRANSITIONS -> the job is in `target`, its
    file in that state's folder; not allowed -> IllegalTransitionError, nothing changed."""
    store = store_at(tmp_path)
    job = job_in(store, source)
    assert job.state is source
    if target is JobState.QUEUED and source in st.FINISHED:
        # a finished name accepted again: its file arrives in queued/ first
        put_file(store, JobFolder.QUEUED, job.id)
    step = to_state(store, job, target)
    if target in JOB_TRANSITIONS[source]:
        step()
        now = store.jobs[job.id]
        assert now.state is target
        assert store.layout.job_file(st.FOLDER_OF[target], job.id).exists()
    else:
        before = job.model_dump()
        with pytest.raises(IllegalTransitionError):
            step()
        assert store.jobs[job.id].model_dump() == before


def test_a_new_job_can_only_start_queued() -> None:
    assert JOB_TRANSITIONS[None] == {JobState.QUEUED}


@pytest.mark.parametrize("source", list(InstanceStatus))
def test_every_instance_transition_follows_the_table(
    tmp_path: Path, source: InstanceStatus
) -> None:
    store = store_at(tmp_path)
    for target in InstanceStatus:
        inst = InstanceRecord(id="x", status=source)
        store.instances["x"] = inst
        if target is source or target in INSTANCE_TRANSITIONS[source]:
            st.set_instance_status(store, inst, target)
            assert inst.status is target
        else:
            with pytest.raises(IllegalTransitionError):
                st.set_instance_status(store, inst, target)
            assert inst.status is source
    # Nothing comes back from DESTROYED.
    assert INSTANCE_TRANSITIONS[InstanceStatus.DESTROYED] == frozenset()


def test_preparation_ending_after_a_drain_does_not_make_it_ready(tmp_path: Path) -> None:
    """mark_instance_ready over a DRAINING or LOST instance changes nothing (behaviour 9)."""
    store = store_at(tmp_path)
    inst = store.instances["i1"]
    st.set_instance_status(store, inst, InstanceStatus.DISCOVERED)
    st.mark_instance_preparing(store, inst)
    st.drain_instance(store, inst, "host key changed", requeue_jobs=True)
    assert st.mark_instance_ready(store, inst, "marker") is False
    assert inst.status is InstanceStatus.DRAINING and inst.prepared_hash is None
    st.mark_instance_lost(store, inst, "gone")
    assert st.mark_instance_ready(store, inst, "marker") is False
    assert inst.status is InstanceStatus.LOST


def test_a_drain_that_requeues_sends_every_held_job_back_without_an_attempt(
    tmp_path: Path,
) -> None:
    store = store_at(tmp_path)
    running = job_in(store, JobState.RUNNING, "r")
    collecting = job_in(store, JobState.COLLECTING, "c")
    inst = store.instances["i1"]
    assert st.drain_instance(store, inst, "host key changed", requeue_jobs=True)
    for job in (running, collecting):
        assert job.state is JobState.QUEUED and job.attempts == 0 and job.instance is None
        assert store.layout.job_file(JobFolder.QUEUED, job.id).exists()
    assert inst.status is InstanceStatus.DRAINING and inst.drain_reason == "host key changed"
    # Their started runs' folders are cleaned up once saved (nothing runs untracked).
    assert {f.job for f in store.snapshot.followups.values()} == {"r", "c"}


# --- follow-up work is recorded with its decision ------------------------------------------------
def test_a_failed_attempt_and_its_cleanup_are_saved_together(tmp_path: Path) -> None:
    """The attempt count and the remote clean-up are one change: a crash right after the
    save finds both (the folder is never removed with the attempt uncounted, behaviour 7)."""
    store = store_at(tmp_path)
    job = job_in(store, JobState.COLLECTING)
    run = job.run_id
    st.record_attempt_failure(store, job.id, reason="exit code 3", exit_code=3, max_attempts=3)
    store.flush_sync()
    saved = load_state(store.path)
    assert saved.jobs[job.id].attempts == 1 and saved.jobs[job.id].state is JobState.QUEUED
    [followup] = saved.followups.values()
    assert (followup.instance, followup.job, followup.run) == ("i1", job.id, run)


def test_a_done_job_records_the_cleanup_of_the_run_it_collected(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    job = job_in(store, JobState.DONE)
    [followup] = store.snapshot.followups.values()
    assert followup.run == job.run_id and followup.reason == "collected"
    assert store.layout.job_file(JobFolder.DONE, job.id).exists()


def test_orphan_results_kept_while_a_second_run_goes_stop_that_run(tmp_path: Path) -> None:
    """DONE from RUNNING (an orphan's results were kept): the running run's stop is recorded."""
    store = store_at(tmp_path)
    store.instances["i2"] = InstanceRecord(id="i2", status=InstanceStatus.READY)
    job = job_in(store, JobState.RUNNING)
    second_run = job.run_id
    st.mark_job_completed(store, job.id, instance_id="i2", run_id="abc", result_files=["x"])
    runs = {(f.instance, f.run, f.reason) for f in store.snapshot.followups.values()}
    assert runs == {("i1", second_run, "duplicate run"), ("i2", "abc", "collected")}
    assert job.state is JobState.DONE and job.instance == "i2"


def test_a_destroyed_instance_ends_its_followups(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    job_in(store, JobState.DONE)
    inst = store.instances["i1"]
    st.mark_instance_destroying(store, inst, "idle")
    st.mark_instance_destroyed(store, inst, 1.0)
    assert store.snapshot.followups == {}


# --- job files ---------------------------------------------------------------------------------
def test_a_job_whose_file_was_removed_from_running_completes_with_its_results(
    tmp_path: Path,
) -> None:
    """Valid results and no file in running/ (removed by hand): DONE, not stuck (behaviour 4)."""
    store = store_at(tmp_path)
    job = job_in(store, JobState.COLLECTING)
    store.layout.job_file(JobFolder.RUNNING, job.id).unlink()
    st.mark_job_completed(store, job.id, instance_id="i1", run_id=job.run_id, result_files=["r"])
    assert job.state is JobState.DONE


def test_a_requeue_without_its_file_fails_the_job_with_a_reason(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    job = job_in(store, JobState.RUNNING)
    store.layout.job_file(JobFolder.RUNNING, job.id).unlink()
    st.requeue_job(store, job.id, reason="instance lost")
    assert job.state is JobState.FAILED
    assert job.last_error is not None and "removed from running/" in job.last_error
    assert store.layout.error_file(job.id).exists()


def test_resubmitting_a_failed_name_clears_its_failed_files(tmp_path: Path) -> None:
    """Behaviour 5: the new run's queue entry removes failed/<job>.csv and .error.json."""
    store = store_at(tmp_path)
    job = job_in(store, JobState.FAILED)
    layout = store.layout
    assert layout.job_file(JobFolder.FAILED, job.id).exists() and layout.error_file(job.id).exists()
    put_file(store, JobFolder.QUEUED, job.id)
    again = st.add_job(store, job.id, job.file_name, 1)
    assert again.state is JobState.QUEUED and again.attempts == 0
    # Not before the record saying it is queued again is on disk (a crash keeps them).
    assert layout.job_file(JobFolder.FAILED, job.id).exists()
    store.flush_sync()
    st.clear_earlier_failure(store, job.id)
    assert not layout.job_file(JobFolder.FAILED, job.id).exists()
    assert not layout.error_file(job.id).exists()
    assert again.earlier_failed_stem is None


def test_clearing_a_failure_removes_only_that_jobs_own_files(tmp_path: Path) -> None:
    """A refused second file that took failed/<job>.csv is not the job's failure: the
    job's own files (as <job>.dup-1) are the ones removed on resubmission."""
    store = store_at(tmp_path)
    layout = store.layout
    (layout.failed / "j.csv").write_text("someone else's refused file\n")
    (layout.failed / "j.error.json").write_text("{}\n")
    job = job_in(store, JobState.FAILED)
    assert job.failed_stem == "j.dup-1"
    put_file(store, JobFolder.QUEUED, job.id)
    st.add_job(store, job.id, job.file_name, 1)
    st.clear_earlier_failure(store, job.id)
    assert sorted(p.name for p in layout.failed.iterdir()) == ["j.csv", "j.error.json"]


def test_every_dispatch_gets_a_new_run_id(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    job = job_in(store, JobState.RUNNING)
    first = job.run_id
    st.requeue_job(store, job.id, reason="drained")
    assert job.run_id is None
    st.mark_job_assigned(store, job.id, "i1")
    assert job.run_id is not None and job.run_id != first
    # A start confirmed for the old run is ignored.
    assert not st.mark_job_started(store, job.id, run_id=first, pgid=1, new=True)
    assert job.runs == 1


# --- one owner -----------------------------------------------------------------------------------
OWNED = {"state", "status", "drain_reason", "destroy_reason", "lost_reason", "kill_reason"}
OWNERS = {VASTD / "core" / "state.py"}


def owner_violations(root: Path, owners: set[Path]) -> list[str]:
    """Assignments to an owned attribute outside the owners (the simulator excepted)."""
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path in owners or "sim" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            while any(isinstance(t, ast.Tuple | ast.List | ast.Starred) for t in targets):
                flat: list[ast.expr] = []
                for t in targets:
                    if isinstance(t, ast.Tuple | ast.List):
                        flat.extend(t.elts)
                    elif isinstance(t, ast.Starred):
                        flat.append(t.value)
                    else:
                        flat.append(t)
                targets = flat
            for t in targets:
                # (an object setting its own field, e.g. an HTTP error's status, is no record)
                own = isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                if own and t.value.id == "self":  # type: ignore[attr-defined]
                    continue
                if isinstance(t, ast.Attribute) and t.attr in OWNED:
                    offenders.append(f"{path.relative_to(root)}:{t.lineno} .{t.attr}")
    return offenders


def test_only_core_state_changes_states_statuses_and_reasons() -> None:
    """No module but core/state.py assigns a record's state, status or a reason."""
    assert owner_violations(VASTD, OWNERS) == []


def test_the_owner_check_finds_an_assignment(tmp_path: Path) -> None:
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "state.py").write_text("def ok(job):\n    job.state = 'done'\n")
    (tmp_path / "other.py").write_text("def f(job, inst):\n    job.state, inst.status = 1, 2\n")
    found = owner_violations(tmp_path, {tmp_path / "core" / "state.py"})
    assert found == ["other.py:2 .state", "other.py:2 .status"]


# --- operators' transitions: cancel, retry, undrain ------------------------------------------------
@pytest.mark.parametrize("source", list(JobState))
def test_cancel_fails_an_unfinished_job_with_reason_cancelled(
    tmp_path: Path, source: JobState
) -> None:
    """Queued, running, collecting -> failed/ with reason `cancelled`, a started run's stop
    recorded; done or failed -> IllegalTransitionError, nothing changed."""
    store = store_at(tmp_path)
    job = job_in(store, source)
    run = job.run_id
    if source in st.FINISHED:
        before = job.model_dump()
        with pytest.raises(IllegalTransitionError):
            st.cancel_job(store, job.id)
        assert store.jobs[job.id].model_dump() == before
        return
    st.cancel_job(store, job.id)
    assert job.state is JobState.FAILED and job.last_error == st.CANCELLED
    assert store.layout.job_file(JobFolder.FAILED, job.id).exists()
    error = (store.layout.failed / f"{job.id}.error.json").read_text()
    assert '"reason": "cancelled"' in error
    stops = {(f.instance, f.run) for f in store.snapshot.followups.values()}
    assert stops == (set() if source is JobState.QUEUED else {("i1", run)})
    assert store.instances["i1"].current_jobs == []


def test_cancel_stops_orphaned_runs_too(tmp_path: Path) -> None:
    """A queued job with a run left on a lost instance: that run's stop is recorded and the
    orphan forgotten, so its results can never complete the cancelled job."""
    store = store_at(tmp_path)
    job = job_in(store, JobState.RUNNING)
    run = job.run_id
    st.requeue_job(store, job.id, reason="lost", orphan=True)
    assert job.orphans
    st.cancel_job(store, job.id)
    assert job.orphans == [] and job.state is JobState.FAILED
    assert ("i1", run) in {(f.instance, f.run) for f in store.snapshot.followups.values()}


def test_cancel_of_an_unknown_job_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IllegalTransitionError):
        st.cancel_job(store_at(tmp_path), "nobody")


@pytest.mark.parametrize("source", list(JobState))
def test_retry_queues_only_a_failed_job_again(tmp_path: Path, source: JobState) -> None:
    """Failed -> a new queued record (attempts 0), its CSV linked back into queued/ and its
    failed/ files removed only by clear_earlier_failure; any other state is refused."""
    store = store_at(tmp_path)
    job = job_in(store, source)
    if source is not JobState.FAILED:
        before = job.model_dump()
        with pytest.raises(IllegalTransitionError):
            st.retry_job(store, job.id, rows=1)
        assert store.jobs[job.id].model_dump() == before
        return
    job.attempts = 3
    new = st.retry_job(store, job.id, rows=1)
    assert new.state is JobState.QUEUED and new.attempts == 0 and new is not job
    assert store.layout.job_file(JobFolder.QUEUED, job.id).read_text() == "a,b\n1,2\n"
    assert (store.layout.failed / f"{job.id}.csv").exists()  # until the save
    st.clear_earlier_failure(store, job.id)
    assert sorted(p.name for p in store.layout.failed.iterdir()) == []
    assert store.layout.job_file(JobFolder.QUEUED, job.id).exists()


def test_retry_of_a_failed_job_in_history_only(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    job = job_in(store, JobState.FAILED)
    assert store.retire_now() == 1 and job.id not in store.jobs
    new = st.retry_job(store, job.id, rows=1)
    assert new.state is JobState.QUEUED and new.earlier_failed_stem == job.id
    assert store.job_state(job.id) is JobState.QUEUED


def test_retry_without_its_csv_is_refused(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    job = job_in(store, JobState.FAILED)
    (store.layout.failed / f"{job.id}.csv").unlink()
    with pytest.raises(FileOperationError):
        st.retry_job(store, job.id, rows=1)
    assert store.jobs[job.id].state is JobState.FAILED
    assert not store.layout.job_file(JobFolder.QUEUED, job.id).exists()


def test_undrain_by_hand_prepares_first_when_asked(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    inst = store.instances["i1"]
    inst.prepared_hash = "marker"
    st.drain_instance(store, inst, st.MANUAL_DRAIN, requeue_jobs=False)
    assert st.undrain_instance(store, inst) and inst.status is InstanceStatus.READY
    fresh = InstanceRecord(id="i2", status=InstanceStatus.DISCOVERED)
    store.instances["i2"] = fresh
    st.drain_instance(store, fresh, st.MANUAL_DRAIN, requeue_jobs=False)
    assert st.undrain_instance(store, fresh, prepare_first=True)
    assert fresh.status is InstanceStatus.DISCOVERED
    assert fresh.drain_reason is None
