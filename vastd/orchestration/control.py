"""The control socket `<root>/control.sock`: commands that change a running daemon.

`vastd cancel`, `retry`, `drain` and `undrain` connect here (vastd/control.py).
One JSON request per line, one JSON answer per line:

    {"command": "cancel" | "retry", "jobs": ["NAME", ...]}
    {"command": "drain" | "undrain", "instance": "ID"}
    {"command": "ping"}

answered by `{"ok": bool, "results": [{"name", "ok", "message"}]}`, or by
`{"ok": false, "error": "..."}` for a request that cannot be read (not JSON, an
unknown command, a line over MAX_LINE bytes, nothing sent within REQUEST_TIMEOUT_S).
A bad request is answered and logged (`control_request_refused`); the daemon carries
on. Commands run one at a time; past MAX_CLIENTS connections a client is refused.

The socket is 0660 (with `[paths] group` it belongs to that group, whose members
may pass through the 0710 root); only the daemon that holds the root lock serves
it, so a socket file found at start is a dead daemon's and is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

from vastd.core import state as st
from vastd.core.files import resubmit_refused
from vastd.core.history import find_record
from vastd.core.state import InstanceStatus, JobState
from vastd.instances.monitoring import HEALTH_DRAINS
from vastd.orchestration.context import Context
from vastd.utils.exceptions import FileOperationError, IllegalTransitionError
from vastd.utils.logging import get_logger

log = get_logger("vastd.control")

SOCKET_NAME = "control.sock"
SOCKET_MODE = 0o660
MAX_LINE = 64 * 1024
REQUEST_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 10.0
MAX_CLIENTS = 8
MAX_NAMES = 10_000
LOCK_WAIT_S = 30.0  # a cancel waits this long for a collection of the job under way
# AF_UNIX paths are limited to 108 bytes: a longer one is reached through its folder's fd
_SUN_PATH_MAX = 100


def socket_path(root: Path) -> Path:
    return root / SOCKET_NAME


def bindable(path: Path, dir_fd: int | None) -> str:
    """The address to bind or connect to: the path, or for a long one the same file
    through /proc/self/fd/<fd of its folder>."""
    text = str(path)
    if len(text.encode()) <= _SUN_PATH_MAX or dir_fd is None:
        return text
    return f"/proc/self/fd/{dir_fd}/{path.name}"


class ControlServer:
    """Serves the control socket until cancelled; removes it at the end."""

    def __init__(self, ctx: Context, gid: int | None = None) -> None:
        self.ctx = ctx
        self.gid = gid
        self.path = socket_path(ctx.layout.root)
        self._clients = 0
        self._command_lock = asyncio.Lock()

    async def run(self) -> None:
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        server: asyncio.AbstractServer | None = None
        try:
            try:
                # The root lock is ours: a socket file here is a killed daemon's.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                server = await asyncio.start_unix_server(
                    self._serve, path=bindable(self.path, dir_fd), limit=MAX_LINE
                )
                os.chmod(self.path, SOCKET_MODE)
                if self.gid is not None:
                    os.chown(self.path, -1, self.gid)
            except OSError as exc:
                # The jobs go on; only the control commands cannot reach this daemon.
                log.error("control_socket_failed", path=str(self.path), error=str(exc))
                return
            log.info("control_socket_listening", path=str(self.path))
            await asyncio.Event().wait()  # until cancelled
        finally:
            if server is not None:
                server.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(dir_fd)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients += 1
        try:
            if self._clients > MAX_CLIENTS:
                await self._answer(writer, _error("busy: too many control clients at once"))
                return
            while True:
                request = await self._read(reader, writer)
                if request is None:
                    return
                async with self._command_lock:
                    try:
                        answer = await self.handle(request)
                    except Exception as exc:  # a bug in a command: said, logged, survived
                        log.error("control_command_failed", error=repr(exc), exc_info=exc)
                        answer = _error(f"the command failed inside the daemon: {exc!r}")
                if not await self._answer(writer, answer):
                    return
        except Exception as exc:  # one client's trouble never reaches the daemon
            log.error("control_client_failed", error=repr(exc))
        finally:
            self._clients -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> dict[str, Any] | None:
        """The next request; None at the end (EOF, or a refusal already answered)."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                line = await reader.readline()
        except TimeoutError:
            return await self._refuse(writer, f"no request within {REQUEST_TIMEOUT_S:g}s")
        except ValueError:  # the line ran past the stream's limit
            return await self._refuse(writer, f"request longer than {MAX_LINE} bytes")
        except ConnectionError:
            return None
        if not line.strip():
            return None if not line else await self._refuse(writer, "empty request")
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return await self._refuse(writer, f"not a JSON request: {exc}")
        if not isinstance(request, dict):
            return await self._refuse(writer, "a request is a JSON object")
        return request

    async def _refuse(self, writer: asyncio.StreamWriter, why: str) -> dict[str, Any] | None:
        """Answer a request that cannot be read, and end the conversation (None)."""
        log.warning("control_request_refused", reason=why)
        await self._answer(writer, _error(why))
        return None

    async def _answer(self, writer: asyncio.StreamWriter, answer: dict[str, Any]) -> bool:
        try:
            writer.write(json.dumps(answer, sort_keys=True).encode() + b"\n")
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await writer.drain()
        except (TimeoutError, ConnectionError) as exc:
            log.warning("control_answer_failed", error=repr(exc))
            return False
        return True

    # --- the commands ------------------------------------------------------------------------
    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        if command == "ping":
            return {"ok": True, "results": [], "pid": os.getpid()}
        if command in ("cancel", "retry"):
            names = request.get("jobs")
            if (
                not isinstance(names, list)
                or not names
                or len(names) > MAX_NAMES
                or not all(isinstance(n, str) and n for n in names)
            ):
                log.warning("control_request_refused", reason="bad jobs", command=command)
                return _error(f"{command}: 'jobs' must be a non-empty list of job names")
            run = self.cancel if command == "cancel" else self.retry
            results = await run(list(dict.fromkeys(names)))
        elif command in ("drain", "undrain"):
            instance = request.get("instance")
            if not isinstance(instance, str | int) or isinstance(instance, bool) or instance == "":
                log.warning("control_request_refused", reason="bad instance", command=command)
                return _error(f"{command}: 'instance' must be an instance id")
            results = [self.drain(str(instance), undrain=command == "undrain")]
            if results[0]["ok"]:
                await self.ctx.store.flush()
        else:
            log.warning("control_request_refused", reason="unknown command", command=str(command))
            return _error(f"unknown command {command!r} (cancel, retry, drain, undrain, ping)")
        return {"ok": all(r["ok"] for r in results), "results": results}

    async def cancel(self, names: list[str]) -> list[dict[str, Any]]:
        store = self.ctx.store
        results = []
        for name in names:
            results.append(await self._cancel_one(name))
        if any(r["ok"] for r in results):
            await store.flush()  # the stops run once this is on disk (followups)
            self.ctx.wake_dispatch()
        return results

    async def _cancel_one(self, name: str) -> dict[str, Any]:
        store = self.ctx.store
        if store.job_state(name) is None:
            return _result(name, False, "no such job")
        try:
            # Never in the middle of a collection of it (whose results would then land).
            async with asyncio.timeout(LOCK_WAIT_S), self.ctx.job_locks.hold(name):
                await store.file_settled(name)  # nor of a dispatch's move of its file
                job = store.jobs.get(name)
                state = job.state if job is not None else store.job_state(name)
                if job is None or state in st.FINISHED:
                    # Found, and nothing of it runs or waits: what cancel asks for holds
                    # (exit 0 when every name was found), with nothing changed.
                    shown = state.value if state is not None else "unknown"
                    return _result(name, True, f"already finished ({shown}): nothing to cancel")
                was, instance = job.state, job.instance
                st.cancel_job(store, name)
        except TimeoutError:
            return _result(name, False, "its results are being collected: try again")
        except (IllegalTransitionError, FileOperationError) as exc:
            return _result(name, False, str(exc))
        log.warning("job_cancelled", job=name, was=was.value, instance=instance)
        if was is JobState.QUEUED:
            return _result(name, True, "cancelled")
        return _result(name, True, f"cancelled; its run on instance {instance} is stopped")

    async def retry(self, names: list[str]) -> list[dict[str, Any]]:
        store = self.ctx.store
        results = []
        queued = []
        for name in names:
            try:
                async with asyncio.timeout(LOCK_WAIT_S):
                    await store.file_settled(name)  # an orphan's late results moving it
            except TimeoutError:
                results.append(_result(name, False, "its file is being moved: try again"))
                continue
            state = store.job_state(name)
            if state is None:
                results.append(await self._resubmit_refused(name))
                continue
            if state is not JobState.FAILED:
                results.append(_result(name, False, f"is {state.value}, not failed"))
                continue
            job = store.jobs.get(name)
            if job is not None:
                rows = job.rows
            else:
                record = await asyncio.to_thread(find_record, store.history_path, name)
                rows = record.rows if record is not None else 0
            try:
                st.retry_job(store, name, rows=rows)
            except (IllegalTransitionError, FileOperationError) as exc:
                results.append(_result(name, False, str(exc)))
                continue
            log.info("job_retried", job=name)
            queued.append(name)
            results.append(_result(name, True, "queued again"))
        if queued:
            self.ctx.wake_dispatch()
            if await store.flush():
                # Queued again, on disk: its failed/ files can go.
                for name in queued:
                    st.clear_earlier_failure(store, name)
                await store.flush()
        return results

    async def _resubmit_refused(self, name: str) -> dict[str, Any]:
        """A name with no job record: a file refused at acceptance (`failed/<name>.csv`)
        goes back to the inbox, where acceptance checks it again (it is refused again,
        with a fresh reason, if it still fails the checks)."""
        try:
            path = await asyncio.to_thread(resubmit_refused, self.ctx.layout, name)
        except FileOperationError as exc:
            return _result(name, False, f"cannot put it back in the inbox: {exc}")
        if path is None:
            return _result(name, False, "no such job")
        log.info("job_retried", job=name, refused=True, inbox=path.name)
        return _result(name, True, f"refused at acceptance: back in the inbox as {path.name}")

    def drain(self, instance_id: str, *, undrain: bool) -> dict[str, Any]:
        store = self.ctx.store
        inst = store.instances.get(instance_id)
        if inst is None or inst.status is InstanceStatus.DESTROYED:
            return _result(instance_id, False, "no such instance")
        if inst.status in st.GONE:
            return _result(instance_id, False, f"is {inst.status.value}")
        if not undrain:
            if inst.status is InstanceStatus.DRAINING:
                return _result(instance_id, True, f"already drained ({inst.drain_reason})")
            st.drain_instance(store, inst, st.MANUAL_DRAIN, requeue_jobs=False)
            running = len(inst.current_jobs)
            return _result(instance_id, True, f"drained; {running} running job(s) finish there")
        if inst.status is not InstanceStatus.DRAINING:
            return _result(instance_id, False, f"is {inst.status.value}, not drained")
        if inst.drain_reason not in (st.MANUAL_DRAIN, st.FAILING_DRAIN, *HEALTH_DRAINS):
            return _result(
                instance_id, False, f"drained by the daemon ({inst.drain_reason}): stays drained"
            )
        prepare_first = inst.prepared_hash is None or inst.resweep
        st.undrain_instance(store, inst, prepare_first=prepare_first)
        log.info("instance_undrained", instance=instance_id, status=inst.status.value)
        self.ctx.wake_dispatch()
        return _result(instance_id, True, "undrained")


def _error(why: str) -> dict[str, Any]:
    return {"ok": False, "error": why}


def _result(name: str, ok: bool, message: str) -> dict[str, Any]:
    return {"name": name, "ok": ok, "message": message}
