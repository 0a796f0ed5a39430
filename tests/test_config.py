"""Config: TOML + env overrides, the API key's sources, every problem reported, the contract keys."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from tests.helpers import clean_env, dump_toml, preserved_logging, write_private_key
from vastd.cli import main
from vastd.utils.config import DEFAULT_CONFIG_PATH, Settings, load_config, resolve_config_path
from vastd.utils.exceptions import ConfigError

REPO = Path(__file__).resolve().parent.parent
# CI lays shared/ beside the clone; a developer's checkout has it at /work/shared.
CONTRACT = next(
    (
        p
        for p in (
            Path(__file__).resolve().parents[2] / "shared" / "CONTRACT.md",
            Path("/work/shared/CONTRACT.md"),
        )
        if p.is_file()
    ),
    Path("/work/shared/CONTRACT.md"),
)
SECRET = "sk-test-4f1d9c0e7a2b"

# CONTRACT §4's keys, used where the contract itself is not on this machine.
CONTRACT_KEYS = {
    "paths.root",
    "vast.api_url",
    "vast.api_key_file",
    "vast.label",
    "vast.poll_interval_s",
    "ssh.user",
    "ssh.key_file",
    "ssh.known_hosts",
    "ssh.endpoint",
    "ssh.connect_timeout_s",
    "ssh.keepalive_interval_s",
    "remote.root",
    "prepare[].name",
    "prepare[].check",
    "prepare[].install",
    "prepare[].timeout_s",
    "job.command",
    "job.result_glob",
    "job.min_results",
    "job.validate",
    "job.timeout_s",
    "job.max_attempts",
    "job.max_input_bytes",
    "job.vars.num_sim",
    "job.patterns[].glob",
    "job.patterns[].vars.num_sim",
    "fleet.mode",
    "fleet.max_instances",
    "fleet.offer_query",
    "fleet.order",
    "fleet.image",
    "fleet.disk_gb",
    "fleet.interruptible",
    "fleet.bid_markup",
    "fleet.max_total_dph",
    "fleet.idle_timeout_s",
    "fleet.boot_timeout_s",
}


@pytest.fixture(autouse=True)
def _no_vastd_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Logging set-up by in-process commands is undone afterwards. Every test starts without VASTD_* / VAST_API_KEY / CREDENTIALS_DIRECTORY."""
    keep = clean_env()
    for name in list(os.environ):
        if name not in keep:
            monkeypatch.delenv(name)
    with preserved_logging():
        yield


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(dump_toml(data), encoding="utf-8")
    return path


def write_key(path: Path, mode: int = 0o600) -> Path:
    return write_private_key(path, mode)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A small valid config whose API key file does not exist (its SSH key file does)."""
    return write_config(
        tmp_path / "config.toml",
        {
            "paths": {"root": str(tmp_path / "root")},
            "vast": {"api_key_file": str(tmp_path / "no-such-key"), "label": "mine"},
            "ssh": {"key_file": str(write_key(tmp_path / "id_ed25519"))},
            "fleet": {"max_instances": 3, "mode": "autoscale", "max_total_dph": 1.5},
            "job": {"validate": "none", "vars": {"num_sim": "10"}},
        },
    )


def flatten(data: Any, prefix: str = "") -> set[str]:
    """Dotted keys of parsed TOML; an array of tables contributes `name[].key`."""
    if isinstance(data, dict):
        keys: set[str] = set()
        for key, value in data.items():
            keys |= flatten(value, f"{prefix}.{key}" if prefix else key)
        return keys
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        return set().union(*(flatten(v, prefix + "[]") for v in data))
    return {prefix}


def contract_keys() -> set[str]:
    """The keys of CONTRACT §4's TOML block, or the copy above when the contract is absent."""
    if not CONTRACT.is_file():
        return CONTRACT_KEYS
    text = CONTRACT.read_text(encoding="utf-8")
    section = text.split("## 4.", 1)[1]
    block = re.search(r"```toml\n(.*?)```", section, re.S)
    assert block is not None, "CONTRACT §4 has no TOML block"
    return flatten(tomllib.loads(block.group(1)))


def settings_has_key(dotted: str) -> bool:
    """Whether `Settings` declares the dotted key (free-form mappings accept any sub-key)."""
    model: type[BaseModel] = Settings
    for part in dotted.split("."):
        name = part.removesuffix("[]")
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        if name not in fields:
            return False
        annotation = fields[name].annotation
        origin = typing.get_origin(annotation)
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if origin is dict:
            return True
        if origin is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            model = args[0]
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return part == dotted.split(".")[-1]
    return True


# --- loading ---------------------------------------------------------------------------------
def test_toml_values_are_loaded(config_file: Path, tmp_path: Path) -> None:
    """Values in the TOML file end up in Settings; keys not in the file keep their defaults."""
    s = load_config(config_file)
    assert s.paths.root == tmp_path / "root"
    assert s.vast.label == "mine"
    assert s.fleet.max_instances == 3
    assert s.fleet.mode == "autoscale"
    assert s.fleet.max_total_dph == 1.5
    assert s.job.validate_ == "none"
    assert s.job.vars == {"num_sim": "10"}
    assert s.ssh.user == "root"  # default


def test_env_overrides_one_key_and_keeps_the_rest(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VASTD_FLEET__MAX_INSTANCES=8 changes only that key; the section's other TOML values stay."""
    monkeypatch.setenv("VASTD_FLEET__MAX_INSTANCES", "8")
    s = load_config(config_file)
    assert s.fleet.max_instances == 8
    assert s.fleet.mode == "autoscale"
    assert s.fleet.max_total_dph == 1.5
    assert s.vast.label == "mine"


def test_env_override_is_validated(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad value from the environment is reported with its dotted key like one from the file."""
    monkeypatch.setenv("VASTD_FLEET__MAX_INSTANCES", "many")
    with pytest.raises(ConfigError) as info:
        load_config(config_file)
    assert [p.split(":")[0] for p in info.value.problems] == ["fleet.max_instances"]


def test_settings_round_trip_through_toml(tmp_path: Path) -> None:
    """A Settings dumped to TOML (tests' dump_toml) loads back equal: the e2e configs are faithful."""
    original = Settings(
        paths={"root": str(tmp_path)},
        prepare=[{"name": "p", "check": "true", "install": "echo 'x \"y\"'"}],
        job={
            "command": "run {input} --n {n}",
            "patterns": [{"glob": "a_*", "vars": {"n": "1"}}],
            "vars": {"n": "2"},
        },
    )
    data = original.model_dump(mode="json", by_alias=True, exclude={"vast": {"api_key"}})
    loaded = load_config(write_config(tmp_path / "c.toml", data))
    assert loaded == original


# --- the API key -----------------------------------------------------------------------------
KEY_SOURCES = ["VASTD_VAST__API_KEY", "VAST_API_KEY", "CREDENTIALS_DIRECTORY", "api_key_file"]


@pytest.mark.parametrize("winner", range(len(KEY_SOURCES)), ids=KEY_SOURCES)
def test_api_key_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, winner: int) -> None:
    """The key comes from VASTD_VAST__API_KEY, else VAST_API_KEY, else the systemd credential
    ($CREDENTIALS_DIRECTORY/vast_api_key), else [vast] api_key_file (the documented order)."""
    key_file = tmp_path / "key"
    creds = tmp_path / "creds"
    creds.mkdir()
    present = KEY_SOURCES[winner:]
    if "VASTD_VAST__API_KEY" in present:
        monkeypatch.setenv("VASTD_VAST__API_KEY", "from-vastd-env")
    if "VAST_API_KEY" in present:
        monkeypatch.setenv("VAST_API_KEY", "from-vast-env")
    if "CREDENTIALS_DIRECTORY" in present:
        (creds / "vast_api_key").write_text("from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    key_file.write_text("from-key-file\n")
    cfg = write_config(tmp_path / "c.toml", {"vast": {"api_key_file": str(key_file)}})
    expected = ["from-vastd-env", "from-vast-env", "from-credential", "from-key-file"][winner]
    assert load_config(cfg).api_key() == expected


def test_no_api_key_anywhere_is_none(config_file: Path) -> None:
    """Without any source the key is None (the daemon then refuses to start)."""
    assert load_config(config_file).api_key() is None


def test_unreadable_key_file_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key file that is not text is a problem naming vast.api_key_file (exit 2), never a
    traceback, and its bytes are not echoed."""
    key_file = tmp_path / "key"
    key_file.write_bytes(b"\xff\xfe" + SECRET.encode())
    cfg = write_config(tmp_path / "c.toml", {"vast": {"api_key_file": str(key_file)}})
    with pytest.raises(ConfigError) as info:
        load_config(cfg).api_key()
    assert info.value.problems[0].startswith("vast.api_key_file:")
    assert main(["check-config", "--config", str(cfg)]) == 2
    out, err = capsys.readouterr()
    assert "vast.api_key_file" in err
    assert SECRET not in out + err
    assert "Traceback" not in out + err


def test_redacted_never_contains_the_key(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redacted() masks the key wherever it came from, and still says that one is set."""
    monkeypatch.setenv("VASTD_VAST__API_KEY", SECRET)
    s = load_config(config_file)
    assert s.api_key() == SECRET
    text = repr(s.redacted()) + repr(s) + s.model_dump_json()
    assert SECRET not in text
    assert s.redacted()["vast"]["api_key"] == "**********"
    assert s.redacted()["fleet"]["max_instances"] == 3


# --- problems --------------------------------------------------------------------------------
def test_every_problem_is_reported_with_its_dotted_key(tmp_path: Path) -> None:
    """All invalid values of one file are listed at once, each under its dotted key."""
    cfg = write_config(
        tmp_path / "bad.toml",
        {
            "vast": {"api_url": "ftp://nope", "poll_interval_s": 0},
            "fleet": {"mode": "rent-everything", "max_instances": -1},
            "job": {"max_attempts": 0, "validate": "maybe"},
            "remote": {"root": "relative/path"},
        },
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    keys = {p.split(":")[0] for p in info.value.problems}
    assert keys == {
        "vast.api_url",
        "vast.poll_interval_s",
        "fleet.mode",
        "fleet.max_instances",
        "job.max_attempts",
        "job.validate",
        "remote.root",
    }
    for key in keys:
        assert key in str(info.value)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"fleet": {"max_instancs": 3}}, "fleet.max_instancs"),
        ({"flet": {"max_instances": 3}}, "flet"),
        ({"prepare": [{"name": "x", "chek": "true"}]}, "prepare.0.chek"),
    ],
    ids=["misspelt-key", "unknown-section", "unknown-key-in-table-array"],
)
def test_unknown_keys_are_refused(tmp_path: Path, data: dict[str, Any], key: str) -> None:
    """A misspelt key is an error naming it, never silently ignored."""
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path / "c.toml", data))
    assert [p.split(":")[0] for p in info.value.problems] == [key]


def test_bad_toml_is_refused(tmp_path: Path) -> None:
    """A file that is not TOML is one problem naming the file, not a parser traceback."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[fleet\nmax_instances = \n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert len(info.value.problems) == 1
    assert str(cfg) in info.value.problems[0]
    assert "TOML" in info.value.problems[0]


def test_missing_explicit_file_is_refused(tmp_path: Path) -> None:
    """An explicitly named config file that does not exist is an error, not the defaults."""
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


# --- resolution ------------------------------------------------------------------------------
def test_config_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--config wins over $VASTD_CONFIG, which wins over /etc/vastd/config.toml."""
    assert resolve_config_path(None) == DEFAULT_CONFIG_PATH
    monkeypatch.setenv("VASTD_CONFIG", str(tmp_path / "env.toml"))
    assert resolve_config_path(None) == tmp_path / "env.toml"
    assert resolve_config_path(tmp_path / "cli.toml") == tmp_path / "cli.toml"


def test_vastd_config_env_is_read(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """load_config() and `vastd check-config` without --config read the file $VASTD_CONFIG names."""
    monkeypatch.setenv("VASTD_CONFIG", str(config_file))
    assert load_config().fleet.max_instances == 3
    assert main(["check-config"]) == 0
    assert '"max_instances": 3' in capsys.readouterr().out


# --- the example and the contract ------------------------------------------------------------
def test_contract_keys_are_all_settings() -> None:
    """Every key of CONTRACT §4 is declared by Settings (a renamed or dropped key fails here)."""
    missing = sorted(k for k in contract_keys() if not settings_has_key(k))
    assert missing == []


def test_contract_copy_matches_contract() -> None:
    """The hard-coded key list above is the contract's (so the fallback stays honest)."""
    if not CONTRACT.is_file():
        pytest.skip(f"{CONTRACT} is not on this machine")
    assert contract_keys() == CONTRACT_KEYS


def test_settings_has_key_can_fail() -> None:
    """The key walker refuses keys Settings does not declare (the contract test can fail)."""
    assert settings_has_key("fleet.max_instances")
    assert settings_has_key("job.patterns[].vars.anything")
    assert not settings_has_key("fleet.max_instancs")
    assert not settings_has_key("job.patterns[].globb")
    assert not settings_has_key("fleet.mode.deeper")


def test_example_config_is_valid_and_complete() -> None:
    """config.example.toml loads without problems and shows every key of CONTRACT §4."""
    example = REPO / "config.example.toml"
    settings = load_config(example)
    assert settings.fleet.mode == "adopt"
    example_keys = flatten(tomllib.loads(example.read_text(encoding="utf-8")))
    assert sorted(contract_keys() - example_keys) == []


# --- `vastd check-config` --------------------------------------------------------------------
def test_check_config_prints_effective_values_masked(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config exits 0 and prints the effective config (env applied) with the key masked."""
    monkeypatch.setenv("VASTD_VAST__API_KEY", SECRET)
    monkeypatch.setenv("VASTD_FLEET__MAX_INSTANCES", "8")
    assert main(["check-config", "--config", str(config_file)]) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    assert '"max_instances": 8' in out
    assert '"api_key": "**********"' in out
    assert "valid" in err


def test_check_config_lists_every_problem_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid file: exit 2, every bad key on stderr, no traceback."""
    cfg = write_config(
        tmp_path / "bad.toml", {"fleet": {"mode": "x", "max_instances": -1}, "ssh": {"usr": "a"}}
    )
    assert main(["check-config", "--config", str(cfg)]) == 2
    out, err = capsys.readouterr()
    for key in ("fleet.mode", "fleet.max_instances", "ssh.usr"):
        assert key in err
    assert "Traceback" not in out + err


def test_check_config_missing_file_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config path that does not exist: exit 2 with the path in the message."""
    assert main(["check-config", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["check-config", "--bogus"], ["no-such-command"], [], ["status", "--json=1"]]
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Bad arguments: exit code 2 and a usage message."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


def run_vastd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vastd", *args],
        capture_output=True,
        text=True,
        env=clean_env(env),
        cwd=REPO,
        timeout=60,
        check=False,
    )


def start_vastd(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vastd", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(env),
        cwd=REPO,
    )


def test_check_config_subprocess_valid(config_file: Path) -> None:
    """`python -m vastd check-config`: exit 0, JSON on stdout, the key (from env) nowhere."""
    proc = run_vastd("check-config", "--config", str(config_file), env={"VAST_API_KEY": SECRET})
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert '"label": "mine"' in proc.stdout
    assert '"api_key": "**********"' in proc.stdout


def test_check_config_subprocess_invalid(tmp_path: Path) -> None:
    """`python -m vastd check-config` on a bad file, on a bad TOML, on a missing file, with a bad
    argument: exit 2 each time, the reason on stderr, never a traceback."""
    bad = write_config(tmp_path / "bad.toml", {"fleet": {"mode": "x"}, "job": {"max_attempts": 0}})
    broken = tmp_path / "broken.toml"
    broken.write_text("= nope")
    ok = write_config(tmp_path / "ok.toml", {})
    cases = {
        ("check-config", "--config", str(bad)): ["fleet.mode", "job.max_attempts"],
        ("check-config", "--config", str(broken)): ["broken.toml", "TOML"],
        ("check-config", "--config", str(tmp_path / "absent.toml")): ["absent.toml"],
        ("check-config", "--frobnicate"): ["usage"],
        ("check-config", "--config", str(ok)): ["VASTD_JOB__VARS", "JSON"],
    }
    envs = {("check-config", "--config", str(ok)): {"VASTD_JOB__VARS": "{bad"}}
    procs = {
        argv: start_vastd(*argv, env=envs.get(argv)) for argv in cases
    }  # in parallel: each start costs ~0.5 s
    for argv, expected in cases.items():
        out, err = procs[argv].communicate(timeout=60)
        assert procs[argv].returncode == 2, (argv, err)
        assert "Traceback" not in out + err
        for text in expected:
            assert text in err, (argv, err)


@pytest.mark.parametrize(
    ("name", "value"),
    [("VASTD_JOB__VARS", "x"), ("VASTD_JOB__VARS", "{bad"), ("VASTD_VAST", "x")],
)
def test_an_environment_variable_that_does_not_parse_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """pydantic-settings raises its own SettingsError for these (no ValidationError): it
    must still come out as a ConfigError naming the variable (exit 2, no traceback)."""
    path = write_config(tmp_path / "c.toml", {})
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert problem.startswith(f"{name}: cannot be parsed")


def test_an_empty_root_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """VASTD_PATHS__ROOT= once meant the current folder, silently."""
    path = write_config(tmp_path / "c.toml", {})
    monkeypatch.setenv("VASTD_PATHS__ROOT", "")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == ["paths.root: must name a folder (it is empty)"]


def test_unknown_command_placeholder_is_a_config_error(tmp_path: Path) -> None:
    """A [job] command with a placeholder that is neither built in nor a var fails at load
    (exit 2 from check-config), instead of failing every dispatch later."""
    path = write_config(
        tmp_path / "c.toml", {"job": {"command": "test -f {input} && { sleep 1; }"}}
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(p.startswith("job.command: unknown placeholder") for p in info.value.problems)
    ok = write_config(
        tmp_path / "ok.toml",
        {
            "job": {
                "command": "x {input} {{literal}} {extra}",
                "patterns": [{"glob": "*", "vars": {"extra": "1"}}],
            }
        },
    )
    assert load_config(ok).job.command.startswith("x {input}")


def test_bad_offer_query_is_a_config_error(tmp_path: Path) -> None:
    """An offer_query the vast CLI syntax does not accept is reported under fleet.offer_query."""
    path = write_config(tmp_path / "c.toml", {"fleet": {"offer_query": "no_such_field>1"}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(p.startswith("fleet.offer_query:") for p in info.value.problems)


def _built(make: Any, values: dict[str, Any]) -> Any:
    try:
        settings = make(**values)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return sorted(settings.model_fields_set), settings.model_dump(mode="json")


@pytest.mark.parametrize("with_env", [False, True])
@pytest.mark.parametrize(
    "values",
    [
        {},
        {"paths": {"root": "/srv/vastd"}, "fleet": {"max_instances": 2}},
        {"PATHS": {"root": "/srv/vastd"}},  # pydantic-settings matches sections in any case
        {"Fleet": {"max_instances": 2}, "fleet": {"max_instances": 3}},
        {"nosuchsection": {}},
        {"job": {"timeout_s": -1}, "ssh": {"known_hosts": "tofoo"}},
        {"prepare": [{"name": "cuda", "check": "true"}]},
    ],
)
def test_settings_read_as_pydantic_settings_reads_them(
    monkeypatch: pytest.MonkeyPatch, values: dict[str, Any], with_env: bool
) -> None:
    """Settings(...) without pydantic-settings (no VASTD_ override set) validates as the
    pydantic-settings class does: same values, same keys set, same errors; with an
    override set, that class reads it."""
    from vastd.utils.config import _env_settings_class

    if with_env:
        monkeypatch.setenv("vastd_log__level", "ERROR")  # any case, as pydantic-settings
    built = _built(Settings, values)
    assert built == _built(_env_settings_class(), values)
    if built[0] != "ValidationError":
        settings = Settings(**values)
        assert type(settings) is Settings
        assert settings.log.level == ("error" if with_env else "info")


@pytest.mark.parametrize(
    ("job", "key", "text"),
    [
        ({"row_key": "job_row", "validate": "none"}, "job", 'needs validate = "parquet"'),
        ({"validate_memory_mb": 0}, "job.validate_memory_mb", "greater than or equal to 16"),
        ({"validate_timeout_s": 0}, "job.validate_timeout_s", "greater than 0"),
        ({"max_results_total_bytes": 0}, "job.max_results_total_bytes", "greater than 0"),
        ({"max_result_files": 0}, "job.max_result_files", "greater than or equal to 1"),
    ],
    ids=["row-key-without-parquet", "memory", "deadline", "total-bytes", "file-count"],
)
def test_result_limits_are_checked(
    tmp_path: Path, job: dict[str, Any], key: str, text: str
) -> None:
    """The result caps and the validator's limits refuse values that would disable them;
    a row key without parquet validation (nothing would count its rows) is refused."""
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path / "c.toml", {"job": job}))
    [problem] = info.value.problems
    assert problem.startswith(key) and text in problem, problem


def test_local_disk_floor_defaults_and_zero(tmp_path: Path) -> None:
    """`[paths] min_free_disk_gb`: 1 GB kept free by default, 0 turns the floor off."""
    assert load_config(write_config(tmp_path / "a.toml", {})).paths.min_free_disk_gb == 1.0
    off = load_config(write_config(tmp_path / "b.toml", {"paths": {"min_free_disk_gb": 0}}))
    assert off.paths.min_free_disk_gb == 0
    with pytest.raises(ConfigError):
        load_config(write_config(tmp_path / "c.toml", {"paths": {"min_free_disk_gb": -1}}))


# --- one job per GPU ----------------------------------------------------------------------
def test_jobs_per_instance_takes_a_count_or_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`jobs_per_instance` is a whole number or "gpus" (then `gpus_per_job`, default 1,
    counts); the environment can set either; `{gpus}` is a known placeholder."""
    data = {"job": {"jobs_per_instance": "gpus", "command": "train --devices {gpus} {input}"}}
    settings = load_config(write_config(tmp_path / "c.toml", data))
    assert settings.job.jobs_per_instance == "gpus" and settings.job.gpus_per_job == 1
    assert settings.job.gpu_idle_s == 0
    monkeypatch.setenv("VASTD_JOB__JOBS_PER_INSTANCE", "4")
    assert load_config(write_config(tmp_path / "c.toml", {})).job.jobs_per_instance == 4
    monkeypatch.setenv("VASTD_JOB__JOBS_PER_INSTANCE", "gpus")
    monkeypatch.setenv("VASTD_JOB__GPUS_PER_JOB", "2")
    job = load_config(write_config(tmp_path / "c.toml", {})).job
    assert (job.jobs_per_instance, job.gpus_per_job) == ("gpus", 2)


@pytest.mark.parametrize(
    ("job", "key", "words"),
    [
        ({"jobs_per_instance": "gpu"}, "job.jobs_per_instance", ['"gpus"', "'gpu'"]),
        ({"jobs_per_instance": 0}, "job.jobs_per_instance", ['"gpus"', "0"]),
        ({"jobs_per_instance": True}, "job.jobs_per_instance", ['"gpus"']),
        ({"jobs_per_instance": "gpus", "gpus_per_job": 0}, "job.gpus_per_job", ["1"]),
        ({"gpu_idle_s": -1}, "job.gpu_idle_s", ["0"]),
        ({"vars": {"num_sim": "1", "gpus": "0"}}, "job.vars", ["gpus", "built-in"]),
    ],
    ids=["typo-gpu", "zero", "bool", "zero-gpus-per-job", "negative-idle", "var-named-gpus"],
)
def test_bad_gpu_settings_are_refused_clearly(
    tmp_path: Path, job: dict[str, Any], key: str, words: list[str]
) -> None:
    """A typo ("gpu"), a count below 1 and a bad gpus_per_job are each one problem under
    its dotted key, saying what is allowed."""
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path / "c.toml", {"job": job}))
    [problem] = info.value.problems
    assert problem.split(":")[0] == key, problem
    for word in words:
        assert word in problem, problem
