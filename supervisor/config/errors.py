"""How a configuration problem is told: one `ConfigError` line naming the file, the key and
what is wrong, in words an operator reads at 3 a.m. (not pydantic's)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError


class ConfigError(Exception):
    """A configuration problem, already phrased as the one line to show the user."""


def toml_spelling(value: Any) -> str:
    """A value as the TOML file spells it (`true`, `'x'`, "a table"), for an error message."""
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


def first_error(exc: ValidationError) -> str:
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
        message = f"must be a table, got {toml_spelling(error.get('input'))}"
    elif kind not in {"value_error", "assertion_error"} and "input" in error:
        message = _plain(message) + f", got {toml_spelling(error['input'])}"
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
