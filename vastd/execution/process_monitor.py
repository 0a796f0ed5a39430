"""One batched status command per instance, completion from `exit_code`, timeouts.

Completion is judged only from the job folder: `exit_code` (written by the wrapper)
and whether the process group still has members. `ps` output and log keywords are
never used for that.

Status output, after the marker, one line per entry, keyed by the entry's index
(job ids are never echoed: they may hold newlines):

    J <index> <exists 0|1> <pgid|-> <alive 0|1> <exit_code> <started_at> <ended_at>
      <log_size> <attempt> <timed_out 0|1> <run>

where a number field is `-` when its file is absent and `!` when it holds garbage,
and `run` is the folder's run id (`-` when absent or not hex). With progress asked
for (`[job] progress_regex`), an existing entry's line is followed by

    P <index>
    <the last PROGRESS_TAIL_BYTES of log.txt, as od hex lines>
    Q <index>

and the regex is matched here, on those bytes: the user's pattern never reaches the
remote shell, and the log's text (hex) can never pass for a status line.
`log_size` is always `-`: measuring it costs two processes per job and cycle, and
the cycle runs on every instance every few seconds. Every read is a shell builtin.

With a listing asked for (the collection's, `result_handler.listing_function`), the
line of an entry whose exit code is 0 (the first `LISTINGS_PER_STATUS` of them, of the
entries allowed) is followed by

    L <index>
    <the folder's listing: R, P, F, END or MORE, nodir lines>
    K <index>

once per run's exit, not per cycle: a subshell, and `wc`, `od` and `tr` for the log's
size and odd names, at most `result_handler.STATUS_LISTING_NAMES` names.
"""

from __future__ import annotations

import contextlib
import math
import re
import shlex
from collections.abc import Container
from dataclasses import dataclass
from enum import StrEnum

from vastd.execution.job_runner import (
    KICK_NEXT,
    SH_HELPERS,
    WAITER_PREFIX,
    WAKE_WAITERS,
    RemoteJobPaths,
    RemoteRunner,
    as_sh_command,
    marker_lines,
    renew_lease,
)
from vastd.utils.exceptions import JobExecutionError

_TICK_S = 0.2
# A wait woken through its FIFO (job_runner.WAKE_WAITERS) still looks this often: for a
# run that ends without its wrapper (killed, the machine rebooted).
WAKE_LOOK_S = 1.0
TIMEOUT_EXIT_CODE = 124
PROGRESS_TAIL_BYTES = 2048  # of log.txt, per job and status check, when progress is asked for


@dataclass(frozen=True)
class RemoteJobStatus:
    """What the job folder says about a job; `exists` is False when the folder is absent."""

    job_id: str
    exists: bool
    pid: int | None = None
    alive: bool = False
    exit_code: int | None = None
    exit_code_invalid: bool = False
    started_at: float | None = None
    ended_at: float | None = None
    log_size: int | None = None
    attempt: int | None = None
    timed_out: bool = False
    run: str | None = None  # the run id the folder holds
    # a staged run ([job] stage_ahead): "staged" while it waits, "withdrawn" once vastd
    # took it back; None once it was claimed (started) or for a run started directly
    stage: str | None = None
    progress_rows: int | None = None  # group 1 of the last log line matching the progress regex
    # the folder's listing (the lines of `result_handler.listing_function`), asked for with
    # the status and printed for a run that exited 0
    listing: tuple[str, ...] | None = None


class CompletionStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    VANISHED = "vanished"
    INVALID = "invalid"
    MISSING = "missing"


@dataclass(frozen=True)
class KillOutcome:
    """`was_alive`: the group had members; `still_alive`: it survived SIGKILL."""

    was_alive: bool
    still_alive: bool
    exit_code_written: bool


def _progress_report(index: int) -> str:
    # Two processes (tail, od), only when progress is asked for; hex cannot fake a J line.
    return (
        f"  printf 'P {index}\\n'\n"
        f'  tail -c {PROGRESS_TAIL_BYTES} "$d/log.txt" 2>/dev/null | od -An -v -tx1\n'
        f"  printf 'Q {index}\\n'\n"
    )


LISTINGS_PER_STATUS = 4  # folders listed by one status command (each a capped listing)


def _listing_report(index: int) -> str:
    # `_list` is the listing function given to build_status_script; `lc` counts its calls
    return (
        f'  if [ "$e" = 0 ] && [ "$lc" -lt {LISTINGS_PER_STATUS} ]; then lc=$((lc+1))\n'
        f"    printf 'L {index}\\n'; _list \"$d\"; printf 'K {index}\\n'\n  fi\n"
    )


def _entry_report(index: int, *, progress: bool = False, listing: bool = False) -> str:
    # The entry's folder and pgid are in the shell variables d<index> and p<index>.
    return f"""d=$d{index}; p=$p{index}
if [ -d "$d" ]; then
  # exit_code wins over liveness: skip the (costly, zombie-aware) check when it is there
  if [ ! -f "$d/exit_code" ] && _alive "$d" "$p"; then al=1; else al=0; fi
  _num "$d/exit_code"; e=$v; _num "$d/started_at"; s=$v; _num "$d/ended_at"; en=$v
  _num "$d/attempt"; at=$v
  ls=
  if [ -e "$d/timed_out" ]; then to=1; else to=0; fi
  r=; read -r r 2>/dev/null < "$d/run"; case $r in ''|*[!0-9a-f]*) r=- ;; esac
  q=-; [ -f "$d/staged" ] && q=s; [ -f "$d/withdrawn" ] && q=w
  printf 'J {index} 1 %s %s %s %s %s %s %s %s %s %s\\n' "${{p:--}}" "$al" "$e" "$s" "$en" \\
    "${{ls:--}}" "$at" "$to" "$r" "$q"
{_progress_report(index) if progress else ""}{_listing_report(index) if listing else ""}else
  printf 'J {index} 0 - 0 - - - - - 0 - -\\n'
fi
"""


def build_status_script(
    entries: list[tuple[str, RemoteJobPaths]],
    *,
    wait_s: float = 0,
    progress: bool = False,
    lease: str | None = None,
    listing: str | None = None,
    listed: Container[int] | None = None,
) -> str:
    """One script reporting every entry; with `wait_s` > 0 it first waits (remote-side, every
    0.2 s) until any entry is no longer running (exit_code written, group gone, folder
    gone) or `wait_s` passes. List only jobs believed running, or it returns at once.
    With `progress`, each existing entry also reports the tail of its log.txt. With
    `lease` (a path), the instance's clock is written there: staged runs start only while
    it is fresh. With `listing` (shell code defining `_list DIR`, such as
    `result_handler.listing_function`), an entry whose exit code is 0 also reports what
    `_list` prints of its folder, between `L <index>` and `K <index>` (the first
    `LISTINGS_PER_STATUS` such entries: the output stays bounded whatever the listing's);
    with `listed`, only entries of these indices.
    """
    lines = [SH_HELPERS]
    if listing is not None:
        lines.append(f"{listing}\nlc=0")
    if lease is not None:
        lines.append(renew_lease(lease))
    for index, (_job_id, paths) in enumerate(entries):
        lines.append(f"d{index}={shlex.quote(paths.job_dir)}")
        lines.append(f'_pgid "$d{index}/pid"; p{index}=$v')
        # A pid from another boot is not ours: treat it as gone from the start.
        lines.append(f'[ -f "$d{index}/exit_code" ] || _alive "$d{index}" "$p{index}" || p{index}=')
    if wait_s > 0 and entries:
        checks = " && ".join(f'_r "$d{i}" "$p{i}"' for i in range(len(entries)))
        lines.append(
            # a staged run waiting for its turn counts as running; its start ends the wait
            '_r() { [ -d "$1" ] && [ ! -f "$1/exit_code" ] && { [ -z "$2" ] && { [ -f "$1/staged" ] || [ -f "$1/go" ]; } '
            '|| { [ -n "$2" ] && kill -0 -"$2" 2>/dev/null && _live_member "$2"; }; }; }'
        )
        lines.append(_wait_lines(entries[0][1].instance_root, wait_s, checks))
    lines.append('printf "%s\\n" "$M"')
    lines.extend(
        _entry_report(
            index,
            progress=progress,
            listing=listing is not None and (listed is None or index in listed),
        )
        for index in range(len(entries))
    )
    return "\n".join(lines) + "\n"


def _wait_lines(instance_root: str, wait_s: float, checks: str) -> str:
    """Wait while `checks` holds (every listed run still running), at most `wait_s`.

    The wait reads its own FIFO, `<instance root>/wait.<pid>`, which a run's wrapper
    writes a line into as it ends (job_runner.WAKE_WAITERS): it returns the moment a run
    ends. A ticker writes a line every `WAKE_LOOK_S` at most, so a run that ends with no
    wrapper to say so (killed, the machine rebooted) is still seen, and `e` when it ends
    for any reason (`wait_s` passed, a fork refused, its waiter gone: it looks before
    each sleep), so the wait never outlasts it. Woken early, the wait stops the ticker
    and the ticker its sleep. `wait.*` entries left by waiters that are gone are removed
    first (a FIFO whose pid is gone; anything that is not a FIFO). Where no FIFO can be
    made, it looks every `_TICK_S` as before.
    """
    looks = max(1, math.ceil(wait_s / WAKE_LOOK_S))
    tick = wait_s / looks
    tick_text = str(int(tick)) if tick == int(tick) else f"{tick:.3f}"
    fifo = shlex.quote(f"{instance_root}/{WAITER_PREFIX}")
    sleep = ">/dev/null 2>&1 8>&- & s=$!; wait $s"
    return f"""if {checks}; then
  for _f in {fifo}*; do
    [ -e "$_f" ] || continue
    if [ -p "$_f" ]; then kill -0 "${{_f##*.}}" 2>/dev/null || rm -f "$_f"; else rm -f "$_f"; fi
  done
  X={fifo}$$
  if mkfifo "$X" 2>/dev/null && command exec 8<>"$X"; then
    ( s=; trap 'echo e' EXIT; trap 'kill $s 2>/dev/null; exit' TERM
      i=0; while [ $i -lt {looks} ] && kill -0 $$ 2>/dev/null; do
        sleep {tick_text} {sleep} || {{ sleep 1 {sleep}; }}
        echo t; i=$((i+1))
      done ) >&8 2>/dev/null &
    _wp=$! _wk=
    while {checks} && read -r _wk <&8 && [ "$_wk" != e ]; do :; done
    [ "$_wk" = e ] || kill $_wp 2>/dev/null
    exec 8<&-; rm -f "$X"
  else
    [ -e "$X" ] && rm -f "$X"
    if [ "$FRAC" = 1 ]; then n={math.ceil(wait_s / _TICK_S)}; else n={math.ceil(wait_s)}; fi
    t=0; while [ $t -lt $n ] && {checks}; do _tick {_TICK_S}; t=$((t+1)); done
  fi
fi"""


_STATUS_LINE = re.compile(
    r"^J ([0-9]+) ([01]) (-|[0-9]+) ([01]) (\S+) (\S+) (\S+) (-|[0-9]+) (\S+) ([01]) (-|[0-9a-f]+)"
    r"(?: ([-sw]))?$"
)
_NUMBER = re.compile(r"^[+-]?[0-9]{1,18}$")


def _number(field: str) -> int | None:
    return int(field) if _NUMBER.match(field) else None


_PROGRESS_START = re.compile(r"^([PQ]) ([0-9]+)$")
_LISTING_START = re.compile(r"^([LK]) ([0-9]+)$")


def _blocks(
    lines: list[str], marker: re.Pattern[str], opener: str
) -> tuple[list[str], dict[int, list[str]]]:
    """The lines outside blocks, and each entry's whole block (`<opener> <index>` ...
    `<closer> <index>`, as `marker` matches them). No block holds a line starting `J `
    (hex and listings never do): one there ends a block left without its closer,
    which then counts as absent."""
    rest: list[str] = []
    blocks: dict[int, list[str]] = {}
    current: int | None = None
    block: list[str] = []
    for line in lines:
        if current is not None and line.startswith("J "):
            current = None  # cut short: the status line after it is still read
        found = marker.match(line.strip())
        if found is not None:
            index = int(found.group(2))
            if found.group(1) == opener:
                current, block = index, []
            elif current == index:
                blocks[index] = block
                current = None
            continue
        if current is not None:
            block.append(line)
        else:
            rest.append(line)
    return rest, blocks


def progress_rows(text: str, pattern: re.Pattern[str]) -> int | None:
    """Group 1 of the last line of `text` that `pattern` matches, as a whole number
    (None when no line matches or group 1 is not a number)."""
    for line in reversed(text.splitlines()):
        match = pattern.search(line)
        if match is None:
            continue
        group = match.group(1)
        if group is None:
            continue
        digits = group.strip().replace(",", "").replace("_", "")
        if digits.isascii() and digits.isdigit() and len(digits) <= 18:
            return int(digits)
    return None


def _progress_blocks(lines: list[str]) -> tuple[list[str], dict[int, str]]:
    """The status lines, and each entry's log tail (decoded) from its P ... Q block."""
    rest, blocks = _blocks(lines, _PROGRESS_START, "P")
    tails: dict[int, str] = {}
    for index, hex_lines in blocks.items():
        with contextlib.suppress(ValueError):  # garbled: no progress this time
            tails[index] = _hex_payload(hex_lines).decode("utf-8", errors="replace")
    return rest, tails


def parse_status_output(
    stdout: str,
    entries: list[tuple[str, RemoteJobPaths]],
    *,
    progress: re.Pattern[str] | None = None,
) -> dict[str, RemoteJobStatus]:
    """Statuses by job id; entries without a well-formed line (truncated output) are absent.
    With `progress`, each status carries the rows done its log tail says."""
    lines, tails = _progress_blocks(marker_lines(stdout) or [])
    lines, blocks = _blocks(lines, _LISTING_START, "L")
    listings = {index: tuple(block) for index, block in blocks.items()}
    statuses: dict[str, RemoteJobStatus] = {}
    for line in lines:
        match = _STATUS_LINE.match(line.strip())
        if not match:
            continue
        index = int(match.group(1))
        if index >= len(entries):
            continue
        job_id = entries[index][0]
        if match.group(2) == "0":
            statuses[job_id] = RemoteJobStatus(job_id=job_id, exists=False)
            continue
        exit_field = match.group(5)
        exit_code = _number(exit_field)
        started, ended = _number(match.group(6)), _number(match.group(7))
        statuses[job_id] = RemoteJobStatus(
            job_id=job_id,
            exists=True,
            pid=_number(match.group(3)),
            alive=match.group(4) == "1",
            exit_code=exit_code,
            exit_code_invalid=exit_field != "-" and exit_code is None,
            started_at=float(started) if started is not None else None,
            ended_at=float(ended) if ended is not None else None,
            log_size=_number(match.group(8)),
            attempt=_number(match.group(9)),
            timed_out=match.group(10) == "1",
            run=None if match.group(11) == "-" else match.group(11),
            stage={"s": "staged", "w": "withdrawn"}.get(match.group(12) or "-"),
            progress_rows=(
                progress_rows(tails[index], progress)
                if progress is not None and index in tails
                else None
            ),
            listing=listings.get(index),
        )
    return statuses


async def monitor_job_execution(
    conn: RemoteRunner,
    entries: list[tuple[str, RemoteJobPaths]],
    *,
    wait_s: float = 0,
    timeout_s: float,
    progress: re.Pattern[str] | None = None,
    lease: str | None = None,
    listing: str | None = None,
    listed: Container[int] | None = None,
) -> dict[str, RemoteJobStatus]:
    """Status of every listed job in one round trip (`timeout_s` is on top of `wait_s`);
    with `progress` (the compiled `[job] progress_regex`), the rows each log says are done;
    with `listing`, the folder listing of each run that exited 0 (`build_status_script`,
    `listed` as there)."""
    if not entries:
        return {}
    script = build_status_script(
        entries,
        wait_s=wait_s,
        progress=progress is not None,
        lease=lease,
        listing=listing,
        listed=listed,
    )
    result = await conn.run(as_sh_command(script), timeout_s=timeout_s + max(wait_s, 0))
    return parse_status_output(result.stdout, entries, progress=progress)


def detect_job_completion(status: RemoteJobStatus) -> CompletionStatus:
    """RUNNING, or how the job ended; `exit_code` wins over liveness."""
    if not status.exists:
        return CompletionStatus.MISSING
    if status.exit_code_invalid:
        return CompletionStatus.INVALID
    if status.exit_code is not None:
        return CompletionStatus.SUCCEEDED if status.exit_code == 0 else CompletionStatus.FAILED
    if status.alive:
        return CompletionStatus.RUNNING
    return CompletionStatus.VANISHED


def build_kill_script(
    paths: RemoteJobPaths, *, grace_s: float, exit_code: int | None, mark_timed_out: bool
) -> str:
    """TERM the group, wait up to `grace_s`, KILL it; then record `exit_code` if none was."""
    ticks = max(0, math.ceil(grace_s / _TICK_S))
    record = ""
    if exit_code is not None:
        mark = ': > "$D/timed_out"; ' if mark_timed_out else ""
        record = f"""if [ -d "$D" ] && [ ! -f "$D/exit_code" ]; then
  # (-s: a wrapper killed halfway through writing ended_at in place leaves it empty)
  [ -s "$D/ended_at" ] || {{ date +%s > "$D/ended_at.tmp" && mv -f "$D/ended_at.tmp" "$D/ended_at"; }}
  {mark}echo {int(exit_code)} > "$D/exit_code.tmp" && mv -f "$D/exit_code.tmp" "$D/exit_code" && w=1
fi"""
    return f"""{SH_HELPERS}
D={shlex.quote(paths.job_dir)}
_pgid "$D/pid"; p=$v
was=0; w=0
if _alive "$D" "$p"; then
  was=1
  kill -TERM -"$p" 2>/dev/null
  n=0; while _alive "$D" "$p" && [ $n -lt {ticks} ]; do _tick {_TICK_S}; n=$((n+1)); done
  kill -KILL -"$p" 2>/dev/null
  n=0; while _alive "$D" "$p" && [ $n -lt 10 ]; do _tick {_TICK_S}; n=$((n+1)); done
fi
if _alive "$D" "$p"; then still=1; else still=0; fi
{record}
# the run staged behind this one starts now (the wrapper that would have started it is gone)
# and a status command waiting there learns of the exit code just written
if [ -d "$D" ]; then (cd "$D" && {{
  if [ "$still" = 0 ]; then {KICK_NEXT}; fi
  if [ "$still" = 0 ] || [ "$w" = 1 ]; then {WAKE_WAITERS}; fi; }}); fi
printf '%s\\nkilled %s %s %s\\n' "$M" "$was" "$still" "$w"
"""


_KILL_LINE = re.compile(r"^killed ([01]) ([01]) ([01])$")


async def kill_job(
    conn: RemoteRunner,
    paths: RemoteJobPaths,
    *,
    grace_s: float = 5,
    timeout_s: float,
    exit_code: int | None = None,
    mark_timed_out: bool = False,
) -> KillOutcome:
    """Kill the job's whole process group (TERM, grace, KILL); record `exit_code` if given."""
    script = build_kill_script(
        paths, grace_s=grace_s, exit_code=exit_code, mark_timed_out=mark_timed_out
    )
    result = await conn.run(as_sh_command(script), timeout_s=timeout_s + grace_s + 2)
    for line in marker_lines(result.stdout) or []:
        match = _KILL_LINE.match(line.strip())
        if match:
            return KillOutcome(
                was_alive=match.group(1) == "1",
                still_alive=match.group(2) == "1",
                exit_code_written=match.group(3) == "1",
            )
    raise JobExecutionError(f"kill script gave no answer (exit {result.exit_status})")


async def handle_job_timeout(
    conn: RemoteRunner, paths: RemoteJobPaths, *, grace_s: float = 5, timeout_s: float
) -> KillOutcome:
    """Kill the group and, unless the job ended first, record exit 124 and `timed_out`."""
    return await kill_job(
        conn,
        paths,
        grace_s=grace_s,
        timeout_s=timeout_s,
        exit_code=TIMEOUT_EXIT_CODE,
        mark_timed_out=True,
    )


def _hex_payload(lines: list[str]) -> bytes:
    return bytes.fromhex("".join("".join(lines).split()))


async def get_process_output(
    conn: RemoteRunner, paths: RemoteJobPaths, *, tail_lines: int = 50, timeout_s: float
) -> str:
    """The last lines of log.txt (at most 64 KiB), undecodable bytes replaced; "" if none."""
    q = shlex.quote
    script = (
        f"printf '%s\\n' __VASTD_BEGIN__; "
        f"tail -n {int(tail_lines)} {q(paths.log)} 2>/dev/null | tail -c 65536 | od -An -v -tx1"
    )
    result = await conn.run(as_sh_command(script), timeout_s=timeout_s)
    lines = marker_lines(result.stdout) or []
    try:
        return _hex_payload(lines).decode("utf-8", errors="replace")
    except ValueError:
        return ""
