"""bench/chaos.py writes its table into bench/RESULTS.md: only its own section changes,
the notes kept there by hand (earlier runs) survive, and the next section keeps its
blank line."""

from __future__ import annotations

from pathlib import Path

from bench.chaos import (
    NOTES_END,
    NOTES_START,
    RESULTS_HEADING,
    ChaosConfig,
    ChaosReport,
    write_results_md,
)


def test_the_chaos_table_replaces_its_own_section_and_keeps_the_notes(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    notes = f"{NOTES_START}\nEarlier runs: abc1234, PASS.\n{NOTES_END}"
    results.write_text(
        f"# Results\n\nintro\n\n{RESULTS_HEADING}\n\nold stamp\n\n{notes}\n\n"
        "| old | table |\n\n## Scale\n\nscale text\n"
    )
    report = ChaosReport(config=ChaosConfig(jobs=7, kills=1, instances=2, stage_ahead=1))
    write_results_md(report, results)
    text = results.read_text()
    assert text.startswith("# Results\n\nintro\n\n" + RESULTS_HEADING + "\n\n")
    assert notes in text and "old stamp" not in text and "| old | table |" not in text
    assert "Profile: 7 jobs x 3 rows, 1 kills, 2 instances, seed" in text
    assert "stage_ahead = 1." in text
    assert text.index(notes) < text.index("Profile:")
    assert text.endswith("\n\n## Scale\n\nscale text\n")
    write_results_md(report, results)  # again: the same shape
    assert results.read_text().count(NOTES_START) == 1
    assert results.read_text().endswith("\n\n## Scale\n\nscale text\n")
