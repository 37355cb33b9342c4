"""supervisor.toml → validated, immutable settings.

Every problem is reported as one `ConfigError` line that names the file, the key and
what is wrong, because an operator reading it at 3 a.m. should not need a traceback.
Unknown keys are errors: a typo such as `max_credit = 10` would otherwise silently
disable a limit.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG_PATH = "supervisor.toml"
CONFIG_ENV = "CLADO_SUPERVISOR_CONFIG"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
LABEL_KEY = re.compile(r"^[A-Za-z0-9_.\-/]{1,64}$")
MAX_LABEL_VALUE = 256


class ConfigError(Exception):
    """A configuration problem, already phrased as the one line to show the user."""


def parse_duration(value: Any) -> timedelta:
    """`"90s"`, `"15m"`, `"2h"`, `"1d"` (also `"250ms"`) or a number of seconds; > 0."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(
                f'invalid duration {value!r} (use a number with a unit: "90s", "15m", "2h", "1d")'
            )
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r}")
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if not LABEL_KEY.match(key):
            raise ValueError(f"invalid label key {key!r} (letters, digits, _ . - /; at most 64)")
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE or any(
            ord(ch) < 32 for ch in value
        ):
            raise ValueError(f"invalid value for label {key!r}")
    return labels


def parse_label(text: str) -> tuple[str, str]:
    """`team=growth` → ("team", "growth"); raises ValueError with a readable message."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"label {text!r} must look like KEY=VALUE")
    check_labels({key: value})
    return key, value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiConfig(_Section):
    base_url: str = "https://search.clado.ai"
    api_key_env: str = "CLADO_API_KEY"
    api_key_file: Path | None = None
    timeout: Duration = timedelta(seconds=10)
    max_concurrency: PositiveInt = Field(default=32, le=1024)
    credits_per_result: PositiveInt = 1
    # Attempts per call beyond the first, for timeouts, connection errors, 5xx, 429 and
    # garbage bodies. Backoff is exponential with jitter, honouring Retry-After.
    max_retries: int = Field(default=3, ge=0, le=10)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"base_url must be an http(s) URL, got {value!r}")
        return value.rstrip("/")


class DatabaseConfig(_Section):
    url: str = "sqlite:///supervisor.db"
    auto_migrate: bool = True

    @field_validator("url")
    @classmethod
    def _supported(cls, value: str) -> str:
        scheme = value.split("://", 1)[0]
        if scheme not in {"sqlite", "sqlite+aiosqlite", "postgresql", "postgresql+psycopg"}:
            raise ValueError(
                f"unsupported database URL scheme {scheme!r} "
                "(use sqlite:///PATH or postgresql+psycopg://…)"
            )
        return value


class SupervisorConfig(_Section):
    poll_interval: Duration = timedelta(seconds=15)
    confirm_timeout: Duration = timedelta(minutes=10)
    # How often a job whose cancel was accepted is polled until its final state shows.
    confirm_interval: Duration = timedelta(seconds=2)
    dry_run: bool = False
    # The scheduler tick: how often due jobs are claimed. Each claimed job is then
    # handled at its own due time, so limits hold to well under a tick.
    tick_interval: Duration = timedelta(seconds=1)
    batch_size: PositiveInt = Field(default=1000, le=10000)
    lease_ttl: Duration = timedelta(seconds=30)
    shutdown_timeout: Duration = timedelta(seconds=10)


Action = Literal["cancel", "observe"]


class PolicyConfig(_Section):
    match: dict[str, str] | None = None
    max_runtime: Duration | None = None
    max_queued: Duration | None = None
    stall_timeout: Duration | None = None
    max_credits: PositiveInt | None = None
    warn_at: list[float] | None = None
    action: Action | None = None

    @field_validator("match")
    @classmethod
    def _labels(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else check_labels(value)

    @field_validator("warn_at")
    @classmethod
    def _fractions(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return None
        for fraction in value:
            if not 0 < fraction < 1:
                raise ValueError(f"warn_at values must be between 0 and 1 (exclusive), got {fraction}")
        return sorted(set(value))


class LoggingConfig(_Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Section):
    api: ApiConfig = ApiConfig()
    database: DatabaseConfig = DatabaseConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    policies: dict[str, PolicyConfig] = Field(default_factory=lambda: {"default": DEFAULT_POLICY})
    logging: LoggingConfig = LoggingConfig()
    # Filled by load_config: where the settings came from and a short hash of the file,
    # recorded on every decision so an event can be traced to the rules that made it.
    _source: str = PrivateAttr(default="<defaults>")
    _hash: str = PrivateAttr(default="")

    @property
    def source(self) -> str:
        return self._source

    @property
    def config_hash(self) -> str:
        return self._hash

    @model_validator(mode="after")
    def _default_policy(self) -> Config:
        if "default" not in self.policies:
            raise ValueError("policies.default: missing (a [policies.default] table is required)")
        for name in self.policies:
            if not re.match(r"^[A-Za-z0-9_\-]{1,64}$", name):
                raise ValueError(f"invalid policy name {name!r}")
        return self

    def resolve_policy(self, name: str) -> Policy:
        """The effective limits of a policy: its own keys over those of `default`."""
        base = self.policies["default"]
        own = self.policies.get(name, base)
        merged = {
            key: getattr(own, key) if getattr(own, key) is not None else getattr(base, key)
            for key in ("max_runtime", "max_queued", "stall_timeout", "max_credits")
        }
        return Policy(
            name=name if name in self.policies else "default",
            warn_at=tuple(own.warn_at if own.warn_at is not None else (base.warn_at or ())),
            action=own.action or base.action or "cancel",
            **merged,
        )

    def choose_policy(self, labels: dict[str, str], explicit: str | None = None) -> str:
        """`--policy` wins; else the first policy (file order) whose match ⊆ labels; else default."""
        if explicit is not None:
            if explicit not in self.policies:
                known = ", ".join(self.policies)
                raise ConfigError(f"unknown policy {explicit!r} (known: {known})")
            return explicit
        for name, policy in self.policies.items():
            if name != "default" and policy.match and all(
                labels.get(key) == value for key, value in policy.match.items()
            ):
                return name
        return "default"


class Policy(BaseModel):
    """The resolved limits of one policy, as the pure policy core consumes them."""

    model_config = ConfigDict(frozen=True)

    name: str
    max_runtime: timedelta | None = None
    max_queued: timedelta | None = None
    stall_timeout: timedelta | None = None
    max_credits: int | None = None
    warn_at: tuple[float, ...] = ()
    action: Action = "cancel"


DEFAULT_POLICY = PolicyConfig(
    max_runtime=timedelta(minutes=30),
    max_queued=timedelta(minutes=10),
    stall_timeout=timedelta(minutes=10),
    max_credits=200,
    warn_at=[0.8],
    action="cancel",
)


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    return Path(explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def load_config(path: str | os.PathLike[str]) -> Config:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_first_error(exc)}") from None
    _check_database_path(path, config.database.url)
    config._source = str(path)
    config._hash = hashlib.sha256(raw).hexdigest()[:12]
    return config


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    message = error["msg"]
    # pydantic prefixes messages raised by our validators with "Value error, ".
    message = message.removeprefix("Value error, ")
    if kind not in {"value_error", "assertion_error"} and "input" in error:
        message = f"{message} (got {error['input']!r})"
    return f"{key}: {message}" if key else message


def _check_database_path(path: Path, url: str) -> None:
    """A SQLite file whose folder does not exist would only fail at the first query."""
    if not url.startswith("sqlite"):
        return
    file_part = url.split(":///", 1)[1] if ":///" in url else ""
    if not file_part or file_part.startswith(":memory:"):
        return
    folder = Path(file_part).expanduser().parent
    if not folder.is_dir():
        raise ConfigError(f"{path}: database.url: directory {str(folder)!r} does not exist")
