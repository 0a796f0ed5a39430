"""Configuration: TOML file + `VASTD_<SECTION>__<KEY>` environment overrides.

Resolution of the file: `--config`, else `$VASTD_CONFIG`, else /etc/vastd/config.toml.
The API key is a secret: env `VASTD_VAST__API_KEY`, env `VAST_API_KEY`, `$CREDENTIALS_DIRECTORY`
(systemd LoadCredential=) or `[vast] api_key_file`; it is never printed.
"""

from __future__ import annotations

import os
import re
import string
import tomllib
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from vastd.utils.exceptions import ConfigError

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

DEFAULT_CONFIG_PATH = Path("/etc/vastd/config.toml")
KNOWN_HOSTS_MODES = ("tofu", "ignore")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# systemd LoadCredential= names the daemon looks for in $CREDENTIALS_DIRECTORY.
API_KEY_CREDENTIAL = "vast_api_key"
SSH_KEY_CREDENTIAL = "ssh_key"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PathsSettings(_Section):
    root: Path = Path("/var/lib/vastd")
    # a group that may drop files into inbox/ and read results/ (2770/2750); "" = owner only
    group: str = ""
    # a download of results that would leave less free on the local disk of results/
    # waits (retried, logged as collection_deferred); 0 = no floor
    min_free_disk_gb: float = Field(default=1.0, ge=0)

    @field_validator("root", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        # Path("") is ".": an empty VASTD_PATHS__ROOT would quietly mean the current folder.
        if isinstance(value, str) and not value.strip():
            raise ValueError("must name a folder (it is empty)")
        return value

    @field_validator("root")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Relative roots once put results in the wrong folder: resolve at load time.
        return value.expanduser().absolute()


class VastSettings(_Section):
    api_url: str = "https://console.vast.ai"
    api_key_file: Path | None = Path("/etc/vastd/vast_api_key")
    api_key: SecretStr | None = None
    label: str = Field(default="vastd", min_length=1)
    poll_interval_s: float = Field(default=30.0, gt=0)
    request_timeout_s: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=5, ge=0)
    lost_grace_s: float = Field(default=300.0, ge=0)

    @field_validator("api_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class SshSettings(_Section):
    user: str = Field(default="root", min_length=1)
    key_file: Path = Path("/etc/vastd/id_ed25519")
    known_hosts: str = "tofu"
    endpoint: Literal["auto", "proxy", "direct"] = "auto"
    connect_timeout_s: float = Field(default=20.0, gt=0)
    keepalive_interval_s: float = Field(default=15.0, gt=0)
    command_timeout_s: float = Field(default=60.0, gt=0)
    max_channels: int = Field(default=4, ge=1, le=9)
    # how long a job may stay on an instance that does not answer before it runs elsewhere
    unreachable_grace_s: float = Field(default=900.0, ge=0)

    @field_validator("known_hosts")
    @classmethod
    def _known_hosts(cls, value: str) -> str:
        # "tofoo" must not silently become a (missing) known_hosts file in the cwd.
        if value in KNOWN_HOSTS_MODES or "/" in value or value.startswith("~"):
            return value
        raise ValueError(
            f'must be "tofu", "ignore" or the path of a known_hosts file (got {value!r};'
            " write a file in the config folder as ./NAME)"
        )


class RemoteSettings(_Section):
    root: str = "/workspace/vastd"

    @field_validator("root")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value.rstrip("/") or "/"


class PrepareStep(_Section):
    name: str = Field(min_length=1)
    check: str = ""
    install: str = ""
    timeout_s: float = Field(default=1800.0, gt=0)


class JobPattern(_Section):
    glob: str = Field(min_length=1)
    vars: dict[str, str] = Field(default_factory=dict)


# Placeholders every [job] command may use besides the [job.vars] keys (config.example.toml).
BUILTIN_PLACEHOLDERS = ("input", "job_dir", "output_dir", "job", "gpus")
JOBS_PER_GPU = "gpus"  # [job] jobs_per_instance: one job per GPU (gpus_per_job each)


class JobSettings(_Section):
    command: str = (
        "cd /workspace/density-engine && python3 scripts/run_garch_jobs.py {input} "
        "--num_sim {num_sim} --num_quantiles 512 --stride 1"
    )
    result_glob: str = "*.parquet"
    min_results: int = Field(default=1, ge=0)
    validate_: Literal["parquet", "none"] = Field(default="parquet", alias="validate")
    timeout_s: float = Field(default=21600.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    # at most 1 TiB: a figure past what a read can be given made every acceptance fail
    max_input_bytes: int = Field(default=104_857_600, gt=0, le=1 << 40)
    max_result_bytes: int = Field(default=10 * 1024**3, gt=0)
    # all of a job's result files together, and how many there may be: checked while
    # copying (past either, the attempt fails)
    max_results_total_bytes: int = Field(default=20 * 1024**3, gt=0)
    max_result_files: int = Field(default=1000, ge=1)
    # with validate = "parquet": complete iff the number of distinct values of this column
    # equals the CSV's data rows (the GARCH scripts write "job_row"); "" = no row check
    row_key: str = ""
    # run locally with /bin/sh in the downloaded folder (also $VASTD_RESULT_DIR) after the
    # built-in validation; exit 0 = valid; "" = none
    validate_command: str = ""
    # validation runs in a child process: its memory beyond start-up, and its deadline
    validate_memory_mb: int = Field(default=512, ge=16)
    validate_timeout_s: float = Field(default=300.0, gt=0)
    poll_interval_s: float = Field(default=5.0, gt=0)
    # an int, or "gpus": one job per GPU of the instance (core/gpus.py), each job getting
    # `gpus_per_job` of them as CUDA_VISIBLE_DEVICES and {gpus}
    jobs_per_instance: int | Literal["gpus"] = 1
    gpus_per_job: int = Field(default=1, ge=1)
    # jobs uploaded to each slot ahead of its running one: the instance itself starts the
    # next the moment the running one exits, whether or not vastd is connected; 0 = off
    stage_ahead: int = Field(default=0, ge=0, le=8)
    # a running job whose GPUs all stay at 0% utilisation (nvidia-smi, health check) this
    # long is flagged `gpu_idle` (not killed); 0 = off
    gpu_idle_s: float = Field(default=0.0, ge=0)
    # a file named like a finished job: refused (to failed/ as <job>.dup-<n>.csv), or
    # run again with the earlier results kept as results/<job>/previous-<n>/
    on_duplicate: Literal["refuse", "rerun"] = "refuse"
    # a line of the remote log.txt matching this (a Python regex; group 1 = rows done)
    # is the job's progress, read with each status check; "" = no progress
    progress_regex: str = ""
    vars: dict[str, str] = Field(default_factory=lambda: {"num_sim": "1000000"})
    patterns: list[JobPattern] = Field(default_factory=list)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("command")
    @classmethod
    def _has_input(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("jobs_per_instance", mode="before")
    @classmethod
    def _jobs_per_instance(cls, value: Any) -> Any:
        # One clear message for a typo ("gpu") and a bad count alike.
        if value == JOBS_PER_GPU:
            return value
        if isinstance(value, str) and value.strip().isdigit():  # an environment override
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        raise ValueError(
            f'must be a whole number >= 1 or "{JOBS_PER_GPU}" (one job per GPU), not {value!r}'
        )

    @field_validator("progress_regex")
    @classmethod
    def _progress_regex(cls, value: str) -> str:
        if not value:
            return value
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        if compiled.groups < 1:
            raise ValueError("needs a group: group 1 is the number of rows done, e.g. (\\d+)")
        return value

    @model_validator(mode="after")
    def _row_key_needs_parquet(self) -> JobSettings:
        if self.row_key and self.validate_ != "parquet":
            raise ValueError('row_key: needs validate = "parquet" (rows are counted in parquet)')
        return self

    @field_validator("result_glob")
    @classmethod
    def _relative_glob(cls, value: str) -> str:
        parts = value.split("/")
        if not value or value.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError("must be a relative glob without '..' (relative to {job_dir})")
        return value

    @model_validator(mode="after")
    def _placeholders_known(self) -> JobSettings:
        # A bad template would otherwise only fail at dispatch, job after job.
        known = set(BUILTIN_PLACEHOLDERS) | set(self.vars)
        for pattern in self.patterns:
            known |= set(pattern.vars)
        try:
            fields = list(string.Formatter().parse(self.command))
        except ValueError as exc:
            raise ValueError(f"command: {exc} (write literal braces as {{{{ and }}}})") from None
        for _text, name, spec, conversion in fields:
            if name is None:
                continue
            if name not in known:
                raise ValueError(
                    f"command: unknown placeholder {{{name}}} (known: {', '.join(sorted(known))};"
                    " write literal braces as {{ and }})"
                )
            if spec or conversion:
                raise ValueError(f"command: placeholder {{{name}}} takes no format or !conversion")
        clash = set(self.vars) & set(BUILTIN_PLACEHOLDERS)
        if clash:
            raise ValueError(f"vars: {', '.join(sorted(clash))} is a built-in placeholder")
        return self


class FleetSettings(_Section):
    mode: Literal["adopt", "autoscale"] = "adopt"
    max_instances: int = Field(default=4, ge=0)
    offer_query: str = (
        "gpu_name in [RTX_3090,RTX_4090] reliability>0.98 dph_total<=0.5 verified=true "
        "direct_port_count>=1"
    )
    order: str = "dph_total"
    image: str = "vastai/pytorch:@vastai-automatic-tag"
    disk_gb: float = Field(default=40.0, gt=0)
    interruptible: bool = False
    bid_markup: float = Field(default=1.2, ge=1.0)
    max_total_dph: float = Field(default=2.0, gt=0)
    max_total_spend: float | None = Field(default=None, gt=0)
    idle_timeout_s: float = Field(default=600.0, ge=0)
    boot_timeout_s: float = Field(default=1200.0, gt=0)
    adopt_foreign_labelled: bool = False
    min_free_disk_gb: float = Field(default=5.0, ge=0)
    health_interval_s: float = Field(default=60.0, gt=0)
    # the rental circuit breaker: after this many rentals in a row that never became
    # ready, renting pauses for rent_pause_s (0: never pause)
    max_failed_rentals: int = Field(default=3, ge=0)
    rent_pause_s: float = Field(default=1800.0, gt=0)
    # the market as vast.ai behaves (orchestration/market.py)
    frozen_grace_s: float = Field(default=300.0, ge=0)
    on_outbid: Literal["destroy", "rebid"] = "destroy"
    max_bid_dph: float | None = Field(default=None, gt=0)

    @field_validator("offer_query")
    @classmethod
    def _query_parses(cls, value: str) -> str:
        from vastd.utils.offer_query import parse_offer_query

        parse_offer_query(value)
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty (the docker image to rent instances with)")
        return value.strip()

    @field_validator("order")
    @classmethod
    def _order_fields(cls, value: str) -> str:
        from vastd.utils.offer_query import check_order

        check_order(value)
        return value

    @model_validator(mode="after")
    def _rebid_has_a_cap(self) -> FleetSettings:
        if self.on_outbid == "rebid" and self.max_bid_dph is None:
            raise ValueError('on_outbid = "rebid" needs max_bid_dph (the highest bid, $/hour)')
        return self


def normalise_log_level(value: str) -> str:
    """'INFO' / 'info' -> 'info'; ValueError naming the choices otherwise."""
    level = value.strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)} (got {value!r})")
    return level


class LogSettings(_Section):
    level: str = "info"

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        return normalise_log_level(value)


def parse_listen(value: str) -> tuple[str, int]:
    """'127.0.0.1:9108' / 'localhost:9108' / '[::1]:9108' -> (host, port); ValueError else."""
    import ipaddress

    text = value.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [IPv6]:PORT, e.g. [::1]:9108 (got {value!r})")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address (got {value!r})") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(
                f"expected HOST:PORT, e.g. 127.0.0.1:9108 or [::1]:9108 (got {value!r})"
            )
        if any(c.isspace() or c in "/[]" for c in host):
            raise ValueError(
                f"{host!r} is not a host name or address (write HOST:PORT, got {value!r})"
            )
        if ":" in host:
            raise ValueError(f"write an IPv6 address in brackets, e.g. [::1]:9108 (got {value!r})")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"the port must be a number from 1 to 65535 (got {value!r})")
    return host, int(port_text)


class MetricsSettings(_Section):
    # HOST:PORT of the Prometheus /metrics and the /healthz endpoint; "" = not served
    listen: str = ""

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value.strip():
            parse_listen(value)
        return value.strip()

    def address(self) -> tuple[str, int] | None:
        """(host, port) to listen on, or None when the endpoint is off."""
        return parse_listen(self.listen) if self.listen else None


class Settings(BaseModel):
    """The whole configuration; sections mirror the TOML tables of config.example.toml.

    `VASTD_<SECTION>__<KEY>` environment variables override the values given, as a
    pydantic-settings `BaseSettings` with env_prefix "VASTD_" and env_nested_delimiter
    "__" reads them (`_env_settings_class`). pydantic-settings is imported only when such
    a variable is set (or a key is not a plain section name): it costs a short command
    such as `vastd status` a good part of its run.
    """

    # BaseSettings' own defaults that shape validation (extra, validate_default)
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)

    paths: PathsSettings = Field(default_factory=PathsSettings)
    vast: VastSettings = Field(default_factory=VastSettings)
    ssh: SshSettings = Field(default_factory=SshSettings)
    remote: RemoteSettings = Field(default_factory=RemoteSettings)
    prepare: list[PrepareStep] = Field(default_factory=list)
    job: JobSettings = Field(default_factory=JobSettings)
    fleet: FleetSettings = Field(default_factory=FleetSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    def __init__(self, **values: Any) -> None:
        if type(self) is Settings and not _plain_values(values):
            from pydantic_settings import SettingsError

            try:
                with_env = _env_settings_class()(**values)
            except SettingsError as exc:
                # A VASTD_<SECTION>... variable that does not parse (a section or a table
                # key given a plain string, broken JSON): not a ValidationError.
                raise ConfigError([_env_problem(exc)]) from None
            values = {name: getattr(with_env, name) for name in with_env.model_fields_set}
        super().__init__(**values)

    def api_key(self) -> str | None:
        """The vast.ai API key from the first place that has one, or None."""
        if self.vast.api_key is not None and self.vast.api_key.get_secret_value():
            return self.vast.api_key.get_secret_value().strip()
        env_key = os.environ.get("VAST_API_KEY", "").strip()
        if env_key:
            return env_key
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir:
            cred = Path(cred_dir) / API_KEY_CREDENTIAL
            if cred.is_file():
                return _read_key(cred, f"$CREDENTIALS_DIRECTORY/{API_KEY_CREDENTIAL}")
        if self.vast.api_key_file is not None and self.vast.api_key_file.is_file():
            return _read_key(self.vast.api_key_file, "vast.api_key_file")
        return None

    def redacted(self) -> dict[str, Any]:
        """The effective values as plain data, secrets replaced by a mask."""
        data = self.model_dump(mode="json", by_alias=True)
        key = self.api_key()
        data["vast"]["api_key"] = "**********" if key else None
        return data


_PlainSettings = Settings


def _plain_values(values: dict[str, Any]) -> bool:
    """Whether `Settings(**values)` is plain validation: every key a section's name as
    written, no environment variable that pydantic-settings would read (its env source
    matches `vastd_<section>` and `vastd_<section>__...`, in any case)."""
    names = Settings.model_fields
    if not all(key in names for key in values):
        return False  # pydantic-settings matches section names in any case
    env_names = {f"vastd_{name}" for name in names}
    return not any(var.lower().split("__", 1)[0] in env_names for var in os.environ)


@cache
def _env_settings_class() -> type[Settings]:
    """`Settings` as a pydantic-settings `BaseSettings`: the environment over the values."""
    from pydantic_settings import BaseSettings, SettingsConfigDict

    class Settings(_PlainSettings, BaseSettings):  # the name its validation errors show
        model_config = SettingsConfigDict(
            env_prefix="VASTD_",
            env_nested_delimiter="__",
            extra="forbid",
            populate_by_name=True,
        )

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            # The TOML content arrives through init kwargs (see load_config) and must
            # lose against the environment, so the env source comes first.
            return (env_settings, init_settings)

    return Settings


def _read_key(path: Path, key: str) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError) as exc:
        # Only the reason, never the content.
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError([f"{key}: {path} cannot be read: {reason}"]) from None


def resolve_config_path(cli_path: str | Path | None) -> Path:
    """`--config`, else $VASTD_CONFIG, else /etc/vastd/config.toml."""
    if cli_path:
        return Path(cli_path)
    env = os.environ.get("VASTD_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH


def _format_errors(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(root)"
        msg = str(err["msg"]).removeprefix("Value error, ")
        head, sep, rest = msg.partition(": ")
        if sep and head.isidentifier() and err["type"] == "value_error":
            # a section's own check names its key first: "job" + "command: ..." -> job.command
            key, msg = f"{key}.{head}", rest
        problems.append(f"{key}: {msg}")
    return problems


# Keys holding paths: a relative value in the file is relative to the file's folder.
PATH_KEYS = (
    ("paths", "root"),
    ("vast", "api_key_file"),
    ("ssh", "key_file"),
    ("ssh", "known_hosts"),
)


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> list[str]:
    """Make the file's relative path values absolute against `base`; notes for what changed."""
    notes = []
    for section, key in PATH_KEYS:
        table = raw.get(section)
        if not isinstance(table, dict):
            continue
        value = table.get(key)
        if not isinstance(value, str) or not value or value.startswith(("/", "~")):
            continue
        if (section, key) == ("ssh", "known_hosts") and "/" not in value:
            continue  # "tofu", "ignore", or a bare word the validator refuses
        resolved = os.path.normpath(base.absolute() / Path(value).expanduser())
        table[key] = resolved
        notes.append(f"{section}.{key}: {value!r} is relative to the config file: {resolved}")
    return notes


def _unknown_env_sections() -> list[str]:
    """VASTD_<SECTION>__<KEY> variables whose section does not exist (pydantic drops them)."""
    sections = set(Settings.model_fields)
    problems = []
    for name in sorted(os.environ):
        if not name.startswith("VASTD_") or "__" not in name:
            continue
        section = name.removeprefix("VASTD_").split("__", 1)[0].lower()
        if section not in sections:
            problems.append(
                f"{name}: unknown section {section!r} (known: {', '.join(sorted(sections))})"
            )
    return problems


def _env_problem(exc: Exception) -> str:
    """A SettingsError as one line naming the environment variables at fault."""
    match = re.search(r'field "([^"]+)"', str(exc))
    field = match.group(1) if match else None
    prefix = f"VASTD_{field.upper()}" if field else "VASTD_"
    names = sorted(n for n in os.environ if n == prefix or n.startswith(prefix + "__"))
    where = ", ".join(names) if names else "the environment"
    return (
        f"{where}: cannot be parsed ({exc}); a table or list takes JSON (e.g. "
        'VASTD_JOB__VARS=\'{"SEED": "1"}\'), a section is set key by key'
    )


def _read_raw(path: Path, *, required: bool) -> tuple[dict[str, Any], list[str]]:
    """The config file's TOML as a dict (relative paths resolved) and notes on those."""
    if not path.exists():
        if required:
            raise ConfigError([f"{path}: config file not found"])
        return {}, []
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError([f"{path}: cannot be read: {reason}"]) from None
    return raw, _resolve_relative_paths(raw, path.absolute().parent)


def read_config(
    config_file: str | Path | None = None, *, require_file: bool = False
) -> tuple[Settings, list[str]]:
    """`load_config`, also returning notes on the relative paths that were resolved."""
    path = resolve_config_path(config_file)
    raw, notes = _read_raw(path, required=require_file or config_file is not None)
    problems = _unknown_env_sections()
    try:
        settings = Settings(**raw)
    except ValidationError as exc:
        raise ConfigError(problems + _format_errors(exc)) from None
    except ConfigError as exc:  # an environment variable that does not parse
        raise ConfigError(problems + exc.problems) from None
    if problems:
        raise ConfigError(problems)
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / SSH_KEY_CREDENTIAL).is_file():
        # systemd LoadCredential=ssh_key:...: the copy only this service can read wins.
        settings.ssh.key_file = Path(cred_dir) / SSH_KEY_CREDENTIAL
        notes.append(f"ssh.key_file: the systemd credential {settings.ssh.key_file}")
    return settings, notes


def file_problems_of_valid_sections(config_file: str | Path | None) -> list[str]:
    """With the config invalid: `check_files`' problems of the sections that are valid
    on their own (paths, vast, ssh), so that check-config lists every problem at once."""
    try:
        raw, _notes = _read_raw(resolve_config_path(config_file), required=True)
    except ConfigError:
        return []
    valid: dict[str, Any] = {}
    for name in ("paths", "vast", "ssh"):
        try:
            valid[name] = getattr(Settings(**{name: raw.get(name, {})}), name)
        except (ValidationError, ConfigError):
            continue
    problems = check_files(Settings.model_construct(**valid))
    return [p for p in problems if p.split(".", 1)[0] in valid]


def load_config(config_file: str | Path | None = None, *, require_file: bool = False) -> Settings:
    """Read and validate the configuration; raise ConfigError listing every problem."""
    return read_config(config_file, require_file=require_file)[0]


def _check_secret_file(path: Path, key: str, *, required: bool) -> list[str]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return [f"{key}: {path} does not exist"] if required else []
    except OSError as exc:
        return [f"{key}: {path} cannot be read: {exc.strerror}"]
    if not path.is_file():
        return [f"{key}: {path} is not a file"]
    if not os.access(path, os.R_OK):
        return [f"{key}: {path} is not readable by this user (uid {os.getuid()})"]
    if st.st_mode & 0o077:
        return [f"{key}: {path} is mode {st.st_mode & 0o777:04o}; make it 0600 (chmod 600)"]
    return []


def _check_private_key(path: Path) -> list[str]:
    """A key file that exists but does not load (garbage, a public key, a passphrase):
    every rental would fail to become ready, so it is refused before renting anything."""
    import asyncssh

    try:
        asyncssh.read_private_key(path)
    except (OSError, ValueError, asyncssh.KeyImportError) as exc:
        why = " ".join(str(exc).split()) or type(exc).__name__
        return [f"ssh.key_file: {path} is not a private key vastd can use: {why}"]
    return []


def check_files(settings: Settings) -> list[str]:
    """Problems with the files the config names: the SSH key, the API key file, known_hosts.

    The API key file only matters when no other source has a key; the SSH key always
    does (without it, preparation would fail on every instance, for ever).
    """
    problems = []
    problems += _check_secret_file(settings.ssh.key_file, "ssh.key_file", required=True)
    if not problems:
        problems += _check_private_key(settings.ssh.key_file)
    key_file = settings.vast.api_key_file
    if key_file is not None:
        other_source = bool(
            (settings.vast.api_key is not None and settings.vast.api_key.get_secret_value())
            or os.environ.get("VAST_API_KEY", "").strip()
            or (
                Path(os.environ.get("CREDENTIALS_DIRECTORY") or "/nonexistent") / API_KEY_CREDENTIAL
            ).is_file()
        )
        problems += _check_secret_file(key_file, "vast.api_key_file", required=False)
        if other_source:
            problems = [p for p in problems if not p.startswith("vast.api_key_file")]
    if settings.paths.group:
        import grp

        try:
            grp.getgrnam(settings.paths.group)
        except KeyError:
            problems.append(f"paths.group: no group named {settings.paths.group!r}")
    known_hosts = settings.ssh.known_hosts
    if known_hosts not in KNOWN_HOSTS_MODES:
        path = Path(known_hosts).expanduser()
        if not path.is_file() or not os.access(path, os.R_OK):
            problems.append(f"ssh.known_hosts: {path} is not a readable file")
    return problems


# --- SIGHUP: what may change while the daemon runs (README) ------------------------------
# Each is read at use time as `ctx.settings.<section>.<key>`, so assigning the new value to
# the running section object is enough; every other key needs a restart.
LIVE_KEYS: tuple[tuple[str, str], ...] = (
    ("fleet", "max_instances"),
    ("fleet", "max_total_dph"),
    ("fleet", "max_total_spend"),
    ("fleet", "idle_timeout_s"),
    ("fleet", "boot_timeout_s"),
    ("fleet", "min_free_disk_gb"),
    ("fleet", "max_failed_rentals"),
    ("fleet", "rent_pause_s"),
    ("fleet", "frozen_grace_s"),
    ("fleet", "on_outbid"),
    ("fleet", "max_bid_dph"),
    ("job", "max_attempts"),
    ("job", "timeout_s"),
    ("log", "level"),
)


def _flat(settings: Settings) -> dict[str, Any]:
    data = settings.model_dump(mode="json", by_alias=True, exclude={"vast": {"api_key"}})
    flat: dict[str, Any] = {}
    for section, values in data.items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value
        else:
            flat[section] = values
    return flat


def diff_settings(old: Settings, new: Settings) -> tuple[dict[str, list[Any]], list[str]]:
    """({"fleet.max_instances": [old, new], ...} for live keys, [keys that need a restart])."""
    before, after = _flat(old), _flat(new)
    live = {f"{s}.{k}" for s, k in LIVE_KEYS}
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return (
        {k: [before.get(k), after.get(k)] for k in changed if k in live},
        [k for k in changed if k not in live],
    )


def apply_live_keys(target: Settings, source: Settings) -> None:
    """Copy the live keys' values from `source` into `target`'s section objects, in place."""
    for section, key in LIVE_KEYS:
        setattr(getattr(target, section), key, getattr(getattr(source, section), key))
