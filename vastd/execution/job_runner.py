"""The remote job folder, the wrapper, and the detached start of a job (docs/ARCHITECTURE.md: "Remote layout").

Remote layout: `<remote root>/<instance id>/jobs/<safe job>/` holds the input CSV
(`<safe job>.csv`, the GARCH script writes its parquet beside it), `out/`,
`log.txt` (stdout+stderr), `pid` (= the process-group id), `attempt`, `run` (the
run id: the start, the status and the collection are keyed by it, so a new run never
reattaches to, or collects, an older run's folder), `boot_key`, `started_at`,
`ended_at` and `exit_code` (written last, atomically).

The seed's `create_job_log_file` is folded into the start script: the script's
redirection creates `log.txt`. Every script is POSIX sh, run as `sh -c '<script>'`
through the login shell, and prints `__VASTD_BEGIN__` before the lines that are
parsed, so login junk is skipped. Every path, id and value reaches the shell
through `shlex.quote`; nothing secret goes into argv or the environment.

`boot_key` (boot id + start time of pid 1) is recorded at start so that a pid read
after a reboot or a container restart is never mistaken for, or killed as, the job.
`kill -0` also succeeds for zombies, which pile up where pid 1 does not reap
orphans: a group counts as alive only with a non-zombie member (`/proc/*/stat`).
Note: dash's builtin `kill` takes no `--`, so groups are signalled as `kill -SIG -PGID`,
and a pgid must be a number > 1 (`kill -9 -1` would signal everything).
"""

from __future__ import annotations

import posixpath
import re
import shlex
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vastd.core.gpus import gpu_list
from vastd.core.remote_layout import LOG_NAME as LOG_NAME
from vastd.core.remote_layout import OUT_NAME as OUT_NAME
from vastd.core.remote_layout import RemoteJobPaths as RemoteJobPaths
from vastd.core.remote_layout import instance_root as instance_root
from vastd.core.remote_layout import is_job_dir_of as is_job_dir_of
from vastd.core.remote_layout import remote_job_paths as remote_job_paths
from vastd.utils.exceptions import ConfigError, JobExecutionError

MARKER = "__VASTD_BEGIN__"
# Files the wrapper and vastd keep in a job folder: never results.
CONTROL_NAMES = frozenset(
    {
        LOG_NAME,
        OUT_NAME,
        "pid",
        "pid.tmp",
        "pid.start.tmp",
        "pid.w.tmp",
        "attempt",
        "attempt.tmp",
        "run",
        "run.tmp",
        "boot_key",
        "started_at",
        "started_at.tmp",
        "ended_at",
        "ended_at.tmp",
        "exit_code",
        "exit_code.tmp",
        "timed_out",
    }
)
_START_WAIT_TICKS = 40  # x 0.05 s: how long the start script waits for the pid file
_RUN_ID = re.compile(r"^[0-9a-f]{1,40}$")


class RemoteResult(Protocol):
    """What `RemoteRunner.run` returns (vastd.core.ssh.CommandResult fits)."""

    @property
    def exit_status(self) -> int | None: ...
    @property
    def stdout(self) -> str: ...
    @property
    def stderr(self) -> str: ...
    @property
    def ok(self) -> bool: ...


class RemoteRunner(Protocol):
    """The operations the execution layer needs (vastd.core.ssh.SSHConnection fits).

    `run` raises SSHConnectionError / RemoteCommandTimeout on transport problems;
    `download` writes via `<local>.part` and refuses files past `max_bytes`.
    """

    async def run(
        self, command: str, *, timeout_s: float, input: str | None = None
    ) -> RemoteResult: ...

    async def upload(self, local_path: Path, remote_path: str, *, timeout_s: float) -> None: ...

    async def makedirs(self, remote_path: str, *, timeout_s: float) -> None: ...

    async def download(
        self,
        remote_path: str,
        local_path: Path,
        *,
        timeout_s: float,
        max_bytes: int | None = None,
    ) -> int: ...


@dataclass(frozen=True)
class ProcessInfo:
    """The remote job's process group; `started` is False when the same attempt was running."""

    pid: int
    pgid: int
    started: bool


def generate_job_command(
    template: str,
    *,
    paths: RemoteJobPaths,
    job_id: str,
    vars: dict[str, str],
    gpus: Sequence[int] = (),
) -> str:
    """`[job] command` with every placeholder replaced by its shell-quoted value.

    `{{` and `}}` are literal braces (str.format rules). Values are never parsed
    again, so a `{` or `$(...)` inside a value stays inert. An unknown placeholder,
    a conversion or a format spec is a ConfigError.
    """
    values: dict[str, str] = {
        "input": paths.input,
        "job_dir": paths.job_dir,
        "output_dir": paths.out_dir,
        "job": job_id,
        "gpus": gpu_list(gpus),
    }
    clashes = sorted(set(vars) & set(values))
    if clashes:
        raise ConfigError([f"job.vars.{k}: clashes with a built-in placeholder" for k in clashes])
    values.update(vars)
    parts: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError([f"job.command: {exc}"]) from None
    for literal, field, spec, conversion in parsed:
        parts.append(literal)
        if field is None:
            continue
        if field not in values:
            raise ConfigError([f"job.command: unknown placeholder {{{field}}}"])
        if spec or conversion:
            raise ConfigError([f"job.command: placeholder {{{field}}} takes no format or !conv"])
        parts.append(shlex.quote(values[field]))
    return "".join(parts)


def with_gpu_env(command: str, gpus: Sequence[int]) -> str:
    """The job's command with its GPUs exported as CUDA_VISIBLE_DEVICES (one job per
    GPU); unchanged without GPUs, so the job sees every GPU as before."""
    if not gpus:
        return command
    return f"CUDA_VISIBLE_DEVICES={shlex.quote(gpu_list(gpus))}; export CUDA_VISIBLE_DEVICES\n{command}"


# Shell helpers shared by every script. `v` is the helpers' result variable.
SH_HELPERS = r"""
M=__VASTD_BEGIN__
_bootkey() {
  b=; read -r b 2>/dev/null < /proc/sys/kernel/random/boot_id
  l=; read -r l 2>/dev/null < /proc/1/stat
  set -- ${l##*) }
  s=; [ $# -ge 20 ] && { shift 19; s=$1; }
  BK="$b:$s"
}
_pgid() {
  v=; read -r v 2>/dev/null < "$1"
  case $v in ''|*[!0-9]*|0*|1) v= ;; esac
}
_st() {
  l=; read -r l 2>/dev/null < "$1" || [ -n "$l" ] || return 1
  r=${l##*) }; set -- $r; S=$1; G=$3
}
_live_member() {
  [ -r /proc/self/stat ] || return 0
  _st "/proc/$1/stat" && [ "$G" = "$1" ] && [ "$S" != Z ] && return 0
  for f in /proc/[0-9]*/stat; do
    _st "$f" && [ "$G" = "$1" ] && [ "$S" != Z ] && return 0
  done
  return 1
}
_alive() {
  [ -n "$2" ] || return 1
  k=; read -r k 2>/dev/null < "$1/boot_key"
  [ -z "$k" ] || [ "$k" = "$BK" ] || return 1
  kill -0 -"$2" 2>/dev/null && _live_member "$2"
}
_num() {
  if [ ! -f "$1" ]; then v=-; return; fi
  v=; x=; { read -r v; read -r x; } 2>/dev/null < "$1"
  [ -z "$x" ] || { v='!'; return; }
  case $v in [+-]*) w=${v#?} ;; *) w=$v ;; esac
  case $w in ''|*[!0-9]*) v='!' ;; esac
}
FRAC=1
_tick() { sleep "$1" 2>/dev/null || { FRAC=0; sleep 1; }; }
_bootkey  # sets BK without a subshell
"""

# The wrapper runs detached with the job folder as cwd and the command as $1.
# (`pid` is written by the start script from $!, which is this wrapper's pid.)
_WRAPPER = (
    # its own pid first: a start script cut off right after launching it (a dropped
    # channel) must not make the next start of the same run launch a second wrapper
    "[ -s pid ] || { echo $$ > pid.w.tmp && mv -f pid.w.tmp pid; }; "
    "date +%s > started_at.tmp && mv -f started_at.tmp started_at; "
    'sh -c "$1"; rc=$?; '
    "date +%s > ended_at.tmp && mv -f ended_at.tmp ended_at; "
    "echo $rc > exit_code.tmp && mv -f exit_code.tmp exit_code"
)


def as_sh_command(script: str) -> str:
    """A command line that runs `script` with /bin/sh whatever the login shell is."""
    return "sh -c " + shlex.quote(script)


def build_start_script(
    paths: RemoteJobPaths, command: str, attempt: int, run_id: str | None = None
) -> str:
    """The idempotent start script; it prints the marker, then `started|existing PID` or `error …`.

    A second start of the same run (`run` file = `run_id`; without a run id, the same
    attempt) reports the existing pid and does nothing. Otherwise a still-running
    earlier run is killed, everything but the input is removed, `out/`, `attempt` and
    `run` are written, and the wrapper is started in its own session.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    if run_id is not None and not _RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r} must be hex digits")
    q = shlex.quote
    same = (
        f'[ "$(head -c 40 run 2>/dev/null)" = {run_id} ]'
        if run_id is not None
        else '[ "$(head -c 32 attempt 2>/dev/null)" = "$A" ]'
    )
    write_run = (
        f"printf '%s\\n' {run_id} > run.tmp && mv -f run.tmp run || _fail \"cannot write run\"\n"
        if run_id is not None
        else ""
    )
    input_name = posixpath.basename(paths.input)
    return f"""{SH_HELPERS}
D={q(paths.job_dir)}
IN={q(input_name)}
A={attempt}
C={q(command)}
W={q(_WRAPPER)}
_fail() {{ printf '%s\\nerror %s\\n' "$M" "$1"; exit 1; }}
_waitpid() {{ n=0; while [ ! -s pid ] && [ $n -lt {_START_WAIT_TICKS} ]; do _tick 0.05; n=$((n+1)); done; }}
cd "$D" 2>/dev/null || _fail "cannot enter the job folder"
command -v setsid >/dev/null 2>&1 || _fail "setsid not found on the instance"
NH=nohup; command -v nohup >/dev/null 2>&1 || NH=
if {same}; then
  _waitpid
  _pgid pid
  if [ -n "$v" ]; then printf '%s\\nexisting %s\\n' "$M" "$v"; exit 0; fi
fi
_pgid pid
if [ -n "$v" ] && _alive . "$v"; then
  kill -KILL -"$v" 2>/dev/null
  n=0; while _alive . "$v" && [ $n -lt 40 ]; do _tick 0.05; n=$((n+1)); done
  _alive . "$v" && _fail "an earlier run (group $v) survives SIGKILL"
fi
for f in * .[!.]* ..?*; do
  [ -e "$f" ] || [ -L "$f" ] || continue
  [ "$f" = "$IN" ] && continue
  rm -rf -- "$f" || _fail "cannot clear the job folder"
done
[ -f "$IN" ] || _fail "the input file is missing"
mkdir out || _fail "cannot create out/"
printf '%s' "$BK" > boot_key || _fail "cannot write boot_key"
printf '%s\\n' "$A" > attempt.tmp && mv -f attempt.tmp attempt || _fail "cannot write attempt"
{write_run}setsid $NH sh -c "$W" vastd-job "$C" > {LOG_NAME} 2>&1 < /dev/null &
# $! is the session (= process group) id: setsid does not fork outside job control.
# The group exists only once the child has called setsid: wait for that (usually at once),
# or a status check right after could find no group and call the job vanished.
v=$!
n=0
while ! kill -0 -"$v" 2>/dev/null && [ ! -f exit_code ] && [ $n -lt 200 ]; do _tick 0.01; n=$((n+1)); done
[ -s pid ] || {{ printf '%s\\n' "$v" > pid.start.tmp && mv -f pid.start.tmp pid; }}
printf '%s\\nstarted %s\\n' "$M" "$v"
"""


def marker_lines(stdout: str) -> list[str] | None:
    """The lines after the last marker line, or None when the marker is absent."""
    lines = stdout.splitlines()
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].strip() == MARKER:
            return lines[index + 1 :]
    return None


def _tail(text: str, limit: int = 500) -> str:
    return text[-limit:].strip()


async def upload_job_file(
    conn: RemoteRunner, local_csv: Path, paths: RemoteJobPaths, *, timeout_s: float
) -> None:
    """Create the job folder and put the CSV there (never partial under its final name)."""
    await conn.makedirs(paths.job_dir, timeout_s=timeout_s)
    # The upload itself goes to a temp name and renames (SSHConnection.upload).
    await conn.upload(local_csv, paths.input, timeout_s=timeout_s)


_START_LINE = re.compile(r"^(started|existing) ([0-9]+)$")


async def start_job_process(
    conn: RemoteRunner,
    paths: RemoteJobPaths,
    command: str,
    attempt: int,
    *,
    timeout_s: float,
    run_id: str | None = None,
) -> ProcessInfo:
    """Start `command` detached (idempotent per run); JobExecutionError if it cannot."""
    script = build_start_script(paths, command, attempt, run_id)
    result = await conn.run(as_sh_command(script), timeout_s=timeout_s)
    lines = marker_lines(result.stdout)
    if lines:
        first = lines[0].strip()
        match = _START_LINE.match(first)
        if match:
            pid = int(match.group(2))
            return ProcessInfo(pid=pid, pgid=pid, started=match.group(1) == "started")
        if first.startswith("error "):
            raise JobExecutionError(f"job start failed: {first[6:]}")
    raise JobExecutionError(
        f"job start script gave no answer (exit {result.exit_status}): {_tail(result.stderr)}"
    )


async def execute_job_on_instance(
    conn: RemoteRunner,
    *,
    remote_root: str,
    instance_id: str,
    job_id: str,
    local_csv: Path,
    command_template: str,
    vars: dict[str, str],
    attempt: int,
    timeout_s: float,
    run_id: str | None = None,
    gpus: Sequence[int] = (),
) -> ProcessInfo:
    """Upload the job's CSV and start its command (run `run_id`); the seed's composite.
    `gpus`: the GPU indices the run was given, as CUDA_VISIBLE_DEVICES and `{gpus}`."""
    paths = remote_job_paths(remote_root, instance_id, job_id)
    command = generate_job_command(
        command_template, paths=paths, job_id=job_id, vars=vars, gpus=gpus
    )
    command = with_gpu_env(command, gpus)
    await upload_job_file(conn, local_csv, paths, timeout_s=timeout_s)
    return await start_job_process(
        conn, paths, command, attempt, timeout_s=timeout_s, run_id=run_id
    )
