"""gRPC through the sidecar (grpcio, HTTP/2 with trailers): a unary and a server-streaming call are
recorded, the sidecar is SIGKILLed, and a new attempt on a new sidecar gets both answers from the
journal, messages and trailing metadata (gRPC's status lives in HTTP/2 trailers) included, with no
second call upstream."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

import paid_api
from conftest import Sidecars, new_run


class Billing:
    """A local gRPC service that bills every call; raw bytes, no generated code."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def bill(self) -> int:
        with self.lock:
            self.calls += 1
            return self.calls

    def charge(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        n = self.bill()
        context.set_trailing_metadata((("x-charge-id", f"ch_{n}"),))
        return b"charged:" + request + b":" + str(n).encode()

    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        n = self.bill()
        for i in range(3):
            yield f"part{i}:{n}".encode()


@pytest.fixture
def billing(tmp_path: Path) -> Iterator[tuple[Billing, int, Path]]:
    service = Billing()
    handler = grpc.method_handlers_generic_handler("bill.Billing", {
        "Charge": grpc.unary_unary_rpc_method_handler(service.charge),
        "Stream": grpc.unary_stream_rpc_method_handler(service.stream),
    })
    cert, key = paid_api.ensure_tls(tmp_path / "tls")
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    server.start()
    yield service, port, tmp_path / "tls" / "ca.pem"
    server.stop(0)


def test_unary_and_streaming_grpc_calls_replay_with_their_trailers_after_a_sidecar_kill(
    sidecars: Sidecars, ca_bundle: Path, billing: tuple[Billing, int, Path]
) -> None:
    service, port, upstream_ca = billing
    run = new_run()
    seen = []
    for attempt in ("a1", "a2"):
        sidecar = sidecars.start(ssl_verify_upstream_trusted_ca=str(upstream_ca))
        creds = grpc.ssl_channel_credentials(root_certificates=ca_bundle.read_bytes())
        options = [("grpc.http_proxy", sidecar.proxy_url(run, attempt)), ("grpc.enable_http_proxy", 1)]
        with grpc.secure_channel(f"localhost:{port}", creds, options=options) as channel:
            answer, call = channel.unary_unary("/bill.Billing/Charge").with_call(b"inv42", timeout=20)
            initial = dict(call.initial_metadata())
            parts = list(channel.unary_stream("/bill.Billing/Stream")(b"x", timeout=20))
        seen.append((answer, tuple(call.trailing_metadata()), parts, initial["durable-outcome"], call.code()))
        sidecar.kill()  # SIGKILL: the journal is all the next sidecar has
    (first, second) = seen
    assert first[3] == "recorded" and second[3] == "replayed"
    assert first[0] == second[0] == b"charged:inv42:1"
    assert first[1] == second[1] and ("x-charge-id", "ch_1") in [(m.key, m.value) for m in second[1]]
    assert first[2] == second[2] == [b"part0:2", b"part1:2", b"part2:2"]
    assert second[4] == grpc.StatusCode.OK
    assert service.calls == 2  # one per logical call: the replays never reached the service
