"""structlog set-up: one JSON object a line on stdout (journald), readable on a TTY.

Stdlib records (asyncssh, aiohttp) go through the same formatter, so every line
on stdout is JSON. Event names are the stable snake_case ones of the README (log events).

The daemon (`setup_logging(..., background=True)`) formats each record on the calling
thread, as before, but a writer thread writes it: a stdout that is slow to drain (a
busy journald, a pipe read by a stalled `tee`, a terminal over a slow link) would
otherwise stop the event loop in `write()` for as long as it is full. Past
`BACKGROUND_QUEUE_CHARS` characters waiting, new lines are dropped, never waited for,
and the next line that fits is preceded by a `log_records_dropped` warning with their
count.

structlog (with rich, which it imports when installed) costs a short command such as
`vastd status` more than its whole work: it is imported on first use only. Loggers
from `get_logger` stand in for structlog's until they log, and `setup_logging(...,
deferred=True)` sets up on the first record (structlog's or stdlib's).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import structlog
    from structlog.typing import EventDict, Processor, WrappedLogger

_SECRETS: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask this value wherever it would appear in a log line."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _SECRETS:
            if secret in value:
                value = value.replace(secret, "**********")
        return value
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def _redact(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    if not _SECRETS:
        return event_dict
    # exc_info must stay a tuple for the renderer that formats it.
    return {k: v if k == "exc_info" else _redact_value(v) for k, v in event_dict.items()}


def _dict_tracebacks() -> Processor:
    import structlog

    # Frame locals could hold a key file's content: tracebacks carry no locals.
    return structlog.processors.ExceptionRenderer(
        structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
    )


# sd-daemon(3) priority prefixes: journald reads `<N>` at the start of a stdout line.
_JOURNAL_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def stream_is_journal(stream: Any) -> bool:
    """True when `stream` is the journal's stream socket ($JOURNAL_STREAM = "dev:inode")."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return bool(expected) and expected == f"{st.st_dev}:{st.st_ino}"


def _journal_priority(renderer: Processor) -> Processor:
    def render(logger: WrappedLogger, name: str, event_dict: EventDict) -> Any:
        priority = _JOURNAL_PRIORITY.get(str(event_dict.get("level", "info")), 6)
        line = renderer(logger, name, event_dict)
        text = line.decode() if isinstance(line, bytes) else str(line)
        return f"<{priority}>{text}"

    return render


def _shared_processors() -> list[Processor]:
    import structlog

    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]


class _DeferredSetup(logging.Handler):
    """The root logger's handler until the first record: that one completes the set-up."""

    def __init__(self, log_level: str, json: bool, stream: Any) -> None:
        super().__init__()
        self.settings = (log_level, json, stream)

    def complete(self) -> None:
        log_level, json, stream = self.settings
        setup_logging(log_level, json=json, stream=stream)  # replaces this handler

    def emit(self, record: logging.LogRecord) -> None:
        self.complete()
        for handler in logging.getLogger().handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


_deferred: _DeferredSetup | None = None


def _complete_deferred_setup() -> None:
    """Before a structlog logger is first used: finish a deferred set-up that still stands."""
    global _deferred
    pending, _deferred = _deferred, None
    if pending is not None and pending in logging.getLogger().handlers:
        pending.complete()


def _quiet_libraries() -> None:
    # asyncssh logs every channel at INFO; aiohttp's access log is noise here.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # watchfiles reports "N changes detected" at INFO: not one of our events.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)


# What may wait for the background writer before new lines are dropped, in characters
# (a line is about 0.3 kB, one with a traceback several kB): bounded by size, so a flood
# of tracebacks while nothing reads stdout cannot grow the daemon without end.
BACKGROUND_QUEUE_CHARS = 32 * 1024 * 1024
# How long closing the background handler waits for the writer to drain its queue
# (a stdout nobody reads must not hold the daemon's exit for ever).
BACKGROUND_CLOSE_S = 5.0
# Once a line wakes the writer, it waits this long for more before writing them all: each
# wake-up takes the GIL from the event loop, so lines logged one by one (several a job)
# go out a batch at a time, at most this late.
BACKGROUND_BATCH_S = 0.05
_STOP = object()  # the writer thread's last item
_WRITE_ITEMS = 1024  # lines (or the stop) one write of the writer thread takes at most


class BackgroundStreamHandler(logging.Handler):
    """Formats on the caller's thread; a writer thread writes the lines to `stream`.

    - Not the stdlib's QueueHandler/QueueListener pair: that queue is unbounded and
      `QueueListener.stop()` waits for the writer without a bound. This one drops what
      would pass `max_chars` waiting, and counts it (`log_records_dropped`); `close()`
      waits at most `close_s`.
    - The queue is a `SimpleQueue` and the writer takes no lock: what is waiting is
      `queued - written`, two counts each kept by one side (lines come in under this
      handler's lock, so one at a time; the writer alone counts what it wrote). So the
      forced-exit paths (signal handlers) can wait for the lines without a deadlock.
    """

    def __init__(
        self,
        stream: Any,
        *,
        max_chars: int | None = None,
        close_s: float | None = None,
        batch_s: float | None = None,
    ) -> None:
        super().__init__()
        self.stream = stream
        self.max_chars = BACKGROUND_QUEUE_CHARS if max_chars is None else max_chars
        self.close_s = BACKGROUND_CLOSE_S if close_s is None else close_s
        self.batch_s = BACKGROUND_BATCH_S if batch_s is None else batch_s
        self.dropped = 0  # lines dropped since the last `log_records_dropped`
        self._queued = 0  # characters put in the queue (under this handler's lock)
        self._written = 0  # characters written or given up on (by the writer alone)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._writer: threading.Thread | None = threading.Thread(
            target=self._write_lines, name="vastd-log-writer", daemon=True
        )
        self._finished = threading.Event()  # the writer wrote its last batch
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        if self._writer is None:
            # Closed: written here once the writer is done; while it is still stuck in
            # a write nobody reads (the close timed out), the line is dropped.
            if self._finished.is_set():
                self._write(line)
            return
        # Lines come in one at a time (under this handler's lock, Handler.handle).
        if self.dropped and self.waiting <= self.max_chars // 2:
            self._note_dropped()
        if self.waiting + len(line) > self.max_chars:
            self.dropped += 1
            return
        self._queued += len(line)
        self._queue.put(line)

    @property
    def waiting(self) -> int:
        """Characters queued and not yet written."""
        return self._queued - self._written

    def _note_dropped(self) -> None:
        # Through the loggers (back into emit, with the count reset), rendered as any line.
        count, self.dropped = self.dropped, 0
        _dropped_log.warning("log_records_dropped", count=count)

    def _write(self, text: str, *, report: bool = True) -> bool:
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception as exc:  # a closed or broken stdout: say so where we can
            if report:
                with contextlib.suppress(Exception):
                    sys.stderr.write(f"vastd: writing the log failed: {exc!r}\n")
            return False
        return True

    def _write_lines(self) -> None:
        """The writer thread: what is waiting goes out in one write, `batch_s` after the
        line that woke it (the stop is not held back, nor a backlog: after a full write
        the next goes at once)."""
        failing = False  # a failure is reported once, until a write works again
        backlog = False  # the last write took all it may: more was waiting
        while True:
            items = [self._queue.get()]
            if items[0] is not _STOP and self.batch_s > 0 and not backlog:
                time.sleep(self.batch_s)
            while len(items) < _WRITE_ITEMS and not self._queue.empty():
                items.append(self._queue.get())
            backlog = len(items) == _WRITE_ITEMS
            lines = [item for item in items if isinstance(item, str)]
            if lines:
                text = "".join(lines)
                failing = not self._write(text, report=not failing)
                self._written += len(text)
            if any(item is _STOP for item in items):
                self._finished.set()
                return

    def wait_written(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until every line queued so far is written; takes no
        lock, so a signal handler may call it. True when all were."""
        deadline = time.monotonic() + timeout_s
        while self.waiting > 0 and not self._finished.is_set():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout_s: float | None = None) -> None:
        """Write what is waiting (for at most `timeout_s`, default `close_s`), then stop
        the writer; what comes after is written on the caller's thread."""
        deadline = time.monotonic() + (self.close_s if timeout_s is None else timeout_s)
        self.acquire()  # no line comes in between (reentrant: the notice logs)
        try:
            writer = self._writer
            if writer is not None and self.dropped:
                # the count of the last lines dropped goes out too, once there is room
                while self.waiting > self.max_chars // 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                if self.waiting <= self.max_chars // 2:
                    self._note_dropped()
            self._writer = None
            if writer is not None:
                self._queue.put(_STOP)
        finally:
            self.release()
        if writer is not None:
            writer.join(max(0.0, deadline - time.monotonic()))
        super().close()


def _background_handler() -> BackgroundStreamHandler | None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BackgroundStreamHandler):
            return handler
    return None


def close_background_logging(timeout_s: float | None = None) -> None:
    """Write what the root logger's background writer holds, and stop it (the daemon's
    last step)."""
    handler = _background_handler()
    if handler is not None:
        handler.close(timeout_s)


def wait_background_logging(timeout_s: float) -> None:
    """Before a forced exit (`os._exit`): give the lines already logged up to
    `timeout_s` to be written. Takes no lock: safe in a signal handler."""
    handler = _background_handler()
    if handler is not None:
        handler.wait_written(timeout_s)


def _replace_root_handlers(handler: logging.Handler, log_level: str) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, BackgroundStreamHandler):
            old.close()
    root.addHandler(handler)
    root.setLevel(log_level.upper())
    _quiet_libraries()


def setup_logging(
    log_level: str = "INFO",
    *,
    json: bool | None = None,
    stream: Any = None,
    deferred: bool = False,
    background: bool = False,
) -> None:
    """Route structlog and stdlib logging to one handler on stdout.

    `deferred`: the same, but structlog is imported and configured only when the first
    record comes (a short command that logs nothing never pays for it).
    `background`: lines are written by a writer thread (`BackgroundStreamHandler`);
    `close_background_logging()` writes what is left.
    """
    global _deferred
    stream = stream if stream is not None else sys.stdout
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    if deferred:
        # the stream and its kind as they are now, as without `deferred`
        pending = _DeferredSetup(log_level, json, stream)
        _replace_root_handlers(pending, log_level)
        _deferred = pending
        return
    _deferred = None
    import structlog

    shared = _shared_processors()
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
        if stream_is_journal(stream):
            # the line stays JSON after the prefix, which journald strips into PRIORITY=
            renderer = _journal_priority(renderer)
        final: list[Processor] = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _dict_tracebacks(),  # before _redact, so exception texts are redacted too
            _redact,
            renderer,
        ]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        final = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,  # plain text, then redacted like the rest
            _redact,
            renderer,
        ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=final)
    handler: logging.Handler
    handler = BackgroundStreamHandler(stream) if background else logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    _replace_root_handlers(handler, log_level)


class _LazyLogger:
    """structlog's logger for `name`, fetched (structlog imported) on first use."""

    __slots__ = ("_initial", "_name", "_target")

    def __init__(self, name: str, initial: dict[str, Any]) -> None:
        self._name = name
        self._initial = initial
        self._target: Any = None

    def __getattr__(self, attr: str) -> Any:
        if _deferred is not None:
            _complete_deferred_setup()
        target = self._target
        if target is None:
            import structlog

            target = structlog.stdlib.get_logger(self._name)
            if self._initial:
                target = target.bind(**self._initial)
            self._target = target
        return getattr(target, attr)


def get_logger(name: str = "vastd", **initial: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger; `initial` values are bound to every line."""
    return cast("structlog.stdlib.BoundLogger", _LazyLogger(name, initial))


_dropped_log = get_logger("vastd.logging")


class RepeatedFailures:
    """A failure that repeats every cycle is logged once per change of state.

    The first failure of a kind (and each change of its error text) is logged at
    warning; the same error again at debug, with `repeats` counting it; the first
    success after it at info, under its own event, with `failures` counting them all.
    Keyed by what fails (e.g. "discovery", or an instance id), so one does not hide
    another.
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[str, int]] = {}

    def failed(
        self,
        logger: Any,
        event: str,
        key: str,
        error: str,
        level: str = "warning",
        field: str = "error",
        **fields: Any,
    ) -> bool:
        """Log `event` for this failure (its text under `field`); True when it was logged
        at `level` (a change), False when at debug (a repeat)."""
        prev = self._last.get(key)
        if prev is not None and prev[0] == error:
            count = prev[1] + 1
            self._last[key] = (error, count)
            logger.debug(event, **{field: error}, repeats=count, **fields)
            return False
        count = (prev[1] if prev is not None else 0) + 1
        self._last[key] = (error, count)
        getattr(logger, level)(event, **{field: error}, **fields)
        return True

    def recovered(self, logger: Any, event: str, key: str, **fields: Any) -> bool:
        """Log `event` at info if `key` was failing; True when it was."""
        prev = self._last.pop(key, None)
        if prev is None:
            return False
        logger.info(event, failures=prev[1], **fields)
        return True

    def forget(self, key: str) -> None:
        """`key` works again, its recovery logged elsewhere: its next failure is news."""
        self._last.pop(key, None)

    def failing(self, key: str) -> bool:
        return key in self._last

    def count(self, key: str) -> int:
        """How many times `key` has failed since it last worked (0: not failing)."""
        prev = self._last.get(key)
        return prev[1] if prev is not None else 0
