"""A test-only seam: `DURABLE_FAULT=<point>` makes the sidecar die with SIGKILL exactly there.

Chaos tests use it to stop the step life cycle at each point where a crash could charge twice or
lose a call. Unset (the default) it costs one string comparison.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "before-pending-commit",  # the request is matched, nothing journaled yet
    "after-pending-commit",  # the pending row is committed, the request not yet forwarded
    "before-complete-commit",  # the upstream answered, the answer is not journaled yet
    "after-complete-commit",  # the answer is journaled, the agent has not received it
)

_ARMED = os.environ.get("DURABLE_FAULT", "")


def crash_point(point: str) -> None:
    if point == _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
