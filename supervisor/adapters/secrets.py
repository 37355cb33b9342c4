"""Reading secrets from the environment or from files (systemd credentials, Docker secrets)."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import structlog

from supervisor.adapters.logs import register_secret
from supervisor.config import Config, ConfigError

log = structlog.get_logger("supervisor.credentials")


def read_secret(*, env_name: str | None, file: Path | None, key: str, source: str) -> str | None:
    """The secret from `file` if set, else from the environment variable `env_name`.

    A relative file is looked up in $CREDENTIALS_DIRECTORY first (systemd LoadCredential=).
    """
    if file is not None:
        path = file
        credentials_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if not path.is_absolute() and credentials_dir:
            path = Path(credentials_dir) / path
        try:
            mode = path.stat().st_mode
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{source}: {key}: cannot read {str(path)!r}: {exc.strerror}") from None
        if stat.S_IMODE(mode) & 0o077:
            log.warning("secret file is readable by others", file=str(path), mode=oct(stat.S_IMODE(mode)))
        if not value:
            raise ConfigError(f"{source}: {key}: {str(path)!r} is empty")
        register_secret(value)
        return value
    from_env = os.environ.get(env_name or "", "").strip() or None
    register_secret(from_env)
    return from_env


def api_key(config: Config) -> str:
    value = read_secret(
        env_name=config.api.api_key_env,
        file=config.api.api_key_file,
        key="api.api_key_file",
        source=config.source,
    )
    if not value:
        name = config.api.api_key_env
        # A key pasted in place of the variable's name must not be echoed to the journal.
        shown = name if re.fullmatch(r"[A-Z_][A-Z0-9_]{0,63}", name) else "it names"
        raise ConfigError(
            f"{config.source}: api.api_key_env: the environment variable {shown} is not set (or set api.api_key_file)"
        )
    return value


def admin_token(config: Config) -> str | None:
    """The admin API's token (None: its /v1 routes stay disabled). An admin API that listens
    beyond loopback needs one: without it /metrics and the health routes would be open to
    every host that can reach the port."""
    token = read_secret(
        env_name=config.http.token_env, file=config.http.token_file, key="http.token_file", source=config.source
    )
    if token is None and config.http.beyond_loopback:
        raise ConfigError(
            f"{config.source}: http.listen: the admin API would listen on {config.http.listen} (beyond loopback) "
            "without a token; set http.token_env's variable or http.token_file, or listen on 127.0.0.1"
        )
    return token
