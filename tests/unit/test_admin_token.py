"""An admin API that other hosts can reach is refused without a token (its /metrics and health
routes would be open to them); on loopback a missing token only keeps /v1 disabled."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.adapters.secrets import admin_token
from supervisor.config import ConfigError, load_config


def config_at(tmp_path: Path, listen: str) -> Path:
    path = tmp_path / "supervisor.toml"
    path.write_text(f'[http]\nlisten = "{listen}"\ntoken_env = "TEST_ADMIN_TOKEN"\n')
    return path


def test_beyond_loopback_without_a_token_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_ADMIN_TOKEN", raising=False)
    path = config_at(tmp_path, "0.0.0.0:8787")
    with pytest.raises(ConfigError) as info:
        admin_token(load_config(path))
    assert str(info.value) == (
        f"{path}: http.listen: the admin API would listen on 0.0.0.0:8787 (beyond loopback) without a token; "
        "set http.token_env's variable or http.token_file, or listen on 127.0.0.1"
    )


def test_beyond_loopback_with_a_token_and_loopback_without_one_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_ADMIN_TOKEN", raising=False)
    assert admin_token(load_config(config_at(tmp_path, "127.0.0.1:8787"))) is None
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "a-long-admin-token")
    assert admin_token(load_config(config_at(tmp_path, "0.0.0.0:8787"))) == "a-long-admin-token"
