"""The kinds of value a setting holds, parsed and checked: durations, labels and the one label
rule, addresses, names, fractions, time zones, file paths. Each raises ValueError with the
words the user sees (pydantic validators and the CLI's options both call them)."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BeforeValidator

from supervisor.config.errors import toml_spelling

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
LABEL_KEY = re.compile(r"^[A-Za-z0-9_.\-/]{1,64}$")
MAX_LABEL_VALUE = 256

_DURATION_HINT = '(use a number with a unit: "90s", "15m", "2h", "1d")'
MAX_DURATION = timedelta(days=3650)


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
        raise ValueError(f'expected a duration ("90s", "15m", "2h", "1d" or seconds), got {toml_spelling(value)}')
    if math.isnan(seconds):
        raise ValueError(f"invalid duration {toml_spelling(value)} {_DURATION_HINT}")
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {toml_spelling(value)}")
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"duration {toml_spelling(value)} is too long (at most 3650 days)")
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


def fractions(value: list[float] | None) -> list[float] | None:
    """`warn_at`: fractions strictly between 0 and 1, sorted, each once."""
    if value is None:
        return None
    for fraction in value:
        if not 0 < fraction < 1:
            raise ValueError(f"warn_at values must be between 0 and 1 (exclusive), got {fraction}")
    return sorted(set(value))


def positive_fractions(value: list[float]) -> list[float]:
    """`forecast_warn_at`: fractions of a budget above 0 (above 1: on track to overspend by
    that much), sorted, each once."""
    for fraction in value:
        if not 0 < fraction < float("inf"):
            raise ValueError(f"forecast_warn_at values must be above 0, got {fraction}")
    return sorted(set(value))


def checked_match(value: dict[str, str] | None) -> dict[str, str] | None:
    """A budget's `match`: left out (every job) or at least one valid label."""
    if value is not None and not value:
        raise ValueError("match must name at least one label (leave it out to cover every job)")
    return None if value is None else check_labels(value)


def timezone_name(value: str) -> str:
    """An IANA time zone name this machine knows."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {value!r} (use an IANA name such as 'UTC' or 'Europe/Paris')") from None
    return value


def without_userinfo(url: str) -> str:
    """An error names the URL, never a password in it."""
    return re.sub(r"(?<=://)[^/@\s]*@", "…@", url, count=1)


def labels_match(match: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """The one label rule: a job matches when it carries every `match` label with its value
    (no `match`: every job). Policies, budgets and label filters all use it."""
    return all(labels.get(key) == value for key, value in (match or {}).items())


def check_names(kind: str, names: Iterable[str]) -> None:
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


def directory_path(value: Any) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a directory path string, got {toml_spelling(value)}")
    if "\x00" in value:
        raise ValueError("must be a directory path string, got one with a NUL character")
    return Path(value)


def file_path(value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a file path string, got {toml_spelling(value)}")
    return Path(value)
