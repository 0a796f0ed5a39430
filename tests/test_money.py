"""Money against the simulator (issue 10): the rental circuit breaker, confirmed destroys,
instances gone from the listing, adopted instances' billing, and a 429 without Retry-After.

The fleet runs in process on `tests/test_fleet.py`'s SimFleet (the daemon's loops on a
simulated account whose instances are live asyncssh hosts).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.test_fleet import SimFleet, _close, _connect, sim_fleet  # noqa: F401
from vastd.core.files import Layout
from vastd.core.records import Snapshot
from vastd.core.snapshot_file import load_state
from vastd.core.state import InstanceStatus
from vastd.orchestration import fleet as fl
from vastd.orchestration import inventory
from vastd.status import build_status, format_status, status_json
from vastd.utils.config import PrepareStep
from vastd.utils.supervise import Backoff

pytestmark = pytest.mark.slow

Fleet = Callable[..., Awaitable[SimFleet]]


# --- 1. the circuit breaker ---------------------------------------------------------------------
async def test_renting_pauses_after_three_rentals_that_never_became_ready(
    sim_fleet: Fleet,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A [[prepare]] step that fails everywhere, twelve offers: after 3 rentals that never
    became ready renting pauses for rent_pause_s (today it rents on while offers last); the
    pause is in the snapshot, `vastd status` says why, and a restart does not lift it."""
    monkeypatch.setattr(inventory, "PREPARE_BACKOFF", Backoff(0.05, 0.1, jitter="none"))
    sf = await sim_fleet(offers=[0.3 + i / 100 for i in range(12)], max_instances=1)
    sf.ctx.settings.prepare = [PrepareStep(name="broken", check="false", install="exit 3")]
    snap = sf.ctx.store.snapshot
    sf.submit(1)
    sf.run()
    await sf.wait(lambda: snap.rent_paused_until is not None, 40, "renting paused")
    assert snap.failed_rentals == 3
    assert snap.rent_paused_until is not None
    assert snap.rent_paused_until > time.time() + 1700
    assert snap.rent_pause_reason and "3 rentals in a row never became ready" in (
        snap.rent_pause_reason
    )
    await sf.wait(lambda: not sf.cloud.instances, 20, "the third one destroyed")
    deadline = time.time() + 3.0
    while time.time() < deadline:
        assert sf.cloud.stats["rent"] == 3
        await asyncio.sleep(0.2)
    assert all(i.status is InstanceStatus.DESTROYED for i in sf.owned())

    await sf.ctx.store.flush()
    layout = Layout(sf.ctx.layout.root)
    status = build_status(layout, load_state(layout.state_file))
    assert status["renting"]["paused"] is True
    assert status["renting"]["failed_rentals"] == 3
    assert "never became ready" in json.loads(status_json(status))["renting"]["reason"]
    assert "renting: PAUSED until" in format_status(status)

    # A restart reads the pause back: the new daemon rents nothing either.
    await _close(sf.ctx, sf.task)
    sf.ctx, sf.task = _connect(sf.cluster, layout.root, sf.ctx.settings), None
    assert sf.ctx.store.snapshot.rent_paused_until == snap.rent_paused_until
    report = await fl.fleet_once(sf.ctx)
    assert report.desired == 1 and report.rented == []
    assert sf.cloud.stats["rent"] == 3


async def test_half_open_breaker_tries_one_rental_and_a_ready_one_resets_it(
    sim_fleet: Fleet,  # noqa: F811
) -> None:
    """Once the pause is over, one rental at a time is tried (not max_instances at once);
    when it becomes ready the count is reset and renting goes on normally."""
    sf = await sim_fleet(max_instances=3, boot_delay_s=2.0, boot_timeout_s=30.0)
    snap = sf.ctx.store.snapshot
    snap.failed_rentals = 3
    snap.rent_paused_until = time.time() - 1.0  # the pause is over
    snap.rent_pause_reason = "3 rentals in a row never became ready"
    sf.submit(3)
    sf.run()
    await sf.wait(lambda: sf.cloud.stats["rent"] >= 1, 10, "the probe rented")
    await asyncio.sleep(1.0)  # the probe is still booting: nothing more is rented
    assert sf.cloud.stats["rent"] == 1
    await sf.wait(lambda: snap.failed_rentals == 0, 20, "the probe became ready")
    assert snap.rent_paused_until is None and snap.rent_pause_reason is None
    await sf.wait(lambda: sf.cloud.stats["rent"] == 3, 20, "renting went on")


def test_a_snapshot_without_the_breaker_fields_still_loads(tmp_path: Path) -> None:
    """A snapshot written before the breaker existed loads with a zero count and no pause."""
    data = Snapshot().model_dump(mode="json")
    for key in ("failed_rentals", "rent_paused_until", "rent_pause_reason"):
        data.pop(key)
    path = tmp_path / "state.json"
    path.write_text(json.dumps(data))
    snap = load_state(path)
    assert snap.failed_rentals == 0 and snap.rent_paused_until is None
