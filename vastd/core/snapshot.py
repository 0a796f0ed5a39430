"""The state snapshot's persistence (CONTRACT §7): the only writer of state.json.

Mutations happen in memory on the event loop (through core/state.py's transitions)
and mark the store dirty; a saver task coalesces them into few atomic writes (temp,
fsync, rename, fsync folder). The previous snapshot is kept as state.json.bak (a
hard link, so it is never half-written). A corrupt snapshot falls back to the
backup; if both are bad the store refuses to load rather than start empty over them.

Write-ahead: a caller about to do something irreversible (upload, start, kill, rent,
destroy) awaits `flush()` and stops when it returns False; `save_error` then says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
from pathlib import Path

from pydantic import ValidationError

from vastd.core.files import Layout
from vastd.core.records import (
    FINISHED,
    SCHEMA_VERSION,
    InstanceRecord,
    JobRecord,
    JobState,
    Snapshot,
)
from vastd.utils.exceptions import StateManagementError
from vastd.utils.logging import get_logger

# temp names save_state uses (a killed write leaves them; the daemon sweeps them at start)
SNAPSHOT_TEMP_PATTERNS = (".state.json.tmp-*", "..state.json.tmp-*")
log = get_logger("vastd.state")


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
    def layout(self) -> Layout:
        """The folders around the snapshot (job files move with their records)."""
        return Layout(self.path.parent)

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
                if self.save_error != str(exc):
                    log.error("state_save_failed", error=str(exc))
                self.save_error = str(exc)
                return False
            if self.save_error is not None:
                log.info("state_save_recovered")
                self.save_error = None
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

    def active_job_ids(self) -> set[str]:
        return {j.id for j in self.snapshot.jobs.values() if j.state not in FINISHED}

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in JobState}
        for job in self.snapshot.jobs.values():
            out[job.state.value] += 1
        return out
