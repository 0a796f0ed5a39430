"""job_runner: remote paths, command generation, the detached idempotent start (real /bin/sh)."""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.localrunner import LocalRunner, group_gone, kill_leftover_jobs, wait_until
from vastd.execution.job_runner import (
    RemoteJobPaths,
    RemoteRunner,
    execute_job_on_instance,
    generate_job_command,
    instance_root,
    remote_job_paths,
    start_job_process,
    upload_job_file,
)
from vastd.utils.exceptions import ConfigError, JobExecutionError

if TYPE_CHECKING:
    from vastd.core.ssh import SSHConnection

    def _ssh_connection_is_a_runner(conn: SSHConnection) -> RemoteRunner:
        return conn  # mypy checks that SSHConnection satisfies the protocol


PY = shlex.quote(sys.executable)
ARGV_CODE = shlex.quote("import sys, json; print(json.dumps(sys.argv[1:]))")


@pytest.fixture
def remote_root(tmp_path: Path) -> str:
    root = tmp_path / "remote"
    root.mkdir()
    return str(root)


@pytest.fixture
async def runner(tmp_path: Path) -> AsyncIterator[LocalRunner]:
    home = tmp_path / "home"
    home.mkdir()
    yield LocalRunner(cwd=home)
    kill_leftover_jobs(tmp_path)


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.csv"
    path.write_text("a,b\n1,2\n")
    return path


async def _start(
    runner: LocalRunner,
    remote_root: str,
    csv_file: Path,
    command: str,
    *,
    job_id: str = "job1",
    attempt: int = 1,
    gpus: tuple[int, ...] = (),
) -> tuple[RemoteJobPaths, int, bool]:
    info = await execute_job_on_instance(
        runner,
        remote_root=remote_root,
        instance_id="inst1",
        job_id=job_id,
        local_csv=csv_file,
        command_template=command,
        vars={},
        attempt=attempt,
        timeout_s=20,
        gpus=gpus,
    )
    assert info.pid == info.pgid
    return remote_job_paths(remote_root, "inst1", job_id), info.pgid, info.started


def test_remote_job_paths_layout() -> None:
    """The job folder is <root>/<instance>/jobs/<job>/ with the input CSV beside out/ etc."""
    paths = remote_job_paths("/r/", "42", "garch_test_job_0000_0099")
    assert instance_root("/r", "42") == "/r/42"
    assert paths.instance_root == "/r/42"
    assert paths.job_dir == "/r/42/jobs/garch_test_job_0000_0099"
    assert paths.input == paths.job_dir + "/garch_test_job_0000_0099.csv"
    assert paths.out_dir == paths.job_dir + "/out"
    assert paths.log == paths.job_dir + "/log.txt"
    assert paths.exit_code == paths.job_dir + "/exit_code"


def test_remote_job_paths_shortens_long_ids() -> None:
    """A job id past the 255-byte name limit gives folder and input names within it."""
    paths = remote_job_paths("/r", "1", "é" * 200)
    assert len(os.fsencode(paths.job_dir.rsplit("/", 1)[1])) <= 255
    assert len(os.fsencode(paths.input.rsplit("/", 1)[1])) <= 255
    assert paths.input.endswith(".csv")


@pytest.mark.parametrize("job_id", ["..", ".", "", "a/b"])
def test_remote_job_paths_refuses_unsafe_ids(job_id: str) -> None:
    """Ids that cannot be one folder name are refused rather than escaping jobs/."""
    with pytest.raises(ValueError):
        remote_job_paths("/r", "1", job_id)


async def test_generated_command_passes_hostile_values_verbatim(
    runner: LocalRunner, tmp_path: Path
) -> None:
    """Quotes, $(), backticks, ;, newlines, leading -, unicode and braces reach argv exactly."""
    canary = tmp_path / "canary"
    hostile = [
        "it's",
        'say "hi"',
        f"$(touch {canary})",
        f"; touch {canary}",
        f"`touch {canary}`",
        f"two\nlines && touch {canary}",
        "-rf",
        "ünïcødé ✓",
        "{job}",
        "$HOME",
        "a\\b",
        "*",
        "",
    ]
    names = [f"v{i}" for i in range(len(hostile))]
    template = f"{PY} -c {ARGV_CODE} {{job}} {{input}} " + " ".join(f"{{{n}}}" for n in names)
    job_id = "job 'x' $(touch canary) `touch canary`;\n-ü"
    paths = remote_job_paths("/remote root", "i", job_id)
    command = generate_job_command(
        template, paths=paths, job_id=job_id, vars=dict(zip(names, hostile, strict=True))
    )
    result = await runner.run(command, timeout_s=20)
    assert result.ok, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [job_id, paths.input, *hostile]
    assert not canary.exists()
    assert not any(p.name == "canary" for p in tmp_path.rglob("*"))


def test_generated_command_literal_braces_and_paths() -> None:
    """`{{`/`}}` are literal braces; {job_dir} and {output_dir} are the job's folders."""
    paths = remote_job_paths("/r", "1", "j")
    command = generate_job_command(
        "awk '{{print}}' {input} {job_dir} {output_dir} {n}",
        paths=paths,
        job_id="j",
        vars={"n": "5"},
    )
    assert command == "awk '{print}' /r/1/jobs/j/j.csv /r/1/jobs/j /r/1/jobs/j/out 5"


@pytest.mark.parametrize(
    ("template", "vars"),
    [
        ("run {nope}", {}),
        ("run {}", {}),
        ("run {n!r}", {"n": "1"}),
        ("run {n:>5}", {"n": "1"}),
        ("run {n.attr}", {"n": "1"}),
        ("run } oops", {}),
        ("run {input}", {"input": "x"}),
    ],
)
def test_generated_command_config_errors(template: str, vars: dict[str, str]) -> None:
    """Unknown placeholders, conversions, specs, stray braces and clashes are ConfigErrors."""
    with pytest.raises(ConfigError) as info:
        generate_job_command(
            template, paths=remote_job_paths("/r", "1", "j"), job_id="j", vars=vars
        )
    assert all(p.startswith("job.") for p in info.value.problems)


async def test_start_is_detached_and_records_pid(
    runner: LocalRunner, remote_root: str, csv_file: Path
) -> None:
    """The start returns while the job runs; pid (= pgid), started_at and attempt are written."""
    paths, pgid, started = await _start(runner, remote_root, csv_file, "sleep 30")
    assert started
    assert not group_gone(pgid)
    assert os.getpgid(pgid) == pgid
    assert Path(paths.pid).read_text().strip() == str(pgid)
    assert Path(paths.attempt).read_text().strip() == "1"
    await wait_until(lambda: Path(paths.started_at).exists(), what="started_at")
    assert int(Path(paths.started_at).read_text()) > 0
    assert not Path(paths.exit_code).exists()
    assert Path(paths.input).read_text() == "a,b\n1,2\n"
    assert not Path(paths.input + ".part").exists()


@pytest.mark.parametrize("code", [0, 3])
async def test_exit_code_and_log(
    runner: LocalRunner, remote_root: str, csv_file: Path, code: int
) -> None:
    """The wrapper writes the command's exit code last; log.txt holds stdout and stderr."""
    paths, _, _ = await _start(
        runner, remote_root, csv_file, f"echo to-out; echo to-err >&2; exit {code}"
    )
    await wait_until(lambda: Path(paths.exit_code).exists(), what="exit_code")
    assert Path(paths.exit_code).read_text() == f"{code}\n"
    assert Path(paths.ended_at).exists()
    log = Path(paths.log).read_text()
    assert "to-out" in log and "to-err" in log
    assert not Path(paths.exit_code + ".tmp").exists()


async def test_command_runs_in_job_folder_with_its_input(
    runner: LocalRunner, remote_root: str, csv_file: Path
) -> None:
    """{input} names the uploaded CSV and the command's working folder is the job folder."""
    paths, _, _ = await _start(runner, remote_root, csv_file, "cat {input} && pwd && exit 0")
    await wait_until(lambda: Path(paths.exit_code).exists(), what="exit_code")
    assert Path(paths.log).read_text() == f"a,b\n1,2\n{paths.job_dir}\n"


@pytest.mark.parametrize(("gpus", "seen"), [((2,), "2"), ((0, 1), "0,1"), ((), "unset")])
async def test_gpus_are_exported_and_a_placeholder(
    runner: LocalRunner,
    remote_root: str,
    csv_file: Path,
    gpus: tuple[int, ...],
    seen: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run given GPU indices sees them as CUDA_VISIBLE_DEVICES (exported: a child
    process has them too) and as `{gpus}`; one given none inherits the environment
    untouched (here: unset) and `{gpus}` is empty."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    code = shlex.quote(
        "import os, sys; print(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'), sys.argv[1:])"
    )
    paths, _, _ = await _start(
        runner, remote_root, csv_file, f"{PY} -c {code} {{gpus}} {{input}}", gpus=gpus
    )
    await wait_until(lambda: Path(paths.exit_code).exists(), what="exit_code")
    arg = seen if gpus else ""
    assert Path(paths.log).read_text() == f"{seen} {[arg, paths.input]!r}\n"


async def test_hostile_job_id_end_to_end(
    runner: LocalRunner, remote_root: str, csv_file: Path, tmp_path: Path
) -> None:
    """A job id full of shell syntax is uploaded, started and seen verbatim, nothing injected."""
    job_id = 'x\' "$(touch canary)" `touch canary`; touch canary\n-ü {job}'
    paths, _, _ = await _start(
        runner, remote_root, csv_file, f"{PY} -c {ARGV_CODE} {{job}} {{input}}", job_id=job_id
    )
    await wait_until(lambda: Path(paths.exit_code).exists(), what="exit_code")
    assert Path(paths.exit_code).read_text() == "0\n"
    assert json.loads(Path(paths.log).read_text()) == [job_id, paths.input]
    assert Path(paths.input).read_text() == "a,b\n1,2\n"
    assert not any(p.name == "canary" for p in tmp_path.rglob("*"))


async def test_second_start_of_same_attempt_is_a_no_op(
    runner: LocalRunner, remote_root: str, csv_file: Path, tmp_path: Path
) -> None:
    """Dispatching the same attempt again reports the running pid and starts nothing."""
    runs = tmp_path / "runs"
    command = f"echo run >> {shlex.quote(str(runs))}; sleep 30"
    paths, pgid, started = await _start(runner, remote_root, csv_file, command)
    assert started
    await wait_until(runs.exists, what="first run")
    again = await start_job_process(runner, paths, command, 1, timeout_s=20)
    assert (again.pid, again.started) == (pgid, False)
    _, pgid3, started3 = await _start(runner, remote_root, csv_file, command)
    assert (pgid3, started3) == (pgid, False)
    assert runs.read_text() == "run\n"
    assert not group_gone(pgid)


async def test_new_attempt_clears_old_outputs(
    runner: LocalRunner, remote_root: str, csv_file: Path
) -> None:
    """A new attempt starts from a folder holding only the input: old results never mix in."""
    paths, _, _ = await _start(
        runner,
        remote_root,
        csv_file,
        "touch {output_dir}/old.parquet beside.parquet .hidden; exit 1",
    )
    await wait_until(lambda: Path(paths.exit_code).exists(), what="exit_code")
    assert Path(paths.out_dir, "old.parquet").exists()
    await _start(runner, remote_root, csv_file, "sleep 30", attempt=2)
    names = sorted(os.listdir(paths.job_dir))
    assert "beside.parquet" not in names and ".hidden" not in names
    assert "exit_code" not in names
    assert os.listdir(paths.out_dir) == []
    assert Path(paths.attempt).read_text().strip() == "2"
    assert Path(paths.input).exists()


async def test_new_attempt_kills_a_still_running_old_one(
    runner: LocalRunner, remote_root: str, csv_file: Path
) -> None:
    """An earlier attempt's process group still alive is killed before the folder is reused."""
    _, old_pgid, _ = await _start(runner, remote_root, csv_file, "sleep 30 & sleep 30")
    _, new_pgid, started = await _start(runner, remote_root, csv_file, "sleep 30", attempt=2)
    assert started and new_pgid != old_pgid
    await wait_until(lambda: group_gone(old_pgid), what="old group gone")
    assert not group_gone(new_pgid)


async def test_start_without_input_is_a_job_error(runner: LocalRunner, remote_root: str) -> None:
    """The start script's own failure (here: no input uploaded) raises JobExecutionError."""
    paths = remote_job_paths(remote_root, "inst1", "nojob")
    os.makedirs(paths.job_dir)
    with pytest.raises(JobExecutionError, match="input"):
        await start_job_process(runner, paths, "true", 1, timeout_s=20)
    assert not Path(paths.pid).exists()


async def test_upload_replaces_input_whole(
    runner: LocalRunner, remote_root: str, csv_file: Path
) -> None:
    """upload_job_file creates the folder and leaves only the complete file under its name."""
    paths = remote_job_paths(remote_root, "inst1", "-leading dash")
    await upload_job_file(runner, csv_file, paths, timeout_s=20)
    csv_file.write_text("a,b\n3,4\n")
    await upload_job_file(runner, csv_file, paths, timeout_s=20)
    assert Path(paths.input).read_text() == "a,b\n3,4\n"
    assert sorted(os.listdir(paths.job_dir)) == [Path(paths.input).name]


async def test_start_output_after_login_junk(
    remote_root: str, csv_file: Path, tmp_path: Path
) -> None:
    """Login-shell junk before the marker (even marker-like text) does not confuse the start."""
    runner = LocalRunner(junk="started 1\n__VASTD_BEGIN\nexisting 99\n", cwd=tmp_path)
    try:
        _, pgid, started = await _start(runner, remote_root, csv_file, "sleep 30")
        assert started and pgid > 1 and not group_gone(pgid)
    finally:
        kill_leftover_jobs(tmp_path)


@pytest.mark.sshd
async def test_whole_job_over_real_openssh(
    openssh_server: Callable[..., Any],
    ssh_pool: Callable[..., Any],
    ssh_settings: Callable[..., Any],
    tmp_path: Path,
    csv_file: Path,
) -> None:
    """Over real sshd: start detached, wait for the exit in one call, collect the parquet;
    a second job is timed out and its whole group killed."""
    from tests.sshd import TEST_PYTHON
    from vastd.core.ssh import Endpoint
    from vastd.execution.process_monitor import (
        CompletionStatus,
        detect_job_completion,
        handle_job_timeout,
        monitor_job_execution,
    )
    from vastd.execution.result_handler import collect_job_results

    server = openssh_server()
    pool = ssh_pool(ssh_settings(user=server.user))
    conn = await pool.get("o1", [Endpoint(*server.address)])
    root = str(server.remote_root)
    code = shlex.quote(
        "import sys, pyarrow as pa, pyarrow.parquet as pq; "
        "pq.write_table(pa.table(dict(x=[1, 2])), sys.argv[1] + '/r.parquet')"
    )
    job_id = "it's $(x) job"
    common: dict[str, Any] = {
        "remote_root": root,
        "instance_id": "o1",
        "local_csv": csv_file,
        "vars": {},
        "attempt": 1,
        "timeout_s": 30,
    }
    await execute_job_on_instance(
        conn,
        job_id=job_id,
        command_template=f"sleep 1; {shlex.quote(TEST_PYTHON)} -c {code} {{output_dir}}",
        **common,
    )
    await execute_job_on_instance(
        conn, job_id="slow", command_template="sleep 100 & sleep 100", **common
    )
    paths = remote_job_paths(root, "o1", job_id)
    slow_paths = remote_job_paths(root, "o1", "slow")
    entries = [(job_id, paths), ("slow", slow_paths)]
    statuses = await monitor_job_execution(conn, entries, wait_s=30, timeout_s=30)
    assert detect_job_completion(statuses[job_id]) is CompletionStatus.SUCCEEDED
    assert detect_job_completion(statuses["slow"]) is CompletionStatus.RUNNING
    collected = await collect_job_results(
        conn,
        paths,
        job_id,
        results_root=tmp_path / "results",
        pattern="out/*.parquet",
        min_results=1,
        validate="parquet",
        max_bytes=10**6,
        timeout_s=30,
    )
    assert collected.rows == 2 and [p.name for p in collected.files] == ["r.parquet"]
    outcome = await handle_job_timeout(conn, slow_paths, grace_s=1, timeout_s=30)
    assert outcome.was_alive and not outcome.still_alive
    final = await monitor_job_execution(conn, [("slow", slow_paths)], timeout_s=30)
    assert final["slow"].exit_code == 124 and final["slow"].timed_out
