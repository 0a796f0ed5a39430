"""What the lower layers count for `/metrics`, without knowing about the endpoint.

The objects here are plain `prometheus_client` metrics created with `registry=None`: no
global registry holds them. Each daemon's own `CollectorRegistry` registers them
(`register_counters`) next to the collectors that read its store at scrape time
(vastd/orchestration/metrics_server.py), so several daemons (tests) never clash.

They count for the whole process; with one daemon per process (`vastd run`) that is
the daemon's. The hot-path cost is one lock and one add per event:

- `API_OK` / `API_RETRY` / `API_ERROR`: vast.ai API calls (vastd/instances/vast_api.py):
  a request that got its answer, each retry of a request, a request given up on;
- `SSH_ERRORS`: SSH failures (vastd/core/ssh.py): a connection that could not be
  opened (after its attempts), or an operation that broke on an open connection;
- `JOB_DURATION`: seconds from dispatch to done, observed when a job's results are in;
- `note_progress()`: the time of the latest job state change (`last_progress()`);
- `beat(loop)`: a loop step finished (utils/supervise.py run_loop): `/healthz` reads
  `beats()` to tell a loop that stopped making progress.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram

API_REQUESTS = Counter(
    "vastd_api_requests",
    "vast.ai API calls by outcome: ok (answered), retry (each retry), error (given up)",
    ["outcome"],
    registry=None,
)
API_OK = API_REQUESTS.labels(outcome="ok")
API_RETRY = API_REQUESTS.labels(outcome="retry")
API_ERROR = API_REQUESTS.labels(outcome="error")

SSH_ERRORS = Counter(
    "vastd_ssh_errors",
    "SSH failures: connections that could not be opened, operations that broke",
    registry=None,
)

# minutes to a day: batch jobs
JOB_DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, float("inf"))
JOB_DURATION = Histogram(
    "vastd_job_duration_seconds",
    "Seconds from dispatch to done, per job that finished with results",
    buckets=JOB_DURATION_BUCKETS,
    registry=None,
)


class _Clock:
    __slots__ = ("beats", "progress")

    def __init__(self) -> None:
        self.progress = 0.0
        self.beats: dict[str, float] = {}


_CLOCK = _Clock()


def note_progress(now: float | None = None) -> None:
    """A job changed state (or the daemon started): epoch seconds."""
    _CLOCK.progress = time.time() if now is None else now


def last_progress() -> float:
    """Epoch seconds of the latest `note_progress`, 0.0 if none."""
    return _CLOCK.progress


def beat(loop: str) -> None:
    """A step of loop `loop` finished (monotonic clock)."""
    _CLOCK.beats[loop] = time.monotonic()


def beats() -> dict[str, float]:
    """loop -> time.monotonic() of its latest finished step."""
    return dict(_CLOCK.beats)


def observe_job_duration(dispatched_at: float | None, finished_at: float | None) -> None:
    if dispatched_at is not None and finished_at is not None and finished_at >= dispatched_at:
        JOB_DURATION.observe(finished_at - dispatched_at)


def register_counters(registry: CollectorRegistry) -> None:
    """Put this module's counters into a daemon's registry."""
    for metric in (API_REQUESTS, SSH_ERRORS, JOB_DURATION):
        registry.register(metric)
