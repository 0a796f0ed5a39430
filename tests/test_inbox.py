"""InboxWatcher: only complete candidate files are reported, each once, and nothing crashes it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from vastd.core import inbox as inbox_mod
from vastd.core.files import Layout
from vastd.core.jobs import InboxWatcher, accept_job_file
from vastd.utils.config import JobSettings

GOOD = "a,b\n1,2\n"


class FakeClock:
    """A monotonic clock the test moves by hand, so settling needs no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def _ignore(_path: Path) -> None:
    return None


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_watcher(tmp_path: Path, clock: FakeClock) -> Callable[..., InboxWatcher]:
    """Factory: a watcher on tmp_path/inbox with settle_s=1 on the fake clock."""
    (tmp_path / "inbox").mkdir(exist_ok=True)

    def make(**kwargs: object) -> InboxWatcher:
        kwargs.setdefault("settle_s", 1.0)
        kwargs.setdefault("clock", clock)
        return InboxWatcher(tmp_path / "inbox", _ignore, **kwargs)  # type: ignore[arg-type]

    return make


def _renamed_in(inbox: Path, name: str, content: str = GOOD) -> Path:
    """Write under a dot-name, then rename in, as `vastd submit`, cp -p or rsync leave it."""
    temp = inbox / f".{name}.part"
    temp.write_text(content)
    os.utime(temp, (1_700_000_000, 1_700_000_000))  # the source's mtime, set before the rename
    final = inbox / name
    os.rename(temp, final)
    return final


async def test_partial_file_is_taken_only_when_stable(
    make_watcher: Callable[..., InboxWatcher], clock: FakeClock, tmp_path: Path
) -> None:
    """A file written in two parts with a pause is not ready until unchanged for settle_s."""
    watcher = make_watcher()
    path = tmp_path / "inbox" / "job.csv"
    with open(path, "w") as handle:
        handle.write("a,b\n")
        handle.flush()
        assert await watcher.scan_once() == []
        clock.advance(0.6)
        assert await watcher.scan_once() == []
        handle.write("1,2\n")  # the writer resumes after a pause
    clock.advance(0.6)
    assert await watcher.scan_once() == []  # changed since the last look: starts over
    clock.advance(0.5)
    assert await watcher.scan_once() == []
    clock.advance(0.5)
    assert await watcher.scan_once() == [path]
    assert path.read_text() == GOOD


async def test_renamed_in_file_is_taken_at_once(
    make_watcher: Callable[..., InboxWatcher], tmp_path: Path
) -> None:
    """A complete file renamed into the inbox (ctime after mtime) is ready on the first look."""
    watcher = make_watcher()
    path = _renamed_in(tmp_path / "inbox", "garch_test_job_0000_0099.csv")
    assert await watcher.scan_once() == [path]


async def test_each_file_is_reported_once_until_it_reappears(
    make_watcher: Callable[..., InboxWatcher], tmp_path: Path
) -> None:
    """A ready file is reported once; after it disappears and comes back, once more."""
    watcher = make_watcher()
    path = _renamed_in(tmp_path / "inbox", "j.csv")
    assert await watcher.scan_once() == [path]
    assert await watcher.scan_once() == []
    path.unlink()
    assert await watcher.scan_once() == []
    _renamed_in(tmp_path / "inbox", "j.csv")
    assert await watcher.scan_once() == [path]
    watcher.forget(path)
    assert await watcher.scan_once() == [path]


async def test_replaced_file_is_reported_again(
    make_watcher: Callable[..., InboxWatcher], tmp_path: Path
) -> None:
    """A file replaced under the same name (a new inode) counts as a new file."""
    watcher = make_watcher()
    path = _renamed_in(tmp_path / "inbox", "j.csv")
    assert await watcher.scan_once() == [path]
    _renamed_in(tmp_path / "inbox", "j.csv", "a\n2\n")
    assert await watcher.scan_once() == [path]


async def test_dotfiles_and_temp_names_are_ignored(
    make_watcher: Callable[..., InboxWatcher], clock: FakeClock, tmp_path: Path
) -> None:
    """Dot-files, *.part, *.tmp, editor backups and non-CSV names are never reported."""
    inbox = tmp_path / "inbox"
    for name in (".hidden.csv", "up.csv.part", "x.tmp", "x.csv~", ".#x.csv", "x.swp", "n.txt"):
        (inbox / name).write_text(GOOD)
    watcher = make_watcher()
    assert await watcher.scan_once() == []
    clock.advance(5)
    assert await watcher.scan_once() == []


async def test_weird_names_and_non_regular_entries_do_not_crash(
    make_watcher: Callable[..., InboxWatcher], clock: FakeClock, tmp_path: Path
) -> None:
    """Odd names (newline, non-UTF-8 bytes, shell characters) and a FIFO are reported, not fatal."""
    inbox = tmp_path / "inbox"
    names = [
        "new\nline.csv",
        "$(touch canary);`x`.csv",
        "\u03b3-テスト.csv",
        os.fsdecode(b"\xff\xfe.csv"),
    ]
    for name in names:
        (inbox / name).write_text(GOOD)
    os.mkfifo(inbox / "pipe.csv")
    watcher = make_watcher()
    assert await watcher.scan_once() == [inbox / "pipe.csv"]  # nothing to wait for in a FIFO
    clock.advance(1.0)
    assert sorted(await watcher.scan_once()) == sorted(inbox / n for n in names)


async def test_vanished_and_missing_inbox_do_not_crash(
    make_watcher: Callable[..., InboxWatcher], clock: FakeClock, tmp_path: Path
) -> None:
    """A file that vanishes while settling, or an inbox folder that is gone, gives no result and no error."""
    inbox = tmp_path / "inbox"
    (inbox / "j.csv").write_text(GOOD)
    watcher = make_watcher()
    assert await watcher.scan_once() == []
    (inbox / "j.csv").unlink()
    clock.advance(2)
    assert await watcher.scan_once() == []
    assert watcher.pending == 0
    inbox.rmdir()
    with capture_logs() as logs:
        assert await watcher.scan_once() == []
        assert await watcher.scan_once() == []
    assert [e["event"] for e in logs] == ["inbox_unreadable"]  # said once, not every look


async def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("use_events", [True, False], ids=["events", "rescan-only"])
async def test_run_delivers_files_and_stops_on_cancel(tmp_path: Path, use_events: bool) -> None:
    """run() hands each ready file to on_ready (events or periodic rescan) and cancellation propagates."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    early = _renamed_in(inbox, "early.csv")
    seen: list[Path] = []

    async def on_ready(path: Path) -> None:
        seen.append(path)

    watcher = InboxWatcher(
        inbox, on_ready, settle_s=0.05, rescan_interval_s=0.2, use_events=use_events
    )
    task = asyncio.create_task(watcher.run())
    await _wait_for(lambda: seen == [early])
    with open(inbox / "late.csv", "w") as handle:  # written in place: taken once settled
        handle.write(GOOD)
    await _wait_for(lambda: len(seen) == 2)
    assert seen[1] == inbox / "late.csv"
    assert (inbox / "late.csv").read_text() == GOOD
    task.cancel()
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert task.cancelled()


async def test_events_wake_the_watcher_before_the_rescan(tmp_path: Path) -> None:
    """With a long rescan interval, a file dropped after start is still delivered (via events)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    seen: list[Path] = []

    async def on_ready(path: Path) -> None:
        seen.append(path)

    watcher = InboxWatcher(inbox, on_ready, settle_s=0.05, rescan_interval_s=3600)
    task = asyncio.create_task(watcher.run())
    try:
        await _wait_for(lambda: watcher.watching)
        path = _renamed_in(inbox, "j.csv")
        await _wait_for(lambda: seen == [path])
    finally:
        task.cancel()
        await asyncio.wait([task])


async def test_a_file_dropped_before_the_watch_is_in_place_is_not_left_to_the_rescan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file renamed in after the first scan but before inotify watches (no event for it)
    is taken once the watch is in place, not at the next rescan an hour later."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    seen: list[Path] = []
    scans: list[int] = []

    async def on_ready(path: Path) -> None:
        seen.append(path)

    watcher = InboxWatcher(inbox, on_ready, settle_s=0.05, rescan_interval_s=3600)
    real_scan = watcher.scan_once

    async def scan_then_drop() -> list[Path]:
        ready = await real_scan()
        if not scans:
            _renamed_in(inbox, "early.csv")  # lands right after the first scan
        scans.append(len(ready))
        return ready

    async def late_watch(*args: Any, **kwargs: Any) -> AsyncIterator[set[Any]]:
        # inotify in place only after the drop: it never reports that file
        await asyncio.sleep(0.3)
        while True:
            yield set()  # a timeout batch: the watch is in place
            await asyncio.sleep(0.1)

    monkeypatch.setattr(watcher, "scan_once", scan_then_drop)
    monkeypatch.setattr(inbox_mod.watchfiles, "awatch", late_watch)
    task = asyncio.create_task(watcher.run())
    try:
        await _wait_for(lambda: [p.name for p in seen] == ["early.csv"])
    finally:
        task.cancel()
        await asyncio.wait([task])


async def test_failing_callback_is_logged_and_retried(tmp_path: Path) -> None:
    """An exception in on_ready is logged and the file is offered again later; run() survives."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    path = _renamed_in(inbox, "j.csv")
    calls: list[Path] = []

    async def on_ready(p: Path) -> None:
        calls.append(p)
        if len(calls) == 1:
            raise RuntimeError("disk trouble")

    watcher = InboxWatcher(inbox, on_ready, settle_s=0.05, rescan_interval_s=0.05, use_events=False)
    with capture_logs() as logs:
        task = asyncio.create_task(watcher.run())
        await _wait_for(lambda: len(calls) >= 2)
        task.cancel()
        await asyncio.wait([task])
    assert calls[:2] == [path, path]
    assert any(e["event"] == "inbox_callback_failed" for e in logs)


async def test_watcher_with_acceptance_end_to_end(tmp_path: Path) -> None:
    """Dropped files flow through the watcher into accept_job_file: good to queued/, bad to failed/."""
    layout = Layout(tmp_path / "root")
    layout.ensure()
    settings = JobSettings()

    async def on_ready(path: Path) -> None:
        await accept_job_file(layout, path, settings, known_ids=set())

    watcher = InboxWatcher(layout.inbox, on_ready, settle_s=0.05, rescan_interval_s=0.2)
    task = asyncio.create_task(watcher.run())
    try:
        _renamed_in(layout.inbox, "good.csv")
        _renamed_in(layout.inbox, "bad.csv", "a,b\n1\n")
        await _wait_for(
            lambda: (layout.queued / "good.csv").exists() and (layout.failed / "bad.csv").exists()
        )
        assert (layout.failed / "bad.error.json").exists()
        assert list(layout.inbox.iterdir()) == []
    finally:
        task.cancel()
        await asyncio.wait([task])


async def test_on_batch_gets_the_ready_files_of_a_look_in_batches(
    tmp_path: Path, clock: FakeClock
) -> None:
    """With on_batch, one look's ready files go out batch_size at a time, by name."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    names = [f"j{n}.csv" for n in range(5)]
    for name in names:
        _renamed_in(inbox, name)
    batches: list[list[str]] = []

    async def on_batch(paths: list[Path]) -> None:
        batches.append([p.name for p in paths])

    watcher = InboxWatcher(inbox, None, on_batch=on_batch, batch_size=2, clock=clock)
    await watcher.deliver(await watcher.scan_once())
    assert batches == [names[0:2], names[2:4], names[4:5]]
    await watcher.deliver(await watcher.scan_once())
    assert len(batches) == 3  # reported once


async def test_a_failing_batch_callback_offers_the_whole_batch_again(
    tmp_path: Path, clock: FakeClock
) -> None:
    """An exception in on_batch is logged and every file of the batch is offered again."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    paths = [_renamed_in(inbox, f"j{n}.csv") for n in range(3)]
    calls: list[list[Path]] = []

    async def on_batch(batch: list[Path]) -> None:
        calls.append(batch)
        if len(calls) == 1:
            raise RuntimeError("disk trouble")

    watcher = InboxWatcher(inbox, None, on_batch=on_batch, clock=clock)
    with capture_logs() as logs:
        await watcher.deliver(await watcher.scan_once())
    assert any(e["event"] == "inbox_callback_failed" and e["files"] == 3 for e in logs)
    await watcher.deliver(await watcher.scan_once())
    assert calls == [paths, paths]


def test_a_watcher_takes_one_callback(tmp_path: Path) -> None:
    """on_ready or on_batch, exactly one; a batch holds at least one file."""

    async def on_batch(_paths: list[Path]) -> None:
        return None

    with pytest.raises(ValueError, match="exactly one"):
        InboxWatcher(tmp_path, _ignore, on_batch=on_batch)
    with pytest.raises(ValueError, match="exactly one"):
        InboxWatcher(tmp_path, None)
    with pytest.raises(ValueError, match="batch_size"):
        InboxWatcher(tmp_path, None, on_batch=on_batch, batch_size=0)
