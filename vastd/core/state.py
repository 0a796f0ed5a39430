"""The state snapshot (CONTRACT §7): the only writer of state.json.

Mutations happen in memory on the event loop and mark the store dirty; a saver
task coalesces them into few atomic writes (temp, fsync, rename, fsync folder).
The previous snapshot is kept as state.json.bak (a hard link, so it is never
half-written). A corrupt snapshot falls back to the backup; if both are bad the
store refuses to load rather than start empty over them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vastd.utils.exceptions import StateManagementError
from vastd.utils.logging import get_logger

SCHEMA_VERSION = 1
# temp names save_state uses (a killed write leaves them; the daemon sweeps them at start)
SNAPSHOT_TEMP_PATTERNS = (".state.json.tmp-*", "..state.json.tmp-*")
log = get_logger("vastd.state")


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COLLECTING = "collecting"
    DONE = "done"
    FAILED = "failed"


class InstanceStatus(StrEnum):
    BOOTING = "booting"  # rented by us, not running yet
    DISCOVERED = "discovered"  # running in the API, SSH not confirmed
    PREPARING = "preparing"
    READY = "ready"
    UNREACHABLE = "unreachable"  # SSH fails; jobs keep their attempt during the grace
    DRAINING = "draining"  # gets no new jobs; destroyed once empty
    LOST = "lost"  # gone from the API or exited/offline
    DESTROYING = "destroying"
    DESTROYED = "destroyed"


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", validate_assignment=False)


class JobRecord(_Model):
    id: str
    file_name: str
    state: JobState = JobState.QUEUED
    seq: int = 0
    rows: int = 0
    attempts: int = 0  # failures observed on an instance (exit code, bad results)
    runs: int = 0  # remote starts, whatever their outcome
    instance: str | None = None
    pgid: int | None = None
    accepted_at: float = Field(default_factory=time.time)
    dispatched_at: float | None = None
    started_at: float | None = None
    exited_at: float | None = None
    finished_at: float | None = None
    last_exit_code: int | None = None
    last_error: str | None = None
    not_before: float | None = None  # retry back-off
    avoid_instances: list[str] = Field(default_factory=list)
    # instances holding an earlier run that was given up while unreachable
    orphans: list[str] = Field(default_factory=list)
    result_files: list[str] = Field(default_factory=list)


class InstanceRecord(_Model):
    id: str  # the vast.ai instance id, as text
    label: str | None = None
    status: InstanceStatus = InstanceStatus.DISCOVERED
    api_status: str | None = None  # vast.ai actual_status
    ssh_host: str | None = None
    ssh_port: int | None = None
    public_ipaddr: str | None = None
    direct_port: int | None = None
    host_key: str | None = None
    prepared_hash: str | None = None
    prepare_failures: int = 0
    prepare_error: str | None = None
    next_prepare_at: float | None = None
    current_jobs: list[str] = Field(default_factory=list)
    dph: float = 0.0
    machine_id: int | None = None
    gpu_name: str | None = None
    owned: bool = False  # rented by this vastd
    first_seen: float = Field(default_factory=time.time)
    last_seen: float | None = None  # in the API list
    last_contact: float | None = None  # SSH answered
    unreachable_since: float | None = None
    missing_since: float | None = None
    idle_since: float | None = None
    booting_since: float | None = None
    # fleet (autoscale): ownership, money and teardown
    intent_id: str | None = None  # the rent intent this instance was created for
    rented_at: float | None = None
    accrued_until: float | None = None  # spend is accrued up to here
    ssh_key_attached: bool = False
    destroy_reason: str | None = None
    destroy_attempts: int = 0
    next_destroy_at: float | None = None
    destroyed_at: float | None = None
    # health (monitoring.py)
    health_failures: int = 0
    drain_reason: str | None = None
    disk_free_gb: float | None = None
    health_checked_at: float | None = None


class Snapshot(_Model):
    version: int = SCHEMA_VERSION
    saved_at: float | None = None
    next_seq: int = 1
    jobs: dict[str, JobRecord] = Field(default_factory=dict)
    instances: dict[str, InstanceRecord] = Field(default_factory=dict)
    blocked_machines: dict[str, float] = Field(default_factory=dict)  # machine id -> until
    rent_intents: dict[str, dict[str, Any]] = Field(default_factory=dict)
    spend_total: float = 0.0  # dollars accrued by owned instances
    last_discovery_at: float | None = None  # last successful instance listing


def load_state(file_path: Path) -> Snapshot:
    """Parse one snapshot file; StateManagementError if it is unreadable or invalid."""
    try:
        raw = file_path.read_bytes()
        data = json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateManagementError(f"{file_path}: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != SCHEMA_VERSION:
        raise StateManagementError(f"{file_path}: not a version {SCHEMA_VERSION} snapshot")
    try:
        return Snapshot.model_validate(data)
    except ValidationError as exc:
        raise StateManagementError(f"{file_path}: invalid snapshot: {exc}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(data: bytes, file_path: Path, backup_path: Path | None = None) -> None:
    """Write bytes atomically; the file it replaces becomes `backup_path`."""
    tmp = file_path.with_name(f".{file_path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if backup_path is not None and file_path.exists():
            bak_tmp = backup_path.with_name(f".{tmp.name}.bak")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(bak_tmp)
            os.link(file_path, bak_tmp)
            os.replace(bak_tmp, backup_path)
        os.replace(tmp, file_path)
        _fsync_dir(file_path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StateManagementError(f"cannot write {file_path}: {exc}") from exc


class StateStore:
    """Owns the in-memory snapshot and its persistence."""

    def __init__(
        self,
        path: Path,
        snapshot: Snapshot | None = None,
        *,
        coalesce_s: float = 0.25,
    ) -> None:
        self.path = path
        self.backup_path = path.with_name(path.name + ".bak")
        self.snapshot = snapshot or Snapshot()
        self.coalesce_s = coalesce_s
        self.writes = 0
        self.write_failures = 0
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
    def open(cls, path: Path, *, coalesce_s: float = 0.25) -> StateStore:
        """Load state.json, else its backup; a fresh store only when neither exists."""
        backup = path.with_name(path.name + ".bak")
        errors = []
        for candidate in (path, backup):
            if not candidate.exists():
                continue
            try:
                snap = load_state(candidate)
            except StateManagementError as exc:
                errors.append(str(exc))
                continue
            if candidate is backup:
                log.warning("state_restored_from_backup", path=str(backup), errors=errors)
            return cls(path, snap, coalesce_s=coalesce_s)
        if errors:
            raise StateManagementError(
                "refusing to start: the snapshot and its backup are both unreadable ("
                + "; ".join(errors)
                + "). Move them aside to start fresh."
            )
        return cls(path, Snapshot(), coalesce_s=coalesce_s)

    # --- persistence ---------------------------------------------------------------------
    @property
    def jobs(self) -> dict[str, JobRecord]:
        return self.snapshot.jobs

    @property
    def instances(self) -> dict[str, InstanceRecord]:
        return self.snapshot.instances

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

    def serialize(self) -> bytes:
        self.snapshot.saved_at = time.time()
        return self.snapshot.model_dump_json(indent=None).encode()

    async def flush(self) -> bool:
        """Write now if anything changed; False (and still dirty) when the write failed."""
        async with self._lock:
            if not self._dirty_flag:
                return True
            self._dirty_flag = False
            self._dirty.clear()
            gen = self._marked_gen
            data = self.serialize()
            write = asyncio.ensure_future(
                asyncio.to_thread(save_state, data, self.path, self.backup_path)
            )
            try:
                # A cancelled caller must not leave a write running behind the next one.
                await asyncio.shield(write)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await write
                self.mark_dirty()
                raise
            except StateManagementError as exc:
                self.write_failures += 1
                self.mark_dirty()
                log.error("state_save_failed", error=str(exc))
                return False
            self.writes += 1
            await self._note_saved(gen)
            log.info(
                "state_saved",
                jobs=len(self.snapshot.jobs),
                instances=len(self.snapshot.instances),
                bytes=len(data),
            )
            return True

    def flush_sync(self) -> None:
        """Blocking write, for the CLI outside a loop."""
        if self._dirty_flag:
            save_state(self.serialize(), self.path, self.backup_path)
            self._dirty_flag = False
            self.writes += 1

    async def run_saver(self, *, retry_s: float = 2.0) -> None:
        """Coalesce changes: wait for one, let a burst gather, write once."""
        if self._dirty_flag:
            self._dirty.set()
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.coalesce_s)
            if not await self.flush():
                await asyncio.sleep(retry_s)

    # --- jobs ----------------------------------------------------------------------------
    def add_job(self, job_id: str, file_name: str, rows: int) -> JobRecord:
        seq = self.snapshot.next_seq
        self.snapshot.next_seq += 1
        job = JobRecord(id=job_id, file_name=file_name, rows=rows, seq=seq)
        self.snapshot.jobs[job_id] = job
        self.mark_dirty()
        return job

    def active_job_ids(self) -> set[str]:
        finished = (JobState.DONE, JobState.FAILED)
        return {j.id for j in self.snapshot.jobs.values() if j.state not in finished}

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in JobState}
        for job in self.snapshot.jobs.values():
            out[job.state.value] += 1
        return out


# --- the seed's state functions --------------------------------------------------------------
def _update(store: StateStore, record: _Model, updates: dict[str, Any]) -> None:
    for key in updates:
        if key not in type(record).model_fields:
            raise AttributeError(key)  # a typo must not silently add nothing
    for key, value in updates.items():
        setattr(record, key, value)
    store.mark_dirty()


def update_job_state(store: StateStore, job_id: str, **updates: Any) -> JobRecord:
    job = store.jobs[job_id]
    _update(store, job, updates)
    return job


def update_instance_state(store: StateStore, instance_id: str, **updates: Any) -> InstanceRecord:
    inst = store.instances[instance_id]
    _update(store, inst, updates)
    return inst


def get_available_jobs(store: StateStore, now: float | None = None) -> list[JobRecord]:
    """Queued jobs whose back-off has passed, in acceptance order."""
    now = time.time() if now is None else now
    jobs = [
        j
        for j in store.jobs.values()
        if j.state is JobState.QUEUED and (j.not_before is None or j.not_before <= now)
    ]
    jobs.sort(key=lambda j: j.seq)
    return jobs


def get_idle_instances(store: StateStore, jobs_per_instance: int = 1) -> list[InstanceRecord]:
    """Ready instances with room for another job."""
    return [
        i
        for i in store.instances.values()
        if i.status is InstanceStatus.READY and len(i.current_jobs) < jobs_per_instance
    ]


def mark_job_assigned(store: StateStore, job_id: str, instance_id: str) -> JobRecord:
    """Record the assignment before anything is uploaded (a crash then finds it)."""
    job = store.jobs[job_id]
    inst = store.instances[instance_id]
    job.state = JobState.RUNNING
    job.instance = instance_id
    job.dispatched_at = time.time()
    job.pgid = None
    job.started_at = None
    job.exited_at = None
    if job_id not in inst.current_jobs:
        inst.current_jobs.append(job_id)
    inst.idle_since = None
    store.mark_dirty()
    return job


def release_job(store: StateStore, job_id: str) -> None:
    """Detach a job from its instance (the instance may be gone)."""
    job = store.jobs[job_id]
    if job.instance and job.instance in store.instances:
        inst = store.instances[job.instance]
        if job_id in inst.current_jobs:
            inst.current_jobs.remove(job_id)
        if not inst.current_jobs:
            inst.idle_since = time.time()
    store.mark_dirty()


def mark_job_completed(store: StateStore, job_id: str, success: bool) -> JobRecord:
    release_job(store, job_id)
    job = store.jobs[job_id]
    job.state = JobState.DONE if success else JobState.FAILED
    job.finished_at = time.time()
    store.mark_dirty()
    return job


def requeue_job(
    store: StateStore, job_id: str, *, delay_s: float = 0.0, avoid: Iterable[str] = ()
) -> JobRecord:
    """Back to the queue; the instance it ran on is avoided next time when possible."""
    release_job(store, job_id)
    job = store.jobs[job_id]
    job.state = JobState.QUEUED
    job.instance = None
    job.pgid = None
    job.not_before = time.time() + delay_s if delay_s > 0 else None
    for inst in avoid:
        if inst not in job.avoid_instances:
            job.avoid_instances.append(inst)
    store.mark_dirty()
    return job
