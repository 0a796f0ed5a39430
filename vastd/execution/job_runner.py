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
        # staged runs ([job] stage_ahead): the launcher, its claim, the link to the next
        "start.sh",
        "start.sh.tmp",
        "staged",
        "go",
        "withdrawn",
        "next",
        "next.tmp",
    }
)
_START_WAIT_TICKS = 40  # x 0.05 s: how long the start script waits for the pid file
_RUN_ID = re.compile(r"^[0-9a-f]{1,40}$")


def check_run_id(run_id: str | None) -> None:
    """Raise ValueError unless `run_id` is None or hex digits (it reaches the shell bare)."""
    if run_id is not None and not _RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r} must be hex digits")


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
        size: int | None = None,
    ) -> int: ...


@dataclass(frozen=True)
class ProcessInfo:
    """The remote job's process group; `started` is False when the same attempt was running.
    `staged`: the run waits on the instance for the one before it (no process yet: pid 0)."""

    pid: int
    pgid: int
    started: bool
    staged: bool = False


@dataclass(frozen=True)
class StagedAfter:
    """The run a staged run waits for on the same slot: its folder and run id."""

    paths: RemoteJobPaths
    run_id: str | None


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


# The boot key (boot id + start time of pid 1) into $BK, and a process's start time
# (field 22 of /proc/<pid>/stat, the 20th after its name) into $ST: builtins only.
_BOOTKEY_SH = r"""_starttime() {
  l=; read -r l 2>/dev/null < "/proc/$1/stat"
  set -- ${l##*) }
  ST=; [ $# -ge 20 ] && { shift 19; ST=$1; }
}
_bootkey() {
  b=; read -r b 2>/dev/null < /proc/sys/kernel/random/boot_id
  _starttime 1
  BK="$b:$ST"
}
"""
# Shell helpers shared by every script. `v` is the helpers' result variable.
SH_HELPERS = (
    r"""
M=__VASTD_BEGIN__
"""
    + _BOOTKEY_SH
    + r"""_pgid() {
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
)

# A staged run's folder holds `start.sh` (claim: `staged` -> `go`, then launch) and the
# folder of the run before it names it in `next`; whoever ends that run (its wrapper,
# vastd's kill) runs `start.sh` at once. The claim is one rename: a withdrawal
# (`staged` -> `withdrawn`) and a start can never both succeed.
# `start.sh` runs in a session of its own: a kill of this run's group (its clean-up)
# cannot cut it off between its claim and its launch.
# $VASTD_NOW, when set, is the instance's clock (`date +%s`) of a moment ago: the wrapper
# that has just read it for `ended_at` passes it on, and `start.sh` needs no fork of its own.
# $VASTD_FROM is the run id of the run that ended (its folder's `run`): `start.sh` starts
# only behind the run it was staged behind. A folder whose staged run was withdrawn still
# names it in `next`, and that job may since be staged again behind another run.
KICK_NEXT = (
    "[ -f next ] && { n=; read -r n < next; _fr=; read -r _fr < run 2>/dev/null; "
    '[ -n "$n" ] && cd "$n" 2>/dev/null '
    '&& VASTD_NOW="${_vt:-}" VASTD_FROM="$_fr" setsid sh ./start.sh > /dev/null 2>&1; }; true'
)
# A status command waiting for a run to end listens on a FIFO of its own,
# `<instance root>/wait.<its pid>` (process_monitor.build_status_script). Whoever writes a
# run's `exit_code` (its wrapper, vastd's kill) then writes a line into each such FIFO, so
# the wait ends at once, not at its next look. Opened read-write, a FIFO never blocks its
# opener (Linux), and one whose waiter is gone swallows the line. No fork: builtins only.
# From a job folder (the wrapper's cwd, also after KICK_NEXT's cd to a sibling folder).
WAITER_PREFIX = "wait."
WAKE_WAITERS = (
    f'for _f in ../../{WAITER_PREFIX}*; do [ -p "$_f" ] && {{ echo x >&9; }} 9<>"$_f"; '
    "done 2>/dev/null; true"
)
# <instance root>/lease holds the instance's clock (`date +%s`) of vastd's last look there:
# every status check (and staging) writes it, atomically.
LEASE_NAME = "lease"


def renew_lease(path: str) -> str:
    """Shell lines writing the instance's clock into the lease at `path` (atomically: a
    staged run reading it halfway would withdraw itself for nothing)."""
    p = shlex.quote(path)
    t = shlex.quote(path) + '".$$.tmp"'  # one per writer: two checks may overlap
    return f"{{ date +%s > {t} && mv -f {t} {p}; }} 2>/dev/null || rm -f {t}"


# The wrapper runs detached with the job folder as cwd and the command as $1.
# (`pid` is written by the start script from $!, which is this wrapper's pid.)
_WRAPPER = (
    # its own pid first: a start script cut off right after launching it (a dropped
    # channel) must not make the next start of the same run launch a second wrapper
    "[ -s pid ] || { echo $$ > pid.w.tmp && mv -f pid.w.tmp pid; }; "
    "date +%s > started_at.tmp && mv -f started_at.tmp started_at; "
    'sh -c "$1"; rc=$?; '
    # `ended_at` needs no rename: nothing reads it before `exit_code`, written after it
    "_vt=$(date +%s); echo $_vt > ended_at; "
    "echo $rc > exit_code.tmp && mv -f exit_code.tmp exit_code; "
    # a run staged behind this one ([job] stage_ahead) starts now, vastd connected or not;
    # what this run left behind in its group is told to go first (it holds the GPUs)
    '[ -f next ] && { trap "" TERM; kill -TERM -$$ 2>/dev/null; trap - TERM; }; '
    + KICK_NEXT
    # then vastd's waiting status command, if any, learns of the exit
    + "; "
    + WAKE_WAITERS
)


def as_sh_command(script: str) -> str:
    """A command line that runs `script` with /bin/sh whatever the login shell is."""
    return "sh -c " + shlex.quote(script)


# $! is the session (= process group) id: setsid does not fork outside job control.
# Launch the wrapper in its own session (cwd = the job folder; $W, $C, $NH set), wait
# until its group exists (a status check right after must find it), record its pid.
# The group is there 1-5 ms after the fork, on a quiet machine: the first wait is 2 ms,
# the next ones 10 ms. Each is a fork of `sleep`, so there is only one short one; and no
# spin on the builtin `kill -0`, which would take the CPU from the very child it waits
# for on a busy instance.
_LAUNCH = f"""setsid $NH sh -c "$W" vastd-job "$C" > {LOG_NAME} 2>&1 < /dev/null &
v=$!
n=0
while ! kill -0 -"$v" 2>/dev/null && [ ! -f exit_code ] && [ $n -lt 200 ]; do
  if [ $n = 0 ]; then _lw=0.002; else _lw=0.01; fi
  sleep $_lw 2>/dev/null || break; n=$((n+1))
done
[ -s pid ] || {{ printf '%s\\n' "$v" > pid.start.tmp && mv -f pid.start.tmp pid; }}
"""


def build_launcher(command: str, lease_s: float | None = None, after_run: str | None = None) -> str:
    """`start.sh` of a staged run: claim it (`staged` -> `go`; a withdrawn or already
    claimed run is left alone), then start the wrapper as a direct start does.

    With `lease_s`, a run whose instance vastd has not looked at for that long (the clock
    in the instance's `lease` file is older: vastd may have given its jobs to other
    instances meanwhile) withdraws itself instead of starting.

    With `after_run` (the run it is staged behind), a start by the end of another run
    (`$VASTD_FROM`, see KICK_NEXT) is refused: it leaves the run staged."""
    q = shlex.quote
    caller = ""
    if after_run is not None:
        check_run_id(after_run)
        caller = f'case ${{VASTD_FROM:-}} in ""|{after_run}) ;; *) exit 0 ;; esac\n'
    lease = ""
    if lease_s is not None:
        # no fork when the wrapper before passed its clock (see KICK_NEXT)
        lease = (
            f"l=; read -r l 2>/dev/null < ../../{LEASE_NAME}\n"
            'case $l in ""|*[!0-9]*) l=0 ;; esac\n'
            "t=${VASTD_NOW:-}\n"
            'case $t in ""|*[!0-9]*) t=$(date +%s) ;; esac\n'
            f"if [ $((t - l)) -ge {max(1, int(lease_s))} ]; then "
            "mv staged withdrawn 2>/dev/null; exit 0; fi\n"
        )
    # A staged run is started by the wrapper before it (already in a session of its own,
    # no terminal: nothing to `nohup`) or by vastd. The launch waits for the group and
    # writes the pid as a direct start does (the job does not wait for that): a wrapper
    # that stalls before writing its own pid must still be found by a later start of
    # the same run, or that start would launch the job a second time.
    # `go` holds the launcher's pid and start time until the wrapper's pid is in `pid`: a
    # start of the same run meanwhile (vastd's, when the launch seems stuck) waits while
    # that very process lives instead of launching a second wrapper. `boot_key` is this
    # boot's: the folder was made at staging, perhaps before the machine restarted.
    return (
        f"{caller}{lease}mv staged go 2>/dev/null || exit 0\n"
        f'{_BOOTKEY_SH}_starttime $$; echo "$$ $ST" > go\n'
        "_bootkey; printf '%s' \"$BK\" > boot_key\n"
        "unset VASTD_NOW VASTD_FROM\nNH=\n"
        f"W={q(_WRAPPER)}\nC={q(command)}\n{_LAUNCH}"
    )


def build_start_script(
    paths: RemoteJobPaths,
    command: str,
    attempt: int,
    run_id: str | None = None,
    *,
    after: StagedAfter | None = None,
    lease_s: float | None = None,
) -> str:
    """The idempotent start script; it prints the marker, then `started|existing PID`,
    `staged`, or `error …`.

    A second start of the same run (`run` file = `run_id`; without a run id, the same
    attempt) reports the existing pid and does nothing. Otherwise a still-running
    earlier run is killed, everything but the input is removed, `out/`, `attempt` and
    `run` are written, and the wrapper is started in its own session.

    With `after` (`[job] stage_ahead`), the run is staged instead: `start.sh` and
    `staged` are written, the folder of the run it follows names it in `next`, and it
    starts here only if that run has already ended (its folder gone or holding another
    run, `exit_code` written, or its group gone). Run again for a staged run, the
    script re-links it and starts it if that run has ended meanwhile.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    check_run_id(run_id)
    if after is not None:
        check_run_id(after.run_id)
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
    if after is None:
        staging = ""
        resume = ""
        launching = ""
        launch = f"""{_LAUNCH}printf '%s\\nstarted %s\\n' "$M" "$v"
"""
    else:
        pred_run = q(after.run_id) if after.run_id is not None else "''"
        renew = renew_lease(f"../../{LEASE_NAME}")
        staging = f"""PD={q(after.paths.job_dir)}
PR={pred_run}
_link() {{
  [ -d "$PD" ] || return 0
  printf '%s\\n' "$D" > "$PD/next.tmp" && mv -f "$PD/next.tmp" "$PD/next"
}}
_pred_done() {{
  [ -d "$PD" ] || return 0
  r=; read -r r 2>/dev/null < "$PD/run"
  [ -z "$PR" ] || [ "$r" = "$PR" ] || return 0
  _pgid "$PD/pid"
  [ -n "$v" ] && _alive "$PD" "$v" && return 1
  [ -f "$PD/exit_code" ] && return 0
  [ -f "$PD/staged" ] || [ -f "$PD/withdrawn" ] && return 1
  [ -n "$v" ] || return 1
  return 0
}}
_report() {{
  if [ -f staged ]; then printf '%s\\nstaged\\n' "$M"; exit 0; fi
  _waitpid; _pgid pid
  [ -n "$v" ] && {{ printf '%s\\nstarted %s\\n' "$M" "$v"; exit 0; }}
}}
"""
        # claimed, and its launcher (pid in `go`, this boot) still on its way: a second
        # launch now would run the job twice in one folder
        # (that very process: not a zombie, and the start time it wrote, against reuse)
        launching = """  if [ -f go ]; then
    gp=; gs=; read -r gp gs 2>/dev/null < go; k=; read -r k 2>/dev/null < boot_key
    case $gp in ''|*[!0-9]*) ;; *)
      if { [ -z "$k" ] || [ "$k" = "$BK" ]; } && kill -0 "$gp" 2>/dev/null \\
        && { [ ! -r /proc/self/stat ] || { _st "/proc/$gp/stat" && [ "$S" != Z ] \\
          && { [ -z "$gs" ] || { _starttime "$gp"; [ "$ST" = "$gs" ]; }; }; }; }; then
        printf '%s\\nstaged\\n' "$M"; exit 0
      fi ;;
    esac
  fi
"""
        resume = f"""  if [ -f staged ]; then
    {renew}
    _link || _fail "cannot link the run before"
    _pred_done && sh ./start.sh > /dev/null 2>&1
    _report
  fi
"""
        launch = f"""{renew}
printf '%s' "$LAUNCHER" > start.sh.tmp && mv -f start.sh.tmp start.sh || _fail "cannot write start.sh"
: > staged || _fail "cannot write staged"
_link || _fail "cannot link the run before"
_pred_done && sh ./start.sh > /dev/null 2>&1
_report
_fail "the staged run neither waits nor started"
"""
    launcher = ""
    if after is not None:
        # vastd is connected right now: the instance's lease is fresh
        # (not `S`: the helpers' `_st` sets S to a process's state, and `_alive` calls it)
        launcher = f"LAUNCHER={q(build_launcher(command, lease_s, after.run_id))}\n"
    return f"""{SH_HELPERS}
D={q(paths.job_dir)}
IN={q(input_name)}
A={attempt}
C={q(command)}
W={q(_WRAPPER)}
{launcher}_fail() {{ printf '%s\\nerror %s\\n' "$M" "$1"; exit 1; }}
_waitpid() {{ n=0; while [ ! -s pid ] && [ $n -lt {_START_WAIT_TICKS} ]; do _tick 0.05; n=$((n+1)); done; }}
{staging}cd "$D" 2>/dev/null || _fail "cannot enter the job folder"
command -v setsid >/dev/null 2>&1 || _fail "setsid not found on the instance"
NH=nohup; command -v nohup >/dev/null 2>&1 || NH=
if {same}; then
{resume}  _waitpid
  _pgid pid
  if [ -n "$v" ]; then printf '%s\\nexisting %s\\n' "$M" "$v"; exit 0; fi
{launching}fi
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
{write_run}{launch}"""


def marker_lines(stdout: str) -> list[str] | None:
    """The lines after the last marker line, or None when the marker is absent."""
    lines = stdout.splitlines()
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].strip() == MARKER:
            return lines[index + 1 :]
    return None


def failure_text(result: RemoteResult, limit: int = 500) -> str:
    """A command that failed, for an error message: its exit status and its stderr's end
    (said to be empty, not left blank: the reason is then the status alone)."""
    status = "no exit status" if result.exit_status is None else f"exit {result.exit_status}"
    tail = result.stderr[-limit:].strip()
    return f"{status}: {tail}" if tail else f"{status}, nothing on stderr"


async def upload_job_file(
    conn: RemoteRunner, local_csv: Path, paths: RemoteJobPaths, *, timeout_s: float
) -> None:
    """Create the job folder and put the CSV there (never partial under its final name)."""
    await conn.makedirs(paths.job_dir, timeout_s=timeout_s)
    # The upload itself goes to a temp name and renames (SSHConnection.upload).
    await conn.upload(local_csv, paths.input, timeout_s=timeout_s)


_START_LINE = re.compile(r"^(started|existing) ([0-9]+)$")
_STAGED_LINE = "staged"


async def start_job_process(
    conn: RemoteRunner,
    paths: RemoteJobPaths,
    command: str,
    attempt: int,
    *,
    timeout_s: float,
    run_id: str | None = None,
    after: StagedAfter | None = None,
    lease_s: float | None = None,
) -> ProcessInfo:
    """Start `command` detached (idempotent per run), or stage it `after` a run on the
    same slot (`staged` in the answer; `lease_s`: see build_launcher); JobExecutionError
    if it cannot."""
    script = build_start_script(paths, command, attempt, run_id, after=after, lease_s=lease_s)
    result = await conn.run(as_sh_command(script), timeout_s=timeout_s)
    lines = marker_lines(result.stdout)
    if lines:
        first = lines[0].strip()
        if first == _STAGED_LINE and after is not None:
            return ProcessInfo(pid=0, pgid=0, started=False, staged=True)
        match = _START_LINE.match(first)
        if match:
            pid = int(match.group(2))
            return ProcessInfo(pid=pid, pgid=pid, started=match.group(1) == "started")
        if first.startswith("error "):
            raise JobExecutionError(f"job start failed: {first[6:]}")
    raise JobExecutionError(f"job start script gave no answer ({failure_text(result)})")


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
    after: StagedAfter | None = None,
    lease_s: float | None = None,
) -> ProcessInfo:
    """Upload the job's CSV and start its command (run `run_id`); the seed's composite.
    `gpus`: the GPU indices the run was given, as CUDA_VISIBLE_DEVICES and `{gpus}`.
    `after`: stage it behind that run of the same slot (`[job] stage_ahead`)."""
    paths = remote_job_paths(remote_root, instance_id, job_id)
    command = generate_job_command(
        command_template, paths=paths, job_id=job_id, vars=vars, gpus=gpus
    )
    command = with_gpu_env(command, gpus)
    await upload_job_file(conn, local_csv, paths, timeout_s=timeout_s)
    return await start_job_process(
        conn,
        paths,
        command,
        attempt,
        timeout_s=timeout_s,
        run_id=run_id,
        after=after,
        lease_s=lease_s,
    )


_WITHDRAW_LINE = re.compile(r"^W ([0-9]+) (withdrawn|started|gone|other)$")


def build_withdraw_script(entries: Sequence[tuple[RemoteJobPaths, str | None]]) -> str:
    """Withdraw staged runs, in the order given (the caller lists a slot's later runs
    first). Prints `W <index> withdrawn|started|gone|other` per entry: `started` when
    the run was claimed first (it runs), `other` when the folder holds another run."""
    lines = ["M=__VASTD_BEGIN__", 'printf "%s\\n" "$M"']
    for index, (paths, run_id) in enumerate(entries):
        check_run_id(run_id)
        d = shlex.quote(paths.job_dir)
        run_check = (
            f'elif r=; read -r r 2>/dev/null < {d}/run; [ "$r" != {run_id} ]; then w=other\n'
            if run_id is not None
            else ""
        )
        lines.append(
            f"if [ ! -d {d} ]; then w=gone\n"
            f"{run_check}"
            f"elif mv {d}/staged {d}/withdrawn 2>/dev/null || [ -f {d}/withdrawn ]; then w=withdrawn\n"
            "else w=started\n"
            "fi\n"
            f'printf "W {index} %s\\n" "$w"'
        )
    return "\n".join(lines) + "\n"


async def withdraw_staged_runs(
    conn: RemoteRunner,
    entries: Sequence[tuple[str, RemoteJobPaths, str | None]],
    *,
    timeout_s: float,
) -> dict[str, str]:
    """Withdraw staged runs that have not started (one round trip); by job id:
    `withdrawn` (it will never start), `started` (it had been claimed: it runs),
    `gone` (no folder) or `other` (another run's folder). Absent: no answer for it."""
    if not entries:
        return {}
    script = build_withdraw_script([(paths, run) for _job, paths, run in entries])
    result = await conn.run(as_sh_command(script), timeout_s=timeout_s)
    answers: dict[str, str] = {}
    for line in marker_lines(result.stdout) or []:
        match = _WITHDRAW_LINE.match(line.strip())
        if match and int(match.group(1)) < len(entries):
            answers[entries[int(match.group(1))][0]] = match.group(2)
    return answers
