"""`vastd check-config` catches what would otherwise fail later, and the CLI's expected errors
are one line with the right exit code, never a traceback (issue 12)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import clean_env, dump_toml, write_private_key
from vastd.cli import _parser, main
from vastd.core.lock import RootLock

REPO = Path(__file__).resolve().parent.parent


def write_key(path: Path, mode: int = 0o600) -> Path:
    return write_private_key(path, mode)


def make_config(folder: Path, **sections: dict[str, Any]) -> Path:
    """A valid config in `folder` (SSH key beside it, 0600), with `sections` merged in."""
    folder.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "paths": {"root": str(folder / "root")},
        "vast": {"api_key_file": str(folder / "no-such-api-key")},
        "ssh": {"key_file": str(write_key(folder / "id_ed25519"))},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path = folder / "config.toml"
    path.write_text(dump_toml(data), encoding="utf-8")
    return path


def check(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["check-config", "--config", str(config)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture(autouse=True)
def _no_vastd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VASTD_") or name in ("VAST_API_KEY", "CREDENTIALS_DIRECTORY"):
            monkeypatch.delenv(name)


# --- check-config: each case -------------------------------------------------------------------
BAD_CASES = {
    "order_typo": ({"fleet": {"order": "dph_totl"}}, ["fleet.order", "dph_totl"]),
    "order_empty": ({"fleet": {"order": " , "}}, ["fleet.order"]),
    # past what a read can take: every acceptance failed with an OverflowError
    "max_input_bytes_huge": ({"job": {"max_input_bytes": 10**27}}, ["job.max_input_bytes"]),
    "query_number": ({"fleet": {"offer_query": "dph_total<=abc"}}, ["fleet.offer_query", "number"]),
    "query_bool": ({"fleet": {"offer_query": "verified=maybe"}}, ["fleet.offer_query", "true"]),
    "query_list": (
        {"fleet": {"offer_query": "num_gpus in [1,two]"}},
        ["fleet.offer_query", "num_gpus"],
    ),
    "known_hosts_typo": ({"ssh": {"known_hosts": "tofoo"}}, ["ssh.known_hosts", "tofoo"]),
    "known_hosts_missing": (
        {"ssh": {"known_hosts": "./known_hosts"}},
        ["ssh.known_hosts", "not a readable file"],
    ),
    "endpoint_enum": ({"ssh": {"endpoint": "proxi"}}, ["ssh.endpoint"]),
    "mode_enum": ({"fleet": {"mode": "rent"}}, ["fleet.mode"]),
    "validate_enum": ({"job": {"validate": "csv"}}, ["job.validate"]),
    "image_empty": ({"fleet": {"image": ""}}, ["fleet.image", "empty"]),
    "image_blank": ({"fleet": {"image": "   "}}, ["fleet.image", "empty"]),
    "log_level": ({"log": {"level": "loud"}}, ["log.level", "loud"]),
    "ssh_key_missing": ({"ssh": {"key_file": "/nonexistent/id_ed25519"}}, ["ssh.key_file"]),
    "failed_rentals_negative": (
        {"fleet": {"max_failed_rentals": -1}},
        ["fleet.max_failed_rentals"],
    ),
    "rent_pause_zero": ({"fleet": {"rent_pause_s": 0}}, ["fleet.rent_pause_s"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_check_config_refuses(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each mistake: exit 2 and a line naming the key; nothing on stdout."""
    sections, needles = BAD_CASES[case]
    code, out, err = check(make_config(tmp_path, **sections), capsys)
    assert code == 2, err
    assert out == ""
    for needle in needles:
        assert needle in err


def test_check_config_valid_variants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Descending orders, typed queries, a known_hosts file beside the config, DEBUG in capitals."""
    (tmp_path / "known_hosts").write_text("")
    config = make_config(
        tmp_path,
        fleet={
            "order": "-reliability,dph_total",
            "offer_query": "num_gpus in [1,2] verified=true gpu_name=RTX_4090 dph<=0.4",
        },
        ssh={"known_hosts": "./known_hosts"},
        log={"level": "DEBUG"},
    )
    code, out, err = check(config, capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["log"]["level"] == "debug"
    assert data["ssh"]["known_hosts"] == str(tmp_path / "known_hosts")


def test_a_schema_mistake_and_a_bad_key_file_are_listed_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every problem at once: the file checks of the valid sections run beside the
    schema's errors (they were only seen once the schema was fixed)."""
    config = make_config(tmp_path, fleet={"mode": "foo"})
    (tmp_path / "id_ed25519").unlink()
    code, out, err = check(config, capsys)
    assert code == 2 and out == ""
    assert "fleet.mode" in err
    assert "ssh.key_file" in err and "does not exist" in err


def test_ssh_key_must_be_0600(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(tmp_path)
    (tmp_path / "id_ed25519").chmod(0o644)
    code, _out, err = check(config, capsys)
    assert code == 2
    assert "ssh.key_file" in err and "0644" in err and "0600" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_ssh_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(tmp_path)
    (tmp_path / "id_ed25519").chmod(0o000)
    code, _out, err = check(config, capsys)
    assert code == 2 and "not readable" in err


def test_api_key_file_mode_checked_only_when_it_is_the_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A world-readable API key file is refused, unless another source has the key."""
    key = write_key(tmp_path / "vast_api_key", 0o644)
    config = make_config(tmp_path, vast={"api_key_file": str(key)})
    code, _out, err = check(config, capsys)
    assert code == 2 and "vast.api_key_file" in err and "0644" in err
    monkeypatch.setenv("VAST_API_KEY", "from-env-1234")
    code, out, err = check(config, capsys)
    assert code == 0, err
    assert "from-env-1234" not in out + err


def test_unknown_env_section_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """VASTD_FLET__MAX_INSTANCES (a typo of a section) is named, not silently dropped."""
    monkeypatch.setenv("VASTD_FLET__MAX_INSTANCES", "8")
    code, _out, err = check(make_config(tmp_path), capsys)
    assert code == 2
    assert "VASTD_FLET__MAX_INSTANCES" in err and "flet" in err


def test_unknown_env_key_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VASTD_FLEET__MAX_INSTANSES", "8")
    code, _out, err = check(make_config(tmp_path), capsys)
    assert code == 2
    assert "max_instanses" in err


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """paths.root, ssh.key_file, vast.api_key_file given relative are relative to the file's
    folder, whatever the current folder; check-config prints the resolved values."""
    etc = tmp_path / "etc"
    make_config(etc)  # writes etc/id_ed25519
    write_key(etc / "vast_api_key")
    config = etc / "config.toml"
    config.write_text(
        dump_toml(
            {
                "paths": {"root": "state"},
                "vast": {"api_key_file": "vast_api_key"},
                "ssh": {"key_file": "id_ed25519"},
            }
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = check(Path("../etc/config.toml"), capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["paths"]["root"] == str(etc / "state")
    assert data["ssh"]["key_file"] == str(etc / "id_ed25519")
    assert data["vast"]["api_key_file"] == str(etc / "vast_api_key")
    assert f"paths.root: 'state' is relative to the config file: {etc / 'state'}" in err


def test_every_problem_is_listed_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config(
        tmp_path, fleet={"order": "x", "image": ""}, log={"level": "x"}, ssh={"known_hosts": "x"}
    )
    code, _out, err = check(config, capsys)
    assert code == 2
    for key in ("fleet.order", "fleet.image", "log.level", "ssh.known_hosts"):
        assert key in err


# --- the CLI's expected errors, as a subprocess --------------------------------------------------
def vastd(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vastd", *args],
        capture_output=True,
        text=True,
        env=clean_env(env),
        cwd=cwd,
        timeout=60,
        check=False,
    )


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr
    assert '"exc_info"' not in proc.stdout and '"exception"' not in proc.stdout


def test_bad_log_level_is_a_usage_error(tmp_path: Path) -> None:
    """`--log-level bogus` and VASTD_LOG_LEVEL=bogus: exit 2, the choices named, no traceback."""
    config = make_config(tmp_path)
    for proc in (
        vastd("run", "--config", str(config), "--log-level", "bogus"),
        vastd("run", "--config", str(config), env={"VASTD_LOG_LEVEL": "bogus"}),
    ):
        assert proc.returncode == 2, proc.stderr
        no_traceback(proc)
        assert "--log-level" in proc.stderr and "debug, info" in proc.stderr
        assert proc.stdout == ""


def test_missing_api_key_is_reported_once(tmp_path: Path) -> None:
    """No API key anywhere: exit 2, one line on stderr, nothing on stdout."""
    proc = vastd("run", "--config", str(make_config(tmp_path)))
    assert proc.returncode == 2
    no_traceback(proc)
    assert (proc.stdout + proc.stderr).count("vast.api_key") == 1
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("vastd: invalid configuration: vast.api_key:")


def test_missing_ssh_key_stops_run_with_exit_2(tmp_path: Path) -> None:
    """`vastd run` with no SSH key file refuses to start (it would fail on every instance)."""
    config = make_config(tmp_path, ssh={"key_file": str(tmp_path / "absent")})
    proc = vastd("run", "--config", str(config), env={"VAST_API_KEY": "k-1234"})
    assert proc.returncode == 2
    no_traceback(proc)
    assert "ssh.key_file" in proc.stderr and proc.stderr.strip().count("\n") == 0


UNLOADABLE_KEYS = {
    "garbage": "not really a key\n",
    "public": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBxXb3bd8t1qU3X0aC7iy9M8c8qGf1Q1gQ1v1Q1v1Q1v x\n",
    "empty": "",
}


@pytest.mark.parametrize("kind", sorted(UNLOADABLE_KEYS))
def test_unloadable_ssh_key_is_refused_by_check_config_and_run(tmp_path: Path, kind: str) -> None:
    """A key file that exists (mode 0600) but is no private key asyncssh loads: check-config
    and `vastd run` both exit 2 with one line naming ssh.key_file, before renting anything
    (issue 10, item 1: every rental would otherwise fail to become ready)."""
    config = make_config(tmp_path)
    key = tmp_path / "id_ed25519"
    key.write_text(UNLOADABLE_KEYS[kind])
    for command in ("check-config", "run"):
        proc = vastd(command, "--config", str(config), env={"VAST_API_KEY": "k-1234"})
        assert proc.returncode == 2, (command, proc.stderr)
        no_traceback(proc)
        assert proc.stdout == ""
        assert "ssh.key_file" in proc.stderr and "not a private key" in proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr


def test_encrypted_ssh_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A passphrase-protected key cannot be used unattended: refused, naming the key."""
    import asyncssh

    config = make_config(tmp_path)
    key = tmp_path / "id_ed25519"
    key.write_bytes(
        asyncssh.generate_private_key("ssh-ed25519").export_private_key("pkcs8-pem", passphrase="p")
    )
    code, out, err = check(config, capsys)
    assert code == 2 and out == ""
    assert "ssh.key_file" in err and "not a private key" in err


def test_second_daemon_on_one_root_is_one_line_exit_1(tmp_path: Path) -> None:
    """A root whose lock another process holds: exit 1 and one log line saying so."""
    config = make_config(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    lock = RootLock(root)
    lock.acquire()
    try:
        proc = vastd("run", "--config", str(config), env={"VAST_API_KEY": "k-1234"})
    finally:
        lock.release()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    no_traceback(proc)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    record = json.loads(lines[0])
    assert record["event"] == "daemon_fatal" and "already runs" in record["error"]
    assert str(os.getpid()) in record["error"]


def test_bad_demo_numbers_and_version(tmp_path: Path) -> None:
    proc = vastd("demo", "--jobs", "0", cwd=tmp_path)
    assert proc.returncode == 2 and "--jobs" in proc.stderr
    no_traceback(proc)
    assert not (tmp_path / "demo-run").exists()
    proc = vastd("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("vastd ")


def test_every_option_has_help() -> None:
    """Every option and positional of every command says what it is for."""
    parser = _parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert subparsers
    missing = []
    commands = {a.dest: a.help for a in subparsers[0]._choices_actions}
    missing += [f"command {name}" for name, text in commands.items() if not text]
    for name, sub in [("vastd", parser), *subparsers[0].choices.items()]:
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


# --- check-config --online -------------------------------------------------------------------
@pytest.mark.e2e
async def test_check_config_online_against_the_simulator(tmp_path: Path) -> None:
    """--online: the key is tried on the API and SSH on a labelled instance, one line each;
    a rejected key is one FAILED line and exit 1."""
    import asyncio

    from vastd.sim.cluster import SimCluster

    sim = await SimCluster.start(tmp_path / "sim", instances=1)
    try:
        settings = sim.settings(tmp_path / "root")
        data = settings.model_dump(mode="json", by_alias=True, exclude={"vast": {"api_key"}})
        config = tmp_path / "config.toml"
        config.write_text(dump_toml(data))

        async def online(key: str) -> tuple[int, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "vastd",
                "check-config",
                "--online",
                "--config",
                str(config),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=clean_env({"VAST_API_KEY": key}),
                cwd=REPO,
            )
            async with asyncio.timeout(60):
                _out, err = await proc.communicate()
            assert proc.returncode is not None
            return proc.returncode, err.decode()

        code, err = await online(sim.api_key)
        assert code == 0, err
        assert "# online: ok: vast.api_key: accepted by" in err
        assert f"# online: ok: ssh: {settings.ssh.user}@instance" in err
        assert sim.api_key not in err

        code, err = await online("wrong-key-123456")
        assert code == 1, err
        lines = [line for line in err.splitlines() if line.startswith("# online:")]
        assert len(lines) == 1 and "FAILED: vast.api_key" in lines[0] and "401" in lines[0]
        assert "Traceback" not in err and "wrong-key-123456" not in err
    finally:
        await sim.aclose()
