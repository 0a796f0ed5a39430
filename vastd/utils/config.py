"""Configuration: TOML file + `VASTD_<SECTION>__<KEY>` environment overrides.

Resolution of the file: `--config`, else `$VASTD_CONFIG`, else /etc/vastd/config.toml.
The API key is a secret: env `VASTD_VAST__API_KEY`, env `VAST_API_KEY`, `$CREDENTIALS_DIRECTORY`
(systemd LoadCredential=) or `[vast] api_key_file`; it is never printed.
"""

from __future__ import annotations

import os
import string
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from vastd.utils.exceptions import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/vastd/config.toml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PathsSettings(_Section):
    root: Path = Path("/var/lib/vastd")

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
    user: str = "root"
    key_file: Path = Path("/etc/vastd/id_ed25519")
    known_hosts: str = "tofu"
    endpoint: Literal["auto", "proxy", "direct"] = "auto"
    connect_timeout_s: float = Field(default=20.0, gt=0)
    keepalive_interval_s: float = Field(default=15.0, gt=0)
    command_timeout_s: float = Field(default=60.0, gt=0)
    max_channels: int = Field(default=4, ge=1, le=9)
    # how long a job may stay on an instance that does not answer before it runs elsewhere
    unreachable_grace_s: float = Field(default=900.0, ge=0)


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


# Placeholders every [job] command may use besides the [job.vars] keys (CONTRACT §4).
BUILTIN_PLACEHOLDERS = ("input", "job_dir", "output_dir", "job")


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
    max_input_bytes: int = Field(default=104_857_600, gt=0)
    max_result_bytes: int = Field(default=10 * 1024**3, gt=0)
    poll_interval_s: float = Field(default=5.0, gt=0)
    jobs_per_instance: int = Field(default=1, ge=1)
    # a file named like a finished job: refused (to failed/ as <job>.dup-<n>.csv), or
    # run again with the earlier results kept as results/<job>/previous-<n>/
    on_duplicate: Literal["refuse", "rerun"] = "refuse"
    vars: dict[str, str] = Field(default_factory=lambda: {"num_sim": "1000000"})
    patterns: list[JobPattern] = Field(default_factory=list)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("command")
    @classmethod
    def _has_input(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

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

    @field_validator("offer_query")
    @classmethod
    def _query_parses(cls, value: str) -> str:
        from vastd.utils.offer_query import parse_offer_query

        parse_offer_query(value)
        return value


class Settings(BaseSettings):
    """The whole configuration; sections mirror the TOML tables of CONTRACT §4."""

    model_config = SettingsConfigDict(
        env_prefix="VASTD_",
        env_nested_delimiter="__",
        extra="forbid",
        populate_by_name=True,
    )

    paths: PathsSettings = Field(default_factory=PathsSettings)
    vast: VastSettings = Field(default_factory=VastSettings)
    ssh: SshSettings = Field(default_factory=SshSettings)
    remote: RemoteSettings = Field(default_factory=RemoteSettings)
    prepare: list[PrepareStep] = Field(default_factory=list)
    job: JobSettings = Field(default_factory=JobSettings)
    fleet: FleetSettings = Field(default_factory=FleetSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML content arrives through init kwargs (see load_config) and must lose
        # against the environment, so the env source comes first.
        return (env_settings, init_settings)

    def api_key(self) -> str | None:
        """The vast.ai API key from the first place that has one, or None."""
        if self.vast.api_key is not None and self.vast.api_key.get_secret_value():
            return self.vast.api_key.get_secret_value().strip()
        env_key = os.environ.get("VAST_API_KEY", "").strip()
        if env_key:
            return env_key
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir:
            cred = Path(cred_dir) / "vast_api_key"
            if cred.is_file():
                return _read_key(cred, "$CREDENTIALS_DIRECTORY/vast_api_key")
        if self.vast.api_key_file is not None and self.vast.api_key_file.is_file():
            return _read_key(self.vast.api_key_file, "vast.api_key_file")
        return None

    def redacted(self) -> dict[str, Any]:
        """The effective values as plain data, secrets replaced by a mask."""
        data = self.model_dump(mode="json", by_alias=True)
        key = self.api_key()
        data["vast"]["api_key"] = "**********" if key else None
        return data


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


def load_config(config_file: str | Path | None = None, *, require_file: bool = False) -> Settings:
    """Read and validate the configuration; raise ConfigError listing every problem."""
    path = resolve_config_path(config_file)
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{path}: cannot be read: {exc}"]) from None
    elif require_file or config_file is not None:
        raise ConfigError([f"{path}: config file not found"])
    try:
        return Settings(**raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
