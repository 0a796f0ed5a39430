"""File work off the event loop: many job-file moves made durable together (aiofiles),
and worker-thread trips that run to their end.

Apart from core/files.py so that the short-lived commands (`vastd status`), which
import core/files.py, do not load asyncio.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ParamSpec, TypeVar

import aiofiles.os

from vastd.core.files import fsync_directory
from vastd.utils.exceptions import FileOperationError
from vastd.utils.logging import get_logger

log = get_logger("vastd.files")

_T = TypeVar("_T")
_P = ParamSpec("_P")


async def in_thread_to_its_end(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """`fn(*args, **kwargs)` in a worker thread, awaited to its end even when the caller
    is cancelled meanwhile (the cancellation is raised once it has ended).

    For file work whose clean-up on the caller's error path must not race it: with a
    bare `asyncio.to_thread`, a cancelled caller goes on (removing a temp folder, say)
    while the thread is still writing or renaming in it. The wait is that of the disk
    operation itself, as a synchronous call's would be. The thread's future is a plain
    executor future, not a task: the cancellation of every task at the loop's end
    (`asyncio.run`) cannot end the wait early."""
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    future = loop.run_in_executor(None, call)
    cancelled: asyncio.CancelledError | None = None
    while not future.done():
        try:
            await asyncio.wait((future,))  # (never cancels `future`, never raises its error)
        except asyncio.CancelledError as exc:
            cancelled = exc  # from outside: wait on
    if cancelled is not None:
        if not future.cancelled() and (error := future.exception()) is not None:
            # The caller gets the cancellation; what went wrong meanwhile is logged.
            log.warning(
                "file_work_failed_while_cancelled", error=f"{type(error).__name__}: {error}"
            )
        raise cancelled
    return future.result()


def _rename_new(source: Path, destination: Path) -> FileOperationError | None:
    """`atomic_file_move` without its fsyncs; the error is returned, not raised."""
    if os.path.lexists(destination):
        return FileOperationError(f"cannot move {source} to {destination}: destination exists")
    try:
        os.rename(source, destination)
    except OSError as exc:
        return FileOperationError(f"cannot move {source} to {destination}: {exc}")
    return None


def _rename_each(moves: list[tuple[Path, Path]]) -> list[FileOperationError | None]:
    return [_rename_new(source, destination) for source, destination in moves]


def _fsync_directories(folders: Iterable[Path]) -> None:
    for folder in folders:
        fsync_directory(folder)


_rename_each_off_loop = aiofiles.os.wrap(_rename_each)
_fsync_directories_off_loop = aiofiles.os.wrap(_fsync_directories)

# Renames per trip to the executor: one trip per rename costs ~8 times the rename itself.
MOVES_PER_CALL = 128


async def atomic_file_moves(
    moves: list[tuple[Path, Path]],
) -> list[FileOperationError | None]:
    """Many `atomic_file_move`s made durable together, off the event loop.

    Each `(source, destination)` is renamed as `atomic_file_move` does (the entry
    itself, never over an existing one); a failed one does not stop the others. Then
    every destination folder, and after them every source folder, is fsynced once
    (not once per file): when this returns, every move it reports done is durable.

    Returns, per move and in order, None (moved) or the FileOperationError that kept
    it where it was. Raises FileOperationError when a folder cannot be fsynced: the
    entries already renamed then stay where they are, not known to be durable.
    """
    outcomes: list[FileOperationError | None] = []
    for start in range(0, len(moves), MOVES_PER_CALL):
        outcomes.extend(await _rename_each_off_loop(moves[start : start + MOVES_PER_CALL]))
    moved = [move for move, outcome in zip(moves, outcomes, strict=True) if outcome is None]
    destinations = dict.fromkeys(destination.parent for _, destination in moved)
    sources = dict.fromkeys(
        source.parent for source, _ in moved if source.parent not in destinations
    )
    await _fsync_directories_off_loop([*destinations, *sources])
    return outcomes
