"""The service as an operator installs it (issue 12): the systemd unit verified and scored,
scripts/install-service.sh run into a temporary root, and `vastd demo` from that
non-editable install, run outside the checkout."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import clean_env

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "vastd.service"
INSTALL = REPO / "scripts" / "install-service.sh"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze missing (scripts/ensure-systemd-tools.sh installs it)"
)


def unit_settings(text: str) -> dict[str, list[str]]:
    """key -> every value it is given (keys like LoadCredential= repeat)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


# --- the unit -----------------------------------------------------------------------------------
def test_unit_restart_reload_and_credentials() -> None:
    """A bad config (exit 2) is not restarted; reload sends SIGHUP; both secrets are credentials."""
    unit = unit_settings(UNIT.read_text())
    assert unit["RestartPreventExitStatus"] == ["2"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert sorted(unit["LoadCredential"]) == [
        "ssh_key:/etc/vastd/id_ed25519",
        "vast_api_key:/etc/vastd/vast_api_key",
    ]
    assert unit["ExecStart"] == ["/opt/vastd/.venv/bin/vastd run --config /etc/vastd/config.toml"]
    # what the daemon needs: outbound TCP and DNS, and its own state folder
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert "PrivateNetwork" not in unit and "IPAddressDeny" not in unit
    assert unit["StateDirectory"] == ["vastd"]


@needs_analyze
def test_unit_exposure_is_at_most_2() -> None:
    """`systemd-analyze security --offline=yes`: overall exposure <= 2.0."""
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--threshold=20", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.0
    assert proc.returncode == 0, proc.stdout[-2000:]


# --- the install into a temporary root -------------------------------------------------------
def run_install(*args: str, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=540,
        env=clean_env({"PYTHON": sys.executable}),
        cwd=root.parent,
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """scripts/install-service.sh --root ROOT (a real venv, built from this tree); its
    output is kept beside ROOT as install.log."""
    root = tmp_path_factory.mktemp("install") / "root"
    proc = run_install(root=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (root.parent / "install.log").write_text(proc.stdout)
    yield root


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_install_lays_out_the_service(installed: Path) -> None:
    root = installed
    etc = root / "etc" / "vastd"
    assert mode(etc) == 0o750
    config = etc / "config.toml"
    assert config.read_text() == (REPO / "config.example.toml").read_text()
    assert mode(config) == 0o640
    assert mode(root / "var" / "lib" / "vastd") == 0o750
    sysusers = (root / "usr/lib/sysusers.d/vastd.conf").read_text()
    assert re.search(r"^u vastd - .* /var/lib/vastd /usr/sbin/nologin$", sysusers, re.M)
    tmpfiles = (root / "usr/lib/tmpfiles.d/vastd.conf").read_text()
    assert "d /var/lib/vastd 0750 vastd vastd -" in tmpfiles
    unit = root / "etc/systemd/system/vastd.service"
    assert unit.read_text() == UNIT.read_text()  # default prefix: the unit as shipped
    # enabled offline in ROOT (systemctl --root): the wants/ link, and a line saying so
    wants = root / "etc/systemd/system/multi-user.target.wants/vastd.service"
    assert os.readlink(wants) == "/etc/systemd/system/vastd.service"
    assert f"enabled vastd.service in {root}" in (root.parent / "install.log").read_text()
    assert (root / "opt/vastd/share/doc/OPERATIONS.md").is_file()
    vastd = root / "opt/vastd/.venv/bin/vastd"
    version = subprocess.run([str(vastd), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("vastd ")
    # non-editable: the package lives in the venv, not in this checkout
    where = subprocess.run(
        [str(root / "opt/vastd/.venv/bin/python"), "-c", "import vastd; print(vastd.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    ).stdout.strip()
    assert where.startswith(str(root / "opt/vastd/.venv")), where


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_installed_config_is_checked_by_the_installed_vastd(installed: Path) -> None:
    """The example config names key files that are not there yet: check-config says so."""
    vastd = installed / "opt/vastd/.venv/bin/vastd"
    proc = subprocess.run(
        [str(vastd), "check-config", "--config", str(installed / "etc/vastd/config.toml")],
        capture_output=True,
        text=True,
        check=False,
        env=clean_env(),
        cwd=installed,
    )
    assert proc.returncode == 2
    assert "ssh.key_file: /etc/vastd/id_ed25519 does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


@needs_analyze
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_installed_unit_verifies(installed: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify` on the installed unit, its paths pointed into the root."""
    assert ANALYZE is not None
    text = (installed / "etc/systemd/system/vastd.service").read_text()
    unit = tmp_path / "vastd.service"
    unit.write_text(text.replace("/opt/vastd", str(installed / "opt/vastd")))
    proc = subprocess.run(
        [ANALYZE, "verify", str(unit)], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # warnings about the unit itself name it; the host's own units are not ours to judge
    assert "vastd.service" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_runs_from_the_installed_wheel_anywhere(installed: Path, tmp_path: Path) -> None:
    """`vastd demo` from the non-editable install, in a folder far from the checkout."""
    vastd = installed / "opt/vastd/.venv/bin/vastd"
    proc = subprocess.run(
        [str(vastd), "demo", "--jobs", "2", "--instances", "1", "--rows", "2"],
        capture_output=True,
        text=True,
        check=False,
        env=clean_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "summary: 2 done, 0 failed of 2 jobs" in proc.stdout
    assert (tmp_path / "demo-run" / "vastd" / "results").is_dir()
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_uninstall_keeps_state_unless_purged(installed: Path, tmp_path: Path) -> None:
    """Uninstall keeps the (edited) config and the state; --purge removes them."""
    root = tmp_path / "root"
    subprocess.run(["cp", "-al", str(installed), str(root)], check=True)  # cheap copy
    state = root / "var/lib/vastd/state.json"
    state.write_text("{}")
    config = root / "etc/vastd/config.toml"
    os.unlink(config)  # a hard link: replace, never write through to the fixture's copy
    config.write_text("# edited\n")
    proc = run_install("--uninstall", root=root)
    assert proc.returncode == 0, proc.stderr
    assert not (root / "opt/vastd").exists()
    assert not (root / "etc/systemd/system/vastd.service").exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/vastd.service").is_symlink()
    assert not (root / "usr/lib/sysusers.d/vastd.conf").exists()
    assert not (root / "usr/lib/tmpfiles.d/vastd.conf").exists()
    assert state.read_text() == "{}"
    assert config.read_text() == "# edited\n"
    proc = run_install("--uninstall", "--purge", root=root)
    assert proc.returncode == 0, proc.stderr
    assert not (root / "etc/vastd").exists() and not (root / "var/lib/vastd").exists()
    assert (installed / "var/lib/vastd").is_dir()  # the fixture's root is untouched


def test_install_refuses_bad_options(tmp_path: Path) -> None:
    proc = run_install("--frobnicate", root=tmp_path / "r")
    assert proc.returncode == 2 and "unknown option" in proc.stderr
    proc = run_install("--prefix", "relative", root=tmp_path / "r")
    assert proc.returncode == 2 and "absolute" in proc.stderr


# --- the credentials, as systemd hands them over -------------------------------------------------
@pytest.mark.e2e
async def test_daemon_takes_both_secrets_from_credentials(tmp_path: Path) -> None:
    """$CREDENTIALS_DIRECTORY/vast_api_key and /ssh_key (LoadCredential=) replace the API key
    and [ssh] key_file: the daemon starts and prepares an instance with them."""
    from tests.helpers import dump_toml
    from tests.test_daemon_process import DaemonProcess
    from vastd.sim.cluster import SimCluster

    sim = await SimCluster.start(tmp_path / "sim", instances=1)
    try:
        creds = tmp_path / "credentials"
        creds.mkdir(mode=0o700)
        (creds / "vast_api_key").write_text(sim.api_key + "\n")
        shutil.copyfile(sim.key_file, creds / "ssh_key")
        for name in ("vast_api_key", "ssh_key"):
            (creds / name).chmod(0o400)
        settings = sim.settings(tmp_path / "root")
        data = settings.model_dump(mode="json", by_alias=True, exclude={"vast": {"api_key"}})
        data["vast"]["api_key_file"] = str(tmp_path / "no-such-key")
        data["ssh"]["key_file"] = str(tmp_path / "no-such-ssh-key")
        config = tmp_path / "config.toml"
        config.write_text(dump_toml(data))
        daemon = await DaemonProcess.start(config, {"CREDENTIALS_DIRECTORY": str(creds)})
        try:
            await daemon.wait_event("daemon_started")
            await daemon.wait_event("instance_prepared", timeout_s=60)
            assert await daemon.stop() == 0
        finally:
            await daemon.kill()
    finally:
        await sim.aclose()


@needs_analyze
def test_verify_can_fail(tmp_path: Path) -> None:
    """The check above is not vacuous: the unit as shipped, on a machine without the venv
    (or any unit naming a missing program), fails `systemd-analyze verify`."""
    assert ANALYZE is not None
    unit = tmp_path / "vastd.service"
    unit.write_text(UNIT.read_text().replace("/opt/vastd", str(tmp_path / "absent")))
    proc = subprocess.run(
        [ANALYZE, "verify", str(unit)], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode != 0
    assert "is not executable" in proc.stdout + proc.stderr
