"""Small helpers shared by the tests: waiting for a condition, writing TOML, clean env.

Generic on purpose; import as `from tests.helpers import wait_for`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import structlog

T = TypeVar("T")

DEFAULT_POLL_S = 0.02


def wait_for(
    predicate: Callable[[], T],
    timeout_s: float,
    *,
    poll_s: float = DEFAULT_POLL_S,
    message: str | Callable[[], str] = "",
) -> T:
    """Call `predicate` until it returns something truthy (returned); AssertionError at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"condition not met within {timeout_s}s: {text}")
        time.sleep(poll_s)


async def async_wait_for(
    predicate: Callable[[], T],
    timeout_s: float,
    *,
    poll_s: float = DEFAULT_POLL_S,
    message: str | Callable[[], str] = "",
) -> T:
    """`wait_for` that yields to the event loop between looks (servers in the loop keep running)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"condition not met within {timeout_s}s: {text}")
        await asyncio.sleep(poll_s)


# Environment variables that change how vastd reads its config or its API key.
VASTD_ENV_PREFIXES = ("VASTD_",)
VASTD_ENV_NAMES = ("VAST_API_KEY", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of os.environ without anything that steers vastd, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(VASTD_ENV_PREFIXES) and k not in VASTD_ENV_NAMES
    }
    env.update(extra or {})
    return env


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes (\" \\ \n \uXXXX) are valid TOML basic-string escapes.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _dump_table(name: str, table: Mapping[str, Any], out: list[str]) -> None:
    scalars = {
        k: v
        for k, v in table.items()
        if v is not None and not isinstance(v, dict) and not _is_table_array(v)
    }
    if name:
        out.append(f"[{name}]")
    out.extend(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in scalars.items())
    out.append("")
    for key, value in table.items():
        child = f"{name}.{json.dumps(key)}" if name else json.dumps(key)
        if isinstance(value, dict):
            _dump_table(child, value, out)
        elif _is_table_array(value):
            for item in value:
                out.append(f"[[{child}]]")
                _dump_table_body(child, item, out)


def _dump_table_body(name: str, table: Mapping[str, Any], out: list[str]) -> None:
    # Inside an array-of-tables entry nested tables are written inline.
    out.extend(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items() if v is not None)
    out.append("")


def dump_toml(data: Mapping[str, Any]) -> str:
    """A TOML document for plain data (None values are left out: TOML has no null)."""
    out: list[str] = []
    _dump_table("", data, out)
    return "\n".join(out)


@contextlib.contextmanager
def preserved_logging() -> Iterator[None]:
    """Give back the root logger's handlers and level and structlog's defaults afterwards
    (setup_logging, also called by `vastd` commands run in-process, changes them)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


def saved_jobs(root: os.PathLike[str] | str) -> dict[str, dict[str, Any]]:
    """Every job's last saved record: history.jsonl's last line per name, overridden by
    state.json (work in flight), as a restarted daemon reads them."""
    base = os.fspath(root)
    out: dict[str, dict[str, Any]] = {}
    with contextlib.suppress(FileNotFoundError), open(os.path.join(base, "history.jsonl")) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                out[record["id"]] = record
    with open(os.path.join(base, "state.json")) as f:
        out.update(json.load(f)["jobs"])
    return out


@functools.cache
def private_key_text() -> str:
    """An unencrypted ed25519 private key in OpenSSH format (made once per test run):
    `check-config` and `vastd run` refuse an `[ssh] key_file` that does not load."""
    import asyncssh

    return asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode()


def write_private_key(path: Path, mode: int = 0o600) -> Path:
    """`private_key_text()` written to `path` with `mode`."""
    path.write_text(private_key_text())
    path.chmod(mode)
    return path


def full_pipe() -> tuple[int, int]:
    """A pipe of one page whose buffer is already full: the next write to it blocks."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, b"filler\n" * 64)
    os.set_blocking(w, True)
    return r, w


def read_to_eof(fd: int) -> bytes:
    """Everything read from `fd` until every writer has closed it."""
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


class LoopTurns:
    """Counts the event loop's turns while inside `async with LoopTurns() as turns:`
    (`turns.count`): a task that adds one each time it runs, yielding at every turn."""

    def __init__(self) -> None:
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            self.count += 1
            await asyncio.sleep(0)

    async def __aenter__(self) -> LoopTurns:
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def longest_run(values: list[Any]) -> int:
    """The length of the longest run of equal neighbours in `values` (0 when empty)."""
    longest = run = 0
    for i, value in enumerate(values):
        run = run + 1 if i and value == values[i - 1] else 1
        longest = max(longest, run)
    return longest
