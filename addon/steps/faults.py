"""A test-only seam: `DURABLE_FAULT=<point>[:<n>]` makes the sidecar die with SIGKILL exactly there.

Chaos tests use it to stop the step life cycle at each point where a crash could charge twice or
lose a call; `:n` dies the n-th time the point is reached (default: the first). Unset (the default)
it costs one comparison per point.
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


def _parse(spec: str) -> tuple[str, int]:
    point, _, nth = spec.partition(":")
    if point and point not in POINTS:
        raise ValueError(f"DURABLE_FAULT: unknown point {point!r}; one of {', '.join(POINTS)}")
    return point, int(nth or 1)


_POINT, _NTH = _parse(os.environ.get("DURABLE_FAULT", ""))
_reached = 0


def crash_point(point: str) -> None:
    global _reached
    if point == _POINT:
        _reached += 1
        if _reached == _NTH:
            os.kill(os.getpid(), signal.SIGKILL)
