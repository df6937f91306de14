"""What the sidecar says about its flows: one log line per flow (redacted; JSON with
durable_log_json), the Prometheus metrics, counted as the flows go by, and a span per step when
OTLP export is on (tracing.py)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import psycopg
from mitmproxy import ctx, http

from ..matching import usage
from ..steps.lifecycle import Step, elapsed_ms
from ..store.journal import Journal
from . import tracing
from .metrics import Metrics

logger = logging.getLogger("durable")


class Reporter:
    def __init__(self, url: Callable[[http.HTTPFlow], str]) -> None:
        self.url = url  # the request's URL as it may be logged (redacted)
        self.metrics: Metrics | None = None
        self.lines = True  # one log line per flow, when the terminal log shows INFO
        self.json = False
        self.tracing: tracing.Tracing | None = None
        self._drops_told = 0.0  # when dropped spans were last logged

    def log(self, flow: http.HTTPFlow, step: Step, status: int | None, note: str = "") -> None:
        """Formatted only if a handler emits it: the hot path pays for a log record, not a string,
        and for nothing when the terminal log would not show it."""
        self.count(flow, step)
        if self.tracing is not None and step.run is not None:  # a step, not the sidecar's own endpoints
            self.tracing.record(tracing.finished(flow, step, status, self.url(flow)))
        if self.lines:
            logger.info("%s", FlowLine(self, flow, step, status, note))

    def spans_dropped(self, count: int) -> None:
        """From the export thread: counted, and said at most every 30 s."""
        if self.metrics is not None:
            self.metrics.spans_dropped.inc(count)
        if time.monotonic() - self._drops_told > 30:
            self._drops_told = time.monotonic()
            total = self.tracing.dropped if self.tracing is not None else count
            logger.warning(
                "durable: %d spans dropped so far (the OTLP collector is slow, down, or refused them)", total
            )

    def count(self, flow: http.HTTPFlow, step: Step) -> None:
        if self.metrics is None:
            return
        self.metrics.steps.labels(step.outcome).inc()
        if step.outcome == "replayed" and flow.response is not None:
            self.metrics.calls_avoided.inc()
            self.metrics.tokens_avoided.inc(
                usage.tokens(flow.response.raw_content or b"", list(flow.response.headers.fields))
            )

    def observe_journal(self, what: str, seconds: float, ok: bool) -> None:
        assert self.metrics is not None
        if ok:
            self.metrics.journal_writes.labels(what).observe(seconds)
        else:
            self.metrics.journal_errors.inc()


def in_doubt_steps(journal: Journal | None) -> float:
    """Scraped from the metrics thread: a short synchronous query of its own."""
    target = journal.target if journal else None
    if target is None:
        return float("nan")
    try:
        with psycopg.connect(target.dsn, connect_timeout=2) as conn:
            row = conn.execute("SELECT count(*) FROM durable_steps WHERE state = 'pending'").fetchone()
            return float(row[0]) if row else float("nan")
    except psycopg.Error:
        return float("nan")


def lines_shown() -> bool:
    """Whether mitmproxy's terminal log shows INFO. Every record costs mitmproxy a formatted
    `add_log` event whether or not it is shown, so at `--set termlog_verbosity=warn` the per-flow
    lines are not emitted at all (they would never be printed)."""
    verbosity = getattr(ctx.options, "termlog_verbosity", "info")
    return logging.getLevelName(str(verbosity).upper()) in (logging.DEBUG, logging.INFO)


class FlowLine:
    """A flow's log line, rendered when (and only if) logging formats it."""

    def __init__(self, reporter: Reporter, flow: http.HTTPFlow, step: Step, status: int | None, note: str) -> None:
        self.reporter, self.flow, self.step, self.status, self.note = reporter, flow, step, status, note
        self.ms = round(elapsed_ms(step), 1)

    def __str__(self) -> str:
        fields = {
            "run": self.step.run,
            "attempt": self.step.attempt,
            "seq": self.step.seq,
            "outcome": self.step.outcome,
            "status": self.status,
            "ms": self.ms,
            "method": self.flow.request.method,
            "url": self.reporter.url(self.flow),
        }
        if self.note:
            fields["note"] = self.note
        if self.reporter.json:
            return json.dumps(fields)
        return "durable " + " ".join(f"{k}={v}" for k, v in fields.items())
