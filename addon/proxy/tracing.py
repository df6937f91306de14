"""Every step as an OpenTelemetry span, exported over OTLP/HTTP when the standard variables ask.

On when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set (or the
`durable_otlp_endpoint` option), unless `OTEL_SDK_DISABLED=true`; off otherwise, and then nothing
of OpenTelemetry is even imported. The exporter reads the other standard variables itself
(`OTEL_EXPORTER_OTLP_HEADERS`, `..._TIMEOUT`, `..._CERTIFICATE`, `..._COMPRESSION`), the resource
reads `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`, the provider's sampler reads
`OTEL_TRACES_SAMPLER`. Only `http/protobuf` is spoken.

Contents (prompts, completions) only with the conventions' own switch,
`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`, from the request as the journal stores it
(`durable_redact_json` applied), and never while the journal is encrypted at rest: what is sealed
there does not leave in clear here.

Off the hot path: the event loop hands each finished step over as references (its flow's bodies
are immutable bytes) to a bounded queue; one thread builds the spans (and reads the bodies for the
GenAI attributes, matching/genai.py), and exports them in batches. A full queue drops the span and
counts it (`durable_otlp_spans_dropped`), as does a batch the collector did not take: a down or slow
collector never delays or fails a call.

Traces: a request carrying a W3C `traceparent` gets its span as a child of the agent's own. Any
other step belongs to its attempt's trace (an id derived from run and attempt, so a sidecar that
restarts mid-attempt keeps it), under a root span `attempt ATTEMPT` emitted with the attempt's
first step. One trace per attempt, not per run: an attempt is one life of the agent, bounded in
time; a run may last days and hold 100,000 steps, past what backends keep in one trace. Every span
carries `durable.run_id`, so a run's attempts (the crash, then the resume) are one query away.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mitmproxy import http

from ..matching import genai

logger = logging.getLogger("durable")

ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
QUEUE_MAX = 4096  # steps waiting for the export thread; past it they are dropped (counted)
BATCH_MAX = 512
FLUSH_S = 0.5  # how long a lone span may wait for others to share its export
ROOTS_KEPT = 10_000  # attempts whose root span this process emitted
SAVED = "durable.saved."  # a replayed step's usage: tokens saved, not spent


def wanted(endpoint_option: str, environ: Mapping[str, str] = os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(endpoint_option or any(environ.get(name) for name in ENDPOINTS))


def describe(endpoint_option: str, environ: Mapping[str, str] = os.environ) -> str:
    """Where spans go, for the log."""
    return endpoint_option or next(environ[name] for name in ENDPOINTS if environ.get(name))


@dataclass
class Finished:
    """A step as the loop hands it over: references, nothing copied or parsed."""

    run: str | None
    attempt: str | None
    seq: int | None
    outcome: str
    method: str
    url: str  # as the log shows it: redacted
    host: str
    port: int
    scheme: str
    path: str
    status: int | None
    start: float  # epoch seconds
    end: float
    first_byte: float | None  # epoch seconds of the answer's first byte, for streams
    streamed: bool
    traceparent: str | None
    tracestate: str | None
    session: str | None  # MCP's Mcp-Session-Id
    request_type: str  # its Content-Type (what redaction goes by)
    request_body: bytes
    response_body: Callable[[], bytes]  # read on the export thread (a stream's tee joins its chunks there)
    response_headers: list[tuple[bytes, bytes]]


def finished(flow: http.HTTPFlow, step: Any, status: int | None, url: str) -> Finished:
    """The step's record, taken on the loop: cheap, every field a reference or a number."""
    req, resp = flow.request, flow.response
    tee = getattr(step, "tee", None)
    raw = resp.raw_content if resp is not None else None
    if tee is not None:
        body: Callable[[], bytes] = tee.recorded
    else:
        body = (lambda: raw) if raw else (lambda: b"")
    return Finished(
        run=step.run,
        attempt=step.attempt,
        seq=step.seq,
        outcome=step.outcome,
        method=req.method,
        url=url,
        host=req.pretty_host,
        port=req.port,
        scheme=req.scheme,
        path=req.path,
        status=status,
        start=req.timestamp_start or time.time(),
        end=(resp.timestamp_end if resp is not None and resp.timestamp_end else None) or time.time(),
        first_byte=resp.timestamp_start if resp is not None and tee is not None else None,
        streamed=tee is not None,
        traceparent=req.headers.get("traceparent"),
        tracestate=req.headers.get("tracestate"),
        session=req.headers.get("mcp-session-id"),
        request_type=req.headers.get("content-type", ""),
        request_body=req.raw_content or b"",
        response_body=body,
        response_headers=list(resp.headers.fields) if resp is not None else [],
    )


def ids(run: str, attempt: str) -> tuple[int, int]:
    """The attempt's trace id and its root span's id: the same in every process."""
    digest = hashlib.sha256(f"{run}\0{attempt}".encode()).digest()
    return int.from_bytes(digest[:16], "big") or 1, int.from_bytes(digest[16:24], "big") or 1


class Tracing:
    """The span exporter: `record` on the loop, everything else on its own thread."""

    def __init__(self, endpoint: str, on_drop: Callable[[int], None], environ: Mapping[str, str] = os.environ) -> None:
        import requests
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        if protocol not in (None, "", "http/protobuf"):
            raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: the sidecar exports http/protobuf only")
        ended: list[Any] = []

        class Collect(SpanProcessor):
            def on_end(self, span: Any) -> None:
                ended.append(span)

        class Ids(RandomIdGenerator):
            forced: tuple[int, int] | None = None  # (trace id, span id) of the next root: an attempt's

            def generate_trace_id(self) -> int:
                return Ids.forced[0] if Ids.forced is not None else super().generate_trace_id()

            def generate_span_id(self) -> int:
                forced, Ids.forced = Ids.forced, None
                return forced[1] if forced is not None else super().generate_span_id()

        self._trace, self._Ids, self._ended = trace, Ids, ended
        resource = Resource.create({} if environ.get("OTEL_SERVICE_NAME") else {"service.name": "durable-sidecar"})
        self.provider = TracerProvider(resource=resource, id_generator=Ids())
        self.provider.add_span_processor(Collect())
        self.tracer = self.provider.get_tracer("durable-sidecar")
        session = requests.Session()
        session.trust_env = False  # never through a proxy from the environment: that may be this sidecar
        explicit = endpoint.rstrip("/") + "/v1/traces" if endpoint else None
        self.exporter = OTLPSpanExporter(endpoint=explicit, session=session)
        self.propagator = TraceContextTextMapPropagator()
        self.on_drop = on_drop
        capture = environ.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "").lower()
        self.contents = capture in ("true", "span_only", "span_and_event")  # the conventions' own opt-in
        self.redact: Callable[[bytes, str], bytes] = lambda body, _type: body  # the journal's redaction (configure)
        self.queue: queue.Queue[Finished | None] = queue.Queue(QUEUE_MAX)
        self.dropped = 0
        self.roots: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.thread = threading.Thread(target=self._work, name="durable-otlp", daemon=True)
        self.thread.start()

    def record(self, step: Finished) -> None:
        """On the loop: hand the step over, or count it dropped."""
        try:
            self.queue.put_nowait(step)
        except queue.Full:
            self._drop(1)

    def close(self, timeout: float = 5.0) -> None:
        """Export what is queued (up to `timeout`), then stop."""
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self.thread.join(timeout)
        self.provider.shutdown()

    def _drop(self, count: int) -> None:
        self.dropped += count
        self.on_drop(count)

    def _work(self) -> None:
        done = False
        while not done:
            batch: list[Finished] = []
            try:
                first = self.queue.get(timeout=FLUSH_S)
            except queue.Empty:
                continue
            deadline = time.monotonic() + FLUSH_S
            item: Finished | None = first
            while True:
                if item is None:
                    done = True
                    break
                batch.append(item)
                if len(batch) >= BATCH_MAX:
                    break
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            for step in batch:
                try:
                    self._span(step)
                except Exception:  # one odd body must not stop the exporter
                    logger.exception("durable: span for run=%s seq=%s not built", step.run, step.seq)
            spans, self._ended[:] = list(self._ended), []
            if spans and self.exporter.export(spans).name != "SUCCESS":
                self._drop(len(spans))

    def _parent(self, step: Finished) -> Any:
        """The agent's own span when it sent a traceparent; else the attempt's root."""
        trace = self._trace
        if step.traceparent:
            carrier = {"traceparent": step.traceparent, **({"tracestate": step.tracestate} if step.tracestate else {})}
            context = self.propagator.extract(carrier)
            if trace.get_current_span(context).get_span_context().is_valid:
                return context
        if not step.run or not step.attempt:
            return None
        trace_id, root_id = ids(step.run, step.attempt)
        if (step.run, step.attempt) not in self.roots:
            self._root(step, trace_id, root_id)
        root = trace.SpanContext(trace_id, root_id, is_remote=False, trace_flags=trace.TraceFlags(1))
        return trace.set_span_in_context(trace.NonRecordingSpan(root))

    def _root(self, step: Finished, trace_id: int, root_id: int) -> None:
        """The attempt's root span, once per attempt in this process, at its first step's start."""
        from opentelemetry.context import Context

        self.roots[(step.run or "", step.attempt or "")] = None
        while len(self.roots) > ROOTS_KEPT:
            self.roots.popitem(last=False)
        self._Ids.forced = (trace_id, root_id)
        start = int(step.start * 1e9)
        span = self.tracer.start_span(
            f"attempt {step.attempt}",
            context=Context(),  # no parent: the trace's root
            attributes={"durable.run_id": step.run or "", "durable.attempt": step.attempt or ""},
            start_time=start,
        )
        span.end(end_time=start)

    def _span(self, step: Finished) -> None:
        trace = self._trace
        attributes: dict[str, Any] = {
            "durable.outcome": step.outcome,
            "http.request.method": "GET" if step.method == "WS" else step.method,
            "url.full": step.url,
            "url.scheme": step.scheme,
            "server.address": step.host,
            "server.port": step.port,
        }
        for key, value in (("durable.run_id", step.run), ("durable.attempt", step.attempt), ("durable.step", step.seq)):
            if value is not None:
                attributes[key] = value
        if step.method == "WS":
            attributes["durable.websocket.message"] = True
        if step.status is not None:
            attributes["http.response.status_code"] = step.status
        if step.first_byte is not None:
            attributes["durable.time_to_first_byte_ms"] = round((step.first_byte - step.start) * 1000, 2)
        if step.session:
            attributes["mcp.session.id"] = step.session
        name = f"{step.method} {step.host}"
        try:
            request = self.redact(step.request_body, step.request_type) if self.contents else step.request_body
            described = genai.attributes(
                step.method, step.host, step.path, request, step.response_body(), step.response_headers, self.contents
            )
        except Exception:  # a body of an unexpected shape: the span goes out without GenAI attributes
            logger.debug("durable: GenAI attributes of run=%s seq=%s not read", step.run, step.seq, exc_info=True)
            described = None
        if described is not None:
            name, found = described
            if step.outcome == "replayed":  # saved, not spent: a cost view must not count a resume twice
                found = {
                    (SAVED + k[len("gen_ai.usage.") :] if k.startswith("gen_ai.usage.") else k): v
                    for k, v in found.items()
                }
            attributes.update(found)
        failed = step.outcome == "refused" or (step.status is not None and step.status >= 400)
        if failed:
            attributes["error.type"] = str(step.status) if step.status is not None else step.outcome
        span = self.tracer.start_span(
            name,
            context=self._parent(step),
            kind=trace.SpanKind.CLIENT,
            attributes=attributes,
            start_time=int(step.start * 1e9),
        )
        if failed:
            span.set_status(trace.Status(trace.StatusCode.ERROR))
        span.end(end_time=int(max(step.end, step.start) * 1e9))
