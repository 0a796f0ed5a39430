"""Logging: one JSON object a line with timestamp/level/event, stdlib records too, secrets masked."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.helpers import full_pipe, preserved_logging, read_to_eof
from vastd.core import state as st
from vastd.core.state import StateStore
from vastd.utils import logging as vlog
from vastd.utils.logging import RepeatedFailures, get_logger, register_secret, setup_logging

SECRET = "vk-9d2e71c4aa0b"


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """setup_logging changes process-wide state: give it back after each test."""
    monkeypatch.setattr(vlog, "_SECRETS", set())
    with preserved_logging():
        yield


@pytest.fixture
def buf() -> io.StringIO:
    """JSON logging into a buffer."""
    stream = io.StringIO()
    setup_logging(json=True, stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line parsed as JSON (fails on a line that is not)."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_object_per_line(buf: io.StringIO) -> None:
    """Each event is one JSON line with an ISO 8601 UTC timestamp, the level and the event,
    plus bound and per-call fields."""
    log = get_logger("vastd.test", instance="101")
    log.info("job_started", job="j1", pgid=42)
    log.warning("instance_unreachable", error="multi\nline")
    records = lines(buf)
    assert len(records) == 2
    first = records[0]
    assert first["event"] == "job_started"
    assert first["level"] == "info"
    assert (first["job"], first["instance"], first["pgid"]) == ("j1", "101", 42)
    stamp = datetime.fromisoformat(first["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    assert first["timestamp"].endswith("Z")
    assert records[1]["level"] == "warning"
    assert records[1]["error"] == "multi\nline"


def test_stdlib_loggers_come_out_as_json(buf: io.StringIO) -> None:
    """Records of libraries that use `logging` (aiohttp, asyncssh) are JSON lines too."""
    logging.getLogger("aiohttp.client").warning("connection reset by %s", "peer")
    logging.getLogger("asyncssh").warning("host key mismatch")
    records = lines(buf)
    assert [r["event"] for r in records] == ["connection reset by peer", "host key mismatch"]
    assert all(r["level"] == "warning" for r in records)
    assert records[0]["logger"] == "aiohttp.client"
    datetime.fromisoformat(records[0]["timestamp"])


def test_level_filtering(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below the configured level nothing is written; asyncssh's INFO chatter is dropped."""
    stream = io.StringIO()
    setup_logging("WARNING", json=True, stream=stream)
    get_logger("vastd.x").info("state_saved")
    get_logger("vastd.x").warning("api_retry")
    stream2 = io.StringIO()
    setup_logging("INFO", json=True, stream=stream2)
    logging.getLogger("asyncssh").info("Opening SSH connection")
    assert [r["event"] for r in lines(stream)] == ["api_retry"]
    assert lines(stream2) == []


def test_registered_secret_is_masked(buf: io.StringIO) -> None:
    """A registered secret is masked in the event, in values (nested too) and in stdlib lines."""
    register_secret(SECRET)
    log = get_logger("vastd.test")
    log.info(f"key is {SECRET}", header={"Authorization": f"Bearer {SECRET}"}, args=[SECRET])
    logging.getLogger("aiohttp.client").warning("GET /?api_key=%s", SECRET)
    text = buf.getvalue()
    assert SECRET not in text
    records = lines(buf)
    assert records[0]["event"] == "key is **********"
    assert records[0]["header"] == {"Authorization": "Bearer **********"}
    assert records[1]["event"] == "GET /?api_key=**********"


def test_secret_in_an_exception_is_masked(buf: io.StringIO) -> None:
    """A traceback is a structured `exception` field, the secret masked in it, no frame locals;
    a stdlib record's exc_info is kept (not lost) and masked too."""
    register_secret(SECRET)
    log = get_logger("vastd.test")
    api_key = SECRET  # a local that must not be dumped
    try:
        raise RuntimeError(f"401 for key {api_key}")
    except RuntimeError:
        log.exception("api_failed")
        logging.getLogger("aiohttp.client").error("request failed", exc_info=True)
    assert SECRET not in buf.getvalue()
    records = lines(buf)
    assert len(records) == 2
    for record in records:
        exc = record["exception"][0]
        assert exc["exc_type"] == "RuntimeError"
        assert exc["exc_value"] == "401 for key **********"
        assert all("locals" not in frame for frame in exc["frames"])


def test_short_values_are_not_registered_as_secrets(buf: io.StringIO) -> None:
    """Empty or tiny values are not secrets (masking every 'a' would ruin every line)."""
    register_secret("")
    register_secret(None)
    register_secret("abc")
    get_logger().info("a_b_c", value="abc")
    assert lines(buf)[0]["value"] == "abc"


def test_console_renderer_masks_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal (json=False) lines are readable text, secrets and tracebacks masked."""
    stream = io.StringIO()
    setup_logging(json=False, stream=stream)
    register_secret(SECRET)
    try:
        raise ValueError(SECRET)
    except ValueError:
        get_logger().exception("boom", key=SECRET)
    text = stream.getvalue()
    assert "boom" in text
    assert "ValueError" in text
    assert SECRET not in text


async def test_capture_logs_sees_events(tmp_path: Path) -> None:
    """structlog.testing.capture_logs records events of vastd's module loggers for assertions."""
    store = StateStore(tmp_path / "state.json")
    st.add_job(store, "j1", "j1.csv", 3)
    with structlog.testing.capture_logs() as captured:
        await store.flush()
        get_logger("vastd.test", instance="7").warning("instance_lost", job="j1")
        for _ in range(2):
            st.add_job(store, f"j{store.writes + 1}", "x.csv", 1)
            await store.flush()
    assert captured[0]["event"] == "state_saved"
    assert captured[0]["jobs"] == 1
    # The first write at info, the next ones (within a minute) at debug: not half the log.
    assert [c["log_level"] for c in captured if c["event"] == "state_saved"] == [
        "info",
        "debug",
        "debug",
    ]
    assert captured[1] == {
        "event": "instance_lost",
        "instance": "7",
        "job": "j1",
        "log_level": "warning",
    }


def test_journal_priority_prefix_when_stdout_is_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$JOURNAL_STREAM naming our stream: each JSON line starts with journald's `<N>`
    priority; the same stream without it (or another stream) gets bare JSON lines."""
    path = tmp_path / "journal"
    with path.open("w+") as stream:
        st_ = path.stat()
        monkeypatch.setenv("JOURNAL_STREAM", f"{st_.st_dev}:{st_.st_ino}")
        setup_logging("DEBUG", json=True, stream=stream)
        log = get_logger("vastd.test")
        log.debug("state_saved")
        log.info("job_done", job="j")
        log.warning("job_retry")
        log.error("daemon_fatal")
        logging.getLogger("asyncssh").error("from a library")
        stream.flush()
    got = path.read_text().splitlines()
    assert [line[:3] for line in got] == ["<7>", "<6>", "<4>", "<3>", "<3>"]
    assert [json.loads(line[3:])["event"] for line in got][:2] == ["state_saved", "job_done"]

    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # someone else's journal stream
    other = io.StringIO()
    setup_logging(json=True, stream=other)
    get_logger("vastd.test").info("job_done")
    assert json.loads(other.getvalue())["event"] == "job_done"


@pytest.mark.parametrize("first", ["stdlib", "structlog"])
def test_deferred_setup_completes_on_the_first_record(first: str) -> None:
    """setup_logging(deferred=True) configures nothing of structlog until a record comes;
    the first one (stdlib's or structlog's) completes the set-up and is written as it
    would have been, and so are the ones after it; records below the level are not."""
    stream = io.StringIO()
    log = get_logger("vastd.test", instance="101")
    setup_logging("WARNING", json=True, stream=stream, deferred=True)
    assert vlog._deferred is not None
    logging.getLogger("vastd.lib").info("below_the_level")
    assert stream.getvalue() == ""
    if first == "stdlib":
        logging.getLogger("vastd.lib").warning("from_stdlib")
        log.warning("from_structlog", job="j1")
    else:
        log.warning("from_structlog", job="j1")
        logging.getLogger("vastd.lib").warning("from_stdlib")
    log.info("below_the_level")
    assert vlog._deferred is None
    records = {r["event"]: r for r in lines(stream)}
    assert set(records) == {"from_stdlib", "from_structlog"}
    assert records["from_structlog"]["instance"] == "101"
    assert records["from_structlog"]["level"] == "warning"
    assert records["from_stdlib"]["logger"] == "vastd.lib"


def test_repeated_failures_are_logged_once_per_change() -> None:
    """A failure: at its level once, the same text again at debug with a count, a new text
    at its level again, the recovery once at info; after `forget` the next failure is news;
    keys are independent."""
    repeats = RepeatedFailures()
    log = get_logger("vastd.test")
    with structlog.testing.capture_logs() as got:
        assert repeats.failed(log, "x_failed", "a", "boom")
        assert not repeats.failed(log, "x_failed", "a", "boom")
        assert repeats.failed(log, "y_failed", "b", "boom", level="error", field="reason")
        assert repeats.failed(log, "x_failed", "a", "other")
        assert repeats.recovered(log, "x_recovered", "a")
        assert not repeats.recovered(log, "x_recovered", "a")
        assert repeats.failed(log, "x_failed", "a", "other")
        repeats.forget("b")
        assert repeats.failed(log, "y_failed", "b", "boom", level="error", field="reason")
    assert [(e["event"], e["log_level"]) for e in got] == [
        ("x_failed", "warning"),
        ("x_failed", "debug"),
        ("y_failed", "error"),
        ("x_failed", "warning"),
        ("x_recovered", "info"),
        ("x_failed", "warning"),
        ("y_failed", "error"),
    ]
    assert got[1]["repeats"] == 2 and got[2]["reason"] == "boom" and got[4]["failures"] == 3


def in_thread(fn: Callable[[], object], timeout_s: float = 30.0) -> bool:
    """Run `fn` in a thread; True when it returned within `timeout_s` (a blocked write
    would keep it for ever)."""
    worker = threading.Thread(target=fn, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return not worker.is_alive()


def test_background_logging_never_waits_for_a_full_stdout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With stdout a full pipe nobody reads, logging returns at once: lines past the
    queue's bound are dropped, and a `log_records_dropped` line counts them (the next
    line that fits brings it, and the close the last one), so every record is either
    written, in order, or counted."""
    monkeypatch.setattr(vlog, "BACKGROUND_QUEUE_CHARS", 50 * 120)  # about 50 lines
    r, w = full_pipe()
    stream = os.fdopen(w, "w")
    setup_logging(json=True, stream=stream, background=True)
    log = get_logger("vastd.test")

    def burst() -> None:
        for i in range(1000):
            log.info("job_accepted", n=i)

    assert in_thread(burst), "a log call waited for the full pipe"
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read_to_eof, r)
        vlog.close_background_logging()
        stream.close()
        out = reading.result(timeout=30)
    os.close(r)
    records = [json.loads(line) for line in out.splitlines() if line != b"filler"]
    written = [rec["n"] for rec in records if rec["event"] == "job_accepted"]
    assert written == sorted(written) and len(written) >= 40
    notices = [rec for rec in records if rec["event"] == "log_records_dropped"]
    assert notices and all(n["level"] == "warning" and n["count"] > 0 for n in notices)
    assert len(written) + sum(n["count"] for n in notices) == 1000


def test_background_logging_writes_every_line_in_order_by_close() -> None:
    """A stdout that keeps up loses nothing: by `close_background_logging()` every line
    is written, in order, and no drop is reported."""
    stream = io.StringIO()
    setup_logging(json=True, stream=stream, background=True)
    log = get_logger("vastd.test")
    logging.getLogger("asyncssh").warning("from a library")
    for i in range(5000):
        log.info("job_done", n=i)
    vlog.close_background_logging()
    records = lines(stream)
    assert records[0]["event"] == "from a library"
    assert [rec["n"] for rec in records[1:]] == list(range(5000))
    # after the close, lines are written by the caller itself
    log.info("daemon_stopped")
    assert lines(stream)[-1]["event"] == "daemon_stopped"


def test_closing_background_logging_on_a_stdout_nobody_reads_returns() -> None:
    """The daemon's exit waits for its log writer at most the close timeout: a stdout
    nobody reads does not hold it for ever. The line still comes out if it is read."""
    r, w = full_pipe()
    stream = os.fdopen(w, "w")
    setup_logging(json=True, stream=stream, background=True)
    [handler] = [
        h for h in logging.getLogger().handlers if isinstance(h, vlog.BackgroundStreamHandler)
    ]
    writer = handler._writer
    assert writer is not None
    get_logger("vastd.test").info("daemon_stopped")
    assert in_thread(lambda: vlog.close_background_logging(timeout_s=0.2))
    assert writer.is_alive()  # still in its write
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read_to_eof, r)
        writer.join(30)  # the pipe read, its write ends and so does it
        assert not writer.is_alive()
        stream.close()
        out = reading.result(timeout=30)
    os.close(r)
    assert b'"event": "daemon_stopped"' in out


def test_an_exit_with_the_writer_stuck_on_a_full_stdout_is_a_clean_exit(
    tmp_path: Path,
) -> None:
    """A process whose log writer is still stuck on a stdout nobody reads when it exits
    (the close timed out) exits at once with its own status: the writer is a daemon
    thread, and nothing at exit waits for it."""
    r, w = full_pipe()
    script = (
        "import sys\n"
        "from vastd.utils import logging as vlog\n"
        "vlog.setup_logging(json=True, background=True)\n"
        "vlog.get_logger('vastd.test').info('daemon_stopped', pad='x' * 10000)\n"
        "vlog.close_background_logging(timeout_s=0.2)\n"
        "print('after the close')\n"
        "sys.exit(3)\n"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script],
            stdout=w,
            stderr=subprocess.PIPE,
            timeout=60,
            cwd=Path(__file__).resolve().parent.parent,
        )
    finally:
        os.close(w)
        os.close(r)
    assert proc.returncode == 3, proc.stderr.decode(errors="replace")[-2000:]
    assert b"Fatal Python error" not in proc.stderr


def test_waiting_for_the_background_writer_takes_no_lock() -> None:
    """Before a forced exit the daemon waits for the lines already logged:
    `wait_background_logging` returns once they are written, with the writer still
    running, and with the handler's lock held by someone else."""
    stream = io.StringIO()
    setup_logging(json=True, stream=stream, background=True)
    [handler] = [
        h for h in logging.getLogger().handlers if isinstance(h, vlog.BackgroundStreamHandler)
    ]
    log = get_logger("vastd.test")
    for i in range(2000):
        log.info("job_done", n=i)
    with handler.lock:  # as when a signal lands inside emit
        done = threading.Event()
        worker = threading.Thread(
            target=lambda: (vlog.wait_background_logging(30), done.set()), daemon=True
        )
        worker.start()
        worker.join(30)
    assert done.is_set()
    assert [rec["n"] for rec in lines(stream)] == list(range(2000))


class _CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_lines_logged_one_by_one_are_written_a_batch_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A line wakes the writer, which waits `BACKGROUND_BATCH_S` for more before writing:
    the daemon logs a few lines per job, one at a time, and a writer woken by each would
    take the GIL from the event loop each time. Lines 2 ms apart, with a 0.25 s batch,
    go out in a few writes, still in order; the close does not wait for a batch."""
    monkeypatch.setattr(vlog, "BACKGROUND_BATCH_S", 0.25)
    stream = _CountingStream()
    setup_logging(json=True, stream=stream, background=True)
    log = get_logger("vastd.test")
    started = time.monotonic()
    for i in range(40):
        log.info("job_done", n=i)
        time.sleep(0.002)
    elapsed = time.monotonic() - started
    closing = time.monotonic()
    vlog.close_background_logging()
    assert time.monotonic() - closing < 0.25 + 5  # the last batch, never a wait for more
    assert [rec["n"] for rec in lines(stream)] == list(range(40))
    # one write per batch started (and one by the close); without batching, about 40
    assert stream.writes <= 2 * (elapsed / 0.25 + 2), (stream.writes, elapsed)


def test_a_backlog_is_written_without_waiting_for_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer waits `BACKGROUND_BATCH_S` only when the line that woke it came alone: a
    backlog (more than one write's worth of lines) goes out write after write, so the
    wait never caps how fast lines can be written."""
    monkeypatch.setattr(vlog, "BACKGROUND_BATCH_S", 1.0)
    waits: list[float] = []
    real_time = vlog.time

    class CountedTime:
        monotonic = staticmethod(real_time.monotonic)

        @staticmethod
        def sleep(seconds: float) -> None:
            if seconds == 1.0:
                waits.append(seconds)
            real_time.sleep(seconds)

    monkeypatch.setattr(vlog, "time", CountedTime)
    stream = _CountingStream()
    setup_logging(json=True, stream=stream, background=True)
    log = get_logger("vastd.test")
    for i in range(3000):  # well within the first wait: a backlog of about 3 writes
        log.info("job_done", n=i)
    vlog.close_background_logging()
    assert [rec["n"] for rec in lines(stream)] == list(range(3000))
    assert stream.writes >= 3 and waits == [1.0]
