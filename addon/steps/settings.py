"""The sidecar's `durable_*` mitmproxy options: declared once, validated into one immutable Settings."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from mitmproxy import exceptions

from ..matching import choice
from ..matching.fingerprint import MatchRules, Rule
from ..store import crypto
from ..store.crypto import Keyring

IN_DOUBT_POLICIES = ("reissue", "fail")
WS_RESUME_POLICIES = ("auto", "live", "close", "resend")  # ws_resume.py (steps/ imports nothing from proxy/)
OVERSIZE_POLICIES = ("refuse", "passthrough")

# (name, type, default, help)
OPTIONS: list[tuple[str, Any, Any, str]] = [
    ("durable_dsn", str, "", "PostgreSQL DSN of the journal. Empty: $DATABASE_URL, else an embedded PostgreSQL."),
    ("durable_run", str, "", "Run id for requests that carry none (header or proxy credentials)."),
    ("durable_attempt", str, "", "Attempt id for requests that carry none. Empty: one per proxy process."),
    ("durable_strict", bool, False, "Answer 409 to a request that diverges from the journal instead of recording it."),
    (
        "durable_offline",
        bool,
        False,
        "Forward nothing: a call the journal cannot answer is journaled as never sent and answered 404 "
        "'not in the recording' (what `durable test` replays a fixture with).",
    ),
    ("durable_ignore_hosts", Sequence[str], [], "Regexes of hosts whose traffic passes through unjournaled."),
    (
        "durable_ignore_paths",
        Sequence[str],
        [],
        "HOST/PATH patterns (* matches anything, e.g. */v1/traces or api.example.com/telemetry/*) whose "
        "requests pass through unjournaled, besides the built-in telemetry list.",
    ),
    (
        "durable_builtin_ignores",
        bool,
        True,
        "Pass known telemetry exporters through unjournaled (OpenAI Agents traces, LangSmith, OTLP/HTTP): "
        "they carry fresh ids and timestamps and would diverge on every attempt.",
    ),
    ("durable_ignore_json", Sequence[str], [], "JSON pointers left out of the fingerprint, as /ptr or host=/ptr."),
    ("durable_ignore_query", Sequence[str], [], "Query parameters left out of the fingerprint, as name or host=name."),
    ("durable_match_headers", Sequence[str], [], "Request headers added to the fingerprint, as name or host=name."),
    (
        "durable_choice_headers",
        Sequence[str],
        list(choice.HEADERS),
        "Request headers that choose the answer but not the fingerprint (credentials, tenant, Accept, Range, "
        "conditionals): among journaled steps of one fingerprint, the one whose values (a keyed hash) match is "
        "replayed first; occurrence order decides only when none does (rotated credentials). As name or host=name.",
    ),
    (
        "durable_idempotency_methods",
        Sequence[str],
        ["POST", "PATCH"],
        "Methods that get an idempotency key derived from (run, seq) when the agent sent none.",
    ),
    (
        "durable_idempotency_header",
        Sequence[str],
        ["Idempotency-Key"],
        "Idempotency header name: Name for all hosts, host=Name for one (e.g. api.paypal.com=PayPal-Request-Id).",
    ),
    (
        "durable_in_doubt",
        Sequence[str],
        ["reissue"],
        "In-doubt steps reached again: reissue (re-send with the original idempotency key) or fail (409, an "
        "operator resolves it); policy for all hosts, or host=policy for one (e.g. api.openai.com=fail).",
    ),
    ("durable_in_doubt_window", str, "24h", "Pending steps older than this are not reissued automatically."),
    (
        "durable_ws_resume",
        Sequence[str],
        ["auto"],
        "A resumed WebSocket conversation whose next message must go live on a new upstream connection, which "
        "never saw the replayed messages: auto (live for messages that carry their own state, like the Responses "
        "API's response.create; else close), live, close (the agent's connection is closed with 4410, nothing "
        "sent) or resend (the replayed messages are sent again first, at their price); for all hosts or host=policy.",
    ),
    (
        "durable_in_flight_wait",
        str,
        "10m",
        "How long a request waits for its step while another attempt or sidecar has it in flight, before a 503.",
    ),
    (
        "durable_transient_statuses",
        Sequence[str],
        ["408", "425", "429", "500", "502", "503", "504"],
        "Response statuses journaled as failed: replayed only once the run moved past them.",
    ),
    (
        "durable_db_timeout",
        int,
        5000,
        "Milliseconds to wait for a journal connection or statement before answering 503 (the server's "
        "statement_timeout is a second longer).",
    ),
    (
        "durable_allow_remote_clients",
        bool,
        False,
        "Serve clients that are not on this host's loopback although durable_auth_secret is not set (protected "
        "mode, as Redis's, refuses them by default: anyone who reaches the port could replay any run's answers). "
        "For transparent mode from other hosts or namespaces, or a container port published on the host's loopback.",
    ),
    (
        "durable_raw_tcp",
        bool,
        False,
        "Relay what is not HTTP after a CONNECT (mitmproxy's rawtcp), unjournaled. Off: such bytes are never relayed.",
    ),
    (
        "durable_attempt_per_start",
        bool,
        True,
        "When the agent runs on this host, bind each attempt id to the start of the agent (process group) "
        "that used it first; a later start reusing the id is served as an attempt of its own, which replays.",
    ),
    (
        "durable_drain_timeout",
        str,
        "25s",
        "On SIGTERM/SIGINT, how long the sidecar keeps finishing and journaling the calls in flight (orphans "
        "included) while refusing new ones, before it exits; keep it under Kubernetes' "
        "terminationGracePeriodSeconds (30s by default).",
    ),
    (
        "durable_lease_grace",
        str,
        "10s",
        "How long another sidecar's lease must stay lost (not re-taken) before its steps in flight count as "
        "abandoned and may be re-sent; longer than any blip of the journal's link you want to ride out.",
    ),
    (
        "durable_body_cap",
        int,
        16 * 1024 * 1024,
        "Largest body journaled, in bytes. Larger responses stream through unjournaled (the step stays in doubt).",
    ),
    (
        "durable_oversize_request",
        str,
        "refuse",
        "Requests over durable_body_cap: refuse (413, nothing forwarded) or passthrough (forwarded unjournaled).",
    ),
    (
        "durable_replay_pacing",
        bool,
        False,
        "Replay journaled streams with their recorded inter-chunk timing instead of all at once.",
    ),
    (
        "durable_otlp_endpoint",
        str,
        "",
        "OTLP/HTTP base URL to export a span per step to (e.g. http://127.0.0.1:4318). Empty: "
        "$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or $OTEL_EXPORTER_OTLP_ENDPOINT, else no export.",
    ),
    ("durable_metrics_listen", str, "", "Serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9464)."),
    ("durable_log_json", bool, False, "Log one JSON object per flow instead of a text line."),
    (
        "durable_retention",
        str,
        "30d",
        "Delete runs idle for longer than this (checked every 10 minutes, in small batches); 0 keeps everything.",
    ),
    (
        "durable_attempt_idle",
        str,
        "24h",
        "Forget the replay position of an attempt unheard of for this long (memory); it must outlast any "
        "pause within one life of an agent.",
    ),
    (
        "durable_orphan_timeout",
        str,
        "10m",
        "When the agent hangs up mid-call, how long the sidecar keeps the upstream exchange going to "
        "journal its answer; past it the step stays in doubt.",
    ),
    (
        "durable_offload_bytes",
        int,
        1024 * 1024,
        "Bodies over this many bytes are hashed, redacted, diffed and encrypted in a worker thread, off the "
        "event loop other agents share (0: always inline).",
    ),
    (
        "durable_read_ahead_bytes",
        int,
        64 * 1024 * 1024,
        "Bytes of journaled answers read ahead for replay, across all attempts (least recently used dropped first).",
    ),
    (
        "durable_max_attempts",
        int,
        10_000,
        "Attempts whose replay position is kept at once; past it the least recently used is forgotten "
        "(its next call gets a 409 asking for a new attempt).",
    ),
    ("durable_redact_headers", Sequence[str], [], "More request headers stored only as a keyed hash."),
    (
        "durable_log_secrets",
        bool,
        False,
        "Keep mitmproxy's own flow dump (flow_detail), which prints URLs, headers and bodies with their "
        "credentials. Off: the sidecar sets flow_detail=0 and logs one redacted line per flow instead.",
    ),
    ("durable_redact_json", Sequence[str], [], "JSON pointers of request body fields stored only as a keyed hash."),
    (
        "durable_redact_key",
        str,
        "",
        "Key of the redaction hash. Empty: $DURABLE_REDACT_KEY, else $DURABLE_HOME/redact.key.",
    ),
    (
        "durable_encryption_key",
        str,
        "",
        "Encrypt journaled bodies and headers: KID:BASE64KEY[,KID:BASE64KEY...], first active. "
        "Empty: $DURABLE_ENCRYPTION_KEY, else no encryption.",
    ),
    (
        "durable_clear_paths",
        Sequence[str],
        [],
        "With an encryption key, HOST/PATH patterns (* matches anything, e.g. */v1/chat/completions) whose "
        "URL path is stored in clear; every other URL keeps only its scheme and host in clear, the rest sealed.",
    ),
    (
        "durable_auth_secret",
        str,
        "",
        "Require a per-run token in the proxy credentials (RUN:ATTEMPT~TOKEN). Empty: $DURABLE_AUTH_SECRET, else open.",
    ),
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '24h', '7d' -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 24h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class Settings:
    dsn: str | None
    run: str | None
    attempt: str | None
    strict: bool
    offline: bool
    ignore_hosts: tuple[re.Pattern[str], ...]
    ignore_paths: tuple[re.Pattern[str], ...]
    clear_paths: tuple[re.Pattern[str], ...]
    rules: MatchRules
    choice_headers: tuple[Rule, ...]
    idempotency_methods: frozenset[str]
    idempotency_headers: dict[str | None, str]
    in_doubt: dict[str | None, str]  # policy by host; None: every other host
    in_doubt_window_s: float
    ws_resume: dict[str | None, str]  # durable_ws_resume by host; None: every other host
    in_flight_wait_s: float
    transient_statuses: frozenset[int]
    db_timeout_s: float
    lease_grace_s: float
    drain_timeout_s: float
    attempt_per_start: bool
    raw_tcp: bool
    allow_remote_clients: bool
    body_cap: int
    oversize_request: str
    redact_headers: tuple[str, ...]
    redact_json: tuple[str, ...]
    redact_key: str
    encryption_key: str
    auth_secret: str
    log_secrets: bool
    metrics_listen: str
    otlp_endpoint: str
    replay_pacing: bool
    log_json: bool
    retention_s: float
    attempt_idle_s: float
    read_ahead_bytes: int
    max_attempts: int
    offload_bytes: int
    orphan_timeout_s: float

    def idempotency_header(self, host: str) -> str:
        return self.idempotency_headers.get(host.lower()) or self.idempotency_headers[None]

    def in_doubt_policy(self, host: str) -> str:
        return self.in_doubt.get(host.lower()) or self.in_doubt[None]

    def choosers(self, host: str) -> frozenset[str]:
        """The answer-choosing headers of requests to `host` (matching/choice.py)."""
        return frozenset(r.name.lower() for r in self.choice_headers if r.applies(host.lower()))

    def ws_resume_policy(self, host: str) -> str:
        return self.ws_resume.get(host.lower()) or self.ws_resume[None]

    def ignored(self, host: str, path: str = "") -> bool:
        """Passes through unjournaled: an ignored host, or a HOST/PATH an ignore pattern matches."""
        return any(p.search(host) for p in self.ignore_hosts) or matches(self.ignore_paths, host, path)

    def clear_path(self, host: str, path: str) -> bool:
        """With an encryption key, is this URL's path stored in clear? (An operator's allow-list.)"""
        return matches(self.clear_paths, host, path)


def matches(patterns: tuple[re.Pattern[str], ...], host: str, path: str) -> bool:
    """Does a HOST/PATH pattern (`path_pattern`) match this request? Nothing to build when there are none."""
    if not patterns:
        return False
    target = host.lower() + path.partition("?")[0]
    return any(p.fullmatch(target) for p in patterns)


# Telemetry exporters: fresh ids and timestamps in every request, so they would diverge on every
# attempt; nothing an agent pays for or depends on. Turned off with durable_builtin_ignores=false.
BUILTIN_IGNORES = (
    "*/v1/traces/ingest",  # the OpenAI Agents SDK's trace exporter (on the LLM's own host)
    "*/v1/traces",  # OTLP/HTTP exporters (OpenTelemetry), on any collector
    "*/v1/logs",
    "*/v1/metrics",
    "*smith.langchain.com/*",  # LangSmith's run exporter (/runs/multipart, /runs/batch)
    # litellm's import-time fetch of its model cost map: no call of the agent's (LITELLM_LOCAL_MODEL_COST_MAP=True
    # turns it off in litellm itself)
    "raw.githubusercontent.com/berriai/litellm/*",
)


def path_pattern(spec: str) -> re.Pattern[str]:
    """A HOST/PATH glob (`*` matches anything, `/` included) as a case-insensitive regex."""
    return re.compile(".*".join(re.escape(part) for part in spec.lower().split("*")), re.IGNORECASE)


def per_host(
    specs: Sequence[str], default: str, option: str, allowed: Sequence[str] | None = None
) -> dict[str | None, str]:
    """`value` for every host, `host=value` for one -> {host or None: value}."""
    values: dict[str | None, str] = {None: default}
    for spec in specs:
        rule = Rule.parse(spec)
        if allowed is not None and rule.name not in allowed:
            raise ValueError(f"{option}: {spec!r} is not one of {', '.join(allowed)} (or host=one of them)")
        values[rule.host] = rule.name
    return values


def from_options(o: Any, environ: Mapping[str, str] = os.environ) -> Settings:
    """Validate the options (and the environment's DURABLE_ENCRYPTION_KEY, DURABLE_AUTH_SECRET) into
    Settings; raises OptionsError with the offending option named."""
    from ..matching.identity import IdentityError, validate_id

    try:
        for name in ("durable_run", "durable_attempt"):
            if getattr(o, name):
                validate_id(getattr(o, name), name)
        in_doubt = per_host(o.durable_in_doubt, "reissue", "durable_in_doubt", IN_DOUBT_POLICIES)
        if o.durable_oversize_request not in OVERSIZE_POLICIES:
            raise ValueError(f"durable_oversize_request must be one of {', '.join(OVERSIZE_POLICIES)}")
        if o.durable_metrics_listen and not re.fullmatch(r"[^:]*:\d+", o.durable_metrics_listen):
            raise ValueError("durable_metrics_listen must be HOST:PORT")
        if o.durable_body_cap < 0:
            raise ValueError("durable_body_cap must be >= 0")
        if o.durable_read_ahead_bytes < 0:
            raise ValueError("durable_read_ahead_bytes must be >= 0")
        if o.durable_offload_bytes < 0:
            raise ValueError("durable_offload_bytes must be >= 0")
        if o.durable_max_attempts < 1:
            raise ValueError("durable_max_attempts must be >= 1")
        encryption_key = o.durable_encryption_key or environ.get(crypto.ENV, "")
        Keyring(encryption_key)  # a malformed key fails here, at start, not on the first call
        headers = per_host(o.durable_idempotency_header, "Idempotency-Key", "durable_idempotency_header")
        return Settings(
            dsn=o.durable_dsn or None,
            run=o.durable_run or None,
            attempt=o.durable_attempt or None,
            strict=o.durable_strict,
            offline=o.durable_offline,
            ignore_hosts=tuple(re.compile(p, re.IGNORECASE) for p in o.durable_ignore_hosts),
            ignore_paths=tuple(
                path_pattern(p)
                for p in (*o.durable_ignore_paths, *(BUILTIN_IGNORES if o.durable_builtin_ignores else ()))
            ),
            clear_paths=tuple(path_pattern(p) for p in o.durable_clear_paths),
            rules=MatchRules(
                ignore_json=tuple(Rule.parse(s) for s in o.durable_ignore_json),
                ignore_query=tuple(Rule.parse(s) for s in o.durable_ignore_query),
                match_headers=tuple(Rule.parse(s) for s in o.durable_match_headers),
            ),
            choice_headers=tuple(Rule.parse(s) for s in o.durable_choice_headers),
            idempotency_methods=frozenset(m.upper() for m in o.durable_idempotency_methods),
            idempotency_headers=headers,
            in_doubt=in_doubt,
            in_doubt_window_s=parse_duration(o.durable_in_doubt_window),
            ws_resume=per_host(o.durable_ws_resume, "auto", "durable_ws_resume", WS_RESUME_POLICIES),
            in_flight_wait_s=parse_duration(o.durable_in_flight_wait),
            transient_statuses=frozenset(int(s) for s in o.durable_transient_statuses),
            db_timeout_s=o.durable_db_timeout / 1000,
            lease_grace_s=parse_duration(o.durable_lease_grace),
            drain_timeout_s=parse_duration(o.durable_drain_timeout),
            attempt_per_start=o.durable_attempt_per_start,
            raw_tcp=o.durable_raw_tcp,
            allow_remote_clients=o.durable_allow_remote_clients,
            body_cap=o.durable_body_cap,
            oversize_request=o.durable_oversize_request,
            redact_headers=tuple(o.durable_redact_headers),
            redact_json=tuple(o.durable_redact_json),
            redact_key=o.durable_redact_key,
            encryption_key=encryption_key,
            auth_secret=o.durable_auth_secret or environ.get("DURABLE_AUTH_SECRET", ""),
            log_secrets=o.durable_log_secrets,
            metrics_listen=o.durable_metrics_listen,
            otlp_endpoint=o.durable_otlp_endpoint,
            replay_pacing=o.durable_replay_pacing,
            log_json=o.durable_log_json,
            retention_s=parse_duration(o.durable_retention),
            attempt_idle_s=parse_duration(o.durable_attempt_idle),
            read_ahead_bytes=o.durable_read_ahead_bytes,
            max_attempts=o.durable_max_attempts,
            offload_bytes=o.durable_offload_bytes,
            orphan_timeout_s=parse_duration(o.durable_orphan_timeout),
        )
    except (ValueError, IdentityError, re.error, crypto.KeyringError) as e:
        raise exceptions.OptionsError(f"durable: {e}") from e


DEFAULTS = from_options(SimpleNamespace(**{name: default for name, _, default, _ in OPTIONS}), environ={})
"""Settings with every option at its default, until mitmproxy configures the addon (the environment's
key is read then: a malformed one must stop the start with one line, not fail this module's import)."""
