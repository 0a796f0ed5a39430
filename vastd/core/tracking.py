"""What the store keeps beside its records so that no loop walks every job.

- `RecordTable`: the snapshot's `jobs` and `instances` dicts. Each record's JSON entry
  is kept until the record (a field assigned, see records.Tracked) or its key changes,
  so a save assembles the snapshot from kept bytes and dumps only what changed, and a
  finished job's history line is the same bytes.
- `JobIndex`: jobs by state, the jobs each instance holds, the instances their
  orphaned runs are on, and the queue in acceptance order (a heap), brought up to date
  from the keys the table reports changed, when next asked.

`VASTD_CHECK_STATE=1` (the test suite sets it) makes every save and every index
query compare with a full dump or scan, so a change the store did not hear of fails
loudly instead of being saved stale.
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from pydantic_core import PydanticSerializationError, to_json

from vastd.core.records import JobRecord, JobState, Tracked
from vastd.utils.text import scrub

R = TypeVar("R", bound=Tracked)
HELD = frozenset({JobState.RUNNING, JobState.COLLECTING})  # a job tied to its instance


def checking() -> bool:
    """Whether every save and query is checked against a full scan (tests)."""
    return os.environ.get("VASTD_CHECK_STATE", "") == "1"


BLOCK = 256  # entries per block of a table's kept JSON


class RecordTable(dict[str, R]):
    """A dict of records keyed by id that keeps each record's JSON entry `"id":{...}`,
    and the entries of each block of `BLOCK` keys joined: a save of 10,000 jobs of
    which a few changed joins a few blocks again and hands the rest over as they are."""

    def __init__(
        self, records: Mapping[str, R] = {}, on_change: Callable[[str], None] | None = None
    ) -> None:
        super().__init__()
        # Each key's entry `"id":{...}`, in the table's own order (a key changed keeps its
        # place, holding None until dumped again).
        self._json: dict[str, bytes | None] = {}
        # The same keys cut in blocks, in the same order: a new key goes to the last
        # block, a removed one leaves its block (an emptied block goes). A block's
        # joined entries are kept until one of its keys changes.
        self._block_of: dict[str, int] = {}
        self._blocks: dict[int, dict[str, None]] = {}
        self._joined: dict[int, bytes] = {}
        self._last_block = 0
        self._on_change = on_change
        for key, record in records.items():
            self[key] = record

    def _changed(self, key: str) -> None:
        if self._json.get(key, b"") is None and dict.__contains__(self, key):
            # still here, and already to be dumped (its block joined again) at the next save
            if self._on_change is not None:
                self._on_change(key)
            return
        block = self._block_of.get(key)
        if dict.__contains__(self, key):
            self._json[key] = None
            if block is None:
                block = self._last_block
                keys = self._blocks.get(block)
                if keys is None or len(keys) >= BLOCK:
                    block = self._last_block = self._last_block + 1
                    keys = self._blocks[block] = {}
                keys[key] = None
                self._block_of[key] = block
            self._joined.pop(block, None)
        else:
            self._json.pop(key, None)
            if block is not None:
                del self._block_of[key]
                keys = self._blocks[block]
                del keys[key]
                self._joined.pop(block, None)
                if not keys:
                    del self._blocks[block]
        if self._on_change is not None:
            self._on_change(key)

    def _record_changed(self, record: Any) -> None:
        # A record no longer here (retired, replaced) only costs a fresh dump.
        self._changed(record.id)

    # --- every way a dict changes -------------------------------------------------------
    def __setitem__(self, key: str, record: R) -> None:
        record.watch(self._record_changed)
        super().__setitem__(key, record)
        self._changed(key)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._changed(key)

    def pop(self, key: str, *default: Any) -> Any:
        had = key in self
        value = super().pop(key, *default)
        if had:
            self._changed(key)
        return value

    def popitem(self) -> tuple[str, R]:
        key, value = super().popitem()
        self._changed(key)
        return key, value

    def clear(self) -> None:
        keys = list(self)
        super().clear()
        for key in keys:
            self._changed(key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, record in dict(*args, **kwargs).items():
            self[key] = record

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def __ior__(self, other: Any) -> RecordTable[R]:  # type: ignore[override,misc]
        self.update(other)
        return self

    # --- JSON ---------------------------------------------------------------------------
    def entry(self, key: str, record: R) -> bytes:
        cached = self._json.get(key)
        if cached is None:
            cached = to_json(scrub(key)) + b":" + dump_record(record)
            if record.id == key and self.get(key) is record:
                self._json[key] = cached
        return cached

    def _refill(self, key: str) -> bytes:
        return self.entry(key, dict.__getitem__(self, key))

    def body_parts(self) -> list[bytes]:
        """The entries, comma-separated, as pieces to write one after the other: the JSON
        object without its braces. Only the records changed since they were last dumped
        are dumped now, and only their blocks joined again."""
        parts: list[bytes] = []
        joined, kept, refill = self._joined, self._json, self._refill
        for block, keys in self._blocks.items():
            part = joined.get(block)
            if part is None:
                entries = [kept[k] for k in keys]
                whole = True
                if None in entries:
                    entries = [
                        e if e is not None else refill(k)
                        for k, e in zip(keys, entries, strict=True)
                    ]
                    # a record kept under another key than its id is dumped every time
                    whole = all(kept[k] is not None for k in keys)
                part = b",".join(entries)  # type: ignore[arg-type]  # (no None left)
                if whole:
                    joined[block] = part
            if parts:
                parts.append(b",")
            parts.append(part)
        return parts

    def body(self) -> bytes:
        """`body_parts` joined."""
        return b"".join(self.body_parts())

    def dump(self) -> bytes:
        """The table as a JSON object, from the kept entries."""
        return b"".join((b"{", self.body(), b"}"))

    def record_json(self, key: str) -> bytes:
        """One record's JSON (KeyError when absent)."""
        return self.entry(key, self[key])[len(to_json(scrub(key))) + 1 :]

    def check(self) -> None:
        """Every kept entry equals a fresh dump (VASTD_CHECK_STATE)."""
        if list(self._json) != list(self):
            raise AssertionError("the kept entries are not the table's keys in its order")
        if [k for keys in self._blocks.values() for k in keys] != list(self) or any(
            self._block_of[k] != b for b, keys in self._blocks.items() for k in keys
        ):
            raise AssertionError("the table's blocks are not its keys in its order")
        for block, part in self._joined.items():
            keys = self._blocks[block]
            if part != b",".join(self.entry(k, self[k]) for k in keys):
                raise AssertionError(f"block {block} kept stale entries")
        for key, cached in self._json.items():
            fresh = to_json(scrub(key)) + b":" + dump_record(self[key])
            if cached is not None and cached != fresh:
                raise AssertionError(
                    f"record {key!r} changed without its store hearing of it (changed in "
                    f"place?): kept {cached[:200]!r}, now {fresh[:200]!r}"
                )


# The fields a job's entry always has, whatever their value: the snapshot's documented
# outline (state, attempts and runs, instance, timestamps; `accepted_at`, whose default
# is a factory, is written apart). Every other field is left out while it holds its
# default, which is what a reader takes for a field that is not there. A queued job of a
# 24-character name is then 258 bytes instead of 752, and a done job's history line
# about half of what it was.
_ALWAYS: tuple[tuple[str, Any, bytes], ...] = (
    ("state", JobState.QUEUED, b'"state":"queued"'),
    ("attempts", 0, b'"attempts":0'),
    ("runs", 0, b'"runs":0'),
    ("instance", None, b'"instance":null'),
    ("dispatched_at", None, b'"dispatched_at":null'),
    ("started_at", None, b'"started_at":null'),
    ("exited_at", None, b'"exited_at":null'),
    ("finished_at", None, b'"finished_at":null'),
)

_WRITTEN_APART = {"accepted_at"}  # (a set: pydantic-core's `exclude`)


def dump_record(record: Tracked) -> bytes:
    """The record as JSON; a job's without the fields that hold their defaults (but
    `_ALWAYS`'s). A str that is not UTF-8 in it (whatever let it in) is written as
    U+FFFD rather than failing the save: a record that cannot be dumped made every save
    fail, and the saver's error stopped the daemon."""
    if not isinstance(record, JobRecord):
        try:
            # (the serializer itself: model_dump_json's str and .encode() cost a copy each)
            return type(record).__pydantic_serializer__.to_json(record)
        except PydanticSerializationError:
            return to_json(scrub(record.model_dump(mode="json")))
    values = record.__dict__
    head = [text for name, default, text in _ALWAYS if values[name] == default]
    # accepted_at's default is a factory, which exclude_defaults calls at the dump and
    # compares: a record dumped in the clock tick it was made in would lose it
    head.append(b'"accepted_at":' + to_json(values["accepted_at"]))
    try:
        data = JobRecord.__pydantic_serializer__.to_json(
            record, exclude_defaults=True, exclude=_WRITTEN_APART
        )
    except PydanticSerializationError:
        dumped = record.model_dump(mode="json", exclude_defaults=True, exclude=_WRITTEN_APART)
        data = to_json(scrub(dumped))
    return b"".join((b"{", b",".join(head), b",", data[1:]))


def record_data(record: Tracked) -> Any:
    """The record as `dump_record` writes it, as Python data (for the checks)."""
    return json.loads(dump_record(record))


_Key = tuple[JobState, str | None, frozenset[str], int]


def _key(job: JobRecord) -> _Key:
    holder = job.instance if job.state in HELD else None
    return (job.state, holder, frozenset(o.instance for o in job.orphans), job.seq)


def _add(groups: dict[str, dict[str, None]], group: str, job_id: str) -> None:
    members = groups.get(group)
    if members is None:
        members = groups[group] = {}
    members[job_id] = None


def _discard(groups: dict[str, dict[str, None]], group: str, job_id: str) -> None:
    members = groups.get(group)
    if members is not None:
        members.pop(job_id, None)
        if not members:
            del groups[group]


class JobIndex:
    """The jobs of one table, indexed; `changed(key)` is the table's callback."""

    def __init__(self, jobs: RecordTable[JobRecord]) -> None:
        self.jobs = jobs
        self._stale: set[str] = set(jobs)
        self._keys: dict[str, _Key] = {}
        # dicts as ordered sets: ids in the order they entered
        self._by_state: dict[JobState, dict[str, None]] = {s: {} for s in JobState}
        self._held: dict[str, dict[str, None]] = {}
        self._orphaned: dict[str, dict[str, None]] = {}
        self._heap: list[tuple[int, str]] = []  # (seq, id) of queued jobs; stale ones skipped
        self._pushed: dict[str, int] = {}  # id -> the seq its heap entry has

    def changed(self, key: str) -> None:
        self._stale.add(key)

    def refresh(self) -> None:
        """Bring the index up to date with the changes reported since the last call."""
        self._apply()
        if checking():
            self.check()

    def _apply(self) -> None:
        if self._stale:
            jobs = self.jobs
            stale, self._stale = self._stale, set()
            for job_id in stale:
                old = self._keys.pop(job_id, None)
                if old is not None:
                    self._remove(job_id, old)
                job = jobs.get(job_id)
                if job is not None:
                    key = _key(job)
                    self._keys[job_id] = key
                    self._insert(job_id, key)

    def _insert(self, job_id: str, key: _Key) -> None:
        state, holder, orphaned_on, seq = key
        self._by_state[state][job_id] = None
        if holder is not None:
            _add(self._held, holder, job_id)
        for instance_id in orphaned_on:
            _add(self._orphaned, instance_id, job_id)
        if state is JobState.QUEUED and self._pushed.get(job_id) != seq:
            heapq.heappush(self._heap, (seq, job_id))
            self._pushed[job_id] = seq

    def _remove(self, job_id: str, key: _Key) -> None:
        state, holder, orphaned_on, _seq = key
        self._by_state[state].pop(job_id, None)
        if holder is not None:
            _discard(self._held, holder, job_id)
        for instance_id in orphaned_on:
            _discard(self._orphaned, instance_id, job_id)
        # its heap entry stays until a look at the queue finds it stale

    # --- queries (each after refresh) ---------------------------------------------------
    def ids_in(self, state: JobState) -> Iterable[str]:
        return self._by_state[state].keys()

    def count(self, state: JobState) -> int:
        return len(self._by_state[state])

    def held_on(self, instance_id: str) -> list[str]:
        return list(self._held.get(instance_id, ()))

    def orphaned_on(self, instance_id: str) -> list[str]:
        return list(self._orphaned.get(instance_id, ()))

    def orphan_load(self) -> dict[str, int]:
        return {instance_id: len(ids) for instance_id, ids in self._orphaned.items()}

    def queued(self, now: float, limit: int | None = None) -> list[JobRecord]:
        """Queued jobs whose back-off has passed, in acceptance order, at most `limit`."""
        heap, jobs = self._heap, self.jobs
        out: list[JobRecord] = []
        keep: list[tuple[int, str]] = []
        while heap and (limit is None or len(out) < limit):
            seq, job_id = heapq.heappop(heap)
            job = jobs.get(job_id)
            if job is None or job.state is not JobState.QUEUED or job.seq != seq:
                if self._pushed.get(job_id) == seq:
                    del self._pushed[job_id]
                continue
            keep.append((seq, job_id))
            if job.not_before is None or job.not_before <= now:
                out.append(job)
        for item in keep:
            heapq.heappush(heap, item)
        return out

    def check(self) -> None:
        """The index equals a full scan of the table (VASTD_CHECK_STATE)."""
        fresh = JobIndex(self.jobs)
        fresh._apply()
        mine = {s: set(v) for s, v in self._by_state.items()}
        theirs = {s: set(v) for s, v in fresh._by_state.items()}
        problems = []
        if mine != theirs:
            problems.append(f"by state {mine} != {theirs}")
        for name in ("_held", "_orphaned"):
            a = {k: set(v) for k, v in getattr(self, name).items()}
            b = {k: set(v) for k, v in getattr(fresh, name).items()}
            if a != b:
                problems.append(f"{name} {a} != {b}")
        queued = [j.id for j in sorted(self.jobs.values(), key=lambda j: (j.seq, j.id))]
        queued = [i for i in queued if self.jobs[i].state is JobState.QUEUED]
        valid = sorted(e for e in self._heap if self._entry_valid(e))
        if [i for _s, i in valid] != queued:
            problems.append(f"queue {valid} != {queued}")
        if problems:
            raise AssertionError(
                "job index differs from a scan (a record changed in place?): "
                + json.dumps(problems, default=str)[:2000]
            )

    def _entry_valid(self, entry: tuple[int, str]) -> bool:
        seq, job_id = entry
        job = self.jobs.get(job_id)
        return job is not None and job.state is JobState.QUEUED and job.seq == seq
