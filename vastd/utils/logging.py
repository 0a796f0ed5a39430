"""structlog set-up: one JSON object a line on stdout (journald), readable on a TTY.

Stdlib records (asyncssh, aiohttp) go through the same formatter, so every line
on stdout is JSON. Event names are the stable snake_case ones of the README (log events).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

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


# Frame locals could hold a key file's content: tracebacks carry no locals.
_dict_tracebacks = structlog.processors.ExceptionRenderer(
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
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]


def setup_logging(log_level: str = "INFO", *, json: bool | None = None, stream: Any = None) -> None:
    """Route structlog and stdlib logging to one handler on stdout."""
    stream = stream if stream is not None else sys.stdout
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    shared = _shared_processors()
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
        if stream_is_journal(stream):
            # the line stays JSON after the prefix, which journald strips into PRIORITY=
            renderer = _journal_priority(renderer)
        final: list[Processor] = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _dict_tracebacks,  # before _redact, so exception texts are redacted too
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
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(log_level.upper())
    # asyncssh logs every channel at INFO; aiohttp's access log is noise here.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # watchfiles reports "N changes detected" at INFO: not one of our events.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)


def get_logger(name: str = "vastd", **initial: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger; `initial` values are bound to every line."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger.bind(**initial) if initial else logger
