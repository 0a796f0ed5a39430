"""`[metrics] listen`: /metrics (Prometheus text) and /healthz (JSON), the config key, and
the daemon as a process serving both over the simulator."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from tests.sshd import free_port
from tests.test_daemon_process import (  # noqa: F401 (fixtures)
    DaemonProcess,
    cluster,
    daemons,
    submit,
    write_config,
)
from vastd.core.files import Layout
from vastd.core.records import InstanceRecord
from vastd.core.ssh import Endpoint, SSHPool
from vastd.core.state import InstanceStatus, JobState
from vastd.orchestration.context import Context, build_context, close_context
from vastd.orchestration.metrics_server import (
    TICK_STALE_S,
    MetricsListenError,
    MetricsServer,
    health,
    start_metrics_server,
)
from vastd.sim.cluster import SimCluster, load_make_jobs
from vastd.utils import metrics
from vastd.utils.config import MetricsSettings, Settings, parse_listen, read_config
from vastd.utils.exceptions import SSHConnectionError, VastAIError

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[set[str], Samples]:
    """(family names, {(sample name, sorted labels): value})."""
    families = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples


async def get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


# --- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:9108", ("127.0.0.1", 9108)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:9108", ("::1", 9108)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_listen_addresses(listen: str, address: tuple[str, int]) -> None:
    assert parse_listen(listen) == address
    assert MetricsSettings(listen=listen).address() == address


@pytest.mark.parametrize(
    ("listen", "says"),
    [
        ("9108", "expected HOST:PORT"),
        (":9108", "expected HOST:PORT"),
        ("127.0.0.1:", "port must be a number"),
        ("127.0.0.1:0", "port must be a number"),
        ("127.0.0.1:70000", "port must be a number"),
        ("127.0.0.1:http", "port must be a number"),
        ("::1:9108", "in brackets"),
        ("[::1]9108", "expected [IPv6]:PORT"),
        ("[127.0.0.1]:9108", "not an IPv6 address"),
        ("http://127.0.0.1:9108", "not a host name"),
    ],
)
def test_malformed_listen_is_refused(listen: str, says: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(says)):
        MetricsSettings(listen=listen)


def test_listen_off_by_default() -> None:
    assert Settings().metrics.listen == ""
    assert Settings().metrics.address() is None


def test_config_file_error_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[metrics]\nlisten = "localhost"\n', encoding="utf-8")
    with pytest.raises(Exception) as info:
        read_config(config)
    problems = info.value.problems  # type: ignore[attr-defined]
    assert len(problems) == 1
    assert problems[0].startswith("metrics.listen: expected HOST:PORT"), problems


def test_listen_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VASTD_METRICS__LISTEN", "[::1]:9200")
    assert Settings().metrics.address() == ("::1", 9200)


# --- in-process: the registry and /healthz ----------------------------------------------------
@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[Context]:
    root = tmp_path / "root"
    Layout(root).ensure()
    context = build_context(Settings(paths={"root": str(root)}), cloud=None)
    yield context
    await close_context(context)


async def test_endpoints_in_process(ctx: Context) -> None:
    """Two servers in one process (a registry each); series from the store; 503 while the
    snapshot cannot be saved, 200 again once a save lands."""
    for n, status in enumerate((InstanceStatus.READY, InstanceStatus.READY, InstanceStatus.LOST)):
        ctx.store.instances[str(n)] = InstanceRecord(id=str(n), status=status, dph=0.25)
    ctx.store.snapshot.spend_total = 1.5
    ctx.loop_lag.record(0.002)
    ctx.loop_lag.record(0.5)
    port, other_port = free_port(), free_port()
    server = await start_metrics_server(ctx, MetricsSettings(listen=f"127.0.0.1:{port}"))
    other = await start_metrics_server(ctx, MetricsSettings(listen=f"127.0.0.1:{other_port}"))
    assert server is not None and other is not None
    try:
        status, ctype, text = await get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and ctype.startswith("text/plain"), ctype
        families, samples = parse(text)
        assert {
            "vastd_jobs",
            "vastd_instances",
            "vastd_dph_total",
            "vastd_spend_dollars",
            "vastd_api_requests",
            "vastd_ssh_errors",
            "vastd_job_duration_seconds",
            "vastd_event_loop_lag_seconds",
            "vastd_last_progress_timestamp_seconds",
        } <= families
        for state in JobState:
            assert samples[("vastd_jobs", (("state", state.value),))] == 0
        for st in InstanceStatus:
            want = {"ready": 2, "lost": 1}.get(st.value, 0)
            assert samples[("vastd_instances", (("status", st.value),))] == want
        assert samples[("vastd_dph_total", ())] == pytest.approx(0.5)
        assert samples[("vastd_spend_dollars_total", ())] == 1.5
        for outcome in ("ok", "retry", "error"):
            assert ("vastd_api_requests_total", (("outcome", outcome),)) in samples
        assert ("vastd_ssh_errors_total", ()) in samples
        assert samples[("vastd_event_loop_lag_seconds_count", ())] == 2
        assert samples[("vastd_event_loop_lag_seconds_bucket", (("le", "+Inf"),))] == 2
        under_a_second = [
            v
            for (name, labels), v in samples.items()
            if name == "vastd_event_loop_lag_seconds_bucket"
            and labels[0][1] != "+Inf"
            and 0.01 < float(labels[0][1]) < 0.4
        ]
        assert under_a_second and set(under_a_second) == {1}
        assert samples[("vastd_last_progress_timestamp_seconds", ())] > 0

        ctx.loop_lag.record(0.001)  # the ticker has run
        metrics.beat("dispatch"), metrics.beat("preparation"), metrics.beat("followups")
        status, ctype, text = await get(f"http://127.0.0.1:{other_port}/healthz")
        assert status == 200 and ctype.startswith("application/json")
        body = json.loads(text)
        assert body["status"] == "ok" and body["problems"] == []
        assert body["save_error"] is None and body["jobs"]["queued"] == 0
        assert set(body["loop_lag"]) >= {"p99_ms", "last_tick_age_s"}

        ctx.store.save_error = "state.json: No space left on device"
        status, _ctype, text = await get(f"http://127.0.0.1:{port}/healthz")
        assert status == 503, text
        assert "No space left on device" in text and '"unhealthy"' in text
        ctx.store.save_error = None
        status, _ctype, _text = await get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200

        with pytest.raises(MetricsListenError, match=f"127.0.0.1:{port}: cannot listen"):
            await MetricsServer(ctx, "127.0.0.1", port).start()
    finally:
        await server.stop()
        await other.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(f"http://127.0.0.1:{port}/metrics")


async def test_health_stale_loops(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """503 when the loop-lag ticker or a watched loop stopped making progress."""
    started = time.monotonic()
    ok, body = health(ctx, started=started, now=started + 1)
    assert ok, body  # within the start-up grace
    ok, body = health(ctx, started=started, now=started + TICK_STALE_S + 1)
    assert not ok and any("loop-lag ticker" in p for p in body["problems"])
    ctx.loop_lag.record(0.0)
    metrics.beat("preparation"), metrics.beat("followups")
    now = time.monotonic()
    monkeypatch.setitem(metrics._CLOCK.beats, "dispatch", now - 1000)  # long ago
    ctx.loop_lag.last_tick = now
    ok, body = health(ctx, started=now - 2000, now=now)
    assert not ok
    assert body["problems"] == [body["problems"][0]]
    assert "the dispatch loop has not finished a step" in body["problems"][0]


# --- the daemon as a process --------------------------------------------------------------
async def test_daemon_serves_metrics_and_healthz(
    tmp_path: Path,
    cluster: Callable[..., Awaitable[SimCluster]],  # noqa: F811
    daemons: Callable[..., Awaitable[DaemonProcess]],  # noqa: F811
) -> None:
    """`vastd run` with [metrics] listen: /metrics parses, its job counts follow the jobs
    to done (with their durations and the API calls counted), /healthz is 200; SIGTERM
    closes the port."""
    sim = await cluster(instances=2)
    port = free_port()
    config, root = write_config(sim, tmp_path, metrics={"listen": f"127.0.0.1:{port}"})
    daemon = await daemons(config)
    await daemon.wait_event("daemon_started")
    assert daemon.events("metrics_listening", port=port)
    base = f"http://127.0.0.1:{port}"

    status, _ctype, text = await get(f"{base}/metrics")
    assert status == 200
    _families, before = parse(text)
    assert before[("vastd_jobs", (("state", "done"),))] == 0

    sources = load_make_jobs()(tmp_path / "jobs", 3, 3, 11, prefix="metrics_job")
    await submit(config, sources)
    submitted = time.time()

    async def done_count() -> float:
        _status, _ctype, text = await get(f"{base}/metrics")
        return parse(text)[1][("vastd_jobs", (("state", "done"),))]

    async def all_done() -> bool:
        return await done_count() == 3

    deadline = time.monotonic() + 90
    while not await all_done():
        assert time.monotonic() < deadline, daemon.tail()
        assert daemon.proc.returncode is None, daemon.tail()
        await asyncio.sleep(0.3)

    _status, _ctype, text = await get(f"{base}/metrics")
    _families, samples = parse(text)
    assert samples[("vastd_jobs", (("state", "queued"),))] == 0
    assert samples[("vastd_jobs", (("state", "failed"),))] == 0
    assert samples[("vastd_job_duration_seconds_count", ())] == 3
    assert samples[("vastd_job_duration_seconds_sum", ())] > 0
    assert samples[("vastd_api_requests_total", (("outcome", "ok"),))] > 0
    assert samples[("vastd_api_requests_total", (("outcome", "error"),))] == 0
    ready = samples[("vastd_instances", (("status", "ready"),))]
    assert ready == 2, text
    assert samples[("vastd_dph_total", ())] > 0
    assert samples[("vastd_event_loop_lag_seconds_count", ())] > 0
    assert samples[("vastd_last_progress_timestamp_seconds", ())] >= submitted - 1
    assert len(list((root / "done").iterdir())) == 3

    async def healthy() -> dict[str, Any] | None:
        status, _ctype, text = await get(f"{base}/healthz")
        return json.loads(text) if status == 200 else None

    body = None
    for _ in range(50):
        body = await healthy()
        if body is not None:
            break
        await asyncio.sleep(0.2)
    assert body is not None and body["status"] == "ok", body
    assert body["jobs"]["done"] == 3

    assert await daemon.stop(signal.SIGTERM) == 0
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(f"{base}/healthz")


async def test_daemon_refuses_to_start_on_a_port_in_use(
    tmp_path: Path,
    cluster: Callable[..., Awaitable[SimCluster]],  # noqa: F811
    daemons: Callable[..., Awaitable[DaemonProcess]],  # noqa: F811
) -> None:
    """A port already in use: exit 1 at start-up with one error naming the address; the
    root's lock is released (the same config with a free port starts)."""
    sim = await cluster(instances=1)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config, _root = write_config(sim, tmp_path, metrics={"listen": f"127.0.0.1:{port}"})
        daemon = await daemons(config)
        assert await daemon.wait_exit(30) == 1
    fatal = daemon.events("daemon_fatal")
    assert len(fatal) == 1, daemon.tail()
    assert f"metrics.listen 127.0.0.1:{port}: cannot listen" in fatal[0]["error"]
    assert not daemon.events("daemon_started")

    config, _root = write_config(sim, tmp_path, metrics={"listen": f"127.0.0.1:{free_port()}"})
    again = await daemons(config)
    await again.wait_event("daemon_started")
    assert await again.stop(signal.SIGTERM) == 0


def test_check_config_shows_and_checks_listen(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vastd check-config` prints metrics.listen and where to scrape; a bad one is one
    line naming the key, exit 2."""
    from tests.test_check_config import check, make_config

    for name in list(os.environ):
        if name.startswith("VASTD_"):
            monkeypatch.delenv(name)
    config = make_config(tmp_path / "good", metrics={"listen": "[::1]:9108"})
    code, out, err = check(config, capsys)
    assert code == 0, err
    assert json.loads(out)["metrics"] == {"listen": "[::1]:9108"}
    assert "# metrics: http://[::1]:9108/metrics and http://[::1]:9108/healthz" in err

    config = make_config(tmp_path / "bad", metrics={"listen": "127.0.0.1:99999"})
    code, out, err = check(config, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if "metrics.listen" in line]
    assert len(lines) == 1 and "port must be a number" in lines[0], err


async def test_api_calls_are_counted_by_outcome() -> None:
    """vastd_api_requests_total: ok per answered call, retry per retry, error per call
    given up on (the simulator answers 503 twice, then for ever)."""
    from vastd.instances.vast_api import VastClient
    from vastd.sim import SimCloud, start_sim_api

    async def no_sleep(_delay_s: float) -> None:
        return None

    def counts() -> tuple[float, float, float]:
        return (
            metrics.API_OK._value.get(),
            metrics.API_RETRY._value.get(),
            metrics.API_ERROR._value.get(),
        )

    cloud = SimCloud(api_key="k" * 20, boot_delay_s=0.02)
    runner, url = await start_sim_api(cloud)
    try:
        async with VastClient(url, "k" * 20, max_retries=3, sleep=no_sleep, timeout_s=5) as client:
            before = counts()
            cloud.faults.add(endpoint="list_instances", status=503, count=2)
            assert await client.list_instances() == []
            ok, retry, error = (a - b for a, b in zip(counts(), before, strict=True))
            assert (ok, retry, error) == (1, 2, 0)
            cloud.faults.add(endpoint="list_instances", status=503, count=None)
            with pytest.raises(VastAIError):
                await client.list_instances()
            ok, retry, error = (a - b for a, b in zip(counts(), before, strict=True))
            assert (ok, retry, error) == (1, 5, 1)
    finally:
        await runner.cleanup()
        await cloud.aclose()


async def test_ssh_connect_failure_is_counted(ssh_pool: Callable[..., SSHPool]) -> None:
    """vastd_ssh_errors_total: one per connection that could not be opened."""
    pool = ssh_pool()
    before = metrics.SSH_ERRORS._value.get()
    with pytest.raises(SSHConnectionError):
        await pool.get("i9", [Endpoint("127.0.0.1", free_port())])
    assert metrics.SSH_ERRORS._value.get() == before + 1


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this host")
async def test_ipv6_listen(ctx: Context) -> None:
    """`[::1]:PORT` binds the IPv6 loopback."""
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        port = sock.getsockname()[1]
    server = await start_metrics_server(ctx, MetricsSettings(listen=f"[::1]:{port}"))
    assert server is not None
    try:
        status, _ctype, text = await get(f"http://[::1]:{port}/metrics")
        assert status == 200 and "vastd_jobs" in text
    finally:
        await server.stop()
