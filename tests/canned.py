"""A local HTTP server that answers GETs as the test sets them: it stands for a sidecar's own URLs,
asked through it as a proxy (the request line then holds the absolute URL, e.g.
`http://durable.sidecar/health`), or for another local web server. An unset target gets a 404, so
a client asking for the wrong URL fails its test."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Canned:
    port: int
    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # request target -> (status, body)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.contextmanager
def canned_server(content_type: str = "text/plain") -> Iterator[Canned]:
    canned = Canned(0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            status, body = canned.answers.get(self.path, (404, b"not here"))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    canned.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield canned
    finally:
        server.shutdown()
        server.server_close()
