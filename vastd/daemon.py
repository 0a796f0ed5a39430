"""The daemon: owns the resources, the signals and the supervisor loops.

Lifecycle (uvicorn style): start-up (snapshot, recovery before any scheduling)
-> main loops -> shutdown (signal handlers only set a flag; loops are cancelled
with a bounded wait; state is saved; remote jobs keep running).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import asyncssh

from vastd import __version__
from vastd.core.files import JobFolder, Layout, cleanup_temp_files
from vastd.core.lock import RootLock
from vastd.core.state import SNAPSHOT_TEMP_PATTERNS
from vastd.execution.result_handler import cleanup_stale_result_dirs
from vastd.orchestration.context import Context, build_context, close_context
from vastd.orchestration.control import ControlServer
from vastd.orchestration.followups import followups_once
from vastd.orchestration.metrics_server import MetricsServer, start_metrics_server
from vastd.orchestration.recovery import recover_after_restart, save_recovery
from vastd.orchestration.sharing import group_id, share_folders
from vastd.orchestration.workflow import supervisors
from vastd.utils.config import Settings, apply_live_keys, check_files, diff_settings, read_config
from vastd.utils.exceptions import ConfigError, StateManagementError, VastdError
from vastd.utils.logging import get_logger, wait_background_logging

GC_YOUNG_THRESHOLD = 50_000  # allocations between collections of the young generation (700)
log = get_logger("vastd.daemon")
STOP_TIMEOUT_S = 8.0


def sd_notify(message: str) -> bool:
    """Send a datagram to $NOTIFY_SOCKET (systemd Type=notify); False when there is none."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def status_line(counts: dict[str, int], save_error: str | None) -> str:
    """systemd's STATUS= line (`systemctl status`): the jobs, and why nothing is
    dispatched while the snapshot cannot be written."""
    line = (
        f"STATUS=queued {counts['queued']} running {counts['running']} "
        f"done {counts['done']} failed {counts['failed']}"
    )
    if save_error is not None:
        line += f"; state not saved, dispatch paused: {save_error}"
    return line


class Daemon:
    """`vastd run`: one event loop, concurrent supervisor tasks, a JSON snapshot."""

    def __init__(
        self,
        settings: Settings,
        *,
        client_keys: list[asyncssh.SSHKey] | None = None,
        inbox_settle_s: float = 1.0,
        inbox_rescan_s: float = 30.0,
        config_path: Path | None = None,
        log_level_override: str | None = None,
        tune_gc: bool = False,
    ) -> None:
        self.settings = settings
        self._tune_gc = tune_gc  # the process's collector (`vastd run` only, not in tests)
        self.config_path = config_path  # what SIGHUP re-reads
        self._log_level_override = log_level_override  # `--log-level` wins over [log] level
        self.layout = Layout(settings.paths.root)
        self._client_keys = client_keys
        self._inbox_settle_s = inbox_settle_s
        self._inbox_rescan_s = inbox_rescan_s
        self.should_exit = asyncio.Event()
        self.started = asyncio.Event()  # set once state is loaded and recovered
        self.ctx: Context | None = None
        self._sigints = 0
        self._reloads: set[asyncio.Task[bool]] = set()
        self._lock = RootLock(self.layout.root)
        self._metrics: MetricsServer | None = None  # [metrics] listen

    # --- signals: they only set flags ----------------------------------------------------
    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints > 1:
                log.warning("daemon_forced_exit")
                wait_background_logging(timeout_s=1.0)  # that line, and those before it
                os._exit(130)
        log.info("daemon_stopping", signal=signal.Signals(signum).name)
        sd_notify("STOPPING=1")
        self.should_exit.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def release_signal_handlers(self) -> None:
        """The graceful stop is over: hand the signals back while the loop still runs.

        The loop's handlers write to its wake-up pipe, which closing the loop closes
        before it removes them: a signal in between made CPython print an "Exception
        ignored ... Bad file descriptor" traceback. Removing them here turns the wake-up
        fd off while the pipe is open. From now on a SIGINT (a second ^C) ends the
        process at once as during the stop, and SIGTERM and SIGHUP are ignored: the state
        is saved and the process is on its way out."""
        loop = asyncio.get_running_loop()
        installed = [loop.remove_signal_handler(sig) for sig in _HANDLED]
        if not any(installed):
            return  # (a caller that handles the signals itself)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, _exit_on_late_sigint)

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload(), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> bool:
        """SIGHUP: re-read the config file; apply the live keys, or change nothing and say why.

        The new values are assigned to the running Settings' own section objects, which
        every holder (the Context, the SSH pool) shares and reads at use time.
        """
        if self.config_path is None:
            log.warning("config_reload_refused", reason="the daemon was not started from a file")
            return False
        try:
            new, _notes = await asyncio.to_thread(read_config, self.config_path, require_file=True)
            problems = [p for p in check_files(new) if p.startswith("ssh.key_file")]
            if problems:
                raise ConfigError(problems)
        except ConfigError as exc:
            log.warning(
                "config_reload_refused",
                config=str(self.config_path),
                reason="invalid configuration",
                problems=exc.problems,
            )
            return False
        live, restart = diff_settings(self.settings, new)
        if restart:
            log.warning(
                "config_reload_refused",
                config=str(self.config_path),
                reason="these keys change only with a restart; nothing was applied",
                keys=restart,
            )
            return False
        apply_live_keys(self.settings, new)
        if "log.level" in live and self._log_level_override is None:
            logging.getLogger().setLevel(self.settings.log.level.upper())
        log.info("config_reloaded", config=str(self.config_path), changed=live)
        return True

    # --- lifecycle ---------------------------------------------------------------------------
    async def startup(self) -> Context:
        self.layout.ensure()
        self._lock.acquire()  # before anything is read or moved
        try:
            share_folders(self.layout, group_id(self.settings.paths.group))
            ctx = build_context(self.settings, client_keys=self._client_keys)
        except BaseException:
            self._lock.release()
            raise
        # Leftovers of a crash mid-write; never the inbox, where users' uploads may be.
        removed = cleanup_stale_result_dirs(self.layout.results)
        for folder in (JobFolder.QUEUED, JobFolder.RUNNING, JobFolder.DONE, JobFolder.FAILED):
            removed += cleanup_temp_files(self.layout.folder(folder))
        removed += cleanup_temp_files(self.layout.root, SNAPSHOT_TEMP_PATTERNS)
        if removed:
            log.info("temp_files_removed", count=removed)
        # Recovery comes before any scheduling (the predecessor did it after).
        recover_after_restart(ctx)
        await save_recovery(ctx)
        self.ctx = ctx
        return ctx

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (0) or a fatal error (1)."""
        self.install_signal_handlers()
        try:
            return await self._run()
        finally:
            self.release_signal_handlers()

    async def _run(self) -> int:
        ctx = await self.startup()
        try:
            # [metrics] listen: bound before the loops, so a port in use stops the start
            self._metrics = await start_metrics_server(ctx, self.settings.metrics)
        except BaseException:
            await close_context(ctx)
            self._lock.release()
            raise
        if self._tune_gc:
            tune_gc()
        counts = ctx.store.counts()
        log.info(
            "daemon_started",
            version=__version__,
            config=str(self.config_path) if self.config_path else None,
            pid=os.getpid(),
            root=str(self.layout.root),
            mode=self.settings.fleet.mode,
            jobs=counts,
            instances=len(ctx.store.instances),
            gc_frozen=gc.get_freeze_count(),
        )
        sd_notify("READY=1")
        self.started.set()
        main = asyncio.create_task(self._supervise(ctx), name="orchestrate")
        watchdog = asyncio.create_task(self._watchdog(ctx), name="watchdog")
        # `vastd cancel/retry/drain/undrain` (<root>/control.sock), removed at shutdown
        gid = group_id(self.settings.paths.group)
        control = asyncio.create_task(ControlServer(ctx, gid).run(), name="control")
        stop = asyncio.create_task(self.should_exit.wait(), name="stop")
        await asyncio.wait([main, stop], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if main.done() and not main.cancelled() and main.exception() is not None:
            exc = main.exception()
            log.error("daemon_fatal", error=repr(exc), exc_info=exc)
            code = 1
        await self.shutdown(ctx, [main, watchdog, control, stop])
        log.info("daemon_stopped", exit_code=code, jobs=ctx.store.counts())
        return code

    async def _supervise(self, ctx: Context) -> None:
        """The daemon's TaskGroup: every supervisor loop, until cancelled or one dies."""
        async with asyncio.TaskGroup() as tg:
            for name, make in supervisors(
                ctx, inbox_settle_s=self._inbox_settle_s, inbox_rescan_s=self._inbox_rescan_s
            ):
                tg.create_task(make(), name=name)

    async def shutdown(self, ctx: Context, tasks: list[asyncio.Task[Any]]) -> None:
        """Cancel the loops (bounded), save state, close connections. Remote jobs keep running."""
        if self._metrics is not None:
            await self._metrics.stop()
        for task in tasks:
            task.cancel()
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S / 2):
                await asyncio.gather(*tasks, return_exceptions=True)
        except TimeoutError:
            self._log_stuck_tasks()
        for task in [*ctx.watchers.values(), *ctx.preparing.values()]:
            task.cancel()
        # What is done is saved first; then the recorded remote clean-ups may run (bounded:
        # what is left stays recorded and is done after the next start).
        await ctx.store.flush()
        await ctx.drain(timeout_s=2.0)
        if ctx.store.snapshot.followups and await ctx.store.flush():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await followups_once(ctx, sweep=False)
        await close_context(ctx)
        self._lock.release()

    def _log_stuck_tasks(self) -> None:
        for task in asyncio.all_tasks():
            if task is asyncio.current_task():
                continue
            where = [
                f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}"
                for f in task.get_stack(limit=5)
            ]
            log.warning("task_refused_to_exit", task=task.get_name(), stack=where)

    async def _watchdog(self, ctx: Context) -> None:
        """WATCHDOG=1 at half the systemd interval, only while the loop is responsive."""
        usec = os.environ.get("WATCHDOG_USEC")
        interval_s = int(usec) / 2e6 if usec and usec.isdigit() else 10.0
        while True:
            started = time.monotonic()
            await asyncio.sleep(interval_s)
            lag = time.monotonic() - started - interval_s
            counts = ctx.store.counts()
            sd_notify(status_line(counts, ctx.store.save_error))
            if usec and lag < interval_s:
                sd_notify("WATCHDOG=1")


_HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)  # by the loop, while it runs


def _exit_on_late_sigint(signum: int, frame: object) -> None:
    # as a second SIGINT during the stop does (nothing is left to save), once the lines
    # of the stop are written
    wait_background_logging(timeout_s=1.0)
    os._exit(130)


def tune_gc() -> None:
    """Keep the cyclic collector's pauses off the event loop's critical path.

    What start-up made for good (modules, schemas, the loaded state and history index)
    leaves the collector's view (`gc.freeze`), so a full pass walks only what the
    campaign makes; and the young generation is collected every GC_YOUNG_THRESHOLD
    allocations instead of 700, so full passes (measured at 0.1-0.3 s with 500 instances'
    connections) come far less often. A young pass of that size is about a millisecond.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def run_daemon(
    settings: Settings, *, config_path: Path | None = None, log_level_override: str | None = None
) -> int:
    """Entry point of `vastd run`."""
    daemon = Daemon(
        settings, config_path=config_path, log_level_override=log_level_override, tune_gc=True
    )
    try:
        return asyncio.run(daemon.run())
    except KeyboardInterrupt:
        return 130
    except (ConfigError, StateManagementError):
        raise  # the CLI reports these, once (exit 2 for a config, 1 for a snapshot)
    except (VastdError, OSError) as exc:
        # expected (another daemon on this root, a folder it may not write): one line
        log.error("daemon_fatal", error=str(exc))
        return 1
    except Exception as exc:
        log.error("daemon_fatal", error=repr(exc), exc_info=exc)
        return 1
    finally:
        sys.stdout.flush()
