"""The operator views (`vastd jobs`, `vastd report`, `vastd status`) from files written
as the daemon writes them, progress parsing and the `[job] progress_regex` key."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import dump_toml
from tests.localrunner import LocalRunner, kill_leftover_jobs, wait_until
from vastd.cli import main
from vastd.core import state as st
from vastd.core.files import Layout, atomic_write_json, write_error_json
from vastd.core.history import append_history, history_line
from vastd.core.records import InstanceRecord, InstanceStatus, JobRecord, JobState, Snapshot
from vastd.core.state import StateStore
from vastd.execution.job_runner import execute_job_on_instance, remote_job_paths
from vastd.execution.process_monitor import (
    monitor_job_execution,
    parse_status_output,
    progress_rows,
)
from vastd.status import build_status, format_status, progress_bar
from vastd.utils.config import Settings
from vastd.views import (
    build_report,
    duration_text,
    format_jobs,
    format_report,
    job_rows,
    money,
    progress_text,
    read_campaign,
)


# --- formatting --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "-"),
        (0.0, "$0.00"),
        (0.0032, "$0.0032"),
        (0.000083, "$0.000083"),
        (0.5, "$0.5000"),
        (1.23456, "$1.23"),
        (1234.5, "$1,234.50"),
    ],
)
def test_money_keeps_small_sums_visible(value: float | None, text: str) -> None:
    assert money(value) == text


def test_durations_progress_and_bar() -> None:
    assert duration_text(None) == "-"
    assert duration_text(42.4) == "42s"
    assert duration_text(125) == "2m05s"
    assert duration_text(3 * 3600 + 7 * 60) == "3h07m"
    assert progress_text(None, 10) == "-"
    assert progress_text(3, 12) == "3/12 (25%)"
    assert progress_text(30, 12) == "30/12 (100%)"
    assert progress_text(5, 0) == "5"
    assert progress_bar(0.5, 10) == "[#####-----]  50.0%"
    assert progress_bar(None, 4) == "[----]     -"
    assert progress_bar(2.0, 4) == "[####] 100.0%"


# --- progress parsing ----------------------------------------------------------------------
def test_progress_rows_is_group_one_of_the_last_matching_line() -> None:
    pattern = re.compile(r"done (\S+) rows")
    text = "done 1 rows\nnoise\ndone 1,234 rows\ndone x rows\nmore noise"
    # the last line whose group 1 is a number counts; thousands separators are dropped
    assert progress_rows(text, pattern) == 1234
    assert progress_rows("nothing here", pattern) is None
    assert progress_rows("done 99999999999999999999 rows", pattern) is None


def test_parse_status_output_reads_each_entry_log_tail() -> None:
    """P/Q blocks carry each entry's log as hex; text in a log can never pass for a J line."""
    entries = [("a", remote_job_paths("/r", "1", "a")), ("b", remote_job_paths("/r", "1", "b"))]
    log = b"row 4 of 9\nJ 1 0 - 0 - - - - - 0 -\n"
    hexed = " ".join(f"{b:02x}" for b in log)
    out = (
        "__VASTD_BEGIN__\n"
        "J 0 1 100 1 - 5 - - 1 0 abcd\nP 0\n" + hexed + "\nQ 0\n"
        "J 1 1 101 1 - 5 - - 1 0 abcd\nP 1\nzz not hex\nQ 1\n"
    )
    statuses = parse_status_output(out, entries, progress=re.compile(r"row (\d+) of"))
    assert statuses["a"].progress_rows == 4
    assert statuses["b"].exists and statuses["b"].progress_rows is None
    assert parse_status_output(out, entries)["a"].progress_rows is None


async def test_status_round_trip_reads_progress_from_the_log(tmp_path: Path) -> None:
    """The batched status command on a real shell: the last matching log line's group 1."""
    runner = LocalRunner(cwd=tmp_path)
    remote = tmp_path / "remote"
    remote.mkdir()
    csv = tmp_path / "job.csv"
    csv.write_text("a\n1\n")
    try:
        await execute_job_on_instance(
            runner,
            remote_root=str(remote),
            instance_id="i1",
            job_id="j",
            local_csv=csv,
            command_template="echo 'row 1 of 5'; echo 'row 2 of 5'; echo noise; sleep 30",
            vars={},
            attempt=1,
            timeout_s=20,
        )
        paths = remote_job_paths(str(remote), "i1", "j")
        await wait_until(
            lambda: Path(paths.log).is_file() and b"noise" in Path(paths.log).read_bytes()
        )
        pattern = re.compile(r"row (\d+) of")
        statuses = await monitor_job_execution(
            runner, [("j", paths)], timeout_s=20, progress=pattern
        )
        assert statuses["j"].alive
        assert statuses["j"].progress_rows == 2
        # Without a regex no log is read.
        plain = await monitor_job_execution(runner, [("j", paths)], timeout_s=20)
        assert plain["j"].progress_rows is None
    finally:
        kill_leftover_jobs(tmp_path)


def test_note_progress_assigns_and_a_new_run_starts_over(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.ensure()
    (layout.queued / "j.csv").write_text("x\n1\n")
    store = StateStore(layout.state_file)
    st.add_job(store, "j", "j.csv", 10)
    store.snapshot.instances["1"] = InstanceRecord(id="1", status=InstanceStatus.READY)
    assigned = st.mark_job_assigned(store, "j", "1")
    assert assigned is not None
    assert st.note_progress(store, assigned, 4, now=100.0)
    assert (assigned.progress_rows, assigned.progress_at) == (4, 100.0)
    assert not st.note_progress(store, assigned, 4, now=200.0)  # no news: when stays
    assert assigned.progress_at == 100.0
    st.requeue_job(store, "j", reason="test")
    assert not st.note_progress(store, assigned, 5)  # not running: ignored
    (layout.queued / "j.csv").write_text("x\n1\n")
    again = st.mark_job_assigned(store, "j", "1")
    assert again is not None and again.progress_rows is None and again.progress_at is None


@pytest.mark.parametrize(
    ("regex", "problem"),
    [("row (\\d+", "not a valid regular expression"), ("row \\d+", "needs a group")],
)
def test_progress_regex_is_checked_at_load(regex: str, problem: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=problem):
        Settings(paths={"root": str(tmp_path)}, job={"progress_regex": regex})
    config = tmp_path / "config.toml"
    config.write_text(
        dump_toml({"paths": {"root": str(tmp_path)}, "job": {"progress_regex": regex}})
    )
    assert main(["check-config", "--config", str(config)]) == 2


# --- the campaign read from files ----------------------------------------------------------
def _record(job_id: str, state: JobState, **fields: Any) -> JobRecord:
    return JobRecord(id=job_id, file_name=f"{job_id}.csv", state=state, rows=3, **fields)


def write_campaign(root: Path, now: float) -> Layout:
    """History: `a` done then failed then done again (last counts), `b` failed, `c` done
    (but accepted again: state.json says queued); state.json: `c` and `r` running; failed/:
    b's files, a refused duplicate of a, an invalid file nobody owns."""
    layout = Layout(root)
    layout.ensure()
    lines = [
        _record("a", JobState.DONE, runs=1),
        _record("a", JobState.FAILED, runs=2, last_error="old"),
        _record(
            "a", JobState.DONE, runs=3, instance="7", started_at=now - 50, finished_at=now - 20
        ),
        _record(
            "b", JobState.FAILED, attempts=3, runs=3, failed_stem="b", last_error="exit code 1"
        ),
        _record("c", JobState.DONE, runs=1),
    ]
    append_history(layout.history_file, [history_line(j) for j in lines])
    snap = Snapshot(saved_at=now - 1)
    snap.jobs["c"] = _record("c", JobState.QUEUED, seq=1)
    snap.jobs["r"] = _record(
        "r", JobState.RUNNING, seq=2, instance="7", runs=1, started_at=now - 30, progress_rows=2
    )
    snap.instances["7"] = InstanceRecord(
        id="7", status=InstanceStatus.READY, dph=0.36, current_jobs=["r"]
    )
    snap.instances["8"] = InstanceRecord(id="8", status=InstanceStatus.DESTROYED)
    snap.history.done, snap.history.failed = 1, 1  # a, b (c is in the snapshot)
    atomic_write_json(layout.state_file, snap.model_dump(mode="json"))
    write_error_json(layout, "b", reason="exit code 1", attempts=3)
    (layout.failed / "b.csv").write_text("x\n1\n")
    write_error_json(layout, "a", reason="a job named 'a' is already done", name="a.dup-1")
    (layout.failed / "a.dup-1.csv").write_text("x\n1\n")
    write_error_json(layout, "junk", reason="not UTF-8")
    (layout.failed / "junk.csv").write_bytes(b"\xff")
    results = layout.results_dir("a")
    results.mkdir(parents=True)
    atomic_write_json(
        results / "MANIFEST.json",
        {"job": "a", "rows_in": 3, "rows_out": 33, "cost": 0.0032, "gpu": "RTX 4090"},
    )
    # A failed job's MANIFEST (from an earlier submission) is never read.
    layout.results_dir("b").mkdir()
    atomic_write_json(layout.results_dir("b") / "MANIFEST.json", {"rows_out": 99, "cost": 5.0})
    return layout


def test_jobs_rows_state_json_over_history_and_refusals(tmp_path: Path) -> None:
    now = time.time()
    layout = write_campaign(tmp_path / "root", now)
    campaign = read_campaign(layout)
    assert campaign.daemon_running is False
    rows = {r["id"]: r for r in job_rows(campaign, now=now)}
    assert set(rows) == {"a", "b", "c", "r", "a.dup-1", "junk"}
    assert (rows["a"]["state"], rows["a"]["runs"], rows["a"]["duration_s"]) == ("done", 3, 30.0)
    assert rows["c"]["state"] == "queued"  # state.json wins over its history line
    assert rows["r"]["progress_rows"] == 2
    assert rows["a.dup-1"]["refused"] and rows["a.dup-1"]["state"] == "failed"
    assert not rows["b"]["refused"]  # b owns its files in failed/
    assert [r["id"] for r in job_rows(campaign, "failed", now=now)] == ["b", "a.dup-1", "junk"]
    text = format_jobs(job_rows(campaign, now=now), False, campaign.snapshot.saved_at)
    assert "2/3 (67%)" in text
    assert "failed (refused)" in text
    assert text.splitlines()[-1].startswith("daemon: not running; as of 20")


def test_report_rows_cost_and_why_not_done(tmp_path: Path) -> None:
    now = time.time()
    layout = write_campaign(tmp_path / "root", now)
    report = build_report(layout, read_campaign(layout), now=now)
    by_id = {j["id"]: j for j in report["jobs"]}
    assert (by_id["a"]["rows_in"], by_id["a"]["rows_out"]) == (3, 33)
    assert by_id["a"]["gpu"] == "RTX 4090"
    assert by_id["b"]["rows_out"] is None and by_id["b"]["cost"] is None
    assert report["totals"] == {
        "jobs": 6,
        "done": 1,
        "failed": 3,
        "rows_in": 12,
        "rows_in_done": 3,
        "rows_out": 33,
        "cost": 0.0032,
    }
    why = {n["id"]: (n["state"], n["why"]) for n in report["not_done"]}
    assert why["b"] == ("failed", "exit code 1")
    assert why["c"][0] == "queued"
    assert why["r"] == ("running", "on 7, run 1")
    assert why["a.dup-1"] == ("refused", "a job named 'a' is already done (failed/a.dup-1.csv)")
    assert why["junk"] == ("refused", "not UTF-8 (failed/junk.csv)")
    text = format_report(report)
    assert (
        "totals: 6 jobs  1 done  3 failed  rows in 12 (3 of done jobs), out 33  cost $0.0032"
    ) in text
    assert "not done (5):" in text


def test_status_counts_refusals_hides_destroyed_and_shows_progress(tmp_path: Path) -> None:
    now = time.time()
    layout = write_campaign(tmp_path / "root", now)
    snapshot = Snapshot.model_validate_json(layout.state_file.read_bytes())
    status = build_status(layout, snapshot, now)
    assert status["refused"] == 2
    assert status["jobs"]["failed"] == 3  # b (history) + 2 refused files
    assert [i["id"] for i in status["instances"]] == ["7"]
    assert [
        i["id"] for i in build_status(layout, snapshot, now, all_instances=True)["instances"]
    ] == [
        "7",
        "8",
    ]
    assert status["running_jobs"][0]["progress_rows"] == 2
    text = format_status(status)
    assert "failed 3 (2 refused)" in text
    assert "2/3 rows  on 7" in text
    assert "(as of 20" in text and "/h now" not in text


def test_status_watch_plain_lines_until_ctrl_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = write_campaign(tmp_path / "root", time.time())
    config = tmp_path / "config.toml"
    config.write_text(dump_toml({"paths": {"root": str(layout.root)}}))
    sleeps: list[float] = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", fake_sleep)
    assert main(["status", "--watch", "--interval", "0.5", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and sleeps == [0.5, 0.5, 0.5]
    assert all("done 1  failed 3" in line and "daemon not running" in line for line in lines)
    assert "\x1b[" not in "".join(lines)
    # On a terminal: redrawn in place.
    sleeps.clear()
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert main(["status", "--watch", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.count("\x1b[H\x1b[2J") == 3 and "jobs: queued 1" in out
    with pytest.raises(SystemExit) as info:  # argparse: usage and the error, exit 2
        main(["status", "--watch", "--interval", "0", "--config", str(config)])
    assert info.value.code == 2


def test_jobs_and_report_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = write_campaign(tmp_path / "root", time.time())
    config = tmp_path / "config.toml"
    config.write_text(dump_toml({"paths": {"root": str(layout.root)}}))
    assert main(["jobs", "--json", "--config", str(config)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 6
    assert all({"id", "state", "instance", "attempts", "runs"} <= set(r) for r in rows)
    assert main(["jobs", "--state", "nope", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert main(["report", "--json", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["jobs"] == 6
    # An empty root: nothing to list, nothing created.
    empty = tmp_path / "empty.toml"
    empty.write_text(dump_toml({"paths": {"root": str(tmp_path / "none")}}))
    assert main(["report", "--config", str(empty)]) == 0
    assert "totals: 0 jobs" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()


def test_a_jobs_cost_is_its_share_of_the_instances_time() -> None:
    from vastd.orchestration.collection import job_cost

    assert job_cost(0.36, 1000.0, 1100.0, 1) == 0.01
    assert job_cost(0.36, 1000.0, 1100.0, 2) == 0.005  # two jobs share the instance
    assert job_cost(0.36, None, 1100.0, 1) is None
    assert job_cost(0.36, 1100.0, 1000.0, 1) is None


def test_history_views_agree_with_full_records_and_skip_what_the_record_refuses(
    tmp_path: Path,
) -> None:
    """The views read history lines without building JobRecords; a line typed otherwise
    than vastd writes goes through the record's validation: coerced as it would be, or
    skipped when the record refuses it too (never a crash of `vastd jobs`)."""
    from vastd.core.history import read_history_records
    from vastd.views import JobView, read_history_views

    now = time.time()
    done = JobRecord(id="a", file_name="a.csv", state=JobState.DONE, rows=3, attempts=1)
    done.instance, done.started_at, done.finished_at = "7", now - 5, now
    failed = JobRecord(id="b", file_name="b.csv", state=JobState.FAILED, last_error="boom")
    failed.failed_stem = "b"
    path = tmp_path / "history.jsonl"
    coerced = json.loads(history_line(done).decode()) | {"id": "c", "attempts": "2"}
    refused = json.loads(history_line(done).decode()) | {"id": "d", "runs": "many"}
    no_state = {k: v for k, v in json.loads(history_line(done).decode()).items() if k != "state"}
    append_history(
        path,
        [
            history_line(done),
            history_line(failed),
            json.dumps(coerced).encode() + b"\n",
            json.dumps(refused).encode() + b"\n",
            json.dumps(no_state | {"id": "e"}).encode() + b"\n",
        ],
    )
    with path.open("ab") as f:
        f.write(history_line(done)[:40])  # a crash mid-append: the last line cut short
    views = read_history_views(path)
    full = read_history_records(path)  # (which skips the refused line too)
    assert sorted(full) == ["a", "b", "c", "e"]
    assert views == {k: JobView.of(r) for k, r in full.items()}
    assert views["c"].attempts == 2 and views["e"].state is JobState.QUEUED
    assert "d" not in views
    assert views["a"] == JobView.of(done) and views["b"].last_error == "boom"


def test_report_takes_a_done_records_figures_without_reading_its_manifest(tmp_path: Path) -> None:
    """A record that carries its MANIFEST's figures (rows_out, cost, GPU) is reported from
    them: 100,000 done jobs are not 100,000 file reads. An older record falls back."""
    now = time.time()
    layout = Layout(tmp_path / "root")
    layout.ensure()
    new = _record("n", JobState.DONE, runs=1, instance="7", started_at=now - 9, finished_at=now)
    new.rows_out, new.cost, new.gpu_name = 5, 0.25, "H100"
    old = _record("o", JobState.DONE, runs=1)
    append_history(layout.history_file, [history_line(new), history_line(old)])
    atomic_write_json(layout.state_file, Snapshot(saved_at=now).model_dump(mode="json"))
    layout.results_dir("o").mkdir(parents=True)
    atomic_write_json(layout.results_dir("o") / "MANIFEST.json", {"rows_out": 2, "cost": 0.5})
    # n's MANIFEST says otherwise: the record is what is read
    layout.results_dir("n").mkdir(parents=True)
    atomic_write_json(layout.results_dir("n") / "MANIFEST.json", {"rows_out": 99, "cost": 9.0})
    report = build_report(layout, read_campaign(layout), now=now)
    by_id = {j["id"]: j for j in report["jobs"]}
    assert (by_id["n"]["rows_out"], by_id["n"]["cost"], by_id["n"]["gpu"]) == (5, 0.25, "H100")
    assert (by_id["o"]["rows_out"], by_id["o"]["cost"]) == (2, 0.5)
    assert report["totals"]["rows_out"] == 7 and report["totals"]["cost"] == 0.75
