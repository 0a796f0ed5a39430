"""Validation of downloaded results, outside the daemon's process.

A result file comes from a stranger's machine: a 12.6 kB parquet file can hold one
400 MB zero-filled value, and decoding it in the daemon once took the daemon from
73 MB to 865 MB (32 collections at once could kill it, and it would validate the same
file again after the restart). So the daemon never decodes a result itself:

- `validate_results` runs `python -m vastd.execution.validate` (this module's `main`)
  on the downloaded files, with a request on stdin and one JSON answer on stdout. The
  child limits its own address space (RLIMIT_AS: what it needed at start-up plus
  `[job] validate_memory_mb`) before it opens any file, and the daemon kills it past
  `[job] validate_timeout_s`. A child that runs out of memory, is killed, crashes or
  answers nothing fails the attempt with a reason that says so; the daemon itself is
  never touched, so a restart that validates the same file again does no harm either.
- At most `MAX_CONCURRENT_VALIDATIONS` children run at once (per event loop), so
  many collections at once cannot add up to many limits' worth of memory.
- `run_validate_command` runs `[job] validate_command` (a user's checker, for formats
  vastd does not know) in the downloaded folder, with the same deadline; exit 0 =
  valid. Its whole process group is killed at the deadline.

"parquet" validation: every batch of every file is decoded (corrupt pages only show
when decoded), the rows read must equal the footer's count, each file needs >= 1 row.
With `[job] row_key`, the distinct values of that column over all files are counted:
the result is complete iff that count equals the job CSV's data rows (the caller
compares; the GARCH scripts write one `job_row` per CSV row).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vastd.utils.exceptions import ConfigError, ResultValidationError

# Each child may take its memory limit on top of its start-up (about 100 MB resident);
# this bounds what validations can take from the machine the daemon runs on.
MAX_CONCURRENT_VALIDATIONS = 4
_ANSWER_MAX_BYTES = 1 << 20  # the child's answer is one short JSON line
_STDERR_TAIL_BYTES = 2000
_BATCH_ROWS = 4096  # small batches: a legitimate wide file never needs much memory
_KILL_WAIT_S = 5.0
_KINDS = ("parquet", "none")
_SECRET_ENV = frozenset({"VASTD_VAST__API_KEY", "VAST_API_KEY"})

_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _validation_slots() -> asyncio.Semaphore:
    """The running loop's semaphore (tests run many loops; a semaphore binds to one)."""
    loop = asyncio.get_running_loop()
    slots = _slots.get(loop)
    if slots is None:
        slots = _slots[loop] = asyncio.Semaphore(MAX_CONCURRENT_VALIDATIONS)
    return slots


@dataclass(frozen=True)
class ValidationReport:
    """What the validator found: rows over all files and, with a row key, its distinct
    values over all files (None without one)."""

    rows: int
    keys: int | None = None


# ---------------------------------------------------------------------------------------
# The daemon's side


async def validate_results(
    files: Sequence[Path],
    kind: str,
    *,
    row_key: str = "",
    memory_mb: int,
    timeout_s: float,
) -> ValidationReport:
    """Validate `files` in a child process limited to `memory_mb` (beyond its start-up)
    and `timeout_s`. Raises ResultValidationError with the reason (the attempt fails)."""
    if kind not in _KINDS:
        raise ConfigError([f"job.validate: unknown kind {kind!r}"])
    if kind == "none" or not files:
        return ValidationReport(rows=0)
    request = {
        "kind": kind,
        "row_key": row_key,
        "memory_mb": memory_mb,
        "files": [str(p) for p in files],
    }
    async with _validation_slots():
        code, out, err = await _run_child(
            [sys.executable, "-m", "vastd.execution.validate"],
            json.dumps(request).encode(),
            timeout_s=timeout_s,
            what="the result validator",
        )
    return _read_answer(code, out, err, memory_mb)


def _read_answer(code: int | None, out: bytes, err: bytes, memory_mb: int) -> ValidationReport:
    """The child's verdict, or why there is none (killed, out of memory, crashed)."""
    if code is not None and code < 0:
        name = _signal_name(-code)
        hint = (
            f" (memory limit {memory_mb} MB)" if -code in (signal.SIGKILL, signal.SIGSEGV) else ""
        )
        raise ResultValidationError(f"the result validator was killed by {name}{hint}")
    try:
        answer = json.loads(out.decode("utf-8", errors="replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        answer = None
    if not isinstance(answer, dict):
        tail = err.decode("utf-8", errors="replace").strip()[-300:]
        if "MemoryError" in tail:
            raise ResultValidationError(
                f"the result validator ran out of memory (limit {memory_mb} MB)"
            )
        raise ResultValidationError(
            f"the result validator exited {code} without an answer: {tail or '(no output)'}"
        )
    if not answer.get("ok"):
        raise ResultValidationError(str(answer.get("error", "invalid results"))[:1000])
    rows, keys = answer.get("rows"), answer.get("keys")
    if not isinstance(rows, int) or not (keys is None or isinstance(keys, int)):
        raise ResultValidationError("the result validator gave a malformed answer")
    return ValidationReport(rows=rows, keys=keys)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


async def run_validate_command(command: str, folder: Path, *, timeout_s: float) -> None:
    """Run `[job] validate_command` with `/bin/sh -c` in `folder` (also in env
    VASTD_RESULT_DIR); exit 0 = valid, anything else (or the deadline) fails the attempt."""
    async with _validation_slots():
        code, out, err = await _run_child(
            ["/bin/sh", "-c", command],
            b"",
            timeout_s=timeout_s,
            what="validate_command",
            cwd=folder,
            env={"VASTD_RESULT_DIR": str(folder)},
        )
    if code != 0:
        said = (err.strip() or out.strip()).decode("utf-8", errors="replace")[-300:]
        how = (
            f"was killed by {_signal_name(-code)}"
            if code is not None and code < 0
            else f"exited {code}"
        )
        raise ResultValidationError(f"validate_command {how}" + (f": {said}" if said else ""))


def _child_env(extra: dict[str, str] | None) -> dict[str, str]:
    """The daemon's environment less the API key, with vastd importable and few threads
    per library (each thread's reserved memory counts against the child's address-space
    limit)."""
    # Never the API key: a validate_command is not the place for it.
    env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, "1")
    env.setdefault("MALLOC_ARENA_MAX", "2")
    env.update(extra or {})
    return env


async def _run_child(
    argv: list[str],
    stdin: bytes,
    *,
    timeout_s: float,
    what: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int | None, bytes, bytes]:
    """Run a child in its own process group; (exit code, stdout head, stderr tail).

    Past `timeout_s`, or when the caller is cancelled, the whole group is killed and
    reaped: a validator never outlives the collection that started it.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=_child_env(env),
        start_new_session=True,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(timeout_s):
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(stdin)
                await proc.stdin.drain()
                proc.stdin.close()
            out, err = await asyncio.gather(
                _read_head(proc.stdout, _ANSWER_MAX_BYTES), _read_tail(proc.stderr)
            )
            code = await proc.wait()
    except TimeoutError:
        raise ResultValidationError(f"{what} ran past its deadline of {timeout_s:g}s") from None
    finally:
        if proc.returncode is None:
            _kill_group(proc.pid)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_KILL_WAIT_S):
                    await proc.wait()
    return code, out, err


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def _read_head(stream: asyncio.StreamReader, cap: int) -> bytes:
    """The first `cap` bytes of `stream`; the rest is read and dropped."""
    kept = bytearray()
    while chunk := await stream.read(65536):
        if len(kept) < cap:
            kept += chunk[: cap - len(kept)]
    return bytes(kept)


async def _read_tail(stream: asyncio.StreamReader) -> bytes:
    tail = b""
    while chunk := await stream.read(65536):
        tail = (tail + chunk)[-_STDERR_TAIL_BYTES:]
    return tail


# ---------------------------------------------------------------------------------------
# The child's side (`python -m vastd.execution.validate`)


def _address_space_bytes() -> int:
    """This process's current virtual size (VmSize), 0 when /proc cannot tell."""
    with (
        contextlib.suppress(OSError, ValueError),
        open("/proc/self/status", encoding="ascii", errors="replace") as handle,
    ):
        for line in handle:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def limit_memory(memory_mb: int) -> None:
    """Cap this process's address space at what it uses now plus `memory_mb`: past it,
    allocations fail (MemoryError) instead of growing without bound."""
    limit = _address_space_bytes() + memory_mb * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def check_parquet(path: Path, row_key: str, keys: set[Any] | None) -> int:
    """Rows of one parquet file, decoded to the end; adds `row_key`'s values to `keys`."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except MemoryError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ValueError, ...
        raise ResultValidationError(f"{path.name}: not a readable parquet file: {exc}") from None
    rows = 0
    try:
        expected = int(parquet.metadata.num_rows)
        if row_key and row_key not in parquet.schema_arrow.names:
            raise ResultValidationError(f"{path.name}: has no column {row_key!r} ([job] row_key)")
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, use_threads=False):
            rows += batch.num_rows
            if keys is not None:
                keys.update(pc.unique(batch.column(row_key)).to_pylist())
    except (MemoryError, ResultValidationError):
        raise
    except Exception as exc:
        raise ResultValidationError(f"{path.name}: not a readable parquet file: {exc}") from None
    finally:
        parquet.close()
    if rows != expected:
        raise ResultValidationError(f"{path.name}: {rows} rows read, metadata says {expected}")
    if rows < 1:
        raise ResultValidationError(f"{path.name}: has no rows")
    return rows


def check_files(files: Sequence[Path], row_key: str) -> ValidationReport:
    """Every file checked (`check_parquet`); rows summed, row keys counted over all."""
    keys: set[Any] | None = set() if row_key else None
    rows = 0
    for path in files:
        if not path.is_file() or path.is_symlink():
            raise ResultValidationError(f"{path.name}: not a regular file")
        rows += check_parquet(path, row_key, keys)
    return ValidationReport(rows=rows, keys=None if keys is None else len(keys))


def main() -> int:
    """Read a request from stdin, validate, print one JSON answer; exit 0 when answered."""
    request = json.loads(sys.stdin.read())
    # Loaded before the limit: the libraries' start-up is not the file's to pay for.
    import pyarrow.compute
    import pyarrow.parquet

    del pyarrow

    limit_memory(int(request["memory_mb"]))
    files = [Path(p) for p in request["files"]]
    try:
        report = check_files(files, str(request.get("row_key") or ""))
    except ResultValidationError as exc:
        answer: dict[str, Any] = {"ok": False, "error": str(exc)}
    except MemoryError as exc:
        answer = {
            "ok": False,
            "error": f"decoding the results needs more than the validator's "
            f"{request['memory_mb']} MB ([job] validate_memory_mb): {str(exc)[:200]}",
        }
    else:
        answer = {"ok": True, "rows": report.rows, "keys": report.keys}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
