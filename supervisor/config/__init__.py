"""supervisor.toml → validated, immutable settings.

Every problem is reported as one `ConfigError` line that names the file, the key and
what is wrong, because an operator reading it at 3 a.m. should not need a traceback.
Unknown keys are errors: a typo such as `max_credit = 10` would otherwise silently
disable a limit.

In four parts: `models` (the sections of the file, `Config`, `Policy`), `values` (durations,
labels, addresses and the other kinds of value a setting holds), `loading` (reading the file,
`changed_keys`) and `errors` (`ConfigError` and its wording). Callers import from here.
"""

from supervisor.config.errors import ConfigError
from supervisor.config.loading import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    MAX_CONFIG_BYTES,
    changed_keys,
    config_path,
    load_config,
)
from supervisor.config.models import (
    DEFAULT_POLICY,
    WEBHOOK_EVENTS,
    AccountConfig,
    Action,
    ApiConfig,
    BillingConfig,
    BudgetConfig,
    Config,
    DatabaseConfig,
    HttpConfig,
    LoggingConfig,
    NotifyConfig,
    Policy,
    PolicyConfig,
    SchedulerConfig,
    SupervisorConfig,
    WebhookConfig,
)
from supervisor.config.values import (
    LABEL_KEY,
    MAX_DURATION,
    MAX_LABEL_VALUE,
    Duration,
    DurationOrOff,
    check_labels,
    is_loopback,
    labels_match,
    parse_duration,
    parse_duration_or_off,
    parse_label,
    split_address,
)

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_POLICY",
    "LABEL_KEY",
    "MAX_CONFIG_BYTES",
    "MAX_DURATION",
    "MAX_LABEL_VALUE",
    "WEBHOOK_EVENTS",
    "AccountConfig",
    "Action",
    "ApiConfig",
    "BillingConfig",
    "BudgetConfig",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "Duration",
    "DurationOrOff",
    "HttpConfig",
    "LoggingConfig",
    "NotifyConfig",
    "Policy",
    "PolicyConfig",
    "SchedulerConfig",
    "SupervisorConfig",
    "WebhookConfig",
    "changed_keys",
    "check_labels",
    "config_path",
    "is_loopback",
    "labels_match",
    "load_config",
    "parse_duration",
    "parse_duration_or_off",
    "parse_label",
    "split_address",
]
