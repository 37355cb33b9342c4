"""supervisor.config, pure: durations, labels, policy inheritance and choice, defaults, hash, path."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from supervisor.config import (
    CONFIG_ENV,
    MAX_CONFIG_BYTES,
    Config,
    ConfigError,
    Policy,
    changed_keys,
    config_path,
    load_config,
    parse_duration,
    parse_label,
)
from supervisor.core.policy import job_policy


def write(tmp_path: Path, body: str, name: str = "supervisor.toml") -> Path:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


def load(tmp_path: Path, body: str) -> Config:
    return load_config(write(tmp_path, body))


# --- parse_duration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90),
        ("15m", 15 * 60),
        ("2h", 2 * 3600),
        ("1d", 86400),
        ("250ms", 0.25),
        ("1.5h", 5400),
        (" 10s ", 10),
        ("10 s", 10),
        (45, 45),
        (1, 1),
        (0.5, 0.5),
        (timedelta(minutes=3), 180),
    ],
)
def test_parse_duration_valid(value: object, seconds: float) -> None:
    result = parse_duration(value)
    assert isinstance(result, timedelta)
    assert result.total_seconds() == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        "3x",
        "-5s",
        "0s",
        "0",
        "",
        "   ",
        "1 week",
        "1w",
        "90",  # a bare number string has no unit
        "s",
        "1h30m",
        "1e3s",
        "15M",
        0,
        -5,
        0.0,
        -0.1,
        True,
        False,
        None,
        ["10m"],
        {"m": 10},
        timedelta(0),
        timedelta(seconds=-1),
    ],
)
def test_parse_duration_invalid(value: object) -> None:
    with pytest.raises(ValueError, match=r"."):  # whatever it says: test_config's messages check the wording
        parse_duration(value)


def test_parse_duration_messages_are_readable() -> None:
    with pytest.raises(ValueError, match=r"invalid duration '3x' \(use a number with a unit"):
        parse_duration("3x")
    with pytest.raises(ValueError, match="duration must be positive, got '0s'"):
        parse_duration("0s")


# --- parse_label ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pair"),
    [
        ("team=growth", ("team", "growth")),
        ("app.kubernetes.io/name=crawler", ("app.kubernetes.io/name", "crawler")),
        ("run_id=a=b", ("run_id", "a=b")),  # only the first = splits
        ("note=", ("note", "")),
        ("k=" + "v" * 256, ("k", "v" * 256)),
        ("K-9=x y", ("K-9", "x y")),
        ("k" * 64 + "=v", ("k" * 64, "v")),
    ],
)
def test_parse_label_valid(text: str, pair: tuple[str, str]) -> None:
    assert parse_label(text) == pair


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("team", "must look like KEY=VALUE"),
        ("", "must look like KEY=VALUE"),
        ("=growth", "invalid label key ''"),
        ("team name=growth", "invalid label key 'team name'"),
        ("k" * 65 + "=v", "invalid label key"),
        ("tëam=x", "invalid label key"),
        ("k=" + "v" * 257, "invalid value for label 'k'"),
        ("k=a\tb", "invalid value for label 'k'"),
        ("k=a\nb", "invalid value for label 'k'"),
    ],
)
def test_parse_label_invalid(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_label(text)


# --- defaults -------------------------------------------------------------------------------


def test_empty_file_gives_the_documented_default_policy(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    assert list(config.policies) == ["default"]
    assert config.resolve_policy("default") == Policy(
        name="default",
        max_runtime=timedelta(minutes=30),
        max_queued=timedelta(minutes=10),
        stall_timeout=timedelta(minutes=10),
        max_credits=200,
        warn_at=(0.8,),
        action="cancel",
    )
    assert config.choose_policy({"team": "growth"}) == "default"


def test_empty_file_gives_the_documented_sections(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    assert config.api.base_url == "https://search.clado.ai"
    assert config.api.api_key_env == "CLADO_API_KEY"
    assert config.api.timeout == timedelta(seconds=10)
    assert config.api.max_concurrency == 32
    assert config.api.credits_per_result == 1
    assert config.database.url == "sqlite:///supervisor.db"
    assert config.database.auto_migrate is True
    assert config.supervisor.poll_interval == timedelta(seconds=15)
    assert config.supervisor.confirm_timeout == timedelta(minutes=10)
    assert config.supervisor.dry_run is False
    assert config.logging.format == "auto"
    assert config.logging.level == "info"


def test_loaded_config_records_its_source(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_config(path).source == str(path)
    assert Config().source == "<defaults>"


def test_config_is_immutable(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    with pytest.raises(ValidationError, match="frozen"):
        config.policies["default"].max_credits = 1  # type: ignore[misc]


# --- resolve_policy: inheritance from default -----------------------------------------------

INHERIT = """
[policies.default]
max_runtime = "30m"
max_queued = "10m"
stall_timeout = "5m"
max_credits = 200
warn_at = [0.8]
action = "observe"

[policies.bulk]
match = { team = "growth" }
max_credits = 1000
max_runtime = "2h"

[policies.strict]
stall_timeout = "1m"
warn_at = [0.9, 0.5, 0.5]
action = "cancel"
"""


def test_named_policy_overrides_what_it_sets_and_inherits_the_rest(tmp_path: Path) -> None:
    bulk = load(tmp_path, INHERIT).resolve_policy("bulk")
    assert bulk.name == "bulk"
    assert bulk.max_credits == 1000  # own
    assert bulk.max_runtime == timedelta(hours=2)  # own
    assert bulk.max_queued == timedelta(minutes=10)  # from default
    assert bulk.stall_timeout == timedelta(minutes=5)  # from default
    assert bulk.warn_at == (0.8,)  # from default
    assert bulk.action == "observe"  # from default


def test_named_policy_overrides_action_and_warn_at(tmp_path: Path) -> None:
    strict = load(tmp_path, INHERIT).resolve_policy("strict")
    assert strict.stall_timeout == timedelta(minutes=1)
    assert strict.max_credits == 200
    assert strict.max_runtime == timedelta(minutes=30)
    assert strict.warn_at == (0.5, 0.9)  # sorted, duplicates removed
    assert strict.action == "cancel"


def test_default_resolves_to_itself(tmp_path: Path) -> None:
    default = load(tmp_path, INHERIT).resolve_policy("default")
    assert default.name == "default"
    assert default.max_credits == 200
    assert default.stall_timeout == timedelta(minutes=5)
    assert default.action == "observe"


def test_default_without_limits_leaves_them_unset(tmp_path: Path) -> None:
    """An explicit [policies.default] replaces the built-in one: unset limits stay unset."""
    config = load(tmp_path, '[policies.default]\nmax_credits = 50\n\n[policies.x]\nmax_runtime = "1h"\n')
    x = config.resolve_policy("x")
    assert x.max_credits == 50
    assert x.max_runtime == timedelta(hours=1)
    assert x.max_queued is None
    assert x.stall_timeout is None
    assert x.warn_at == ()
    assert x.action == "cancel"


def test_empty_warn_at_disables_warnings_inherited_from_default(tmp_path: Path) -> None:
    config = load(tmp_path, INHERIT + "\n[policies.quiet]\nwarn_at = []\n")
    assert config.resolve_policy("quiet").warn_at == ()
    assert config.resolve_policy("bulk").warn_at == (0.8,)


def test_unknown_policy_resolves_to_default(tmp_path: Path) -> None:
    policy = load(tmp_path, INHERIT).resolve_policy("gone")
    assert policy.name == "default"
    assert policy.max_credits == 200


# --- choose_policy --------------------------------------------------------------------------

CHOOSE = """
[policies.default]

[policies.growth-eu]
match = { team = "growth", region = "eu" }
max_credits = 10

[policies.growth]
match = { team = "growth" }
max_credits = 20

[policies.also-growth]
match = { team = "growth" }
max_credits = 30

[policies.manual-only]
max_credits = 40
"""


@pytest.mark.parametrize(
    ("labels", "chosen"),
    [
        ({"team": "growth", "region": "eu"}, "growth-eu"),  # all labels of the first match
        ({"team": "growth", "region": "us"}, "growth"),  # growth-eu needs region=eu too
        ({"team": "growth"}, "growth"),  # first in file order, not also-growth
        ({"team": "growth", "extra": "x"}, "growth"),  # extra labels do not matter
        ({"region": "eu"}, "default"),  # a subset of a match is not a match
        ({"team": "Growth"}, "default"),  # values compare exactly
        ({}, "default"),
    ],
)
def test_choose_policy_by_labels(tmp_path: Path, labels: dict[str, str], chosen: str) -> None:
    assert load(tmp_path, CHOOSE).choose_policy(labels) == chosen


def test_file_order_decides_not_specificity(tmp_path: Path) -> None:
    reordered = """
[policies.default]

[policies.growth]
match = { team = "growth" }

[policies.growth-eu]
match = { team = "growth", region = "eu" }
"""
    assert load(tmp_path, reordered).choose_policy({"team": "growth", "region": "eu"}) == "growth"


def test_explicit_policy_wins_over_labels(tmp_path: Path) -> None:
    config = load(tmp_path, CHOOSE)
    assert config.choose_policy({"team": "growth"}, explicit="manual-only") == "manual-only"
    assert config.choose_policy({"team": "growth"}, explicit="default") == "default"
    assert config.choose_policy({}, explicit="also-growth") == "also-growth"


def test_unknown_explicit_policy_names_the_known_ones(tmp_path: Path) -> None:
    config = load(tmp_path, CHOOSE)
    with pytest.raises(ConfigError) as info:
        config.choose_policy({"team": "growth"}, explicit="growht")
    assert str(info.value) == ("unknown policy 'growht' (known: default, growth-eu, growth, also-growth, manual-only)")


def test_policy_without_match_is_never_chosen_by_labels(tmp_path: Path) -> None:
    config = load(tmp_path, CHOOSE)
    assert config.choose_policy({"max_credits": "40"}) == "default"


def test_a_match_on_the_default_policy_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"policies\.default\.match: the default policy applies to every job"):
        load(tmp_path, '[policies.default]\nmatch = { team = "x" }\n[policies.other]\n')


# --- config_hash ----------------------------------------------------------------------------


def test_config_hash_is_stable_for_the_same_bytes(tmp_path: Path) -> None:
    path = write(tmp_path, INHERIT)
    first = load_config(path).config_hash
    assert len(first) == 12 and all(c in "0123456789abcdef" for c in first)
    assert load_config(path).config_hash == first
    copy = write(tmp_path, INHERIT, name="copy.toml")
    assert load_config(copy).config_hash == first  # the content, not the path


def test_config_hash_changes_when_the_file_changes(tmp_path: Path) -> None:
    path = write(tmp_path, INHERIT)
    before = load_config(path).config_hash
    path.write_text(INHERIT.replace("max_credits = 1000", "max_credits = 1001"), encoding="utf-8")
    after = load_config(path).config_hash
    assert after != before
    path.write_text(INHERIT + "# a comment\n", encoding="utf-8")
    assert load_config(path).config_hash not in {before, after}
    path.write_text(INHERIT, encoding="utf-8")
    assert load_config(path).config_hash == before


# --- config_path ----------------------------------------------------------------------------


def test_config_path_explicit_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, "/etc/from-env.toml")
    assert config_path("/srv/explicit.toml") == Path("/srv/explicit.toml")
    assert config_path(Path("rel.toml")) == Path("rel.toml")


def test_config_path_env_when_no_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, "/etc/from-env.toml")
    assert config_path(None) == Path("/etc/from-env.toml")


def test_config_path_defaults_to_cwd_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert config_path(None) == Path("supervisor.toml")
    monkeypatch.setenv(CONFIG_ENV, "")  # empty means unset
    assert config_path(None) == Path("supervisor.toml")


def test_config_env_name() -> None:
    assert CONFIG_ENV == "CLADO_SUPERVISOR_CONFIG"


# --- load_config errors (the corpus in tests/data/bad-configs covers the rest via the CLI) ---


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: config file not found"


def test_errors_name_file_and_dotted_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[policies.default]\nmax_credit = 10\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: policies.default.max_credit: unknown key"


def test_sqlite_memory_and_existing_directory_are_accepted(tmp_path: Path) -> None:
    assert load(tmp_path, '[database]\nurl = "sqlite:///:memory:"\n').database.url == "sqlite:///:memory:"
    url = f"sqlite:///{tmp_path}/sub.db"
    assert load(tmp_path, f'[database]\nurl = "{url}"\n').database.url == url


def test_base_url_trailing_slash_is_removed(tmp_path: Path) -> None:
    config = load(tmp_path, '[api]\nbase_url = "http://127.0.0.1:8080/"\n')
    assert config.api.base_url == "http://127.0.0.1:8080"


# --- what load_config reads: a regular file, bounded -----------------------------------------


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """No writer ever opens it: reading it would block for good."""
    fifo = tmp_path / "supervisor.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as info:
        load_config(fifo)
    assert str(info.value) == f"{fifo}: not a regular file (it is a FIFO); the config must be a regular file"


@pytest.mark.parametrize(("path", "kind"), [("/dev/zero", "a character device"), ("/", "a directory")])
def test_a_device_or_a_directory_is_refused(path: str, kind: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: not a regular file (it is {kind}); the config must be a regular file"


def test_a_symlink_to_a_regular_file_is_read(tmp_path: Path) -> None:
    link = tmp_path / "link.toml"
    link.symlink_to(write(tmp_path, "[policies.default]\nmax_credits = 7\n"))
    assert load_config(link).policies["default"].max_credits == 7


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: config file is too large (over 1 MiB)"
    assert load_config(write(tmp_path, "# padding\n" * (MAX_CONFIG_BYTES // 10 - 1))).source


@pytest.mark.parametrize("body", ["", "\n\n", "# only comments\n# here\n"])
def test_a_reload_refuses_a_file_without_settings(tmp_path: Path, body: str) -> None:
    """A file truncated to nothing would otherwise replace every limit with the defaults."""
    path = write(tmp_path, body)
    assert load_config(path).policies["default"].max_credits == 200  # check-config: valid
    with pytest.raises(ConfigError) as info:
        load_config(path, require_settings=True)
    assert str(info.value) == (
        f"{path}: the file has no settings (empty); refusing to fall back to the built-in defaults"
    )


# --- plain http ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["https://search.clado.ai", "http://127.0.0.1:8080", "http://127.1.2.3", "http://[::1]:80", "http://localhost:9"],
)
def test_base_url_https_or_loopback_is_accepted(tmp_path: Path, url: str) -> None:
    assert load(tmp_path, f'[api]\nbase_url = "{url}"\n').api.base_url == url


@pytest.mark.parametrize("url", ["http://search.clado.ai", "http://10.0.0.5:8080", "http://[::ffff:10.0.0.5]"])
def test_plain_http_base_url_beyond_loopback_is_refused(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, f'[api]\nbase_url = "{url}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: api.base_url: plain http:// to a host beyond loopback would send the API key unencrypted; "
        "use https:// (or set api.allow_insecure_http = true)"
    )


def test_allow_insecure_http_lets_plain_http_through(tmp_path: Path) -> None:
    config = load(tmp_path, '[api]\nallow_insecure_http = true\nbase_url = "http://clado.internal"\n')
    assert config.api.base_url == "http://clado.internal"
    # Its place in the section does not matter.
    config = load(tmp_path, '[api]\nbase_url = "http://clado.internal"\nallow_insecure_http = true\n')
    assert config.api.base_url == "http://clado.internal"


def test_plain_http_webhook_is_refused_by_its_index_and_its_password_is_not_echoed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[notify.webhooks]]\nurl = "https://hooks.example/a"\n'
        '[[notify.webhooks]]\nurl = "http://bot:hunter2@hooks.example/b"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: notify.webhooks[1].url: plain http:// to a host beyond loopback would send its events "
        "(and their signature) unencrypted; use https:// (or set allow_insecure_http = true in it)"
    )
    path = write(tmp_path, '[[notify.webhooks]]\nurl = "ftp://bot:hunter2@hooks.example/b"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "hunter2" not in str(info.value)
    allowed = load(tmp_path, '[[notify.webhooks]]\nurl = "http://hooks.lan/b"\nallow_insecure_http = true\n')
    assert allowed.notify.webhooks[0].url == "http://hooks.lan/b"


def test_notify_retry_for_defaults_to_a_day_and_is_bounded(tmp_path: Path) -> None:
    assert load(tmp_path, "").notify.retry_for == timedelta(hours=24)
    assert load(tmp_path, '[notify]\nretry_for = "30d"\n').notify.retry_for == timedelta(days=30)
    for bad in ('"0s"', '"-5m"', '"31d"'):
        with pytest.raises(ConfigError, match=r"notify\.retry_for: "):
            load(tmp_path, f"[notify]\nretry_for = {bad}\n")


def test_a_hooks_key_names_its_host_never_its_token(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[[notify.webhooks]]\nurl = "https://hooks.slack.com/services/T0/B0/sEcReT"\n'
        '[[notify.webhooks]]\nurl = "https://hooks.slack.com/services/T0/B0/other"\n',
    )
    first, second = (hook.key for hook in config.notify.webhooks)
    assert first.startswith("hooks.slack.com-") and "sEcReT" not in first
    assert first != second  # two hooks on one host stay apart
    assert config.notify.webhooks[0].signature == "standard"


@pytest.mark.parametrize(
    ("listen", "beyond"),
    [("127.0.0.1:8787", False), ("[::1]:8787", False), ("localhost:1", False),
     ("0.0.0.0:8787", True), ("[::]:8787", True), ("10.1.2.3:80", True), ("admin.lan:80", True)],
)  # fmt: skip
def test_admin_api_beyond_loopback(tmp_path: Path, listen: str, beyond: bool) -> None:
    assert load(tmp_path, f'[http]\nlisten = "{listen}"\n').http.beyond_loopback is beyond
    assert load(tmp_path, f'[http]\nenabled = false\nlisten = "{listen}"\n').http.beyond_loopback is False


# --- what a reload changes --------------------------------------------------------------------


def test_changed_keys_names_each_changed_added_and_removed_key(tmp_path: Path) -> None:
    old = load(tmp_path, "[policies.default]\nmax_credits = 40\n[policies.bulk]\nmax_credits = 9\n")
    new = load(
        tmp_path,
        '[supervisor]\npoll_interval = "5s"\n[policies.default]\nmax_credits = 30\n[budgets.team]\ncredits = 100\n',
    )
    changed = changed_keys(old, new)
    assert "supervisor.poll_interval" in changed
    assert "policies.default.max_credits" in changed
    assert "policies.bulk" in changed
    assert "budgets.team" in changed
    assert not any(key.startswith(("api", "database", "logging")) for key in changed)
    assert changed_keys(old, old) == []


BLIND = """
[supervisor]
poll_interval = "10s"

[policies.default]
max_credits = 100

[policies.strict]
on_blind = "cancel"
blind_grace = "45s"

[budgets.growth]
match = { team = "growth" }
credits = 1000
on_blind = "cancel"
"""


def test_on_blind_defaults_to_alert_with_a_grace_of_two_polls_and_a_budget_can_fail_closed(tmp_path: Path) -> None:
    from supervisor.core.job import FIELDS, Job

    config = load(tmp_path, BLIND)

    def policy_of(policy: str, **labels: str) -> tuple[str, timedelta | None]:
        row: dict[str, object] = dict.fromkeys(FIELDS)
        row.update(job_id="j", state="watching", labels=labels, policy=policy, warned=[])
        resolved = job_policy(config, Job.from_row(row))
        return resolved.on_blind, resolved.blind_grace

    assert policy_of("default") == ("alert", timedelta(seconds=20))  # 2 × poll_interval
    assert policy_of("strict") == ("cancel", timedelta(seconds=45))  # its own
    assert policy_of("default", team="growth") == ("cancel", timedelta(seconds=20))  # the budget's
    assert policy_of("default", team="sales") == ("alert", timedelta(seconds=20))
