"""`check-config` against a corpus of broken files, through the real CLI.

Every file in tests/data/bad-configs/NN-name.toml is paired with NN-name.expected: the exact
one line the CLI must print on stderr, with `{path}` standing for the config path. A bad
config must fail with exit 2, that one line, nothing on stdout, no traceback and no file
written (the SQLite URL is relative, so a created database would land in the cwd).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
CORPUS = REPO / "tests" / "data" / "bad-configs"
EXAMPLE = REPO / "supervisor.toml"
PREFIX = "clado-supervisor: error: "

CASES = sorted(CORPUS.glob("*.toml"))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"CLADO_API_KEY", "CLADO_SUPERVISOR_CONFIG"}}
    env["NO_COLOR"] = "1"
    return env


def check_config(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "--config", str(config), "check-config"],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert result.stderr.endswith("\n")
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == expected


def test_corpus_is_complete() -> None:
    """At least 30 cases, and every .toml has its .expected (and no orphan .expected)."""
    assert len(CASES) >= 30
    tomls = {p.stem for p in CASES}
    expected = {p.stem for p in CORPUS.glob("*.expected")}
    assert tomls == expected
    for stem in expected:
        text = (CORPUS / f"{stem}.expected").read_text(encoding="utf-8")
        assert text.count("\n") <= 1, stem
        assert text.strip(), stem
        assert text.startswith(PREFIX + "{path}: "), stem


@pytest.mark.parametrize("config", CASES, ids=[p.stem for p in CASES])
def test_bad_config_is_rejected_with_one_line(config: Path, tmp_path: Path) -> None:
    expected = (config.with_suffix(".expected")).read_text(encoding="utf-8").strip("\n")
    expected = expected.replace("{path}", str(config))

    result = check_config(config, cwd=tmp_path)

    assert_one_line_error(result, expected)
    assert list(tmp_path.iterdir()) == []


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "supervisor.toml"
    result = check_config(missing, cwd=tmp_path)
    assert_one_line_error(result, f"{PREFIX}{missing}: config file not found")
    assert list(tmp_path.iterdir()) == []


def test_missing_default_config_file_in_cwd(tmp_path: Path) -> None:
    """Without --config and $CLADO_SUPERVISOR_CONFIG, ./supervisor.toml is used."""
    result = subprocess.run(
        [sys.executable, "-m", "supervisor", "check-config"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_one_line_error(result, f"{PREFIX}supervisor.toml: config file not found")


def test_example_config_passes(tmp_path: Path) -> None:
    result = check_config(EXAMPLE, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"{EXAMPLE}: OK (policies: default, bulk; hash ")
    assert list(tmp_path.iterdir()) == []  # check-config creates no database


def test_empty_config_is_valid(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_bytes(b"")
    result = check_config(empty, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"{empty}: OK (policies: default; hash ")
    assert [p.name for p in tmp_path.iterdir()] == ["empty.toml"]


def _cli(config: Path, command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "--config", str(config), command],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_fifo_as_config_is_refused_at_once(tmp_path: Path, command: str) -> None:
    """Nobody writes to the FIFO: reading it would hang the command for good."""
    fifo = tmp_path / "supervisor.toml"
    os.mkfifo(fifo)
    result = _cli(fifo, command, cwd=tmp_path)
    assert_one_line_error(
        result, f"{PREFIX}{fifo}: not a regular file (it is a FIFO); the config must be a regular file"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["supervisor.toml"]


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_dev_zero_as_config_is_refused_at_once(tmp_path: Path, command: str) -> None:
    """It never ends: reading it whole would take all memory."""
    result = _cli(Path("/dev/zero"), command, cwd=tmp_path)
    assert_one_line_error(
        result, f"{PREFIX}/dev/zero: not a regular file (it is a character device); the config must be a regular file"
    )


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_an_oversized_config_is_refused(tmp_path: Path, command: str) -> None:
    big = tmp_path / "supervisor.toml"
    big.write_text("# filler\n" * (120 * 1024))  # valid TOML, 1.2 MB
    result = _cli(big, command, cwd=tmp_path)
    assert_one_line_error(result, f"{PREFIX}{big}: config file is too large (over 1 MiB)")
