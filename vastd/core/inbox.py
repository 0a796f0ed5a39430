"""The inbox: which file names are jobs (and their ids), and the watcher of complete files.

`InboxWatcher` reports each complete candidate file once, one at a time or in batches;
acceptance (validation and the move to queued/) is vastd/core/jobs.py's
`accept_job_file` / `accept_job_files`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

from vastd.core.files import JOB_SUFFIX
from vastd.core.files import is_candidate_name as is_candidate_name
from vastd.utils.logging import get_logger

# The logger name it had before the split from jobs.py: log lines stay the same.
log = get_logger("vastd.core.jobs")


def job_id_for(path: Path) -> str:
    """The job id: the file name without `.csv`."""
    name = path.name
    return name[: -len(JOB_SUFFIX)] if name.endswith(JOB_SUFFIX) else name


# Names looked at between two yields to the event loop (a few milliseconds' work).
_NAMES_PER_STEP = 1024

_Signature = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class InboxWatcher:
    """Reports each complete candidate file in the inbox once to `on_ready(path)`, or
    with `on_batch` to `on_batch(paths)`, up to `batch_size` files of one look at a time.

    watchfiles events are only hints to look sooner: it reports a file as soon as it
    appears and has no close-write event. Readiness comes from looking:

    - a regular file whose ctime is later than its mtime is ready at once: its inode
      changed after the last write (renamed in, or an mtime set by `cp -p`/rsync);
    - otherwise size, mtime and inode must be unchanged across two looks `settle_s`
      apart (a writer pausing longer than that is indistinguishable from a finished one);
    - symlinks, FIFOs, devices and folders hold nothing being written: ready at once
      (acceptance refuses them).

    The folder is scanned at start, after events, every `settle_s` while a file is
    settling, and every `rescan_interval_s` regardless. A file is reported again only
    after it disappears and reappears (or is replaced), or after `forget()`.
    """

    def __init__(
        self,
        inbox: Path,
        on_ready: Callable[[Path], Awaitable[object]] | None,
        *,
        on_batch: Callable[[list[Path]], Awaitable[object]] | None = None,
        batch_size: int = 512,
        settle_s: float = 1.0,
        rescan_interval_s: float = 30.0,
        use_events: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (on_ready is None) == (on_batch is None):
            raise ValueError("give exactly one of on_ready and on_batch")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.inbox = inbox
        self._on_ready = on_ready
        self._on_batch = on_batch
        self.batch_size = batch_size
        self.settle_s = settle_s
        self.rescan_interval_s = rescan_interval_s
        self._use_events = use_events
        self._clock = clock
        self._looks: dict[str, tuple[_Signature, float]] = {}
        self._reported: dict[str, _Signature] = {}
        self._hint = asyncio.Event()
        self._unreadable = False
        self.watching = False  # True once file system events are known to arrive

    @property
    def pending(self) -> int:
        """Candidate files seen but not yet ready."""
        return sum(1 for name in self._looks if name not in self._reported)

    def forget(self, path: Path) -> None:
        """Report this file again on the next look where it is ready (e.g. after an error)."""
        self._reported.pop(path.name, None)
        self._looks.pop(path.name, None)

    def _list(self) -> dict[str, os.stat_result] | None:
        found: dict[str, os.stat_result] = {}
        try:
            with os.scandir(self.inbox) as entries:
                for entry in entries:
                    if not is_candidate_name(entry.name):
                        continue
                    try:
                        found[entry.name] = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # vanished or unreadable: look again next time
        except OSError as exc:
            if not self._unreadable:
                log.warning("inbox_unreadable", path=str(self.inbox), error=str(exc))
            self._unreadable = True
            return None
        self._unreadable = False
        return found

    async def scan_once(self) -> list[Path]:
        """Look at the whole inbox once; return the files that became ready (by name)."""
        listing = await asyncio.to_thread(self._list)
        if listing is None:
            return []
        now = self._clock()
        ready: list[Path] = []
        for name in [n for n in self._looks if n not in listing]:
            del self._looks[name]
        for name in [n for n in self._reported if n not in listing]:
            del self._reported[name]
        for n, (name, st) in enumerate(sorted(listing.items())):
            if n and n % _NAMES_PER_STEP == 0:
                await asyncio.sleep(0)  # a big inbox never holds the loop for long
            sig = _signature(st)
            if name in self._reported:
                if self._reported[name][0] == sig[0]:
                    continue
                del self._reported[name]  # replaced by another file under the same name
            previous = self._looks.get(name)
            if previous is None or previous[0] != sig:
                self._looks[name] = (sig, now)
                is_ready = not stat.S_ISREG(st.st_mode) or st.st_ctime_ns > st.st_mtime_ns
            else:
                is_ready = now - previous[1] >= self.settle_s
            if is_ready:
                self._reported[name] = sig
                del self._looks[name]
                ready.append(self.inbox / name)
        return ready

    async def _deliver(self, path: Path) -> None:
        assert self._on_ready is not None
        try:
            await self._on_ready(path)
        except Exception as exc:
            # The file stays in the inbox; the next full rescan offers it again.
            log.warning("inbox_callback_failed", job=job_id_for(path), error=repr(exc))
            self.forget(path)

    async def _deliver_batch(self, paths: list[Path]) -> None:
        assert self._on_batch is not None
        try:
            await self._on_batch(paths)
        except Exception as exc:
            # What stayed in the inbox is offered again by the next full rescan.
            log.warning("inbox_callback_failed", files=len(paths), error=repr(exc))
            for path in paths:
                self.forget(path)

    async def deliver(self, ready: list[Path]) -> None:
        """Hand files to the callback: one at a time, or in batches of `batch_size`."""
        if self._on_batch is None:
            for path in ready:
                await self._deliver(path)
            return
        for start in range(0, len(ready), self.batch_size):
            await self._deliver_batch(ready[start : start + self.batch_size])

    async def _watch_events(self, stop: asyncio.Event) -> None:
        """Set the hint on every batch of events; back off and retry if watching fails."""
        while not stop.is_set():
            try:
                async with contextlib.aclosing(
                    watchfiles.awatch(
                        self.inbox,
                        watch_filter=None,
                        recursive=False,
                        stop_event=stop,
                        rust_timeout=1_000,
                        yield_on_timeout=True,
                        step=50,
                        debounce=500,
                    )
                ) as batches:
                    async for changes in batches:
                        # An empty batch is a timeout: proof that the watch is in place.
                        if not self.watching:
                            # A file that arrived between the last scan and this moment
                            # raised no event: look once more now instead of at the
                            # next periodic rescan.
                            self._hint.set()
                        self.watching = True
                        if changes:
                            self._hint.set()
            except Exception as exc:
                # inotify limits, a missing folder: the periodic rescan still works.
                log.warning("inbox_events_unavailable", path=str(self.inbox), error=repr(exc))
            self.watching = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.rescan_interval_s):
                    await stop.wait()

    async def _wait_for_next_look(self) -> None:
        delay = self.settle_s if self.pending else self.rescan_interval_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._hint.wait()
        self._hint.clear()

    async def run(self) -> None:
        """Watch until cancelled; every ready file goes to `on_ready` (or `on_batch`)."""
        stop = asyncio.Event()
        watcher: asyncio.Task[None] | None = None
        if self._use_events:
            watcher = asyncio.create_task(self._watch_events(stop), name="inbox-events")
        try:
            while True:
                try:
                    ready = await self.scan_once()
                except Exception as exc:
                    log.warning("inbox_scan_failed", error=repr(exc))
                    ready = []
                await self.deliver(ready)
                await self._wait_for_next_look()
        finally:
            # The stop event ends watchfiles' thread promptly; then the task itself.
            stop.set()
            if watcher is not None:
                watcher.cancel()
                await asyncio.wait([watcher])
