"""A TCP relay that breaks the link it carries on demand: the sidecar talks to PostgreSQL through it.

    relay, dsn = Relay.for_dsn(dsn) # listens on 127.0.0.1:relay.port, forwards to the DSN's server
                                   # (TCP or unix socket); `dsn` connects through it
    relay.cut()                    # every connection reset now; new ones refused until heal()
    relay.freeze()                 # bytes held both ways, no reset (a dead NAT entry, a paused VM)
    relay.drop_replies()           # what the server sends next is lost, then the connection dies
    relay.drop_reply_with(b"x")    # the first reply holding b"x" is lost with its connection; the
                                   # others pass (one pooled connection fails, the rest work)
    relay.heal()                   # new connections pass again (held ones stay as they are)

Used by tests/test_connection_failures.py and scripts/connection_failures.py. One thread per
direction of each connection; `close()` ends them all.
"""

from __future__ import annotations

import socket
import threading

CHUNK = 65536


class Relay:
    def __init__(self, target: tuple[str, int] | str) -> None:
        self.target = target  # (host, port), or the path of a unix socket
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self.mode = "pass"  # pass | cut | freeze | drop | drop-one
        self._marker = b""  # drop-one: the reply that is lost holds these bytes
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self.accepted = 0  # connections that reached the relay
        threading.Thread(target=self._accept, daemon=True).start()

    @classmethod
    def for_dsn(cls, dsn: str) -> tuple[Relay, str]:
        """A relay in front of the server `dsn` names, and the DSN that goes through it: in clear,
        so `drop_reply_with` can read replies (a Citus node turns TLS on for itself)."""
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        parts = conninfo_to_dict(dsn)
        host, port = str(parts.get("host") or "127.0.0.1"), int(parts.get("port") or 5432)
        relay = cls(f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port))
        return relay, make_conninfo(dsn, host="127.0.0.1", port=str(relay.port), sslmode="disable")

    # -- what the tests do --------------------------------------------------------------------

    def cut(self) -> None:
        """Reset every connection now and refuse new ones until heal()."""
        self.mode = "cut"
        self._flowing.set()
        self._reset_all()

    def freeze(self) -> None:
        """Hold every byte in both directions; connections stay open (nothing tells either side)."""
        self.mode = "freeze"
        self._flowing.clear()

    def drop_replies(self) -> None:
        """Lose the server's next bytes on every connection, then reset it: a reply that never arrives
        although the server did the work (a commit whose answer is lost)."""
        self.mode = "drop"
        self._flowing.set()

    def drop_reply_with(self, marker: bytes) -> None:
        """Lose the first reply holding `marker` and reset its connection; every other connection,
        and this one's earlier replies, pass. Then back to passing."""
        self._marker = marker
        self.mode = "drop-one"
        self._flowing.set()

    def heal(self) -> None:
        """New connections pass again; connections frozen meanwhile are reset (their state is unknown)."""
        was = self.mode
        self.mode = "pass"
        if was in ("freeze", "drop"):
            self._reset_all()
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._flowing.set()
        self._reset_all()

    # -- plumbing -----------------------------------------------------------------------------

    def _reset_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                try:  # shutdown, not only close: a thread blocked in recv keeps a closed socket open
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode == "cut":
                client.close()
                continue
            try:
                if isinstance(self.target, str):
                    server = socket.socket(socket.AF_UNIX)
                    server.connect(self.target)
                else:
                    server = socket.create_connection(self.target, timeout=5)
                    server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        try:
            while True:
                data = source.recv(CHUNK)
                if not data:
                    break
                self._flowing.wait()
                if self.mode == "drop" and from_server:
                    break  # the reply is lost with the connection
                if self.mode == "drop-one" and from_server and self._marker in data:
                    with self._lock:
                        if self.mode == "drop-one":  # only the first such reply
                            self.mode = "pass"
                            break
                if self.mode == "cut":
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the other direction's thread
            except OSError:
                pass
            sock.close()
