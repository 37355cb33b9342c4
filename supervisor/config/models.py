"""The settings of supervisor.toml as pydantic models: frozen, strict, unknown keys refused
(a typo such as `max_credit = 10` would otherwise silently disable a limit); `Config` also
resolves a job's policy and budgets from its labels."""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationInfo,
    field_validator,
)

from supervisor.config.errors import ConfigError
from supervisor.config.values import (
    Duration,
    DurationOrOff,
    check_labels,
    check_names,
    checked_match,
    directory_path,
    file_path,
    fractions,
    is_loopback,
    labels_match,
    positive_fractions,
    split_address,
    timezone_name,
    without_userinfo,
)


class _Section(BaseModel):
    # strict: `max_credits = true` must be an error, not a limit of 1 credit.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ApiConfig(_Section):
    # Plain http:// sends the API key in clear text: allowed only to a loopback host or with
    # this set. Declared before base_url, whose validator reads it.
    allow_insecure_http: bool = False
    base_url: str = "https://search.clado.ai"
    api_key_env: str = "CLADO_API_KEY"
    api_key_file: Annotated[Path, BeforeValidator(file_path)] | None = None
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
# What a job whose spend cannot be read (`blind`) gets: an alert only (the default), or,
# once it has been blind for blind_grace, a cancel with reason `blind` (fail closed).
OnBlind = Literal["alert", "cancel"]


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
    # A directory: every job this policy's supervisor cancels has its results (billed,
    # partial ones too) written there as <job_id>.jsonl once the job is final (keeper.py).
    keep_results: Annotated[Path, BeforeValidator(directory_path)] | None = None
    on_blind: OnBlind | None = None  # default "alert"
    blind_grace: Duration | None = None  # default 2 × supervisor.poll_interval

    @field_validator("match")
    @classmethod
    def _labels(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and not value:
            raise ValueError("match must name at least one label (it would never match)")
        return None if value is None else check_labels(value)

    @field_validator("warn_at")
    @classmethod
    def _warn(cls, value: list[float] | None) -> list[float] | None:
        return fractions(value)


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
    # With cancel, a job this budget covers is cancelled once blind for its policy's
    # blind_grace, whatever its policy's own on_blind says (a budget cannot hold a spend it
    # cannot read).
    on_blind: OnBlind = "alert"
    # Fractions of `credits` (above 1 allowed: "on track to overspend by this much") the central
    # forecast fires `budget_forecast` at, once per period each; and what a submission the
    # forecast says would overspend gets: a warning only, or refused (queued with --queue).
    forecast_warn_at: list[float] = Field(default_factory=list)
    forecast_action: Literal["warn", "block"] = "warn"

    _labels = field_validator("match")(classmethod(lambda cls, v: checked_match(v)))
    _forecast_warn = field_validator("forecast_warn_at")(classmethod(lambda cls, v: positive_fractions(v)))
    _warn = field_validator("warn_at")(classmethod(lambda cls, v: fractions(v)))
    _zone = field_validator("timezone")(classmethod(lambda cls, v: timezone_name(v)))


class BillingConfig(_Section):
    """What a credit costs (Clado's pricing page: $0.01), for the money twin of credit figures."""

    credit_price: Annotated[float, Field(gt=0, le=1_000_000)] = 0.01
    currency: str = "USD"

    @field_validator("currency")
    @classmethod
    def _code(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Z]{3}", value):
            raise ValueError(f'currency must be a three-letter ISO 4217 code such as "USD", got {value!r}')
        return value


class AccountConfig(_Section):
    """The account's remaining credits, read from GET /api/credits."""

    min_credits: Annotated[int, Field(ge=0)]
    check_interval: Duration = timedelta(minutes=1)
    action: Literal["block", "cancel", "observe"] = "block"


WEBHOOK_EVENTS = (
    "warning", "cancel_requested", "cancelled", "unconfirmed", "budget_warning",
    "budget_exhausted", "account_floor", "api_key_rejected",
    "lost", "reopened", "cancel_refused", "cancel_ignored", "api_misconfigured",
    "queued", "orphaned", "expired", "job_blind", "job_blind_cleared", "api_drift",
    "budget_forecast", "budget_forecast_cleared",
)  # fmt: skip


class WebhookConfig(_Section):
    # As in [api]: plain http:// beyond loopback only when this says so. Before url, whose
    # validator reads it.
    allow_insecure_http: bool = False
    url: str
    events: list[Literal[WEBHOOK_EVENTS]] = Field(default_factory=lambda: list(WEBHOOK_EVENTS))  # type: ignore[valid-type]
    format: Literal["json", "slack"] = "json"
    # Standard Webhooks headers (webhook-id, webhook-timestamp, webhook-signature); "legacy"
    # keeps the X-Clado-Supervisor-* headers of earlier releases, for one release.
    signature: Literal["standard", "legacy"] = "standard"
    # Deliveries of this hook in flight at once (the worker's bound per hook).
    max_in_flight: Annotated[int, Field(ge=1, le=256)] = 16
    secret_env: str | None = None
    secret_file: Annotated[Path, BeforeValidator(file_path)] | None = None
    timeout: Duration = timedelta(seconds=5)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str, info: ValidationInfo) -> str:
        if not re.fullmatch(r"https?://[^/\s?#]+(/\S*)?", value):
            raise ValueError(f"webhook url must be an http(s) URL, got {without_userinfo(value)!r}")
        _refuse_plain_http(
            value, info, "would send its events (and their signature) unencrypted", "allow_insecure_http = true in it"
        )
        return value

    @property
    def key(self) -> str:
        """The hook's name in the outbox, the CLI and metrics: its host and a digest of its
        URL (never the URL itself, whose path often holds a token), stable across reloads."""
        host = self.url.split("/")[2].rsplit("@", 1)[-1]
        return f"{host}-{hashlib.sha256(self.url.encode()).hexdigest()[:8]}"


class NotifyConfig(_Section):
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    # How long a delivery is retried (growing gaps) before it is marked failed.
    retry_for: Duration = timedelta(hours=24)

    @field_validator("retry_for")
    @classmethod
    def _retry_window(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0) or value > timedelta(days=30):
            raise ValueError("must be more than 0s and at most 30 days (how long a delivery is retried)")
        return value


class HttpConfig(_Section):
    """The admin API: jobs in and out, health, metrics."""

    enabled: bool = True
    listen: str = "127.0.0.1:8787"
    token_env: str = "CLADO_SUPERVISOR_TOKEN"  # noqa: S105 - the name of the variable, not a token
    token_file: Annotated[Path, BeforeValidator(file_path)] | None = None
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
    billing: BillingConfig = BillingConfig()
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
        check_names("policy", policies)
        if "default" not in policies:
            raise ValueError("[policies.default] is required")
        if policies["default"].match is not None:
            raise ValueError("policies.default.match: the default policy applies to every job; remove match")
        return policies

    @field_validator("budgets")
    @classmethod
    def _budget_names(cls, budgets: dict[str, BudgetConfig]) -> dict[str, BudgetConfig]:
        check_names("budget", budgets)
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
            for key in (
                "max_runtime",
                "max_queued",
                "stall_timeout",
                "max_credits",
                "cancel_lead",
                "keep_results",
                "blind_grace",
            )
        }
        return Policy(
            name=name if name in self.policies else "default",
            warn_at=tuple(own.warn_at if own.warn_at is not None else (base.warn_at or ())),
            action=own.action or base.action or "cancel",
            on_blind=own.on_blind or base.on_blind or "alert",
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
    keep_results: Path | None = None  # see PolicyConfig.keep_results
    on_blind: OnBlind = "alert"
    blind_grace: timedelta | None = None  # None: 2 × supervisor.poll_interval (core.policy.job_policy)


# Annotated: Config.policies refers to it (lazily) before this line, and mypy needs the type there.
DEFAULT_POLICY: PolicyConfig = PolicyConfig(
    max_runtime=timedelta(minutes=30),
    max_queued=timedelta(minutes=10),
    stall_timeout=timedelta(minutes=10),
    max_credits=200,
    warn_at=[0.8],
    action="cancel",
)
