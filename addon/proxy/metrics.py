"""Prometheus metrics, served at /metrics with `--set durable_metrics_listen=HOST:PORT` (off by default).

Counters live in a registry of the sidecar's own, so two sidecars in one process (tests) or a
script reload never collide. Everything here is cheap and synchronous: recording never awaits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ..steps.responses import OUTCOMES

logger = logging.getLogger("durable")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.steps = Counter(
            "durable_steps", "Flows by what the sidecar did with them", ["outcome"], registry=self.registry
        )
        for outcome in OUTCOMES:
            self.steps.labels(outcome)  # every outcome shows, at 0 until it happens
        self.journal_writes = Histogram(
            "durable_journal_write_seconds",
            "Latency of journal statements",
            ["statement"],
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5),
            registry=self.registry,
        )
        self.commit_writes = Histogram(
            "durable_journal_commit_writes",
            "Journal writes per commit: above 1 when agents' writes share one (group commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.journal_errors = Counter(
            "durable_journal_errors", "Journal statements that failed (PostgreSQL errors)", registry=self.registry
        )
        self.divergences = Counter(
            "durable_divergences", "Requests that matched nothing while steps lay ahead", registry=self.registry
        )
        self.calls_avoided = Counter(
            "durable_upstream_calls_avoided", "Upstream calls answered from the journal", registry=self.registry
        )
        self.tokens_avoided = Counter(
            "durable_llm_tokens_avoided", "LLM tokens in answers replayed from the journal", registry=self.registry
        )
        self.orphans = Counter(
            "durable_orphans_finished", "Calls finished and journaled after their agent hung up", registry=self.registry
        )
        self.in_doubt = Gauge(
            "durable_in_doubt_steps", "Steps journaled as pending (in doubt) in the journal", registry=self.registry
        )
        self.read_ahead = Gauge(
            "durable_read_ahead_bytes",
            "Bytes of journaled answers held read ahead for replay, all attempts together",
            registry=self.registry,
        )
        self.held = Gauge(
            "durable_held_answers",
            "Upstream answers held in memory because their journal commit failed, retried until journaled",
            registry=self.registry,
        )
        self.spans_dropped = Counter(
            "durable_otlp_spans_dropped",
            "Spans not exported: the export queue was full or the collector did not take them",
            registry=self.registry,
        )
        self._server: object | None = None

    def serve(
        self, listen: str, in_doubt: Callable[[], float], read_ahead: Callable[[], float], held: Callable[[], float]
    ) -> None:
        """Start the /metrics endpoint (a thread of prometheus_client's); the callables are read on each scrape."""
        host, _, port = listen.rpartition(":")
        self.in_doubt.set_function(in_doubt)
        self.read_ahead.set_function(read_ahead)
        self.held.set_function(held)
        self._server = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        logger.info("durable: metrics at http://%s:%s/metrics", host or "127.0.0.1", port)
