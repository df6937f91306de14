"""What an operator asks of the journal: list and inspect runs, fork, resolve, edit, delete.

Synchronous psycopg on purpose: these run from the `durable` CLI, one statement after another.
Every function takes an open connection; `connect` finds the database as the sidecar does and
applies migrations first.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from ..matching import usage
from ..store import database, migrations
from ..store.crypto import (
    SEALED_COLUMNS,
    SEALED_JSON_COLUMNS,
    Keyring,
    KeyringError,
    open_json,
    open_row,
    open_url,
    reseal_url,
    seal_json,
)
from ..store.journal import DELETE_RUNS, IDLE_RUNS, decode_headers

Conn = psycopg.Connection[dict[str, Any]]  # rows as dicts (dict_row)


def keyring() -> Keyring:
    """The CLI's keys: $DURABLE_ENCRYPTION_KEY (the sidecar may also take them by option)."""
    return Keyring.from_option("")


class OperatorError(RuntimeError):
    """A request the journal cannot honour (unknown run, wrong state...): one line for the user."""


class NotFound(OperatorError):
    """No such run or step (the UI answers 404)."""


@contextmanager
def connect(dsn: str | None, migrate: bool = True) -> Iterator[Conn]:
    target = database.resolve(dsn)

    async def apply() -> None:
        async with await psycopg.AsyncConnection.connect(target.dsn, autocommit=True) as conn:
            await migrations.apply(conn)

    if migrate:
        asyncio.run(apply())
    with psycopg.connect(target.dsn, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def create_journal(dsn: str | None, partitions: int) -> dict[str, Any]:
    """`durable db init`: the journal's tables, hash-partitioned by run into `partitions` when > 0.

    The layout is chosen when the journal is created; asking an existing journal for another one is
    an error (it is never rewritten in place)."""
    target = database.resolve(dsn)

    async def create() -> dict[str, Any]:
        async with await psycopg.AsyncConnection.connect(target.dsn, autocommit=True) as conn:
            existing = await migrations.layout(conn)
            if existing is not None and partitions and existing.partitions != partitions:
                raise OperatorError(
                    f"the journal at {database.describe(target.dsn)} already exists ({existing}), not"
                    f" partitioned into {partitions}: its layout is chosen when it is created (run `durable db init"
                    " --partitions N` on an empty database, and move runs there with export/import)"
                )
            try:
                applied = await migrations.apply(conn, partitions)
            except migrations.LayoutError as e:
                raise OperatorError(str(e)) from e
            made = await migrations.layout(conn)
            assert made is not None
            return {
                "journal": database.describe(target.dsn),
                "applied": applied,
                "layout": str(made),
                "partitions": made.partitions,
                "shards": made.shards,
                "workers": made.workers,
            }

    return asyncio.run(create())


def journal_layout(dsn: str | None) -> dict[str, Any]:
    """`durable db status`: the layout of the journal `dsn` names (layout None: none yet), unmigrated."""
    target = database.resolve(dsn)

    async def read() -> migrations.Layout | None:
        async with await psycopg.AsyncConnection.connect(target.dsn, autocommit=True) as conn:
            return await migrations.layout(conn)

    found = asyncio.run(read())
    return {"journal": database.describe(target.dsn), "layout": str(found) if found else None}


RUN_STATES = ("ok", "in doubt", "failed steps")


def runs(
    conn: Conn, prefix: str = "", state: str = "", limit: int | None = None, offset: int = 0
) -> list[dict[str, Any]]:
    """Runs, most recently active first, with what replay saved: upstream calls (replays) and the LLM
    tokens of the replayed answers that are plain JSON (sealed or streamed answers count 0 here;
    `durable show` counts them all). Filtered by id prefix and state; a page of `limit` from `offset`."""
    return conn.execute(
        """
        SELECT * FROM (
            SELECT r.id AS run, r.created_at AS created,
                   greatest(r.updated_at, max(s.completed_at), max(s.replayed_at)) AS last_activity, r.forked_from,
                   count(s.seq) AS steps,
                   CASE WHEN count(s.seq) FILTER (WHERE s.state = 'pending') > 0 THEN 'in doubt'
                        WHEN count(s.seq) FILTER (WHERE s.state = 'failed') > 0 THEN 'failed steps'
                        ELSE 'ok' END AS state,
                   count(s.seq) FILTER (WHERE s.state = 'pending') AS in_doubt,
                   count(s.divergence) AS diverged,
                   coalesce(sum(s.replay_count), 0) AS calls_saved,
                   coalesce(sum(s.replay_count * coalesce(
                       (durable_try_jsonb(s.response_body, s.response_headers)->'usage'->>'total_tokens')::bigint,
                       (durable_try_jsonb(s.response_body, s.response_headers)->'usage'->>'input_tokens')::bigint
                       + (durable_try_jsonb(s.response_body, s.response_headers)->'usage'->>'output_tokens')::bigint,
                       0)) FILTER (WHERE s.replay_count > 0 AND s.key_id IS NULL), 0) AS tokens_saved
            FROM durable_runs r LEFT JOIN durable_steps s ON s.run_id = r.id
            WHERE r.id LIKE %(prefix)s
            GROUP BY r.id
        ) runs WHERE %(state)s = '' OR state = %(state)s
        ORDER BY last_activity DESC, run LIMIT %(limit)s OFFSET %(offset)s
        """,
        {
            "prefix": prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",
            "state": state,
            "limit": limit,
            "offset": offset,
        },
    ).fetchall()


def run_row(conn: Conn, run: str) -> dict[str, Any]:
    """The run's own row (created, forked_from, labels...); OperatorError if there is none."""
    return _require_run(conn, run)


def _require_run(conn: Conn, run: str) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM durable_runs WHERE id = %s", (run,)).fetchone()
    if row is None:
        raise NotFound(f"no run {run!r} in the journal")
    return row


def run_version(conn: Conn, run: str) -> str:
    """What changes whenever a run's steps do (a step added, answered, resolved, replayed): one
    indexed aggregate, so a live view asks it every second and reads the steps only on a change."""
    row = conn.execute(
        "SELECT count(*) AS n, sum(replay_count) AS replays, max(greatest(started_at, completed_at, replayed_at))"
        " AS latest, count(*) FILTER (WHERE state = 'pending') AS pending, bool_or(approved) AS approved"
        " FROM durable_steps WHERE run_id = %s",
        (run,),
    ).fetchone()
    return "-".join(str(row[k]) for k in ("n", "replays", "latest", "pending", "approved")) if row else ""


def steps(conn: Conn, run: str) -> list[dict[str, Any]]:
    """One row per step, with the tokens its answer reports (what a replay of it saves)."""
    _require_run(conn, run)
    rows = conn.execute(
        """
        SELECT seq, method, url, state, status, attempt, last_attempt, last_outcome, replay_count AS replays,
               round(duration_ms::numeric, 1)::float8 AS duration_ms, streamed, truncated, idempotency_key,
               started_at, completed_at, divergence IS NOT NULL AS diverged, approved, response_headers,
               response_body
        FROM durable_steps WHERE run_id = %s ORDER BY seq
        """,
        (run,),
    ).fetchall()
    keys = keyring()
    for row in rows:
        row["sealed"] = None
        try:
            open_row(keys, row)
        except KeyringError as e:  # URLs and states stay readable; only what the answer holds is sealed
            row["sealed"], row["tokens"] = str(e), None
            row.pop("response_body"), row.pop("response_headers")
            continue
        body, headers = row.pop("response_body"), row.pop("response_headers")
        row["tokens"] = usage.tokens(bytes(body), decode_headers(headers)) if body else 0
    return rows


def step_detail(conn: Conn, run: str, seq: int) -> dict[str, Any]:
    """One step whole: request and answer (headers as pairs), its divergence's diff; what is sealed
    with a key this process lacks stays sealed and `sealed` says which key."""
    row = dict(_require_step(conn, run, seq))
    row["sealed"] = None
    try:
        open_row(keyring(), row)
        if row["divergence"] is not None:
            row["divergence"] = {**row["divergence"], "diff": open_json(keyring(), row["divergence"].get("diff"))}
    except KeyringError as e:
        row["sealed"] = str(e)
        for column in (*SEALED_COLUMNS, *SEALED_JSON_COLUMNS):
            row[column] = None
        if row["divergence"] is not None:
            row["divergence"] = {**row["divergence"], "diff": None}
    for column in ("request_headers", "response_headers", "response_trailers"):
        if row[column] is not None:
            row[column] = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in decode_headers(row[column])]
    for column in ("request_body", "response_body"):
        if row[column] is not None:
            row[column] = bytes(row[column])
    return row


def step_rows(conn: Conn, run: str) -> list[dict[str, Any]]:
    """Whole journal rows of a run, bodies included (for export)."""
    _require_run(conn, run)
    keys = keyring()
    return [
        open_row(keys, row)
        for row in conn.execute("SELECT * FROM durable_steps WHERE run_id = %s ORDER BY seq", (run,))
    ]


TLS_FAILURE = re.compile(r"certificate verify failed|TLS handshake|SSL", re.IGNORECASE)  # mitmproxy's words


def attempt_summary(conn: Conn, run: str, attempt: str) -> dict[str, int]:
    """What one attempt did: steps per outcome, and the calls and tokens its replays did not re-spend.
    Calls whose upstream's certificate was not trusted (no call reached it) are counted apart, as
    `tls_failed`: they are not recorded answers."""
    summary = {"recorded": 0, "replayed": 0, "reissued": 0, "diverged": 0, "tokens_saved": 0, "tls_failed": 0}
    keys = keyring()
    for row in conn.execute(
        "SELECT last_outcome, state, error, response_headers, response_body FROM durable_steps"
        " WHERE run_id = %s AND last_attempt = %s",
        (run, attempt),
    ):
        outcome = row["last_outcome"]
        if row["state"] == "failed" and TLS_FAILURE.search(row["error"] or ""):
            outcome = "tls_failed"
        summary[outcome] = summary.get(outcome, 0) + 1
        if outcome == "replayed" and row["response_body"]:
            open_row(keys, row)
            summary["tokens_saved"] += usage.tokens(
                bytes(row["response_body"]), decode_headers(row["response_headers"])
            )
    return summary


def divergences(conn: Conn, run: str) -> list[dict[str, Any]]:
    """Where attempts diverged. A diff sealed at rest is opened with $DURABLE_ENCRYPTION_KEY; without
    the key it stays sealed (`diff` None, `sealed` saying why): values are shown only to a key holder."""
    _require_run(conn, run)
    rows = conn.execute(
        "SELECT seq, attempt, method, url, divergence->'expected_step' AS expected_step, divergence->'diff' AS diff"
        " FROM durable_steps WHERE run_id = %s AND divergence IS NOT NULL ORDER BY seq",
        (run,),
    ).fetchall()
    keys = keyring()
    for row in rows:
        row["sealed"], row["url"] = None, open_url(keys, row["url"])
        try:
            row["diff"] = open_json(keys, row["diff"])
        except ValueError as e:  # KeyringError: no key, or the wrong one
            row["diff"], row["sealed"] = None, str(e)
    return rows


def fork(conn: Conn, run: str, at: int, to: str) -> int:
    """A new run holding copies of the first `at` steps of `run`; returns how many were copied."""
    _require_run(conn, run)
    with conn.transaction():
        if conn.execute("SELECT 1 FROM durable_runs WHERE id = %s", (to,)).fetchone():
            raise OperatorError(f"run {to!r} already exists")
        conn.execute(
            "INSERT INTO durable_runs (id, forked_from, last_seq, labels)"
            " SELECT %s, id, %s, labels FROM durable_runs WHERE id = %s",
            (to, at, run),
        )
        copied = conn.execute(
            """
            INSERT INTO durable_steps (run_id, seq, fingerprint, fp_version, occurrence, step_key, state, attempt,
                method, url, envelope, request_headers, request_body, idempotency_key, status, reason, http_version,
                response_headers, response_body, response_trailers, error, streamed, truncated, created_at,
                started_at, completed_at, duration_ms, last_attempt, last_outcome, choice)
            SELECT %s, seq, fingerprint, fp_version, occurrence, step_key, state, attempt,
                method, url, envelope, request_headers, request_body, NULL, status, reason, http_version,
                response_headers, response_body, response_trailers, error, streamed, truncated, created_at,
                started_at, completed_at, duration_ms, 'fork', 'forked', choice
            FROM durable_steps WHERE run_id = %s AND seq <= %s
            """,
            (to, run, at),
        ).rowcount
    return copied


def _require_step(conn: Conn, run: str, seq: int) -> dict[str, Any]:
    _require_run(conn, run)
    row = conn.execute("SELECT * FROM durable_steps WHERE run_id = %s AND seq = %s", (run, seq)).fetchone()
    if row is None:
        raise NotFound(f"run {run!r} has no step {seq}")
    return row


def resolve(
    conn: Conn,
    run: str,
    seq: int,
    action: str,
    status: int = 200,
    body: bytes = b"",
    content_type: str = "application/json",
) -> str:
    """Settle an in-doubt step: re-send it (`reissue`), drop it (`forget`) or give its answer (`complete`)."""
    step = _require_step(conn, run, seq)
    if step["state"] == "completed" and action != "complete":
        raise OperatorError(f"step {seq} of run {run!r} is completed, not in doubt")
    if action == "reissue":
        conn.execute("UPDATE durable_steps SET approved = true WHERE run_id = %s AND seq = %s", (run, seq))
        key = step["idempotency_key"]
        return f"step {seq} will be re-sent with its original idempotency key {key!r} by the next attempt"
    if action == "forget":
        conn.execute("DELETE FROM durable_steps WHERE run_id = %s AND seq = %s", (run, seq))
        return f"step {seq} forgotten: the next attempt records the call afresh (with a new idempotency key)"
    _write_answer(conn, run, seq, status, [["Content-Type", content_type], ["Content-Length", str(len(body))]], body)
    return f"step {seq} completed by hand with status {status} ({len(body)} bytes): the next attempt replays it"


def _write_answer(conn: Conn, run: str, seq: int, status: int, headers: list, body: bytes) -> None:
    """Make a step completed with this answer, as an operator gave it (sealed when encryption is on)."""
    keys = keyring()
    conn.execute(
        "UPDATE durable_steps SET state = 'completed', status = %s, reason = '', http_version = 'HTTP/1.1',"
        " response_headers = %s, response_body = %s, truncated = false, streamed = false, error = NULL,"
        " completed_at = now(), last_outcome = 'edited', key_id = %s WHERE run_id = %s AND seq = %s",
        (status, Jsonb(seal_json(keys, headers)), keys.seal(body), keys.active, run, seq),
    )


def edit(conn: Conn, run: str, seq: int, status: int | None, body: bytes | None) -> str:
    """Change what the agent will see at one step of a forked run (the original run is never touched).

    A new body is given as the agent should read it, so the old Content-Encoding is dropped with it.
    """
    if not _require_run(conn, run)["forked_from"]:
        raise OperatorError(f"run {run!r} is not a fork: fork it first (durable fork {run} --at N --to NEW)")
    step = open_row(keyring(), _require_step(conn, run, seq))
    headers = step["response_headers"] or []
    if body is None:
        body = bytes(step["response_body"] or b"")
    else:
        headers = [[k, v] for k, v in headers if k.lower() not in ("content-encoding", "content-length")]
    status = status or step["status"] or 200
    _write_answer(conn, run, seq, status, headers, body)
    return f"step {seq} of run {run!r} now answers {status} with {len(body)} bytes"


def rekey(conn: Conn, batch: int = 200) -> int:
    """Re-encrypt every row not sealed with the active key (plaintext rows included) with it."""
    keys = keyring()
    if not keys.enabled:
        raise OperatorError("no encryption key: set DURABLE_ENCRYPTION_KEY=NEWKID:KEY,OLDKID:KEY (new key first)")
    done = 0
    while True:
        rows = conn.execute(
            "SELECT run_id, seq, url, envelope, request_headers, request_body, response_headers, response_body,"
            " response_trailers, divergence"
            " FROM durable_steps WHERE key_id IS DISTINCT FROM %s LIMIT %s",
            (keys.active, batch),
        ).fetchall()
        if not rows:
            return done
        with conn.transaction():
            for row in rows:
                url = reseal_url(keys, row["url"])
                open_row(keys, row)
                divergence = row["divergence"]
                if divergence is not None:  # its diff holds body values: sealed like the bodies
                    divergence = {**divergence, "diff": seal_json(keys, open_json(keys, divergence.get("diff")))}
                conn.execute(
                    "UPDATE durable_steps SET url = %s, envelope = %s, request_headers = %s, request_body = %s,"
                    " response_headers = %s, response_body = %s, response_trailers = %s, divergence = %s, key_id = %s"
                    " WHERE run_id = %s AND seq = %s",
                    (
                        url,
                        Jsonb(seal_json(keys, row["envelope"])),
                        Jsonb(seal_json(keys, row["request_headers"])),
                        keys.seal(bytes(row["request_body"] or b"")),
                        Jsonb(seal_json(keys, row["response_headers"]))
                        if row["response_headers"] is not None
                        else None,
                        keys.seal(bytes(row["response_body"])) if row["response_body"] is not None else None,
                        Jsonb(seal_json(keys, row["response_trailers"]))
                        if row["response_trailers"] is not None
                        else None,
                        Jsonb(divergence) if divergence is not None else None,
                        keys.active,
                        row["run_id"],
                        row["seq"],
                    ),
                )
        done += len(rows)


def remove(conn: Conn, run: str) -> int:
    _require_run(conn, run)
    count = len(conn.execute("SELECT seq FROM durable_steps WHERE run_id = %s", (run,)).fetchall())
    conn.execute("DELETE FROM durable_runs WHERE id = %s", (run,))
    return count


def gc(conn: Conn, older_than_s: float, dry_run: bool, batch: int = 100, only: list[str] | None = None) -> list[str]:
    """Delete runs with no activity for `older_than_s`, a batch per statement so traffic never stalls.
    `only`: of those, just these (the ones a user confirmed; a run active since is spared)."""
    doomed = [r["id"] for r in conn.execute(IDLE_RUNS, {"age": older_than_s})]
    if only is not None:
        confirmed = set(only)
        doomed = [run for run in doomed if run in confirmed]
    if not dry_run:
        for start in range(0, len(doomed), batch):
            conn.execute(DELETE_RUNS, (doomed[start : start + batch],))
    return doomed
