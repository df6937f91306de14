#!/usr/bin/env python3
"""A small local "paid API" for the demo and the tests: it bills every call it serves.

Endpoints (all billed unless noted; every POST honours `Idempotency-Key`, like Stripe: a repeated key
gets the stored answer back and is not billed again):
  POST /v1/chat/completions   OpenAI-style chat completion, JSON or SSE (`"stream": true`)
  GET  /v1/search?q=...       a search tool; gzip-encoded when the client accepts gzip
  POST /v1/payments           a payment; `?delay_ms=N` books it, then waits before answering
  POST /v1/generate           an LLM generation that IGNORES Idempotency-Key (as the LLM APIs document
                              none): every call is booked; `?delay_ms=N` books it, then waits; with
                              `"stream": true` an event stream (x_event_delay_ms between events)
  GET  /v1/chunked            a chunked response without Content-Length
  GET  /v1/slow?ms=N          answers after N ms
  GET|POST /v1/whoami         billed; the answer names the headers that chose it (Authorization,
                              X-Tenant, Accept, Accept-Language, Range, If-None-Match, Host,
                              Content-Type) and a hash of the body
  GET  /v1/cut                announces a Content-Length of 1000 bytes, sends 400, and hangs up
  GET  /v1/flaky              503 (not billed) while failures configured by /_config remain, then billed
  GET  /v1/encoded?enc=E      a JSON body sent with Content-Encoding E (gzip, deflate, br, zstd)
  POST /v1/echo               the request body back, as application/octet-stream
  GET  /v1/download?mb=N      N MiB of bytes, with Content-Length, written in 64 KiB pieces
                              (`&delay_ms=N`: booked, then N ms before answering)
  POST /mcp                   an MCP-style server (Streamable HTTP): `initialize` opens a session
                              (Mcp-Session-Id), `ping` is answered free, any other method is a billed
                              tool call of that session (404 for an unknown session), answered with
                              the session's cart (the tool `add_to_cart` {"item": X} adds to it: state
                              the session keeps); each answer is an event stream holding the
                              JSON-RPC response, kept open `?hold_ms=N` (default 1500) after it, as
                              servers that push on the same stream do
  GET  /mcp                   the session's notification stream (open for 3 s, not billed)
  POST /_mcp_restart          the MCP server "restarts": every session is forgotten
Chat streams take two extra body fields: x_event_delay_ms (pause between events) and
x_die_after_events (drop the connection after that many events, without ending the stream).
Request bodies sent with a Content-Encoding are decoded first.
  GET  /_books                the ledger (not billed): calls, charges, deduplicated, requests seen
  POST /_reset                clears the ledger (not billed)
  POST /_config               {"flaky_failures": N}: the next N calls to /v1/flaky fail (not billed)

Run: python scripts/paid_api.py --port 0 --port-file PORT [--tls-dir DIR]
With --tls-dir it serves HTTPS with a certificate for 127.0.0.1/localhost signed by its own CA,
created in DIR on first use (DIR/ca.pem is what a client, or the sidecar, must trust).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import secrets
import ssl
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from mitmproxy.net import encoding


WHOAMI_HEADERS = frozenset({"authorization", "x-tenant", "accept", "accept-language", "range", "if-none-match",
                            "host", "content-type"})


class Ledger:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.calls = 0  # requests that reached a billed endpoint
        self.charges: list[dict] = []  # what was booked
        self.deduplicated = 0  # repeats answered from the idempotency store
        self.requests: list[dict] = []  # method, path, headers of the last requests
        self.keys: dict[str, dict] = {}  # idempotency key -> stored answer (or in flight)
        self.flaky_failures = 0  # how many more /v1/flaky calls answer 503
        self.streams_finished = 0  # chat streams written to their end
        self.mcp_sessions: dict[str, list[str]] = {}  # session -> its cart (state the server keeps)

    def books(self) -> dict:
        return {
            "calls": self.calls,
            "charges": len(self.charges),
            "booked": self.charges,
            "deduplicated": self.deduplicated,
            "streams_finished": self.streams_finished,
            "requests": self.requests[-500:],
        }


LEDGER = Ledger()


def _completion(n: int, prompt: str, model: str) -> dict:
    return {
        "id": f"chatcmpl-{n}",
        "object": "chat.completion",
        "created": 1_700_000_000 + n,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"answer #{n} to: {prompt[:60]}"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
    }


def _sse(n: int, prompt: str, model: str) -> list[bytes]:
    words = f"answer #{n} to: {prompt[:60]}".split(" ")
    events = []
    for i, word in enumerate(words):
        chunk = {
            "id": f"chatcmpl-{n}",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000 + n,
            "model": model,
            "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word}, "finish_reason": None}],
        }
        events.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    done = {"id": f"chatcmpl-{n}", "object": "chat.completion.chunk", "created": 1_700_000_000 + n,
            "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": len(words), "total_tokens": 12 + len(words)}}
    events.append(b"data: " + json.dumps(done).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "PaidAPI/1.0"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    # -- plumbing -------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = b""
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                raw += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
        else:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
        coding = self.headers.get("Content-Encoding")
        return encoding.decode(raw, coding) if coding and raw else raw

    def _send(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc: dict, extra: list[tuple[str, str]] = ()) -> None:
        self._send(status, json.dumps(doc).encode(), [("Content-Type", "application/json"), *extra])

    def _note(self) -> None:
        with LEDGER.lock:
            LEDGER.calls += 1
            LEDGER.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers.items())})

    def _book(self, kind: str, amount: int, build, honour_key: bool = True) -> tuple[int, list[tuple[str, str]], bytes, bool]:
        """Book a charge once per idempotency key (every time if not `honour_key`);
        returns (status, headers, body, replayed_by_key)."""
        key = self.headers.get("Idempotency-Key") if honour_key else None
        with LEDGER.lock:
            if key and key in LEDGER.keys:
                LEDGER.deduplicated += 1
                entry = LEDGER.keys[key]
                stored = True
            else:
                n = len(LEDGER.charges) + 1
                LEDGER.charges.append({"n": n, "kind": kind, "amount": amount, "key": key})
                entry = {"event": threading.Event(), "n": n}
                if key:
                    LEDGER.keys[key] = entry
                stored = False
        if stored:
            entry["event"].wait(30)
            return entry["status"], entry["headers"], entry["body"], True
        status, headers, body = build(entry["n"])
        entry.update(status=status, headers=headers, body=body)
        entry["event"].set()
        return status, headers, body, False

    # -- endpoints ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/_books":
            with LEDGER.lock:
                return self._json(200, LEDGER.books())
        self._note()
        if url.path == "/v1/whoami":
            return self._whoami(b"")
        if url.path == "/v1/search":
            q = query.get("q", [""])[0]
            _, headers, body, _ = self._book("search", 1, lambda n: (200, [], json.dumps(
                {"query": q, "call": n, "results": [f"result {i} for {q}" for i in range(3)]}).encode()))
            if "gzip" in self.headers.get("Accept-Encoding", ""):
                return self._send(200, gzip.compress(body, mtime=0), [("Content-Type", "application/json"),
                                                                        ("Content-Encoding", "gzip"),
                                                                        ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
            return self._send(200, body, [("Content-Type", "application/json"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
        if url.path == "/v1/chunked":
            _, _, body, _ = self._book("chunked", 1, lambda n: (200, [], f"chunked call {n}\n".encode() * 3))
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (body[:10], body[10:]):
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        if url.path == "/v1/encoded":
            coding = query.get("enc", ["gzip"])[0]
            _, _, body, _ = self._book("encoded", 1, lambda n: (200, [], json.dumps({"call": n, "enc": coding}).encode()))
            return self._send(200, encoding.encode(body, coding), [("Content-Type", "application/json"),
                                                                    ("Content-Encoding", coding)])
        if url.path == "/v1/download":
            size = int(query.get("mb", ["1"])[0]) * 1024 * 1024
            self._book("download", 1, lambda n: (200, [], b""))
            time.sleep(int(query.get("delay_ms", ["0"])[0]) / 1000)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            piece = bytes(range(256)) * 256  # 64 KiB
            for offset in range(0, size, len(piece)):
                self.wfile.write(piece[: size - offset])
            return
        if url.path == "/v1/flaky":
            with LEDGER.lock:
                failing = LEDGER.flaky_failures > 0
                LEDGER.flaky_failures -= failing
            if failing:
                return self._json(503, {"error": "temporarily unavailable"})
            _, _, body, _ = self._book("flaky", 1, lambda n: (200, [], json.dumps({"call": n}).encode()))
            return self._send(200, body, [("Content-Type", "application/json")])
        if url.path == "/v1/cut":
            self._book("cut", 1, lambda n: (200, [], b""))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"[" + b"1," * 199 + b"1")  # 400 bytes of 1000
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if url.path == "/mcp":
            return self._event_stream([b": ping\n\n"], 3.0)
        if url.path == "/v1/slow":
            time.sleep(int(query.get("ms", ["500"])[0]) / 1000)
            _, _, body, _ = self._book("slow", 1, lambda n: (200, [], json.dumps({"call": n}).encode()))
            return self._send(200, body, [("Content-Type", "application/json")])
        self._json(404, {"error": f"no route {url.path}"})

    def _whoami(self, body: bytes) -> None:
        """An answer chosen by the request's headers (whose data, what form, which bytes): billed
        each time, and naming what it saw, so an answer replayed for another request shows."""
        seen = {k.lower(): v for k, v in self.headers.items() if k.lower() in WHOAMI_HEADERS}
        seen["body"] = hashlib.sha256(body).hexdigest()[:12]
        _, _, answer, _ = self._book("whoami", 1, lambda n: (200, [], json.dumps({"call": n, "saw": seen}).encode()),
                                     honour_key=False)
        self._send(200, answer, [("Content-Type", "application/json")])

    def _mcp(self, doc: dict, hold_s: float) -> None:
        self._note()
        session = self.headers.get("Mcp-Session-Id")
        if doc.get("method") == "initialize":
            session = f"sess-{uuid.uuid4().hex[:8]}"
            with LEDGER.lock:
                LEDGER.mcp_sessions[session] = []
            result: dict = {"protocolVersion": "2025-06-18", "serverInfo": {"name": "paid-mcp"}}
        elif session not in LEDGER.mcp_sessions:
            return self._json(404, {"jsonrpc": "2.0", "id": doc.get("id"), "error": {"code": -32001,
                                                                                   "message": "Session not found"}})
        elif doc.get("method") == "ping":
            result = {}  # MCP's ping: not billed
        else:
            params = doc.get("params") or {}
            with LEDGER.lock:
                cart = LEDGER.mcp_sessions[session]
                if params.get("name") == "add_to_cart":
                    cart.append(params["arguments"]["item"])
                held = list(cart)
            _, _, body, _ = self._book("tool", 1, lambda n: (200, [], json.dumps({"call": n, "cart": held}).encode()))
            result = {"content": [{"type": "text", "text": body.decode()}]}
        event = f"event: message\ndata: {json.dumps({'jsonrpc': '2.0', 'id': doc.get('id'), 'result': result})}\n\n"
        self._event_stream([event.encode()], hold_s, [("Mcp-Session-Id", session)])

    def _event_stream(self, events: list[bytes], hold_s: float, headers: list[tuple[str, str]] = ()) -> None:
        """Chunked events, then the stream held open for `hold_s` before it ends."""
        self.send_response(200)
        for k, v in [("Content-Type", "text/event-stream"), *headers]:
            self.send_header(k, v)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for event in events:
                self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                self.wfile.flush()
            time.sleep(hold_s)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        raw = self._body()
        if url.path == "/_reset":
            with LEDGER.lock:
                LEDGER.reset()
            return self._json(200, {"reset": True})
        if url.path == "/_mcp_restart":
            with LEDGER.lock:
                LEDGER.mcp_sessions.clear()
            return self._json(200, {"restarted": True})
        if url.path == "/mcp":
            return self._mcp(json.loads(raw or b"{}"), int(query.get("hold_ms", ["1500"])[0]) / 1000)
        if url.path == "/_config":
            with LEDGER.lock:
                LEDGER.flaky_failures = int(json.loads(raw or b"{}").get("flaky_failures", 0))
            return self._json(200, {"flaky_failures": LEDGER.flaky_failures})
        self._note()
        if url.path == "/v1/whoami":
            return self._whoami(raw)
        if url.path == "/v1/echo":
            _, _, body, _ = self._book("echo", 1, lambda n: (200, [], raw))
            return self._send(200, body, [("Content-Type", "application/octet-stream")])
        try:
            doc = json.loads(raw or b"{}")
        except ValueError:
            return self._json(400, {"error": "body is not JSON"})
        if url.path == "/v1/chat/completions":
            prompt = " ".join(str(m.get("content", "")) for m in doc.get("messages", []))
            model = doc.get("model", "demo-llm")
            if doc.get("stream"):
                def build(n: int):
                    return 200, [("Content-Type", "text/event-stream")], b"".join(_sse(n, prompt, model))
                status, headers, body, from_key_store = self._book("llm", 1, build)
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                delay = int(doc.get("x_event_delay_ms", 10)) / 1000
                die_after = None if from_key_store else doc.get("x_die_after_events")
                for i, event in enumerate(body.split(b"\n\n")[:-1]):
                    if die_after is not None and i >= int(die_after):
                        self.close_connection = True  # the upstream dies mid-stream
                        self.connection.shutdown(2)
                        return
                    event += b"\n\n"
                    self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                    self.wfile.flush()
                    time.sleep(delay)
                self.wfile.write(b"0\r\n\r\n")
                with LEDGER.lock:
                    LEDGER.streams_finished += 1
                return
            status, headers, body, _ = self._book(
                "llm", 1, lambda n: (200, [("Content-Type", "application/json")], json.dumps(_completion(n, prompt, model)).encode()))
            return self._send(status, body, headers)
        if url.path == "/v1/generate":
            prompt = str(doc.get("prompt", ""))
            delay = int(query.get("delay_ms", ["0"])[0]) / 1000

            def generate(n: int):
                time.sleep(delay)  # booked, still generating: an agent killed now must not pay twice
                if doc.get("stream"):
                    return 200, [("Content-Type", "text/event-stream")], b"".join(_sse(n, prompt, "gen-llm"))
                return 200, [("Content-Type", "application/json")], json.dumps(_completion(n, prompt, "gen-llm")).encode()
            status, headers, body, _ = self._book("generation", 1, generate, honour_key=False)
            if not doc.get("stream"):
                return self._send(status, body, headers)
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in body.split(b"\n\n")[:-1]:
                event += b"\n\n"
                self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                self.wfile.flush()
                time.sleep(int(doc.get("x_event_delay_ms", 10)) / 1000)
            self.wfile.write(b"0\r\n\r\n")
            return
        if url.path == "/v1/payments":
            amount = int(doc.get("amount", 0))
            delay = int(query.get("delay_ms", ["0"])[0]) / 1000

            def build(n: int):
                time.sleep(delay)  # booked, not yet answered: the window a crash must not double-charge
                return 201, [("Content-Type", "application/json")], json.dumps(
                    {"payment_id": f"pay_{n}", "amount": amount, "status": "succeeded"}).encode()
            status, headers, body, _ = self._book("payment", amount, build)
            return self._send(status, body, headers)
        self._json(404, {"error": f"no route {url.path}"})


def ensure_tls(directory: Path) -> tuple[Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 and localhost, made once in `directory`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = directory / "server.pem", directory / "server-key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "paid-api test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def serve(port: int, tls_dir: str | None, port_file: str | None, host: str = "127.0.0.1") -> None:
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    if tls_dir:
        cert, key = ensure_tls(Path(tls_dir))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    actual = server.server_address[1]
    if port_file:
        Path(port_file).write_text(str(actual))
    print(f"paid API listening on {'https' if tls_dir else 'http'}://{host}:{actual}", flush=True)
    server.serve_forever()


def spawn(workdir: Path, *, tls: bool = False, host: str = "127.0.0.1", port: int = 0,
          timeout: float = 20) -> tuple[subprocess.Popen[bytes], int]:
    """Start this API in a process of its own (TLS material in workdir/tls) and wait for its port."""
    port_file = workdir / f"paid-api-port-{secrets.token_hex(4)}"
    args = [sys.executable, __file__, "--host", host, "--port", str(port), "--port-file", str(port_file)]
    if tls:
        args += ["--tls-dir", str(workdir / "tls")]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not (port_file.exists() and port_file.read_text()):
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise RuntimeError("the paid API did not start")
        time.sleep(0.02)
    return process, int(port_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file")
    parser.add_argument("--tls-dir", help="serve HTTPS with a CA and certificate kept in this directory")
    args = parser.parse_args()
    serve(args.port, args.tls_dir, args.port_file, args.host)


if __name__ == "__main__":
    main()
