"""A Citus cluster of a test module's own: a coordinator and two workers, each its own PostgreSQL
server from the machine's installation (where Citus must be installed: ../shared/citus/install.sh
in CI), on free ports under a temporary folder. Its own, so that stopping a worker or restarting
the coordinator disturbs no other test."""

from __future__ import annotations

import glob
import os
import shlex
import subprocess
from pathlib import Path

import psycopg

from durable_sidecar.tools import launcher


def _bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def missing() -> str | None:
    """Why no cluster can be started here (None: it can)."""
    bindir = _bin()
    if bindir is None:
        return "no PostgreSQL server installation (/usr/lib/postgresql/*/bin) to run Citus nodes with"
    if not (bindir.parent / "lib" / "citus.so").exists():
        return f"Citus is not installed in {bindir.parent} (CI builds it with ../shared/citus/install.sh)"
    return None


class Cluster:
    def __init__(self, base: Path) -> None:
        bindir = _bin()
        assert bindir is not None
        self.bin, self.base = bindir, base
        self.ports = [launcher.free_port() for _ in range(3)]  # coordinator, worker 1, worker 2
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.ports[0]}/postgres"

    def _as_postgres(self, command: str) -> None:
        """initdb and the servers refuse root: as root they run as the `postgres` user."""
        argv = ["su", "postgres", "-s", "/bin/bash", "-c", command] if os.geteuid() == 0 else ["bash", "-c", command]
        subprocess.run(argv, check=True, capture_output=True, timeout=60)

    def _data(self, port: int) -> Path:
        return self.base / f"node{port}"

    def start(self) -> str:
        """initdb and start the three nodes, create the extension, register the workers; the
        coordinator's DSN (its `postgres` database: Citus's node list is per database)."""
        self.base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            subprocess.run(["chown", "postgres", str(self.base)], check=True)
        for port in self.ports:
            data = self._data(port)
            self._as_postgres(f"{self.bin}/initdb -D {shlex.quote(str(data))} -U postgres --auth=trust -E UTF8")
            self._as_postgres(
                f"cat >> {shlex.quote(str(data / 'postgresql.conf'))} <<'CONF'\n"
                f"shared_preload_libraries = 'citus'\nport = {port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.base}'\nmax_connections = 300\nCONF"
            )
            self.start_node(port)
        for port in self.ports:
            with psycopg.connect(self.node_dsn(port), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION citus")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SELECT citus_set_coordinator_host('127.0.0.1', %s)", (self.ports[0],))
            for port in self.ports[1:]:
                conn.execute("SELECT citus_add_node('127.0.0.1', %s)", (port,))
        return self.dsn

    def node_dsn(self, port: int) -> str:
        return f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def start_node(self, port: int) -> None:
        data = shlex.quote(str(self._data(port)))
        self._as_postgres(f"{self.bin}/pg_ctl -D {data} -l {data}.log -w start")

    def stop_node(self, port: int, mode: str = "fast") -> None:
        """`immediate` is a crash: no checkpoint, every session dropped on the spot."""
        self._as_postgres(f"{self.bin}/pg_ctl -D {shlex.quote(str(self._data(port)))} -m {mode} -w stop")

    def stop(self) -> None:
        for port in self.ports:
            try:
                self.stop_node(port, "immediate")
            except subprocess.CalledProcessError:
                pass  # not running
