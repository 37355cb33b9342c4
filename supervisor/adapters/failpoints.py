"""Failpoints: named places where a test can make the process die, to prove crash safety.

`CLADO_SUPERVISOR_FAILPOINT=<name>` kills the process with SIGKILL the first time the
named point is reached. Unset (always, outside tests) it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "CLADO_SUPERVISOR_FAILPOINT"

# After a cancel decision is committed, before the cancel call is sent.
AFTER_CANCEL_DECISION = "after-cancel-decision"
# After an initiate answered with a job id, before the job row is recorded.
AFTER_INITIATE = "after-initiate"


def hit(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
