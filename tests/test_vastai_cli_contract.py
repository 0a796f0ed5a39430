"""The official vastai CLI against the simulator: it must list, search, create and destroy.

The CLI is synchronous, so it runs as a subprocess while the simulator serves from
this test's event loop. HOME and XDG folders point at a temp dir: the CLI caches
its role there and must not touch the real home.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vastd.instances.vast_api import VastClient
from vastd.sim import SimCloud, start_sim_api

KEY = "cli-contract-key-1234567890"
QUERY = (
    "gpu_name in [RTX_3090,RTX_4090] reliability>0.98 dph_total<=0.5 verified=true "
    "direct_port_count>=1"
)


def vastai_command() -> list[str]:
    script = Path(sys.executable).parent / "vastai"
    if script.exists():
        return [str(script)]
    found = shutil.which("vastai")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from vastai.cli.main import main; sys.exit(main())"]


class CLI:
    """Runs `vastai --url URL --api-key KEY --raw ...` and decodes its JSON output."""

    def __init__(self, url: str, home: Path, key: str = KEY) -> None:
        self.url, self.key = url, key
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("VAST_", "XDG_"))}
        self.env.update(
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / ".config"),
            XDG_CACHE_HOME=str(home / ".cache"),
            XDG_STATE_HOME=str(home / ".local/state"),
            XDG_DATA_HOME=str(home / ".local/share"),
            VASTAI_NO_UPDATE_CHECK="1",
        )

    async def run(self, *args: str) -> tuple[str, str]:
        proc = await asyncio.create_subprocess_exec(
            *vastai_command(),
            "--url",
            self.url,
            "--api-key",
            self.key,
            "--raw",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
        # In --raw mode the CLI reports HTTP errors on stderr but still exits 0.
        assert proc.returncode == 0, err.decode()
        return out.decode(), err.decode()

    async def json(self, *args: str) -> Any:
        out, err = await self.run(*args)
        assert '"error": true' not in err, err
        return json.loads(out)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[SimCloud, CLI, VastClient]]:
    cloud = SimCloud(api_key=KEY, boot_delay_s=0.05)
    runner, url = await start_sim_api(cloud)
    async with VastClient(url, KEY, timeout_s=10) as client:
        yield cloud, CLI(url, tmp_path / "home"), client
    await runner.cleanup()
    await cloud.aclose()


def summary(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["id"], r["label"], r["actual_status"], r["ssh_port"]) for r in rows]


async def test_show_instances_agrees_with_vastclient(
    env: tuple[SimCloud, CLI, VastClient],
) -> None:
    """`show instances --raw` pages through 30 instances and sees what VastClient sees."""
    cloud, cli, client = env
    for i in range(30):
        instance_id = await cloud.add_instance(label="vastd" if i % 3 else "other")
        if i % 7 == 0:
            await cloud.set_status(instance_id, "offline")
    rows = await cli.json("show", "instances")
    assert len(rows) == 30
    assert summary(rows) == summary(await client.list_instances())
    labelled = await cli.json("show", "instances", "--label", "vastd")
    assert summary(labelled) == summary(await client.list_instances("vastd"))
    one = await cli.json("show", "instance", str(rows[0]["id"]))
    assert one["id"] == rows[0]["id"] and one["actual_status"] == rows[0]["actual_status"]
    assert all(KEY not in c["url"] for c in cloud.calls)


async def test_search_offers_agrees_with_vastclient(
    env: tuple[SimCloud, CLI, VastClient],
) -> None:
    """`search offers '<query>'` returns the offers VastClient finds for the same query."""
    _, cli, client = env
    rows = await cli.json("search", "offers", QUERY, "-o", "dph_total")
    assert rows, "the default fleet query should match simulated offers"
    ours = await client.search_offers(QUERY, order="dph_total")
    assert [o["id"] for o in rows] == [o["id"] for o in ours]
    desc = await cli.json("search", "offers", "num_gpus>=1", "-o", "dph_total-", "--limit", "3")
    assert [o["id"] for o in desc] == [
        o["id"] for o in await client.search_offers("num_gpus>=1", order="-dph_total", limit=3)
    ]


async def test_create_and_destroy_instance(env: tuple[SimCloud, CLI, VastClient]) -> None:
    """`create instance` rents what VastClient then lists; `destroy instance -y` removes it."""
    cloud, cli, client = env
    offer_id = (await client.search_offers(QUERY))[0]["id"]
    created = await cli.json(
        "create", "instance", str(offer_id), "--image", "vastai/base", "--disk", "10",
        "--label", "vastd", "--ssh", "--direct",
    )  # fmt: skip
    assert created["success"] is True
    instance_id = created["new_contract"]
    await cloud.wait_for_status(instance_id, "running")
    listed = await client.list_instances("vastd")
    assert [r["id"] for r in listed] == [instance_id]
    assert listed[0]["image_uuid"] == "vastai/base" and listed[0]["disk_space"] == 10
    cli_rows = await cli.json("show", "instances")
    assert summary(cli_rows) == summary(listed)
    # Rented offers leave the market for both clients.
    assert offer_id not in [o["id"] for o in await cli.json("search", "offers", QUERY)]
    # `destroy instance` prints nothing even with --raw (1.9.1 drops the result).
    out, err = await cli.run("destroy", "instance", str(instance_id), "-y")
    assert out.strip() == "" and '"error"' not in err
    assert cloud.stats["destroy"] == 1
    assert await client.list_instances("vastd") == []
    assert await cli.json("show", "instances") == []


async def test_cli_reports_errors_on_stderr(env: tuple[SimCloud, CLI, VastClient]) -> None:
    """A bad key or a missing instance shows as a JSON error on stderr (exit status 0)."""
    cloud, cli, _ = env
    bad = CLI(cli.url, Path(cli.env["HOME"]), key="not-the-key")
    _, err = await bad.run("show", "instances")
    assert json.loads(err.strip().splitlines()[-1])["status_code"] == 401
    _, err = await cli.run("destroy", "instance", "424242", "-y")
    assert json.loads(err.strip().splitlines()[-1])["status_code"] == 404
    assert all("not-the-key" not in c["url"] for c in cloud.calls)
