"""The example workload: examples/garch_worker.py and examples/make_jobs.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from vastd.core.jobs import validate_job_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WORKER = EXAMPLES / "garch_worker.py"
SAMPLE = EXAMPLES / "jobs" / "garch_test_job_0000_0004.csv"
COLUMNS = [
    "alpha",
    "gamma",
    "beta",
    "var0",
    "eta",
    "lam",
    "num_sim_paths",
    "job_row",
    "ti",
    "p",
    "x",
]

sys.path.insert(0, str(EXAMPLES))
from make_jobs import make_jobs  # noqa: E402


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(WORKER), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_worker_writes_one_complete_parquet_beside_its_input(tmp_path: Path) -> None:
    """The worker writes <stem>_0_streaming_1_<N>_<Q>.parquet beside the input with every row."""
    job = tmp_path / SAMPLE.name
    shutil.copy(SAMPLE, job)
    done = _run(job, "--num_sim", "2000", "--num_quantiles", "16", "--stride", "1")
    assert done.returncode == 0, done.stderr
    assert [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("Row ")] == [
        f"Row {n}" for n in range(5)
    ]
    out = tmp_path / "garch_test_job_0000_0004_0_streaming_1_2000_16.parquet"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([job.name, out.name])
    table = pq.read_table(out)
    assert table.column_names == COLUMNS
    assert table.schema.field("x").type.value_type == "float"
    assert len(set(table.column("job_row").to_pylist())) == 5
    assert set(table.column("num_sim_paths").to_pylist()) == {2000}
    for x in table.column("x").to_pylist():
        assert len(x) == 16
        assert np.all(np.diff(x) >= 0)  # quantiles are sorted


def test_worker_output_dir_seed_and_stride(tmp_path: Path) -> None:
    """--output-dir places the file; --stride S takes rows 0, S, 2S; a fixed seed repeats results."""
    first = _run(SAMPLE, "--num_sim", "500", "--num_quantiles", "8", "--stride", "2",
                 "--output-dir", tmp_path, "--seed", "7")  # fmt: skip
    assert first.returncode == 0, first.stderr
    out = tmp_path / "garch_test_job_0000_0004_0_streaming_2_500_8.parquet"
    table = pq.read_table(out)
    assert sorted(set(table.column("job_row").to_pylist())) == [0, 2, 4]
    again = _run(SAMPLE, "--num_sim", "500", "--num_quantiles", "8", "--stride", "2",
                 "--output-dir", tmp_path, "--seed", "7")  # fmt: skip
    assert again.returncode == 0
    assert pq.read_table(out).equals(table)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("eta,lam,var0\n10,0.1,1\n", "missing column"),
        ("eta,lam,var0,alpha,gamma,beta,p\n10,0.1,abc,0.05,0.1,0.85,0.5\n", "not a number"),
        ("eta,lam,var0,alpha,gamma,beta,p\n", "no data rows"),
        ("eta,lam,var0,alpha,gamma,beta,p\n10,0.1,1,0.2,0.2,0.9,0.5\n", "non-stationary"),
    ],
    ids=["columns", "number", "empty", "stationarity"],
)
def test_worker_bad_csv_exits_1_without_output(tmp_path: Path, content: str, message: str) -> None:
    """A bad CSV: exit code 1, the reason on stderr, and no parquet (nor temp file) left behind."""
    job = tmp_path / "bad_job.csv"
    job.write_text(content)
    done = _run(job, "--num_sim", "100", "--num_quantiles", "4", "--stride", "1")
    assert done.returncode == 1
    assert "error:" in done.stderr and message in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["bad_job.csv"]


def test_worker_missing_input_exits_1(tmp_path: Path) -> None:
    """A missing input file is an error on stderr with exit code 1."""
    done = _run(tmp_path / "nope.csv", "--num_sim", "100")
    assert done.returncode == 1 and "error:" in done.stderr


def test_make_jobs_is_deterministic_and_valid(tmp_path: Path) -> None:
    """make_jobs names files like upstream, repeats itself for a seed, and the files validate."""
    one = make_jobs(tmp_path / "a", 3, 4, seed=5)
    two = make_jobs(tmp_path / "b", 3, 4, seed=5, prefix="garch_test_job")
    assert [p.name for p in one] == [
        "garch_test_job_0000_0003.csv",
        "garch_test_job_0004_0007.csv",
        "garch_test_job_0008_0011.csv",
    ]
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in two]
    for path in one:
        info = validate_job_file(path, 1 << 20)
        assert info.rows == 4
        assert info.columns == ["eta", "lam", "var0", "alpha", "gamma", "beta", "p"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [p.name for p in one]


def test_example_job_files_are_valid() -> None:
    """The shipped examples/jobs/*.csv pass acceptance with 5 rows each."""
    files = sorted((EXAMPLES / "jobs").glob("*.csv"))
    assert len(files) >= 3
    for path in files:
        assert validate_job_file(path, 1 << 20).rows == 5
