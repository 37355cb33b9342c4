"""Reading supervisor.toml: from a regular file only, bounded, into a validated `Config`;
and what changed between two of them (for a reload's log line)."""

from __future__ import annotations

import hashlib
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from supervisor.config.errors import ConfigError, first_error
from supervisor.config.models import Config

DEFAULT_CONFIG_PATH = "supervisor.toml"
CONFIG_ENV = "CLADO_SUPERVISOR_CONFIG"
# A real config is a few KB: anything much larger is the wrong file (or /dev/zero).
MAX_CONFIG_BYTES = 1024 * 1024


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
        raise ConfigError(f"{path}: {first_error(exc)}") from None
    _check_database_path(path, config.database.url)
    _check_keep_results(path, config)
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


def _check_keep_results(path: Path, config: Config) -> None:
    """A results directory that is a file, or whose parent is missing, would only fail once a
    cancelled job's paid-for results were due: said now. A missing directory is created
    (0700) by the daemon."""
    for name, policy in config.policies.items():
        if policy.keep_results is None:
            continue
        folder = policy.keep_results.absolute()
        key = f"{path}: policies.{name}.keep_results"
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{key}: {str(folder)!r} is not a directory")
        if not folder.exists() and not folder.parent.is_dir():
            raise ConfigError(f"{key}: directory {str(folder.parent)!r} does not exist")
