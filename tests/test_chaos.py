"""The short chaos run of issue 4 (the full one is `make chaos`).

bench/chaos.py runs the real daemon as a subprocess against the simulated vast.ai
API whose instances are real OpenSSH sshd servers, SIGKILLs it at random moments and
restarts it, kills an instance's sshd mid-job (and revives it), turns an instance
offline, injects ~30% API 5xx with 429 bursts and malformed answers, drops a hostile
inbox corpus (with shell-injection names and a canary) and a duplicate of a queued
name, truncates state.json between two runs and once corrupts both snapshots. Judged
from disk only: every valid job in done/ with exactly one run's valid parquet (or in
failed/ where the worker itself refuses it), nothing lost, nothing duplicated or
mixed, no canary, re-runs within kills + instance faults, no rentals, exit 1 over two
corrupt snapshots with both files untouched, exit 0 on the final SIGTERM.
"""

from __future__ import annotations

import os

import pytest

from bench.chaos import ChaosConfig, run_chaos
from tests.sshd import unavailable_reason

pytestmark = [pytest.mark.e2e, pytest.mark.sshd, pytest.mark.slow, pytest.mark.timeout(360)]


def test_short_chaos_run_loses_nothing_and_runs_nothing_twice_for_nothing() -> None:
    """The short profile (30 jobs, 3 kills, 4 instances, a dozen hostile entries) passes."""
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") or os.environ.get("VASTD_REQUIRE_SSHD"):
            pytest.fail(reason)
        pytest.skip(reason)
    lines: list[str] = []
    report = run_chaos(ChaosConfig.short_profile(echo=lines.append))
    detail = report.table() + "\n\ntimeline:\n" + "\n".join(lines)
    if report.workdir:
        detail += f"\nwork folder kept: {report.workdir}"
    assert report.ok, detail
    assert report.lost == [] and report.duplicated == [] and report.canary == [], detail
    assert report.faults["daemon SIGKILL"] == 3, detail
