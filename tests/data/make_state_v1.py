"""Writes tests/data/state_v1.json: a version 1 snapshot made by the b859f46 code.

Not a test. Run it against that code, e.g.

    mkdir /tmp/v1code && git archive b859f46 vastd | tar -x -C /tmp/v1code
    PYTHONPATH=/tmp/v1code .venv/bin/python tests/data/make_state_v1.py > tests/data/state_v1.json

Two done jobs, a failed one, a failed one with an orphaned run, a queued and a running one.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from vastd.core import state as st
from vastd.core.files import Layout
from vastd.core.state import InstanceRecord, InstanceStatus, OrphanRun, StateStore


def main() -> None:
    assert st.SCHEMA_VERSION == 1, "run this with the b859f46 code on PYTHONPATH"
    layout = Layout(Path(tempfile.mkdtemp()))
    layout.ensure()
    store = StateStore(layout.state_file)
    store.instances["101"] = InstanceRecord(
        id="101", status=InstanceStatus.READY, ssh_host="127.0.0.1", ssh_port=2222, dph=0.25
    )
    for name in ("done_a", "failed_b", "failed_orphan_c", "queued_d", "running_e", "done_f"):
        (layout.queued / f"{name}.csv").write_text("a,b\n1,2\n")
        st.add_job(store, name, f"{name}.csv", rows=1)
    for name in ("done_a", "done_f"):
        st.mark_job_assigned(store, name, "101")
        st.mark_job_exited(store, name, exit_code=0, error=None)
        run_id = store.jobs[name].run_id
        st.mark_job_completed(
            store, name, instance_id="101", run_id=run_id, result_files=["out.parquet"]
        )
    st.mark_job_failed(store, "failed_b", reason="bad input")
    st.mark_job_assigned(store, "failed_orphan_c", "101")
    st.mark_job_failed(store, "failed_orphan_c", reason="gave up")
    orphan = OrphanRun(instance="102", run="00aa00aa00aa00aa", started_at=1.0)
    store.jobs["failed_orphan_c"].orphans.append(orphan)
    st.mark_job_assigned(store, "running_e", "101")
    store.flush_sync()
    sys.stdout.write(layout.state_file.read_text())


if __name__ == "__main__":
    main()
