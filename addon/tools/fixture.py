"""A journaled run as one portable file: what `durable test` replays, `durable export --fixture`
writes and `durable import` reads back.

The format (version 1) is JSON lines, so a fixture diffs well in code review:

    {"durable_fixture": 1, "run": "...", "steps": 7, "fingerprint_version": 2}     the header
    {"seq": 1, "method": "POST", "url": "...", "state": "completed", "status": 200, ...,
     "request_body": "sha256:9f2c...", "response_body": "sha256:41aa..."}          one line per step
    {"body": "sha256:9f2c...", "text": "{\\"model\\": \\"gpt-4o\\", ...}"}         one line per body
    {"body": "sha256:41aa...", "base64": "..."}                                   (binary or sealed)

A step line holds the journal's columns as the journal holds them: headers and URLs redacted (a
credential is a keyed hash), and with an encryption key every sealed part stays sealed, opened only
by a holder of that key. Bodies are content-addressed (a body sent twice is stored once, and a
changed body shows as one changed line plus its new body), text when they are UTF-8, base64
otherwise; each is checked against its hash when read. Timestamps are left out (a re-recording
changes only what changed); each step keeps its duration and a stream its chunk timing.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg.types.json import Jsonb

from ..matching import fingerprint

FORMAT = "durable_fixture"
VERSION = 1
# the durable_steps columns a fixture carries, in the order a step's line shows them
COLUMNS = (
    "seq",
    "method",
    "url",
    "state",
    "status",
    "attempt",
    "fingerprint",
    "fp_version",
    "occurrence",
    "step_key",
    "choice",
    "envelope",
    "request_headers",
    "request_body",
    "idempotency_key",
    "reason",
    "http_version",
    "response_headers",
    "response_body",
    "response_trailers",
    "chunk_timing",
    "error",
    "streamed",
    "truncated",
    "duration_ms",
    "key_id",
)
BODIES = ("request_body", "response_body")
FLAGS = ("streamed", "truncated")  # false unless the line says so
JSON_COLUMNS = ("envelope", "request_headers", "response_headers", "response_trailers", "chunk_timing")


class FixtureError(ValueError):
    """Not a fixture this version reads, or a damaged one."""


@dataclass
class Fixture:
    header: dict[str, Any]
    steps: list[dict[str, Any]]  # the journal's columns, bodies as bytes

    @property
    def last_seq(self) -> int:
        return max((step["seq"] for step in self.steps), default=0)


def dumps(run: str, rows: list[dict[str, Any]]) -> str:
    """Journal rows (as stored: nothing opened) as a fixture's text."""
    bodies: dict[str, bytes] = {}
    lines = [
        json.dumps(
            {
                FORMAT: VERSION,
                "run": run,
                "steps": len(rows),
                "fingerprint_version": rows[0]["fp_version"] if rows else fingerprint.VERSION,
            }
        )
    ]
    for row in rows:
        step: dict[str, Any] = {}
        for column in COLUMNS:
            value = row.get(column)
            if value is None or (column in FLAGS and not value):
                continue
            if column in BODIES:
                data = bytes(value)
                value = "sha256:" + hashlib.sha256(data).hexdigest()
                bodies.setdefault(value, data)
            step[column] = value
        lines.append(json.dumps(step, ensure_ascii=False))
    for ref, data in bodies.items():
        try:
            lines.append(json.dumps({"body": ref, "text": data.decode("utf-8")}, ensure_ascii=False))
        except UnicodeDecodeError:
            lines.append(json.dumps({"body": ref, "base64": base64.b64encode(data).decode()}))
    return "\n".join(lines) + "\n"


def loads(text: str, source: str = "fixture") -> Fixture:
    """A fixture's text read back, every body checked against its hash."""
    lines = [line for line in text.split("\n") if line.strip()]
    try:
        docs = [json.loads(line) for line in lines]
    except json.JSONDecodeError as e:
        raise FixtureError(f"{source}: not a durable fixture (line {e.lineno}: {e.msg})") from e
    if not docs or not isinstance(docs[0], dict) or FORMAT not in docs[0]:
        raise FixtureError(f"{source}: not a durable fixture (its first line has no {FORMAT!r})")
    header = docs[0]
    if header[FORMAT] != VERSION:
        raise FixtureError(f"{source}: fixture format {header[FORMAT]}, this durable reads {VERSION}")
    bodies: dict[str, bytes] = {}
    for doc in docs[1:]:
        if "body" in doc:
            data = doc["text"].encode("utf-8") if "text" in doc else base64.b64decode(doc["base64"])
            if "sha256:" + hashlib.sha256(data).hexdigest() != doc["body"]:
                raise FixtureError(f"{source}: body {doc['body']} does not match its hash (edited by hand?)")
            bodies[doc["body"]] = data
    steps = []
    for doc in docs[1:]:
        if "seq" not in doc:
            continue
        for column in BODIES:
            if column in doc:
                if doc[column] not in bodies:
                    raise FixtureError(f"{source}: step {doc['seq']} names body {doc[column]}, which it lacks")
                doc[column] = bodies[doc[column]]
        steps.append(doc)
    return Fixture(header, sorted(steps, key=lambda step: step["seq"]))


def save(conn: Any, run: str, path: Path, name: str | None = None) -> int:
    """Write `run` as stored in the journal to `path` (its header naming it `name`); how many steps."""
    rows = raw_rows(conn, run)
    path.write_text(dumps(name or run, rows), encoding="utf-8")
    return len(rows)


def read(path: Path) -> Fixture:
    return loads(path.read_text(encoding="utf-8"), str(path))


def is_fixture(path: Path) -> bool:
    """Does the file start like a fixture? (`durable import` also reads HAR and flow files.)"""
    with open(path, "rb") as f:
        return f.read(len(FORMAT) + 4).lstrip(b"{ ").startswith(b'"' + FORMAT.encode())


def raw_rows(conn: Any, run: str) -> list[dict[str, Any]]:
    """A run's steps as the journal stores them (nothing opened: sealed stays sealed)."""
    return conn.execute(
        f"SELECT {', '.join(COLUMNS)} FROM durable_steps WHERE run_id = %s ORDER BY seq", (run,)
    ).fetchall()


def _stored(step: dict[str, Any], column: str) -> Any:
    """A step's value for one column as the journal stores it (a flag left out is false)."""
    value = step.get(column)
    if value is None:
        return False if column in FLAGS else None
    return Jsonb(value) if column in JSON_COLUMNS else value


def load(conn: Any, run: str, fixture: Fixture, labels: dict[str, Any] | None = None) -> int:
    """The fixture's steps as a new run, in one transaction; returns how many."""
    columns = ("run_id", *COLUMNS)
    with conn.transaction():
        if conn.execute("SELECT 1 FROM durable_runs WHERE id = %s", (run,)).fetchone():
            raise FixtureError(f"run {run!r} already exists: load a fixture into a new run")
        conn.execute(
            "INSERT INTO durable_runs (id, last_seq, labels) VALUES (%s, %s, %s)",
            (run, fixture.last_seq, Jsonb(labels or {})),
        )
        with conn.cursor().copy(f"COPY durable_steps ({', '.join(columns)}) FROM STDIN") as copy:
            for step in fixture.steps:
                copy.write_row((run, *(_stored(step, column) for column in COLUMNS)))
    return len(fixture.steps)
