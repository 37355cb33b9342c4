"""supervisor.toml → validated, immutable settings.

Every problem is reported as one `ConfigError` line that names the file, the key and
what is wrong, because an operator reading it at 3 a.m. should not need a traceback.
Unknown keys are errors: a typo such as `max_credit = 10` would otherwise silently
disable a limit.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

DEFAULT_CONFIG_PATH = "supervisor.toml"
CONFIG_ENV = "CLADO_SUPERVISOR_CONFIG"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
LABEL_KEY = re.compile(r"^[A-Za-z0-9_.\-/]{1,64}$")
MAX_LABEL_VALUE = 256
# A real config is a few KB: anything much larger is the wrong file (or /dev/zero).
MAX_CONFIG_BYTES = 1024 * 1024


class ConfigError(Exception):
    """A configuration problem, already phrased as the one line to show the user."""


_DURATION_HINT = '(use a number with a unit: "90s", "15m", "2h", "1d")'
MAX_DURATION = timedelta(days=3650)


def _toml_spelling(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (int, float)):
        return repr(value)
    return f"a {type(value).__name__}"


def parse_duration(value: Any) -> timedelta:
    """`"90s"`, `"15m"`, `"2h"`, `"1d"` (also `"250ms"`) or a number of seconds; > 0."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    elif isinstance(value, str) and value.strip().startswith("-"):
        raise ValueError(f"duration must be positive, got {value!r}")
    elif isinstance(value, str):
        raise ValueError(f"invalid duration {value!r} {_DURATION_HINT}")
    else:
        raise ValueError(f'expected a duration ("90s", "15m", "2h", "1d" or seconds), got {_toml_spelling(value)}')
    if math.isnan(seconds):
        raise ValueError(f"invalid duration {_toml_spelling(value)} {_DURATION_HINT}")
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {_toml_spelling(value)}")
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"duration {_toml_spelling(value)} is too long (at most 3650 days)")
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def parse_duration_or_off(value: Any) -> timedelta:
    """A duration, or 0 (`0`, `"0"`, `"0s"` …) for "off"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return timedelta(0)
    if isinstance(value, str) and (match := _DURATION.match(value)) and float(match.group(1)) == 0:
        return timedelta(0)
    if isinstance(value, str) and value.strip() == "0":
        return timedelta(0)
    return parse_duration(value)


DurationOrOff = Annotated[timedelta, BeforeValidator(parse_duration_or_off)]


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if not LABEL_KEY.match(key):
            raise ValueError(f"invalid label key {key!r} (letters, digits, _ . - /; at most 64)")
        # No control characters, no lone surrogates.
        if (
            not isinstance(value, str)
            or len(value) > MAX_LABEL_VALUE
            or any(ord(ch) < 32 or 0xD800 <= ord(ch) <= 0xDFFF for ch in value)
        ):
            raise ValueError(
                f"invalid value for label {key!r} (a string of at most {MAX_LABEL_VALUE} "
                "characters, no control characters)"
            )
    return labels


def parse_label(text: str) -> tuple[str, str]:
    """`team=growth` → ("team", "growth"); raises ValueError with a readable message."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"label {text!r} must look like KEY=VALUE")
    check_labels({key: value})
    return key, value


class _Section(BaseModel):
    # strict: `max_credits = true` must be an error, not a limit of 1 credit.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ApiConfig(_Section):
    # Plain http:// sends the API key in clear text: allowed only to a loopback host or with
    # this set. Declared before base_url, whose validator reads it.
    allow_insecure_http: bool = False
    base_url: str = "https://search.clado.ai"
    api_key_env: str = "CLADO_API_KEY"
    api_key_file: Annotated[Path, BeforeValidator(lambda v: _path(v))] | None = None
    timeout: Duration = timedelta(seconds=10)
    max_concurrency: PositiveInt = Field(default=32, le=1024)
    credits_per_result: PositiveInt = 1
    # Attempts per call beyond the first, for timeouts, connection errors, 5xx, 429 and
    # garbage bodies. Backoff is exponential with jitter, honouring Retry-After.
    max_retries: int = Field(default=3, ge=0, le=10)
    # How long a submission waits out the API's rate limit (429) before it gives up; a 429
    # means the job was not started, so waiting is safe (unlike retrying other failures).
    initiate_wait: Duration = timedelta(minutes=2)
    # The HTTP transport under the client's httpx API: "aiohttp" (httpx-aiohttp, about three
    # times the requests per CPU second at 32 in flight) or "httpx" (httpx's own, httpcore).
    transport: Literal["aiohttp", "httpx"] = "aiohttp"
    # How many initiates the daemon's queue sends a minute, across replicas (the API's limit:
    # 5 on the free and first paid tiers, 50 and 100 on the higher ones); a 429 slows it more.
    initiate_per_minute: PositiveInt = Field(default=5, le=10_000)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str, info: ValidationInfo) -> str:
        if not re.fullmatch(r"https?://[^/\s?#]+(/\S*)?", value):
            raise ValueError(f"base_url must be an http(s) URL, got {value!r}")
        _refuse_plain_http(value, info, "would send the API key unencrypted", "api.allow_insecure_http = true")
        return value.rstrip("/")


def _refuse_plain_http(url: str, info: ValidationInfo, risk: str, escape: str) -> None:
    """https, or plain http to this host only (loopback), or the operator's explicit yes."""
    if url.startswith("https://") or info.data.get("allow_insecure_http") or is_loopback(urlsplit(url).hostname):
        return
    raise ValueError(f"plain http:// to a host beyond loopback {risk}; use https:// (or set {escape})")


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 or localhost; a name that needs resolving counts as beyond loopback."""
    if not host:
        return False
    host = host.removeprefix("[").removesuffix("]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DatabaseConfig(_Section):
    url: str = "sqlite:///supervisor.db"
    auto_migrate: bool = True

    @field_validator("url")
    @classmethod
    def _supported(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError(f"{value!r} is not a URL (use sqlite:///supervisor.db or postgresql+psycopg://…)")
        scheme = value.split("://", 1)[0]
        if scheme not in {"sqlite", "sqlite+aiosqlite", "postgresql", "postgresql+psycopg"}:
            raise ValueError(
                f"unsupported database URL scheme {scheme!r} (use sqlite:///PATH or postgresql+psycopg://…)"
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
    # A reload that removes a policy or budget still used by running jobs (or by open
    # reservations) is refused, because those jobs would silently fall back to other limits;
    # true lets such a reload through (running jobs on a removed policy then get `default`).
    allow_orphaning: bool = False

    @field_validator("tick_interval")
    @classmethod
    def _tick_floor(cls, value: timedelta) -> timedelta:
        # Shorter ticks overrun their own claim transaction and only add load.
        if value < timedelta(milliseconds=100):
            raise ValueError("tick_interval must be at least 100ms")
        return value

    # Several replicas on one PostgreSQL database: one of them is the leader and alone runs
    # the singleton chores (budget sweeps, the account floor, retention, the jobs-by-state
    # gauges). It renews its leader row every leader_ttl / 3; when it dies, another replica
    # takes over once the row has expired (database time).
    leader_ttl: Duration = timedelta(seconds=15)
    # Terminal jobs (and their events) not updated for this long are deleted by the leader.
    retention: Duration = timedelta(days=30)
    # A completed job may be continued by anyone holding the key (same id, billed again), and
    # a lost one may come back: both are re-checked, read-only, for this long; "0" turns it off.
    reopen_window: DurationOrOff = timedelta(hours=1)


Action = Literal["cancel", "observe"]


class PolicyConfig(_Section):
    match: dict[str, str] | None = None
    max_runtime: Duration | None = None
    max_queued: Duration | None = None
    stall_timeout: Duration | None = None
    max_credits: Annotated[int, Field(gt=0, le=1_000_000_000)] | None = None
    warn_at: list[float] | None = None
    action: Action | None = None
    # Off by default. When set, a credit limit's cancel is sent this long before the limit is
    # predicted to be reached (set it to the cancel latency the bench or the decision logs
    # show), so the billed total lands at the limit rather than just past it; the price is
    # that a job whose rate drops, or that was about to complete, may be cancelled a few
    # credits short of the limit.
    cancel_lead: Duration | None = None

    @field_validator("match")
    @classmethod
    def _labels(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and not value:
            raise ValueError("match must name at least one label (it would never match)")
        return None if value is None else check_labels(value)

    @field_validator("warn_at")
    @classmethod
    def _warn(cls, value: list[float] | None) -> list[float] | None:
        return _fractions(value)


def _fractions(value: list[float] | None) -> list[float] | None:
    if value is None:
        return None
    for fraction in value:
        if not 0 < fraction < 1:
            raise ValueError(f"warn_at values must be between 0 and 1 (exclusive), got {fraction}")
    return sorted(set(value))


def _match(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is not None and not value:
        raise ValueError("match must name at least one label (leave it out to cover every job)")
    return None if value is None else check_labels(value)


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {value!r} (use an IANA name such as 'UTC' or 'Europe/Paris')") from None
    return value


class BudgetConfig(_Section):
    """Credits a group of jobs may spend per period. A job's spend counts in the period it
    was submitted in; several budgets may match one job and each is enforced."""

    match: dict[str, str] | None = None  # no match: every job
    period: Literal["hour", "day", "week", "month", "total"] = "day"
    timezone: str = "UTC"
    credits: Annotated[int, Field(gt=0, le=10**12)]
    warn_at: list[float] = Field(default_factory=list)
    action: Literal["cancel", "block", "observe"] = "cancel"
    reserve: bool = False

    _labels = field_validator("match")(classmethod(lambda cls, v: _match(v)))
    _warn = field_validator("warn_at")(classmethod(lambda cls, v: _fractions(v)))
    _zone = field_validator("timezone")(classmethod(lambda cls, v: _timezone(v)))


class AccountConfig(_Section):
    """The account's remaining credits, read from GET /api/credits."""

    min_credits: Annotated[int, Field(ge=0)]
    check_interval: Duration = timedelta(minutes=1)
    action: Literal["block", "cancel", "observe"] = "block"


WEBHOOK_EVENTS = (
    "warning", "cancel_requested", "cancelled", "unconfirmed", "budget_warning",
    "budget_exhausted", "account_floor", "api_key_rejected",
    "lost", "reopened", "cancel_refused", "cancel_ignored", "api_misconfigured",
    "queued", "orphaned", "expired",
)  # fmt: skip


class WebhookConfig(_Section):
    # As in [api]: plain http:// beyond loopback only when this says so. Before url, whose
    # validator reads it.
    allow_insecure_http: bool = False
    url: str
    events: list[Literal[WEBHOOK_EVENTS]] = Field(default_factory=lambda: list(WEBHOOK_EVENTS))  # type: ignore[valid-type]
    format: Literal["json", "slack"] = "json"
    secret_env: str | None = None
    secret_file: Annotated[Path, BeforeValidator(lambda v: _path(v))] | None = None
    timeout: Duration = timedelta(seconds=5)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str, info: ValidationInfo) -> str:
        if not re.fullmatch(r"https?://[^/\s?#]+(/\S*)?", value):
            raise ValueError(f"webhook url must be an http(s) URL, got {_without_userinfo(value)!r}")
        _refuse_plain_http(
            value, info, "would send its events (and their signature) unencrypted", "allow_insecure_http = true in it"
        )
        return value


def _without_userinfo(url: str) -> str:
    """An error names the URL, never a password in it."""
    return re.sub(r"(?<=://)[^/@\s]*@", "…@", url, count=1)


class NotifyConfig(_Section):
    webhooks: list[WebhookConfig] = Field(default_factory=list)


class HttpConfig(_Section):
    """The admin API: jobs in and out, health, metrics."""

    enabled: bool = True
    listen: str = "127.0.0.1:8787"
    token_env: str = "CLADO_SUPERVISOR_TOKEN"  # noqa: S105 - the name of the variable, not a token
    token_file: Annotated[Path, BeforeValidator(lambda v: _path(v))] | None = None
    max_body_bytes: int = Field(default=65536, ge=1024, le=16 * 1024 * 1024)

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str) -> str:
        split_address(value)
        return value

    @property
    def beyond_loopback(self) -> bool:
        """Whether the admin API listens where other hosts can reach it (0.0.0.0, a LAN
        address, a name): it then needs a token (secrets.admin_token) and warrants a warning
        at start, since it serves plain HTTP."""
        return self.enabled and not is_loopback(split_address(self.listen)[0])


def labels_match(match: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """The one label rule: a job matches when it carries every `match` label with its value
    (no `match`: every job). Policies, budgets and label filters all use it."""
    return all(labels.get(key) == value for key, value in (match or {}).items())


def _check_names(kind: str, names: Iterable[str]) -> None:
    """Policy and budget names: they appear in reasons (`budget:<name>`), rules and labels."""
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", name):
            raise ValueError(f"invalid {kind} name {name!r} (letters, digits, _ and -; at most 64)")


def split_address(value: str) -> tuple[str, int]:
    """Split "127.0.0.1:8787" / "[::1]:8787" / "0.0.0.0:0" into (host, port)."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen must look like HOST:PORT (e.g. 127.0.0.1:8787), got {value!r}")
    return host, int(port)


class SchedulerConfig(_Section):
    """Submissions that do not fit now: refused (the default) or queued until they do."""

    default: Literal["refuse", "queue"] = "refuse"
    # A queued submission not started within this long is expired (submit --expires-after).
    expires_after: Duration = timedelta(days=1)


class LoggingConfig(_Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Section):
    api: ApiConfig = ApiConfig()
    database: DatabaseConfig = DatabaseConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    policies: dict[str, PolicyConfig] = Field(default_factory=lambda: {"default": DEFAULT_POLICY})
    budgets: dict[str, BudgetConfig] = Field(default_factory=dict)
    account: AccountConfig | None = None
    notify: NotifyConfig = NotifyConfig()
    http: HttpConfig = HttpConfig()
    logging: LoggingConfig = LoggingConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
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

    @field_validator("policies")
    @classmethod
    def _policy_names(cls, policies: dict[str, PolicyConfig]) -> dict[str, PolicyConfig]:
        _check_names("policy", policies)
        if "default" not in policies:
            raise ValueError("[policies.default] is required")
        if policies["default"].match is not None:
            raise ValueError("policies.default.match: the default policy applies to every job; remove match")
        return policies

    @field_validator("budgets")
    @classmethod
    def _budget_names(cls, budgets: dict[str, BudgetConfig]) -> dict[str, BudgetConfig]:
        _check_names("budget", budgets)
        return budgets

    def budgets_for(self, labels: dict[str, str]) -> list[str]:
        """Every budget whose match the labels satisfy (a budget without match: all jobs)."""
        return [name for name, budget in self.budgets.items() if labels_match(budget.match, labels)]

    def resolve_policy(self, name: str) -> Policy:
        """The effective limits of a policy: its own keys over those of `default`."""
        base = self.policies["default"]
        own = self.policies.get(name, base)
        merged = {
            key: getattr(own, key) if getattr(own, key) is not None else getattr(base, key)
            for key in ("max_runtime", "max_queued", "stall_timeout", "max_credits", "cancel_lead")
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
            if name != "default" and policy.match and labels_match(policy.match, labels):
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
    cancel_lead: timedelta | None = None  # see PolicyConfig.cancel_lead


# Annotated: Config.policies refers to it (lazily) before this line, and mypy needs the type there.
DEFAULT_POLICY: PolicyConfig = PolicyConfig(
    max_runtime=timedelta(minutes=30),
    max_queued=timedelta(minutes=10),
    stall_timeout=timedelta(minutes=10),
    max_credits=200,
    warn_at=[0.8],
    action="cancel",
)


def _path(value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a file path string, got {_toml_spelling(value)}")
    return Path(value)


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    return Path(explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def load_config(path: str | os.PathLike[str], *, require_settings: bool = False) -> Config:
    """The validated config in `path`. `require_settings` (a reload) refuses a file with no
    settings at all: a truncated file must not quietly replace the limits with defaults."""
    path = Path(path)
    raw = _read_config(path)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    if require_settings and not data:
        raise ConfigError(f"{path}: the file has no settings (empty); refusing to fall back to the built-in defaults")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_first_error(exc)}") from None
    _check_database_path(path, config.database.url)
    config._source = str(path)
    config._hash = hashlib.sha256(raw).hexdigest()[:12]
    return config


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _read_config(path: Path) -> bytes:
    """The file's bytes: from a regular file only (a FIFO would block the reader for good,
    /dev/zero never ends), and at most MAX_CONFIG_BYTES of them."""
    raw = b""
    try:
        # stat before open: opening a device or a FIFO can itself block or have effects.
        kind = _not_regular(os.stat(path).st_mode)
        if kind is None:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            with open(fd, "rb") as file:
                # Checked again on what was opened: the name may have been swapped meanwhile.
                kind = _not_regular(os.fstat(file.fileno()).st_mode)
                if kind is None:
                    raw = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    if kind is not None:
        raise ConfigError(f"{path}: not a regular file (it is {kind}); the config must be a regular file")
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file is too large (over {MAX_CONFIG_BYTES // 1024 // 1024} MiB)")
    return raw


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _FILE_KINDS if test(mode)), "an unknown kind of file")


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ between two configs (added and removed ones
    too), for the log line of a reload: `policies.bulk.max_credits`, `budgets.team-x`."""
    changed: list[str] = []

    def walk(prefix: str, a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in dict.fromkeys([*a, *b]):
                walk(f"{prefix}.{key}" if prefix else str(key), a.get(key, _ABSENT), b.get(key, _ABSENT))
        elif a != b:
            changed.append(prefix)

    walk("", old.model_dump(), new.model_dump())
    return changed


_ABSENT = object()


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "missing":
        return f"{key}: missing (this key is required)"
    message = error["msg"]
    # pydantic prefixes messages raised by our validators with "Value error, ".
    message = message.removeprefix("Value error, ")
    if kind in {"model_type", "model_attributes_type", "dict_type"}:
        message = f"must be a table, got {_toml_spelling(error.get('input'))}"
    elif kind not in {"value_error", "assertion_error"} and "input" in error:
        message = _plain(message) + f", got {_toml_spelling(error['input'])}"
    if message.startswith("policies.default.match:"):
        return message
    return f"{key}: {message}" if key else message


_PYDANTIC_WORDS = (
    ("Input should be ", "must be "),
    ("a valid integer", "an integer"),
    ("a valid boolean", "true or false"),
    ("a valid string", "a string"),
    ("a valid list", "a list"),
    ("a valid number", "a number"),
)


def _plain(message: str) -> str:
    """pydantic's wording, minus its internals ("unable to parse string as an integer")."""
    message = re.sub(r", (unable to .*|got a number with a fractional part)$", "", message)
    for theirs, ours in _PYDANTIC_WORDS:
        message = message.replace(theirs, ours)
    return message


def _check_database_path(path: Path, url: str) -> None:
    """A SQLite file whose folder does not exist would only fail at the first query."""
    if not url.startswith("sqlite"):
        return
    file_part = url.split(":///", 1)[1] if ":///" in url else ""
    if not file_part or file_part.startswith(":memory:"):
        return
    folder = Path(file_part).expanduser().absolute().parent
    if not folder.is_dir():
        raise ConfigError(f"{path}: database.url: directory {str(folder)!r} does not exist")
