"""The records the snapshot holds (README: "Folders", state.json): jobs, instances, follow-up work.

Plain data. Who may change a record's `state`, `status` or reason is decided in
core/state.py (the transition table); persistence lives in core/snapshot.py.

Job and instance records tell their store of every field assigned (`Tracked`): the
store keeps each record's JSON and its indexes (jobs by state, by instance, the queue)
up to date from that, instead of walking every record. So a field is changed by
assigning it (`job.orphans = [*job.orphans, run]`), never in place
(`job.orphans.append(run)` would go unseen).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

SCHEMA_VERSION = 2  # 2: finished jobs live in history.jsonl, not here


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COLLECTING = "collecting"
    DONE = "done"
    FAILED = "failed"


FINISHED = frozenset({JobState.DONE, JobState.FAILED})


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


def new_run_id() -> str:
    """A run id: 16 hex digits (safe in a shell word and a file name)."""
    return secrets.token_hex(8)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", validate_assignment=False)


class Tracked(_Model):
    """A record whose watcher (its store) hears of every public field assigned."""

    id: str  # a job's name; an instance's vast.ai id, as text
    _watcher: Callable[[Any], None] | None = PrivateAttr(default=None)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name[0] != "_":
            private = self.__pydantic_private__
            watcher = private.get("_watcher") if private else None
            if watcher is not None:
                watcher(self)

    def watch(self, watcher: Callable[[Any], None] | None) -> None:
        self._watcher = watcher

    def __eq__(self, other: object) -> bool:
        # The fields only: who watches a record is not part of it.
        if type(other) is not type(self):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]


class OrphanRun(_Model):
    """A run given up while its instance was silent; kept if it finishes first."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    instance: str
    run: str | None = None  # None: recorded before run ids existed
    started_at: float | None = None  # its deadline counts from here, as the job's did
    gpus: tuple[int, ...] = ()  # the GPU indices it was given: held until it is settled


class JobRecord(Tracked):
    file_name: str
    state: JobState = JobState.QUEUED
    seq: int = 0
    rows: int = 0
    attempts: int = 0  # failures observed on an instance (exit code, bad results)
    runs: int = 0  # remote starts, whatever their outcome
    instance: str | None = None
    # the current run: given at dispatch and saved before the upload; the remote
    # folder's `run` file, the idempotent start and the collection are keyed by it
    run_id: str | None = None
    # the GPU indices of its instance the current run was given at assignment
    # ([job] jobs_per_instance = "gpus"; empty otherwise): its CUDA_VISIBLE_DEVICES
    gpus: list[int] = Field(default_factory=list)
    pgid: int | None = None
    accepted_at: float = Field(default_factory=time.time)
    dispatched_at: float | None = None
    # when this run's start was first confirmed, by the local clock: the deadline
    # (`[job] timeout_s`) counts from here and survives reattaches
    started_at: float | None = None
    exited_at: float | None = None
    finished_at: float | None = None
    last_exit_code: int | None = None
    last_error: str | None = None
    kill_reason: str | None = None  # the run must be killed (timeout); saved before the kill
    not_before: float | None = None  # retry back-off
    avoid_instances: list[str] = Field(default_factory=list)
    # runs whose remote folder vanished or came to hold another run while they ran
    # (requeued, not counted as attempts: the first is not the job's fault)
    lost_runs: int = 0
    requeued_at: float | None = None  # when it last went back to the queue (a retry's wait)
    # runs on instances given up while unreachable
    orphans: list[OrphanRun] = Field(default_factory=list)
    result_files: list[str] = Field(default_factory=list)
    # what the done run's MANIFEST.json says, kept so `vastd report` reads no file per job
    rows_out: int | None = None
    cost: float | None = None
    gpu_name: str | None = None
    # accepted again after it was done ([job] on_duplicate = "rerun"): the earlier
    # results are kept as results/<job>/previous-<n>/ when this run's are installed
    keep_previous: bool = False
    # the stem its own files have in failed/ (`<job>` or `<job>.dup-<n>`) once failed
    failed_stem: str | None = None
    failed_csv: bool = True  # whether that failure left `<stem>.csv` (or only its .error.json)
    # resubmitted after it failed: that failure's files in failed/, removed once this
    # record is saved (a crash before the save must not lose them)
    earlier_failed_stem: str | None = None
    # the current run's progress: rows done, as the last log.txt line matching
    # `[job] progress_regex` says, and when that figure last changed (local clock)
    progress_rows: int | None = None
    progress_at: float | None = None
    # the GPU idle watch ([job] gpu_idle_s): since when every GPU of the current run has
    # read 0% at each health check, and whether that has lasted gpu_idle_s (flagged)
    gpu_idle_since: float | None = None
    gpu_idle: bool = False
    # a staged run ([job] stage_ahead): it waits on its instance behind run `after_run` of
    # job `after` (same slot, same GPUs) and starts there when that one exits. `staged`
    # until a status check sees it started; `staged_at` once its staging was confirmed.
    after: str | None = None
    after_run: str | None = None
    # the slot of its instance the run holds (0, 1, ...: the lowest free one at a direct
    # start; a staged run takes the slot of the run it waits behind) and its place in it
    # (0 for a direct start, one more than the run it waits behind): the runs of one
    # slot run one at a time, in that order, whatever their exits seen so far. None off
    # an instance (and in snapshots from before: numbered at start, `number_slots`).
    slot: int | None = None
    slot_pos: int = 0
    staged: bool = False
    staged_at: float | None = None

    @field_validator("orphans", mode="before")
    @classmethod
    def _legacy_orphans(cls, value: Any) -> Any:
        # Snapshots written before run ids held bare instance ids.
        if isinstance(value, list):
            return [{"instance": v} if isinstance(v, str) else v for v in value]
        return value

    def orphan_on(self, instance_id: str) -> OrphanRun | None:
        return next((o for o in self.orphans if o.instance == instance_id), None)


class InstanceRecord(Tracked):
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
    dph: float = 0.0  # the price counted in the budget and the ledger
    # the price an owned instance was rented (or last re-bid) at: it never counts less
    # (inventory.refresh_record); None in a record saved before it was kept
    rented_dph: float | None = None
    machine_id: int | None = None
    gpu_name: str | None = None
    num_gpus: int | None = None  # as the API lists it
    # the GPU indices nvidia-smi listed at the last health check (None: not known, or no
    # nvidia-smi): where present they, not num_gpus, are the instance's GPUs
    gpu_indices: list[int] | None = None
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
    lost_reason: str | None = None
    # job folders on it may be left that nothing accounts for (its jobs were given up
    # while it was silent, or vastd restarted): swept before it gets a new job
    resweep: bool = False
    # health (monitoring.py) and every other drain: why it gets no new jobs
    health_failures: int = 0
    drain_reason: str | None = None
    disk_free_gb: float | None = None
    health_checked_at: float | None = None
    # the market as vast.ai reports it (orchestration/market.py)
    interruptible: bool = False  # rented at a bid: `stopped` means outbid
    end_date: float | None = None  # epoch s when the host's offer (the rental) ends
    frozen_since: float | None = None  # first listed `frozen` (billing but unusable)
    rebid_at: float | None = None  # when vastd last raised its bid after an outbid
    rebid_failures: int = 0  # re-bids in a row that failed since the last one that worked
    # jobs whose attempts failed here one after another since its last completed job, and
    # those of them that completed on another instance since (state.py: FAILING_DRAIN)
    failed_jobs_in_row: list[str] = Field(default_factory=list)
    failures_proven: list[str] = Field(default_factory=list)
    key_reattached_at: float | None = None  # when an SSH auth failure re-attached the key


FollowUpKind = Literal["cleanup"]


class FollowUp(Tracked):
    """Remote work that must happen once the snapshot says so, retried until done.

    `cleanup`: kill what is left of run `run` of `job` on `instance` and remove its
    remote folder, only if the folder still holds that run (its `run` file).
    A finished run's folder, a failed attempt's, and a duplicate run all go this way.
    """

    kind: FollowUpKind = "cleanup"
    instance: str
    job: str
    run: str | None = None
    reason: str = ""
    created_at: float = Field(default_factory=time.time)
    attempts: int = 0
    next_at: float = 0.0
    last_error: str | None = None


class HistorySummary(_Model):
    """What history.jsonl holds, kept with the snapshot so readers need not parse it.

    Counts the distinct finished jobs whose last line is there and that are not in
    the snapshot's `jobs` (a name accepted again leaves it).
    """

    done: int = 0
    failed: int = 0
    done_duration_s: float = 0.0  # dispatch to finish, summed over the done jobs timed
    done_timed: int = 0


class Snapshot(_Model):
    version: int = SCHEMA_VERSION
    saved_at: float | None = None
    next_seq: int = 1
    jobs: dict[str, JobRecord] = Field(default_factory=dict)
    instances: dict[str, InstanceRecord] = Field(default_factory=dict)
    followups: dict[str, FollowUp] = Field(default_factory=dict)
    blocked_machines: dict[str, float] = Field(default_factory=dict)  # machine id -> until
    rent_intents: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # intents dropped unanswered (fleet.expire_rent_intents), kept a while: an instance
    # listed later with one is still claimed as owned (inventory.claim_unknown_instance)
    dropped_intents: dict[str, dict[str, Any]] = Field(default_factory=dict)
    spend_total: float = 0.0  # dollars accrued by owned instances
    last_discovery_at: float | None = None  # last successful instance listing
    # the rental circuit breaker (orchestration/breaker.py): rentals in a row that never
    # became ready, and the pause they caused (kept across restarts)
    failed_rentals: int = 0
    rent_paused_until: float | None = None
    rent_pause_reason: str | None = None
    history: HistorySummary = Field(default_factory=HistorySummary)
