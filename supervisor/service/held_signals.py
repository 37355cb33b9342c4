"""SIGHUP before the daemon is up.

A reload request (`systemctl reload`) can come while `run` is still importing, migrating or
starting: SIGHUP's default action would end the process there. `hold_reloads` is called first
thing in `run` (this module is light, so that is early); the daemon takes the held request
once it is up, and reloads then.
"""

from __future__ import annotations

import signal
from types import FrameType

_held = False


def _remember(_signum: int, _frame: FrameType | None) -> None:
    global _held
    _held = True


def hold_reloads() -> None:
    signal.signal(signal.SIGHUP, _remember)


def take_held_reload() -> bool:
    """Whether a SIGHUP was held since `hold_reloads` (and forget it)."""
    global _held
    held, _held = _held, False
    return held
