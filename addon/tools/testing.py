"""`durable test`: a recorded run becomes a regression test, offline, for any agent in any language.

    durable test --record FILE -- CMD     run CMD live under a sidecar of its own, write the run to FILE
    durable test FILE -- CMD              replay FILE to CMD with nothing forwarded; exit 0 only when CMD
                                          exits 0, every call matched and every recorded step was used

A replay loads the fixture into a scratch run and runs CMD as a new attempt of it under a sidecar
started with `durable_offline`: every call is answered from the recording, and one that matches
nothing is journaled as never sent and answered 404 "not in the recording" (the agent fails fast,
no network timeout, no charge). The report is read from the journal afterwards: the calls that
matched nothing (each with the nearest recorded request and a field-level diff, as `durable diff`
shows), the recorded calls never made, and what the recording's calls would have cost live.

Record modes, vcrpy's names: `none` (the default with FILE: offline), `once` (record when FILE does
not exist yet, else none), `new_episodes` (calls the recording does not answer go live and are added
to FILE), `all` (everything live, FILE rewritten: the same as --record). `--live-after-divergence`
lets a call the recording does not answer go live (and be paid) without touching FILE: the report
still says where the agent left the recording.
"""

from __future__ import annotations

import json
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..matching import usage
from ..steps import divergence
from ..store.crypto import KeyringError, open_row
from ..store.journal import decode_headers
from . import fixture, operations, runner

ATTEMPT = "test"  # the replay's attempt id in the scratch run
RECORD_MODES = ("none", "once", "new_episodes", "all")


@dataclass
class Call:
    """One step as the report names it."""

    seq: int
    method: str
    url: str
    nearest: int | None = None  # extra calls: the recorded step closest to it
    diff: list[dict[str, Any]] = field(default_factory=list)
    sealed: bool = False  # its request is encrypted at rest and this process lacks the key


@dataclass
class Report:
    fixture: str
    status: int | None  # the command's exit status (None: a test in the same process, pytest_plugin.py)
    recorded: int  # steps in the fixture
    matched: int  # recorded steps this attempt was answered from
    extra: list[Call]  # calls that matched nothing (refused offline; live with --live-after-divergence)
    missing: list[Call]  # recorded calls never made
    cost: dict[str, int]  # what the recording's calls would cost live: calls, tokens
    live: bool = False  # calls that matched nothing went upstream
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status in (0, None) and not self.extra and not self.missing

    def first_divergence(self) -> str | None:
        """Where the attempt first left the recording, in one line."""
        if self.extra:
            call = self.extra[0]
            instead = f" instead of recorded step {call.nearest}" if call.nearest is not None else ""
            return f"call {call.method} {call.url}{instead} is not in the recording"
        if self.missing:
            call = self.missing[0]
            return f"recorded step {call.seq} ({call.method} {call.url}) was never made"
        return None

    def text(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        lines = [
            f"durable test {self.fixture}: {verdict}: {self.matched} of {self.recorded} recorded calls answered "
            f"from the recording, {len(self.extra)} not in it{' (sent live)' if self.live else ''}, "
            f"{len(self.missing)} never made" + ("" if self.status is None else f"; the command exited {self.status}"),
        ]
        if (first := self.first_divergence()) is not None:
            lines.append(f"first divergence: {first}")
        for call in self.extra:
            lines.append(f"  not in the recording: {call.method} {call.url}")
            if call.sealed:
                lines.append("    (encrypted at rest: set DURABLE_ENCRYPTION_KEY to see the diff)")
            elif call.nearest is not None:
                lines.append(f"    nearest recorded step {call.nearest}:")
                lines += [
                    f"      {d['field']}: {json.dumps(d['journaled'])} -> {json.dumps(d['now'])}" for d in call.diff
                ]
        for call in self.missing:
            lines.append(f"  never made: recorded step {call.seq} {call.method} {call.url}")
        lines.append(
            f"the recording's calls would cost live: {self.cost['calls']} calls, {self.cost['tokens']} LLM tokens"
        )
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "first_divergence": self.first_divergence()}

    def junit(self) -> bytes:
        """One test case per fixture; a failure holds the report."""
        suite = ET.Element(
            "testsuite",
            name="durable test",
            tests="1",
            failures="0" if self.passed else "1",
            errors="0",
            time=f"{self.seconds:.3f}",
        )
        case = ET.SubElement(
            suite, "testcase", classname="durable.fixture", name=Path(self.fixture).name, time=f"{self.seconds:.3f}"
        )
        if not self.passed:
            failure = ET.SubElement(case, "failure", message=self.first_divergence() or f"exited {self.status}")
            failure.text = self.text()
        return ET.tostring(suite, xml_declaration=True, encoding="utf-8")


def _calls(rows: list[dict[str, Any]]) -> list[Call]:
    return [Call(row["seq"], row["method"], row["url"]) for row in rows]


def report(conn: operations.Conn, run: str, recorded: int, name: str, status: int | None, live: bool) -> Report:
    """What the attempt did with the recording (steps 1..recorded of `run`), read from the journal."""
    keys = operations.keyring()
    rows = conn.execute(
        "SELECT seq, method, url, state, last_attempt, envelope, request_body, response_headers, response_body"
        " FROM durable_steps WHERE run_id = %s ORDER BY seq",
        (run,),
    ).fetchall()
    sealed: set[int] = set()
    for row in rows:
        try:
            open_row(keys, row)
        except KeyringError:
            sealed.add(row["seq"])
    recording, extra_rows = [r for r in rows if r["seq"] <= recorded], [r for r in rows if r["seq"] > recorded]
    used = [r for r in recording if r["last_attempt"] == ATTEMPT]
    unused = [r for r in recording if r["last_attempt"] != ATTEMPT]
    extra = _calls(extra_rows)
    for call, row in zip(extra, extra_rows, strict=True):
        call.sealed = row["seq"] in sealed
        candidates = [r for r in (unused or recording) if r["seq"] not in sealed]
        near = (
            None if call.sealed else divergence.nearest(candidates, row["envelope"], bytes(row["request_body"] or b""))
        )
        if near is not None:
            call.nearest, call.diff = near
    tokens = sum(
        usage.tokens(bytes(r["response_body"]), decode_headers(r["response_headers"]))
        for r in recording
        if r["response_body"] and r["seq"] not in sealed
    )
    calls = sum(1 for r in recording if r["state"] == "completed")
    return Report(
        name, status, len(recording), len(used), extra, _calls(unused), {"calls": calls, "tokens": tokens}, live
    )


@dataclass
class Options:
    command: list[str]
    dsn: str | None
    sidecar: dict[str, str]  # --set and --upstream-ca, as `durable run` takes them
    confdir: Path | None
    keep: bool = False  # leave the scratch run in the journal (durable show RUN)


def scratch_run() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def _execute(opts: Options, run: str, attempt: str, offline: bool) -> runner.Outcome:
    plan = runner.Plan(
        run=run,
        attempt=attempt,
        command=opts.command,
        dsn=opts.dsn,
        options={**opts.sidecar, "durable_offline": "true" if offline else "false"},
        confdir=opts.confdir,
        proxy=None,
        token=None,
    )
    return runner.execute(plan)


def _finish(opts: Options, run: str) -> None:
    if not opts.keep:
        with operations.connect(opts.dsn, migrate=False) as conn:
            operations.remove(conn, run)


def record(path: Path, opts: Options) -> tuple[int, int]:
    """Run the command live and write its run to `path`: (its exit status, steps written)."""
    run = scratch_run()
    outcome = _execute(opts, run, "record", offline=False)
    if outcome.journal is None:  # a signal before the command started: nothing to write
        return outcome.status, 0
    with operations.connect(outcome.journal.dsn, migrate=False) as conn:
        steps = fixture.save(conn, run, path)
    _finish(opts, run)
    return outcome.status, steps


def replay(path: Path, opts: Options, mode: str = "none", live_after_divergence: bool = False) -> Report:
    """Replay `path` to the command as a new attempt of a scratch run (offline unless asked
    otherwise) and report what it did; with `new_episodes`, `path` gains the calls it lacked."""
    loaded = fixture.read(path)
    run = scratch_run()
    with operations.connect(opts.dsn) as conn:
        fixture.load(conn, run, loaded, labels={"fixture": str(path)})
    live = live_after_divergence or mode == "new_episodes"
    started = time.monotonic()
    try:
        outcome = _execute(opts, run, ATTEMPT, offline=not live)
        with operations.connect(opts.dsn, migrate=False) as conn:
            result = report(conn, run, loaded.last_seq, str(path), outcome.status, live)
            if mode == "new_episodes" and result.extra:
                fixture.save(conn, run, path, str(loaded.header.get("run", run)))
    finally:
        _finish(opts, run)
    result.seconds = time.monotonic() - started
    return result
