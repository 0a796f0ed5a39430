"""The README's library examples, run verbatim against the simulator.

Each ```python block of the README's "Using vastd as a library" section is exec'd as it stands (under a module name
other than `__main__`, so its `if __name__ == "__main__":` part stays inert) and the
function it defines is called with settings for a `SimCluster` (asyncssh SimHosts).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from vastd.core.state import JobState
from vastd.instances.preparation import marker_path, steps_hash
from vastd.sim.cluster import SimCluster, load_make_jobs

DOC = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Using vastd as a library"
PARAMS = ("eta", "lam", "var0", "alpha", "gamma", "beta", "p")


def example_blocks() -> list[str]:
    text = DOC.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else None]
    return re.findall(r"^```python\n(.*?)^```$", section, flags=re.M | re.S)


def load_example(index: int) -> dict[str, Any]:
    """Execute the index-th python block of the doc; return its namespace."""
    source = example_blocks()[index]
    namespace: dict[str, Any] = {"__name__": f"library_example_{index}"}
    exec(compile(source, f"{DOC}#example{index + 1}", "exec"), namespace)
    return namespace


def check_results(result_dir: Path, source_csv: Path) -> None:
    """One parquet whose rows match the CSV's parameters row by row, plus log.txt."""
    parquets = sorted(result_dir.glob("*.parquet"))
    assert len(parquets) == 1 and (result_dir / "log.txt").is_file()
    table = pq.read_table(parquets[0]).to_pydict()
    with source_csv.open(newline="") as handle:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(handle)]
    assert sorted(set(table["job_row"])) == list(range(len(rows)))
    for i, job_row in enumerate(table["job_row"]):
        for name in PARAMS:
            assert math.isclose(table[name][i], rows[job_row][name], rel_tol=1e-6, abs_tol=1e-7)


@pytest.fixture
async def sim_cluster(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[SimCluster]]]:
    """Factory: `await sim_cluster(instances=2)` -> a started SimCluster, closed after."""
    clusters: list[SimCluster] = []

    async def make(instances: int = 2) -> SimCluster:
        cluster = await SimCluster.start(tmp_path / f"sim{len(clusters)}", instances=instances)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        await cluster.aclose()


def test_doc_has_the_three_examples() -> None:
    """The README section holds exactly the three examples the tests below run, in order."""
    blocks = example_blocks()
    assert len(blocks) == 3
    assert "async def run_one_job" in blocks[0]
    assert "async def prepare_instances" in blocks[1]
    assert "async def run_my_way" in blocks[2]


async def test_example_simple_job_execution(tmp_path: Path, sim_cluster: Any) -> None:
    """Example 1: `run_complete_job_workflow` runs one job file to DONE with valid results."""
    cluster = await sim_cluster(instances=2)
    settings = cluster.settings(tmp_path / "vastd")
    job = load_make_jobs()(tmp_path / "jobs", 1, 4, 21, prefix="garch_test_job")[0]

    state = await load_example(0)["run_one_job"](settings, job)

    assert state is JobState.DONE
    check_results(settings.paths.root / "results" / job.stem, job)
    assert (settings.paths.root / "done" / job.name).is_file()


async def test_example_instance_management(tmp_path: Path, sim_cluster: Any) -> None:
    """Example 2: discovery finds the labelled instances only, and each gets prepared.

    The returned markers are the steps' hash, written to each instance's marker file;
    an instance under another label is neither returned nor touched.
    """
    cluster = await sim_cluster(instances=2)
    foreign = await cluster.cloud.add_instance(label="other-work")
    settings = cluster.settings(tmp_path / "vastd")

    markers = await load_example(1)["prepare_instances"](settings)

    labelled = {i for i, row in cluster.cloud.instances.items() if row["label"] == "vastd"}
    assert set(markers) == labelled and len(labelled) == 2
    wanted = steps_hash(settings.prepare)
    assert set(markers.values()) == {wanted}
    for instance_id in labelled:
        marker = Path(marker_path(settings.remote.root, str(instance_id)))
        assert marker.read_text().strip() == wanted
    assert not (Path(settings.remote.root) / str(foreign)).exists()


async def test_example_custom_orchestration(tmp_path: Path, sim_cluster: Any) -> None:
    """Example 3: dispatch + scheduler-driven collection run four jobs to DONE on two instances."""
    cluster = await sim_cluster(instances=2)
    settings = cluster.settings(tmp_path / "vastd")
    jobs = load_make_jobs()(tmp_path / "jobs", 4, 3, 22, prefix="garch_test_job")

    states = await load_example(2)["run_my_way"](settings, jobs)

    assert states == {job.stem: JobState.DONE for job in jobs}
    for job in jobs:
        check_results(settings.paths.root / "results" / job.stem, job)
