"""Ends the agent's process group when `durable run` dies without ending it (SIGKILL, the OOM killer).

`durable run` starts the agent in a process group of its own, and the sidecar with a parent-death
signal. Killed with SIGKILL, `durable run` cannot pass anything on: the agent would go on with no
sidecar, failing at its next call. A parent-death signal would reach only the agent's first process
(a shell's children, npm's, would live on), so this small process, in a session of its own, holds
the read end of a pipe from `durable run`: at end of file without the word "done" (its writer died),
it sends the agent's whole group SIGTERM, then SIGKILL after GRACE_S.

Run as `python -m durable_sidecar.tools.watchdog PGID` (runner.py does).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE_S = 5.0
DONE = b"done"


def watch(pgid: int) -> subprocess.Popen[bytes]:
    """Start the watchdog of the agent's group `pgid`; `release` it once the agent has exited."""
    return subprocess.Popen(
        [sys.executable, "-m", "durable_sidecar.tools.watchdog", str(pgid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def release(dog: subprocess.Popen[bytes]) -> None:
    """The agent is gone: the watchdog leaves without a signal."""
    try:
        if dog.stdin is not None:
            dog.stdin.write(DONE)
            dog.stdin.close()
    except OSError:
        pass
    dog.wait(timeout=10)


def end_group(pgid: int, grace_s: float = GRACE_S) -> None:
    """SIGTERM to the group, then SIGKILL to what is left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def main() -> None:
    pgid = int(sys.argv[1])
    if sys.stdin.buffer.read().strip() != DONE:  # end of file: durable run died without ending the agent
        end_group(pgid)


if __name__ == "__main__":
    main()
