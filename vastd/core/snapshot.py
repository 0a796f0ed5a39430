"""The state snapshot's persistence (README: "Folders", state.json): the only writer of state.json.

Mutations happen in memory on the event loop (through core/state.py's transitions)
and mark the store dirty; a saver task coalesces them into few atomic writes (temp,
fsync, rename, fsync folder). The previous snapshot is kept as state.json.bak (a
hard link, so it is never half-written). A corrupt snapshot falls back to the
backup; if both are bad the store refuses to load rather than start empty over them.

Write-ahead: a caller about to do something irreversible (upload, start, kill, rent,
destroy) awaits `flush()` and stops when it returns False; `save_error` then says why.

Finished jobs leave the snapshot for history.jsonl (core/history.py): the saver
appends and fsyncs their lines, then drops them from memory, then saves. A version 1
snapshot (finished jobs inside) is migrated on load; the old file is kept as
state.json.v1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from vastd.core.files import Layout, fsync_directory
from vastd.core.history import (
    HistoryIndex,
    append_history,
    append_history_async,
    find_record,
    history_line,
    retirable,
)
from vastd.core.records import (
    FINISHED,
    SCHEMA_VERSION,
    InstanceRecord,
    JobRecord,
    JobState,
    Snapshot,
)
from vastd.core.snapshot_file import READABLE_VERSIONS as READABLE_VERSIONS
from vastd.core.snapshot_file import load_state as load_state
from vastd.core.snapshot_file import read_snapshot
from vastd.core.tracking import JobIndex, RecordTable, checking, record_data
from vastd.utils.exceptions import FileOperationError, StateManagementError
from vastd.utils.logging import get_logger
from vastd.utils.text import scrub

# temp names save_state uses (a killed write leaves them; the daemon sweeps them at start)
SNAPSHOT_TEMP_PATTERNS = (".state.json.tmp-*", "..state.json.tmp-*")
HISTORY_NAME = "history.jsonl"
try:  # pieces per writev (Linux takes 1024; POSIX promises 16)
    _IOV_MAX = max(16, min(1024, os.sysconf("SC_IOV_MAX")))
except (ValueError, OSError):
    _IOV_MAX = 16

log = get_logger("vastd.state")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | Sequence[bytes]) -> None:
    """Write `data` (bytes, or pieces in order) whole, in as few system calls as may be."""
    pieces = [memoryview(data)] if isinstance(data, bytes) else [memoryview(p) for p in data]
    pieces = [p for p in pieces if p.nbytes]
    while pieces:
        batch = pieces[:_IOV_MAX]
        written = os.writev(fd, batch) if len(batch) > 1 else os.write(fd, batch[0])
        done = 0
        while done < len(batch) and written >= batch[done].nbytes:
            written -= batch[done].nbytes
            done += 1
        if done < len(batch) and written:
            batch[done] = batch[done][written:]
        pieces = batch[done:] + pieces[len(batch) :]


SAVED_INFO_S = 60.0  # state_saved at info at most this often (README, Logs)


def save_state(
    data: bytes | Sequence[bytes],
    file_path: Path,
    backup_path: Path | None = None,
    *,
    folders: Iterable[Path] = (),
) -> None:
    """Write bytes (or pieces of them, in order) atomically; the file it replaces
    becomes `backup_path`.

    `folders` (where job files were renamed since the last save) are fsynced first, so
    the files are where the snapshot says before it says so.
    """
    try:
        for folder in folders:
            fsync_directory(folder)
    except FileOperationError as exc:
        raise StateManagementError(f"cannot write {file_path}: {exc}") from exc
    tmp = file_path.with_name(f".{file_path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    bak_tmp: Path | None = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if backup_path is not None and file_path.exists():
            bak_tmp = backup_path.with_name(f".{tmp.name}.bak")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(bak_tmp)
            os.link(file_path, bak_tmp)
        # The new snapshot goes in before its predecessor's link becomes the backup: the
        # other order, killed between the two renames, left state.json and its backup one
        # file, and a damage to one then was a damage to both.
        os.replace(tmp, file_path)
        if bak_tmp is not None and backup_path is not None:
            os.replace(bak_tmp, backup_path)
            bak_tmp = None
        _fsync_dir(file_path.parent)
    except OSError as exc:
        for leftover in (tmp, bak_tmp):
            if leftover is not None:
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
        raise StateManagementError(f"cannot write {file_path}: {exc}") from exc


class StateStore:
    """Owns the in-memory snapshot and its persistence."""

    def __init__(
        self,
        path: Path,
        snapshot: Snapshot | None = None,
        *,
        coalesce_s: float = 0.25,
        history: HistoryIndex | None = None,
    ) -> None:
        self.path = path
        self.backup_path = path.with_name(path.name + ".bak")
        self.history_path = path.with_name(HISTORY_NAME)
        self.snapshot = snapshot or Snapshot()
        self._index = self._adopt()
        # finished jobs whose record is in history.jsonl only (never one in `jobs`)
        self.history = history or HistoryIndex()
        for job_id in self.snapshot.jobs:
            self.history.pop(job_id)  # the snapshot wins over an older line
        self.history_error: str | None = None  # why the last append failed
        self._unsynced: set[Path] = set()  # folders with renames the next save fsyncs first
        self._unsynced_lock = threading.Lock()  # moves run in worker threads too
        # Jobs whose file is being moved in a worker thread (`state.complete_job`, `assign_job`),
        # each with the event set once the move is over: one mover of a job's file at a time.
        self._moving: dict[str, asyncio.Event] = {}
        self._retiring = asyncio.Lock()
        self._loaded_from: Path | None = None  # the file open() read (state.json or .bak)
        self.coalesce_s = coalesce_s
        self.writes = 0
        self._saved_logged_at: float | None = None  # the last state_saved at info
        self._saved_logged_writes = 0
        self.write_failures = 0
        self.save_error: str | None = None  # why the last write failed (None once one lands)
        # asyncio primitives bind to a loop only when first awaited (3.10+).
        self._dirty = asyncio.Event()
        self._dirty_flag = False
        self._lock = asyncio.Lock()
        # change generations: marked by mark_dirty, saved once a write holding them lands
        self._marked_gen = 0
        self._saved_gen = 0
        self._saved = asyncio.Condition()

    # --- loading -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, *, coalesce_s: float = 0.25, read_only: bool = False) -> StateStore:
        """Load state.json, else its backup; a fresh store only when neither exists.

        The history index is loaded from history.jsonl and an older snapshot migrated,
        unless `read_only` (`vastd status`: the snapshot's summary is enough).
        """
        store = cls._load(path, coalesce_s=coalesce_s, read_only=read_only)
        if not read_only and store.snapshot.version < SCHEMA_VERSION:
            store._migrate()
        return store

    @classmethod
    def _load(cls, path: Path, *, coalesce_s: float, read_only: bool) -> StateStore:
        snap, source = read_snapshot(path)
        history = None if read_only else HistoryIndex.load(path.with_name(HISTORY_NAME))
        store = cls(path, snap, coalesce_s=coalesce_s, history=history)
        store._loaded_from = source
        return store

    def _migrate(self) -> None:
        """A version 1 snapshot: its file is kept as state.json.v1, its finished jobs go
        to history.jsonl, then it is saved as the current version (blocking, at start).

        A crash part-way leaves the v1 file to migrate again (its lines, appended once
        more, are the same records: the last one counts)."""
        old = self.snapshot.version
        source = self._loaded_from or self.path
        kept = self.path.with_name(f"{self.path.name}.v{old}")
        save_state(source.read_bytes(), kept)
        self.snapshot.version = SCHEMA_VERSION
        moved = self.retire_now()
        save_state(self.serialize(), self.path, self.backup_path, folders=self._take_unsynced())
        log.info(
            "state_migrated",
            from_version=old,
            to_version=SCHEMA_VERSION,
            kept=str(kept),
            to_history=moved,
            left=len(self.snapshot.jobs),
        )

    # --- the tables and their index -------------------------------------------------------
    def _adopt(self) -> JobIndex:
        """Put the snapshot's records in tables that keep their JSON, and index the jobs."""
        snap = self.snapshot
        jobs: RecordTable[JobRecord] = RecordTable(snap.jobs)
        snap.jobs = jobs
        snap.instances = RecordTable(snap.instances)
        # a backlog of clean-ups (thousands while collections outrun them) is saved from
        # kept entries too, not dumped whole with the head on every save
        snap.followups = RecordTable(snap.followups)
        index = JobIndex(jobs)
        jobs._on_change = index.changed
        return index

    def _tables(self) -> JobIndex:
        """The index, over tables again if the snapshot was replaced (not brought up to date)."""
        snap = self.snapshot
        if (
            self._index.jobs is not snap.jobs
            or not isinstance(snap.instances, RecordTable)
            or not isinstance(snap.followups, RecordTable)
        ):
            self._index = self._adopt()
        return self._index

    @property
    def index(self) -> JobIndex:
        """The job index, up to date (the tables again if the snapshot was replaced)."""
        index = self._tables()
        index.refresh()
        return index

    def keep_json(self, job: JobRecord) -> None:
        """Dump a new job's record now: a save after 10,000 files are accepted then joins
        kept bytes instead of dumping 10,000 records on the loop at once."""
        jobs = self.snapshot.jobs
        if isinstance(jobs, RecordTable) and jobs.get(job.id) is job:
            jobs.entry(job.id, job)

    def jobs_in(self, *states: JobState) -> list[JobRecord]:
        """The jobs in these states (in the order they entered them)."""
        index, jobs = self.index, self.snapshot.jobs
        return [jobs[job_id] for state in states for job_id in index.ids_in(state)]

    def held_on(self, instance_id: str) -> list[JobRecord]:
        """Jobs tied to an instance: running there, or results not yet collected."""
        index, jobs = self.index, self.snapshot.jobs
        return [jobs[job_id] for job_id in index.held_on(instance_id)]

    def orphans_on(self, instance_id: str) -> list[JobRecord]:
        """Jobs with an orphaned run on the instance."""
        index, jobs = self.index, self.snapshot.jobs
        return [jobs[job_id] for job_id in index.orphaned_on(instance_id)]

    def orphan_load(self) -> dict[str, int]:
        """Orphaned runs per instance."""
        return self.index.orphan_load()

    def queued(self, now: float | None = None, limit: int | None = None) -> list[JobRecord]:
        """Queued jobs whose back-off has passed, in acceptance order (at most `limit`)."""
        return self.index.queued(time.time() if now is None else now, limit)

    # --- history -------------------------------------------------------------------------
    def _retirable(self) -> list[JobRecord]:
        return [j for j in self.jobs_in(JobState.DONE, JobState.FAILED) if retirable(j)]

    def _history_line(self, job: JobRecord) -> bytes:
        """The job's history line: its record's JSON as the snapshot keeps it."""
        jobs = self.snapshot.jobs
        if isinstance(jobs, RecordTable) and jobs.get(job.id) is job:
            return jobs.record_json(job.id) + b"\n"
        return history_line(job)

    def _drop_retired(self, jobs: list[JobRecord], lines: list[bytes]) -> int:
        """Remove the appended jobs whose record did not change meanwhile."""
        moved = 0
        for job, line in zip(jobs, lines, strict=True):
            if (
                self.snapshot.jobs.get(job.id) is job
                and retirable(job)
                and self._history_line(job) == line
            ):
                del self.snapshot.jobs[job.id]
                self.history.add_record(job)
                moved += 1
        if moved:
            self.mark_dirty()
        return moved

    def _history_failed(self, exc: OSError) -> None:
        error = f"cannot append to {self.history_path}: {exc}"
        if self.history_error != error:
            log.error("history_write_failed", error=error)
        self.history_error = error

    def _history_ok(self) -> None:
        if self.history_error is not None:
            log.info("history_write_recovered")
            self.history_error = None

    def retire_now(self) -> int:
        """`retire_finished`, blocking (migration at start, tools outside a loop)."""
        jobs = self._retirable()
        lines = [self._history_line(j) for j in jobs]
        try:
            append_history(self.history_path, lines)
        except OSError as exc:
            self._history_failed(exc)
            return 0
        self._history_ok()
        return self._drop_retired(jobs, lines)

    async def retire_finished(self) -> int:
        """Append the finished jobs' final records to history.jsonl (fsynced, off the
        loop), then drop them from the snapshot; the next save makes that durable.

        A history that cannot be written keeps them here (tried again next time).
        Returns how many left the snapshot.
        """
        async with self._retiring:
            jobs = self._retirable()
            if not jobs:
                return 0
            lines = [self._history_line(j) for j in jobs]
            try:
                await append_history_async(self.history_path, lines)
            except OSError as exc:
                self._history_failed(exc)
                return 0
            self._history_ok()
            return self._drop_retired(jobs, lines)

    def job_state(self, job_id: str) -> JobState | None:
        """The job's state, from the snapshot or else from history (None: unknown)."""
        job = self.snapshot.jobs.get(job_id)
        if job is not None:
            return job.state
        entry = self.history.get(job_id)
        return entry.state if entry is not None else None

    def record(self, job_id: str) -> JobRecord | None:
        """The job's record: in the snapshot, else its last line in history (a file read:
        for tools and tests, not for the loops)."""
        job = self.snapshot.jobs.get(job_id)
        if job is not None or job_id not in self.history:
            return job
        return find_record(self.history_path, job_id)

    @property
    def active_ids(self) -> _ActiveIds:
        """The names of unfinished jobs, as a container (no set built per call)."""
        return _ActiveIds(self)

    @property
    def done_ids(self) -> _DoneIds:
        """The names of done jobs (snapshot or history), as a container."""
        return _DoneIds(self)

    # --- persistence ---------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        """The folders around the snapshot (job files move with their records)."""
        return Layout(self.path.parent)

    @property
    def jobs(self) -> dict[str, JobRecord]:
        return self.snapshot.jobs

    @property
    def instances(self) -> dict[str, InstanceRecord]:
        return self.snapshot.instances

    def moving(self, job_id: str) -> bool:
        """The job's file is being moved in a worker thread (`file_move`)."""
        return job_id in self._moving

    @contextlib.contextmanager
    def file_move(self, job_id: str) -> Iterator[None]:
        """Mark the job's file as moving for the block (its one mover at a time)."""
        if job_id in self._moving:
            raise FileOperationError(f"job {job_id!r}: its file is being moved")
        moved = self._moving[job_id] = asyncio.Event()
        try:
            yield
        finally:
            del self._moving[job_id]
            moved.set()

    async def file_settled(self, job_id: str) -> None:
        """Return once no move of the job's file is under way."""
        while (moved := self._moving.get(job_id)) is not None:
            await moved.wait()

    def defer_fsync(self, folder: Path) -> None:
        """A job file was renamed in `folder`: fsynced before the next save (its thread).

        May be called from a worker thread (a move run off the loop), so it only notes
        the folder: the transition that records the move marks the store dirty.
        """
        with self._unsynced_lock:
            self._unsynced.add(folder)

    def _take_unsynced(self) -> tuple[Path, ...]:
        with self._unsynced_lock:
            folders, self._unsynced = tuple(self._unsynced), set()
        return folders

    def _give_back_unsynced(self, folders: tuple[Path, ...]) -> None:
        with self._unsynced_lock:
            self._unsynced.update(folders)

    def mark_dirty(self) -> None:
        self._dirty_flag = True
        self._marked_gen += 1
        self._dirty.set()

    async def wait_saved(self) -> None:
        """Return once every change made so far is on disk (without forcing a write)."""
        target = self._marked_gen
        async with self._saved:
            await self._saved.wait_for(lambda: self._saved_gen >= target)

    async def _note_saved(self, gen: int) -> None:
        async with self._saved:
            self._saved_gen = max(self._saved_gen, gen)
            self._saved.notify_all()

    @property
    def dirty(self) -> bool:
        return self._dirty_flag

    def serialize_parts(self) -> list[bytes]:
        """The snapshot as JSON, in pieces to be written one after the other (no copy of
        the whole on the loop), assembled from the records' kept entries: only records
        changed since the last save are dumped, and only their blocks joined again."""
        self._tables()  # (the index catches up when next asked, not on the save's time)
        snap = self.snapshot
        snap.saved_at = time.time()
        snap.history = self.history.summary()
        jobs, instances, followups = snap.jobs, snap.instances, snap.followups
        assert isinstance(jobs, RecordTable) and isinstance(instances, RecordTable)
        assert isinstance(followups, RecordTable)
        head = snap.model_dump_json(exclude={"jobs", "instances", "followups"}).encode()
        parts = [head[:-1] + b',"jobs":{', *jobs.body_parts(), b'},"instances":{']
        parts.extend(instances.body_parts())
        parts.append(b'},"followups":{')
        parts.extend(followups.body_parts())
        parts.append(b"}}")
        if checking():
            jobs.check()
            instances.check()
            followups.check()
            whole = scrub(snap.model_dump(mode="json", exclude={"jobs"}))
            whole["jobs"] = {}
            for key, job in jobs.items():
                data = whole["jobs"][scrub(key)] = record_data(job)
                # the fields left out are their defaults: nothing lost
                back = JobRecord.model_validate(data).model_dump(mode="json")
                if back != scrub(job.model_dump(mode="json")):
                    raise AssertionError(f"job {job.id!r} does not read back as it was")
            if json.loads(b"".join(parts)) != whole:
                raise AssertionError("the assembled snapshot differs from a full dump")
        return parts

    def serialize(self) -> bytes:
        """The snapshot as JSON (`serialize_parts` joined)."""
        return b"".join(self.serialize_parts())

    async def flush(self) -> bool:
        """Write now if anything changed; False (and still dirty) when the write failed."""
        async with self._lock:
            if not self._dirty_flag:
                return True
            self._dirty_flag = False
            self._dirty.clear()
            gen = self._marked_gen
            started = time.perf_counter()
            data = self.serialize_parts()
            serialized = time.perf_counter()
            folders = self._take_unsynced()
            write = asyncio.ensure_future(
                asyncio.to_thread(save_state, data, self.path, self.backup_path, folders=folders)
            )
            try:
                # A cancelled caller must not leave a write running behind the next one.
                await asyncio.shield(write)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await write
                self._give_back_unsynced(folders)
                self.mark_dirty()
                raise
            except StateManagementError as exc:
                self.write_failures += 1
                self._give_back_unsynced(folders)
                self.mark_dirty()
                if self.save_error != str(exc):
                    log.error("state_save_failed", error=str(exc))
                self.save_error = str(exc)
                return False
            if self.save_error is not None:
                log.info("state_save_recovered")
                self.save_error = None
            self.writes += 1
            await self._note_saved(gen)
            ended = time.perf_counter()
            # A write every quarter second at busy times: at info the first and then at
            # most one a minute (with the writes since), the others at debug.
            if self._saved_logged_at is None or ended - self._saved_logged_at >= SAVED_INFO_S:
                emit, writes = log.info, self.writes - self._saved_logged_writes
                self._saved_logged_at, self._saved_logged_writes = ended, self.writes
            else:
                emit, writes = log.debug, 1
            emit(
                "state_saved",
                writes=writes,
                jobs=len(self.snapshot.jobs),
                instances=len(self.snapshot.instances),
                bytes=sum(map(len, data)),
                # serialize_ms on the event loop; write_ms in a thread (fsyncs included)
                serialize_ms=round((serialized - started) * 1000, 3),
                write_ms=round((ended - serialized) * 1000, 3),
                duration_ms=round((ended - started) * 1000, 3),
            )
            return True

    def flush_sync(self) -> None:
        """Blocking write, for the CLI outside a loop."""
        if self._dirty_flag:
            save_state(self.serialize(), self.path, self.backup_path, folders=self._take_unsynced())
            self._dirty_flag = False
            self.writes += 1

    async def run_saver(self, *, retry_s: float = 2.0) -> None:
        """Coalesce changes: wait for one, let a burst gather, write once.

        Finished jobs move to history.jsonl first, so the save that follows drops them.
        """
        if self._dirty_flag:
            self._dirty.set()
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.coalesce_s)
            await self.retire_finished()
            if not await self.flush():
                await asyncio.sleep(retry_s)

    def active_job_ids(self) -> set[str]:
        index = self.index
        return {i for s in JobState if s not in FINISHED for i in index.ids_in(s)}

    def counts(self) -> dict[str, int]:
        """Jobs per state: the snapshot's (work in flight) plus history's counts."""
        index = self.index
        out = {s.value: index.count(s) for s in JobState}
        out[JobState.DONE.value] += self.history.done
        out[JobState.FAILED.value] += self.history.failed
        return out


class _ActiveIds:
    __slots__ = ("_store",)

    def __init__(self, store: StateStore) -> None:
        self._store = store

    def __contains__(self, job_id: object) -> bool:
        job = self._store.snapshot.jobs.get(job_id) if isinstance(job_id, str) else None
        return job is not None and job.state not in FINISHED


class _DoneIds:
    __slots__ = ("_store",)

    def __init__(self, store: StateStore) -> None:
        self._store = store

    def __contains__(self, job_id: object) -> bool:
        return isinstance(job_id, str) and self._store.job_state(job_id) is JobState.DONE
