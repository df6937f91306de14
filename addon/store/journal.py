"""The PostgreSQL journal: every statement the step life cycle needs, async, one round trip each.

How they reach PostgreSQL (the pool, the deadline, group commit, the reconnect) is execution.py's;
what differs on a Citus cluster is citus.py's, and no statement here depends on it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from . import lease, offload
from .crypto import Keyring, open_row, seal_json
from .cursor import RunCursor, StepRef, digest
from .execution import Executor, JournalError, Statement

logger = logging.getLogger(__name__)


class NotOurs(JournalError):
    """The step is no longer this sidecar's to answer: completed, deleted, or taken over meanwhile."""


class SealedError(JournalError):
    """A journaled answer is encrypted with a key this process was not given (or a wrong one)."""


@dataclass(frozen=True)
class NewStep:
    run: str
    attempt: str
    key: str
    fp_version: int
    occurrence: int
    step_key: str | None
    method: str
    url: str
    envelope: dict[str, Any]
    request_headers: list[list[str]]
    request_body: bytes
    agent_idempotency_key: str | None
    mint_idempotency_key: bool
    outcome: str = "recorded"  # or "diverged"
    divergence: dict[str, Any] | None = None  # nearest journaled step and the diff against it
    owner: int | None = None  # the lease id of the sidecar that sends it (None: nobody, e.g. an import)
    choice: str | None = None  # the keyed hash of what chooses its answer besides the fingerprint (choice.py)


@dataclass(frozen=True)
class Answer:
    """A response to journal with an imported step."""

    status: int
    reason: str
    http_version: str
    headers: list[list[str]]
    body: bytes


@dataclass(frozen=True)
class Recorded:
    seq: int
    idempotency_key: str | None


@dataclass(frozen=True)
class StoredResponse:
    state: str
    status: int | None
    reason: str | None
    http_version: str | None
    headers: list[tuple[bytes, bytes]]
    body: bytes
    error: str | None
    chunk_timing: list[list[float]] | None = None
    trailers: list[tuple[bytes, bytes]] | None = None  # HTTP trailers (gRPC's status), None: none
    key: str = ""  # the match key and occurrence it answers: the check on the index's digest
    occurrence: int = 0


@dataclass(frozen=True)
class TakeOver:
    """What `take_over` found: the step handed to this sidecar, or why not."""

    state: str | None  # the step's state as found (None: the step is gone)
    in_flight: bool  # another live sidecar is sending it now
    taken: bool
    idempotency_key: str | None = None
    age_s: float = 0.0  # since the step was first journaled
    approved: bool = False  # an operator's `durable resolve --reissue`
    owner: int | None = None  # another sidecar named as sending it (alive or not)
    generation: int | None = None  # that owner's lease generation


class ReplyLost(JournalError):
    """A new step's first commit lost its reply and its retry found the step journaled: most likely
    by that first try, so the call was never forwarded (repairs.py hands it back)."""


def encode_headers(fields: Any) -> list[list[str]]:
    """Header pairs (bytes) -> JSON-safe pairs, order and duplicates kept; latin-1 is lossless.

    PostgreSQL's jsonb cannot hold U+0000: a pair with a NUL byte is kept as base64, marked by a
    third element, so it still replays byte for byte."""
    return [
        [k.decode("latin-1"), v.decode("latin-1")]
        if b"\0" not in k + v
        else [base64.b64encode(k).decode(), base64.b64encode(v).decode(), "b64"]
        for k, v in fields
    ]


def decode_headers(pairs: list[list[str]] | None) -> list[tuple[bytes, bytes]]:
    return [
        (base64.b64decode(pair[0]), base64.b64decode(pair[1]))
        if len(pair) == 3
        else (pair[0].encode("latin-1"), pair[1].encode("latin-1"))
        for pair in pairs or []
    ]


def storable(value: Any) -> Any:
    """A JSON value PostgreSQL's jsonb accepts: NUL characters (a `%00` in a query, say) spelled
    `\\x00`. For what is shown (envelopes, diffs), never for what is replayed."""
    if isinstance(value, str):
        return value.replace("\0", "\\x00") if "\0" in value else value
    if isinstance(value, list):
        return [storable(v) for v in value]
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    return value


# Recording a step: one call of durable_record (migrations 7, 9, 11), which locks the run, checks the step
# is new and takes the next seq, in one round trip and one commit.
_RECORD = """
SELECT seq, idempotency_key FROM durable_record(
    %(run)s, %(key)s, %(fpv)s::smallint, %(occ)s, %(step_key)s, %(attempt)s, %(outcome)s, %(divergence)s,
    %(key_id)s, %(owner)s, %(method)s, %(url)s, %(envelope)s, %(headers)s, %(body)s, %(agent_key)s, %(mint)s,
    %(choice)s)
"""

# A step's answer: only a pending step this sidecar (owner) has in flight takes one
_COMPLETE = """
UPDATE durable_steps SET state = %s, status = %s, reason = %s, http_version = %s, response_headers = %s,
    response_body = %s, error = NULL, completed_at = now(), duration_ms = %s, streamed = %s, truncated = %s,
    key_id = %s, chunk_timing = %s, owner = NULL, response_trailers = %s
WHERE run_id = %s AND seq = %s AND state = 'pending' AND owner IS NOT DISTINCT FROM %s
"""

# An imported run's steps, completed, in one COPY (created and started: the defaults, now).
_IMPORT_COPY = """
COPY durable_steps (run_id, seq, fingerprint, fp_version, occurrence, state, attempt, last_attempt, last_outcome,
                    key_id, method, url, envelope, request_headers, request_body, status, reason, http_version,
                    response_headers, response_body, completed_at, duration_ms) FROM STDIN
"""

# Hand a pending or failed step to this sidecar (owner), atomically: the row lock and PostgreSQL's
# re-check of the WHERE clause on the newest row version mean two sidecars never both take it.
# Never a completed step; never one whose owner is alive (in flight there) or may be (its lock free,
# but not yet with the generation the caller saw free for a whole grace period: see lease.py); a
# pending one only if an operator approved it or the policy allows it and it is younger than the window.
# The leases alive (%(live)s) and whether the dead owner is still so (%(dead_still)s) were read just
# before from lease.LIVE: one statement on one run, so on Citus it runs whole on the run's worker.
_TAKE_OVER = """
WITH taken AS (
    UPDATE durable_steps SET state = 'pending', owner = %(me)s, attempt = %(attempt)s, started_at = now(),
                             last_attempt = %(attempt)s, last_outcome = 'reissued'
    WHERE run_id = %(run)s AND seq = %(seq)s AND fingerprint = %(key)s AND occurrence = %(occ)s
      AND (owner IS NULL OR owner = %(me)s OR (owner = %(dead_owner)s AND %(dead_still)s))
      AND (state = 'failed' OR (state = 'pending' AND (approved OR (%(unsent)s AND owner = %(me)s)
           OR (%(allowed)s AND created_at > now() - make_interval(secs => %(window)s)))))
    RETURNING idempotency_key
)
SELECT s.state, (s.owner IS NOT NULL AND s.owner <> %(me)s AND s.owner = ANY(%(live)s::bigint[])) AS in_flight,
       EXISTS (SELECT 1 FROM taken) AS taken, (SELECT idempotency_key FROM taken) AS idempotency_key,
       extract(epoch FROM now() - s.created_at)::float8 AS age_s, s.approved,
       CASE WHEN s.owner <> %(me)s THEN s.owner END AS owner
FROM durable_steps s
WHERE s.run_id = %(run)s AND s.seq = %(seq)s AND s.fingerprint = %(key)s AND s.occurrence = %(occ)s
"""

# the stored digest (migration 9: cursor.digest(fingerprint, occurrence)): the whole index comes
# from the digest-ordered unique index, with no sort and no hashing
INDEX = "SELECT digest, seq, state FROM durable_steps WHERE run_id = %s ORDER BY digest"
INDEX_PAGE = 4096  # rows turned into Python objects at a time while the index loads
# a run's first steps by seq, from its primary key with no sort: where a resumed attempt starts
INDEX_HEAD = "SELECT digest, seq, state FROM durable_steps WHERE run_id = %s ORDER BY seq LIMIT %s"

# runs with no activity (recorded, completed or replayed step) for %(age)s seconds
IDLE_RUNS = """
SELECT id FROM durable_runs r
WHERE updated_at < now() - make_interval(secs => %(age)s)
  AND NOT EXISTS (SELECT 1 FROM durable_steps s WHERE s.run_id = r.id
                  AND greatest(s.started_at, s.completed_at, s.replayed_at) >= now() - make_interval(secs => %(age)s))
ORDER BY updated_at
"""
DELETE_RUNS = "DELETE FROM durable_runs WHERE id = ANY(%s)"
REPLAY_FLUSH_S = 0.5  # replay counts are written at most this often (and on a polite stop)


class Journal(Executor):
    """Every statement the sidecar sends to PostgreSQL, each through Executor's one path (`_write`,
    `_run`, `_on_connection`)."""

    def __init__(
        self,
        dsn: str | None,
        timeout_s: float = 5.0,
        max_connections: int = 20,
        keyring: Keyring | None = None,
        deadlines: bool = True,
    ) -> None:
        super().__init__(dsn, timeout_s, max_connections, deadlines)
        self.keyring = keyring or Keyring("")
        self._replays: list[tuple[str, int, str]] = []
        self._flusher: asyncio.Future[None] | None = None
        self.offload_bytes = offload.DEFAULT_THRESHOLD  # bodies past it are sealed and opened in a thread

    async def gc(self, older_than_s: float, batch: int = 100) -> int:
        """Delete idle runs, a batch per statement, yielding between batches so traffic never waits."""
        doomed = [row["id"] for row in await self._run("find idle runs", IDLE_RUNS, {"age": older_than_s}, fetch="all")]
        for start in range(0, len(doomed), batch):
            await self._run("delete idle runs", DELETE_RUNS, (doomed[start : start + batch],))
            await asyncio.sleep(0)
        return len(doomed)

    async def load_index(self, run: str, into: RunCursor, head_loaded: Callable[[], None] = lambda: None) -> None:
        """Load the run's replay index into a cursor that serves meanwhile.

        First the run's first INDEX_PAGE steps by seq (its primary key: no sort, a few ms whatever
        the run's length), where a resumed attempt starts replaying. A longer run's whole index then
        streams from a server-side cursor sorted by digest, a page at a time (never all rows in
        memory, neither as Python objects nor in libpq), into a cursor of its own that `into`
        adopts once whole."""

        async def load(conn: psycopg.AsyncConnection) -> None:
            cur = await conn.execute(INDEX_HEAD, (run, INDEX_PAGE + 1))
            head = await cur.fetchall()
            into.load(sorted(head))  # in digest order: appended, not inserted
            head_loaded()
            if len(head) <= INDEX_PAGE:
                return
            whole = RunCursor()
            async with conn.transaction(), conn.cursor("durable_index") as rows:
                await rows.execute(INDEX, (run,))
                while page := await rows.fetchmany(INDEX_PAGE):
                    whole.extend(page)
            into.adopt(whole)

        await self._on_connection(["load run"], load)

    async def fp_version(self, run: str) -> int | None:
        """The fingerprint version a run was journaled with (its first step's); None for a new run."""
        row = await self._run(
            "read run version",
            "SELECT fp_version FROM durable_steps WHERE run_id = %s ORDER BY seq LIMIT 1",
            (run,),
            fetch="one",
        )
        return int(row["fp_version"]) if row else None

    async def has_steps(self, run: str) -> bool:
        row = await self._run(
            "find run", "SELECT EXISTS (SELECT 1 FROM durable_steps WHERE run_id = %s) AS found", (run,), fetch="one"
        )
        return bool(row["found"])

    def _record_params(self, step: NewStep, sealed_body: bytes) -> dict[str, Any]:
        return {
            "owner": step.owner,
            "run": step.run,
            "key": step.key,
            "occ": step.occurrence,
            "fpv": step.fp_version,
            "step_key": step.step_key,
            "attempt": step.attempt,
            "method": step.method,
            "url": step.url,
            "envelope": Jsonb(seal_json(self.keyring, storable(step.envelope))),
            "headers": Jsonb(seal_json(self.keyring, step.request_headers)),
            "body": sealed_body,
            "key_id": self.keyring.active,
            "agent_key": step.agent_idempotency_key,
            "mint": step.mint_idempotency_key,
            "choice": step.choice,
            "outcome": step.outcome,
            "divergence": Jsonb(storable(self._sealed_diff(step.divergence))) if step.divergence is not None else None,
        }

    async def record(self, step: NewStep) -> Recorded | None:
        """Commit a pending step; None if (run, key, occurrence) was journaled meanwhile by someone else.
        Raises ReplyLost when that someone is most likely this very call's first try."""
        body = await offload.run(len(step.request_body), self.offload_bytes, self.keyring.seal, step.request_body)
        statement = Statement("record pending step", _RECORD, self._record_params(step, body), "one", step.run)
        row = await self._write_statement(statement)
        if row and row["seq"] is not None:
            return Recorded(row["seq"], row["idempotency_key"])
        if statement.retried:
            raise ReplyLost(
                f"record pending step: step {step.key}#{step.occurrence} of run {step.run} was journaled "
                "by a try whose reply was lost"
            )
        return None

    async def import_steps(self, run: str, steps: list[tuple[NewStep, Answer]]) -> int:
        """A new run of completed steps (an imported HAR or flow file), with COPY in one transaction:
        5,000 steps of 3 KB take a fraction of a second, and a failed import leaves nothing behind."""

        async def copy(conn: psycopg.AsyncConnection) -> int:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO durable_runs (id, last_seq) VALUES (%s, %s) ON CONFLICT (id) DO UPDATE"
                    " SET last_seq = excluded.last_seq, updated_at = excluded.updated_at",
                    (run, len(steps)),
                )
                now = datetime.now(UTC)
                async with conn.cursor().copy(_IMPORT_COPY) as copy:
                    for seq, (step, answer) in enumerate(steps, start=1):
                        await copy.write_row(
                            (
                                run,
                                seq,
                                step.key,
                                step.fp_version,
                                step.occurrence,
                                "completed",
                                step.attempt,
                                step.attempt,
                                step.outcome,
                                self.keyring.active,
                                step.method,
                                step.url,
                                Jsonb(seal_json(self.keyring, storable(step.envelope))),
                                Jsonb(seal_json(self.keyring, step.request_headers)),
                                self.keyring.seal(step.request_body),
                                answer.status,
                                answer.reason,
                                answer.http_version,
                                Jsonb(seal_json(self.keyring, answer.headers)),
                                self.keyring.seal(answer.body),
                                now,
                                0.0,
                            )
                        )
            return len(steps)

        return await self._on_connection(["import run"], copy)

    def _sealed_diff(self, divergence: dict[str, Any]) -> dict[str, Any]:
        """A divergence as stored: its diff holds body values, so it is sealed like the body."""
        return {**divergence, "diff": seal_json(self.keyring, divergence.get("diff"))}

    async def find(self, run: str, key: str, occurrence: int) -> StepRef | None:
        row = await self._run(
            "find step",
            "SELECT seq, fingerprint, occurrence, state FROM durable_steps"
            " WHERE run_id = %s AND digest = %s AND fingerprint = %s AND occurrence = %s",
            (run, digest(key, occurrence), key, occurrence),
            fetch="one",
        )
        return StepRef(row["seq"], row["fingerprint"], row["occurrence"], row["state"]) if row else None

    async def choices(self, run: str, key: str) -> dict[int, str | None]:
        """Each journaled occurrence of a match key in a run, with its choice digest (choice.py)."""
        rows = await self._run(
            "read step choices",
            "SELECT occurrence, choice FROM durable_steps WHERE run_id = %s AND fingerprint = %s",
            (run, key),
            fetch="all",
        )
        return {row["occurrence"]: row["choice"] for row in rows}

    async def complete(
        self,
        run: str,
        seq: int,
        state: str,
        status: int,
        reason: str,
        http_version: str,
        headers: list[list[str]],
        body: bytes,
        duration_ms: float,
        streamed: bool = False,
        truncated: bool = False,
        chunk_timing: list[tuple[float, int]] | None = None,
        owner: int | None = None,
        trailers: list[list[str]] | None = None,
    ) -> None:
        """Journal the answer of a step this sidecar has in flight (`owner`), and let go of it.

        A truncated answer is kept for inspection but leaves the step in doubt. The step must still
        be pending and ours: a completed answer is never overwritten, and a step deleted or taken
        over meanwhile raises instead.
        """
        sealed = await offload.run(len(body), self.offload_bytes, self.keyring.seal, body)
        updated = await self._write(
            "journal response",
            run,
            _COMPLETE,
            (
                state,
                status,
                reason,
                http_version,
                Jsonb(seal_json(self.keyring, headers)),
                sealed,
                duration_ms,
                streamed,
                truncated,
                self.keyring.active,
                Jsonb(chunk_timing) if chunk_timing is not None else None,
                Jsonb(seal_json(self.keyring, trailers)) if trailers is not None else None,
                run,
                seq,
                owner,
            ),
        )
        if updated != 1:
            raise NotOurs(f"journal response: step {run}/{seq} is gone, answered, or no longer this sidecar's")

    async def append_answer(self, run: str, seq: int, body: bytes) -> None:
        """A WebSocket step's answer grown by the server pushes that followed it (conversations.py):
        the only rewrite of a completed answer, and it only adds messages to it."""
        await self._write(
            "journal server pushes",
            run,
            "UPDATE durable_steps SET response_body = %s WHERE run_id = %s AND seq = %s AND state = 'completed'",
            (self.keyring.seal(body), run, seq),
        )

    async def take_back(self, run: str, seq: int) -> None:
        """A WebSocket answer journaled message by message (conversations.py) that grew past
        durable_body_cap: in doubt again (pending, truncated, its partial answer dropped), as a
        too-big HTTP answer is. The only completed step ever taken back, and only a WebSocket one."""
        await self._write(
            "take back an answer past the cap",
            run,
            "UPDATE durable_steps SET state = 'pending', truncated = true, response_body = NULL, completed_at = NULL,"
            " owner = NULL WHERE run_id = %s AND seq = %s AND state = 'completed' AND method = 'WS'",
            (run, seq),
        )

    async def fail(self, run: str, seq: int, error: str, duration_ms: float, owner: int | None) -> None:
        """The request provably never left (or the upstream answered a transient status): `failed`."""
        await self._write(
            "journal failure",
            run,
            "UPDATE durable_steps SET state = 'failed', error = %s, status = NULL, response_body = NULL,"
            " response_headers = NULL, completed_at = now(), duration_ms = %s, owner = NULL"
            " WHERE run_id = %s AND seq = %s AND state = 'pending' AND owner IS NOT DISTINCT FROM %s",
            (error, duration_ms, run, seq, owner),
        )

    async def let_go(self, run: str, seq: int, owner: int) -> None:
        """The exchange ended without an answer to journal: the step stays pending, in doubt, and
        nobody has it in flight any more, so a later attempt may take it over at once."""
        await self._write(
            "leave step in doubt",
            run,
            "UPDATE durable_steps SET owner = NULL WHERE run_id = %s AND seq = %s AND state = 'pending' AND owner = %s",
            (run, seq, owner),
        )

    async def give_back(self, run: str, key: str, occurrence: int, owner: int) -> None:
        """A step this sidecar recorded but never sent (its pending commit went unanswered): nobody
        has it in flight, and it may be sent whatever the in-doubt policy, since it never left."""
        await self._write(
            "hand back unsent step",
            run,
            "UPDATE durable_steps SET owner = NULL, approved = true WHERE run_id = %s AND digest = %s"
            " AND fingerprint = %s AND occurrence = %s AND state = 'pending' AND owner = %s",
            (run, digest(key, occurrence), key, occurrence, owner),
        )

    async def responses(self, run: str, seqs: list[int], max_body: int | None = None) -> dict[int, StoredResponse]:
        """Journaled answers of some steps, by seq; with max_body, larger bodies are left out."""
        rows = await self._run(
            "read journaled responses",
            "SELECT seq, state, status, reason, http_version, response_headers, response_body, error, chunk_timing,"
            " response_trailers, fingerprint, occurrence FROM durable_steps WHERE run_id = %s AND seq = ANY(%s)"
            " AND (%s::int IS NULL OR coalesce(octet_length(response_body), 0) <= %s::int)",
            (run, seqs, max_body, max_body),
            fetch="all",
            binary=True,  # a 15 MiB answer costs 15 MiB in libpq's buffer, not 30 of hex
        )
        size = sum(len(row["response_body"] or b"") for row in rows)
        try:
            rows = await offload.run(size, self.offload_bytes, lambda: [open_row(self.keyring, row) for row in rows])
        except ValueError as e:  # KeyringError: a missing or wrong key
            raise SealedError(f"read journaled responses of run {run}: {e}") from e
        return {
            row["seq"]: StoredResponse(
                state=row["state"],
                status=row["status"],
                reason=row["reason"],
                http_version=row["http_version"],
                headers=decode_headers(row["response_headers"]),
                body=bytes(row["response_body"] or b""),
                error=row["error"],
                chunk_timing=row["chunk_timing"],
                trailers=decode_headers(row["response_trailers"]) if row["response_trailers"] is not None else None,
                key=row["fingerprint"],
                occurrence=row["occurrence"],
            )
            for row in rows
        }

    def note_replay(self, run: str, seq: int, attempt: str) -> None:
        """Count a replay (replay_count, replayed_at, last attempt and outcome) without delaying it.

        Notes are written in batches by one background task, at most every REPLAY_FLUSH_S, so a
        burst of replays costs one statement, not one each; losing the last few in a crash costs
        nothing but a counter.
        """
        self._replays.append((run, seq, attempt))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_replays())

    async def flush_replays(self) -> None:
        """Wait for the replay counts gathered so far to be written."""
        if self._flusher is not None and not self._flusher.done():
            await self._flusher

    async def _flush_replays(self) -> None:
        await asyncio.sleep(REPLAY_FLUSH_S)  # let a burst of replays gather into one statement
        while self._replays:
            batch, self._replays = self._replays, []
            runs, seqs, attempts = (list(column) for column in zip(*batch, strict=True))
            try:
                await self._run(
                    "count replays",
                    "UPDATE durable_steps s SET replay_count = s.replay_count + n.times, replayed_at = now(),"
                    " last_attempt = n.attempt, last_outcome = 'replayed'"
                    " FROM (SELECT run, seq, max(attempt) AS attempt, count(*) AS times"
                    "       FROM unnest(%s::text[], %s::int[], %s::text[]) AS u(run, seq, attempt) GROUP BY run, seq) n"
                    " WHERE s.run_id = n.run AND s.seq = n.seq",
                    (runs, seqs, attempts),
                )
            except JournalError as e:
                logger.warning("durable: %d replay counts not written: %s", len(batch), e)

    async def take_over(
        self,
        run: str,
        step: StepRef,
        attempt: str,
        pending_allowed: bool,
        window_s: float,
        dead: tuple[int, int | None] | None = None,
        unsent: bool = False,
    ) -> TakeOver:
        """Hand a pending or failed step to this sidecar to send again, with its original key.

        Not taken: a completed step (replay it), a step in flight in another live sidecar (wait for
        it), an in-doubt step the policy keeps (`pending_allowed` false, or older than `window_s`: the
        upstream may have forgotten its key) unless an operator approved it (`durable resolve
        --reissue`), and a row whose key is not this request's (should the index's digest ever name
        the wrong step, its idempotency key is never lent out). A step whose owner's lock is free is
        taken only when `dead` names that owner and generation: the caller saw them so for a grace period.
        `unsent`: this sidecar knows it never sent the step (repairs.py), so no policy holds it back.
        """
        me = await self.owner()
        dead_owner, dead_gen = dead if dead is not None else (None, None)
        leases = await self._run("read live leases", lease.LIVE, {"lease": dead_owner}, fetch="one")
        dead_still = dead_owner is not None and dead_owner not in leases["live"] and leases["generation"] == dead_gen
        row = await self._run(
            "take over step",
            _TAKE_OVER,
            {
                "me": me,
                "attempt": attempt,
                "run": run,
                "seq": step.seq,
                "key": step.key,
                "occ": step.occurrence,
                "allowed": pending_allowed,
                "window": window_s,
                "live": leases["live"],
                "dead_owner": dead_owner,
                "dead_still": dead_still,
                "unsent": unsent,
            },
            fetch="one",
        )
        if row is None:
            return TakeOver(None, False, False)
        generation = None
        if row["owner"] is not None and not row["in_flight"] and not row["taken"]:  # a suspect: its generation
            seen = await self._run("read live leases", lease.LIVE, {"lease": row["owner"]}, fetch="one")
            generation = seen["generation"]
        return TakeOver(
            row["state"],
            row["in_flight"],
            row["taken"],
            row["idempotency_key"],
            row["age_s"],
            row["approved"],
            row["owner"],
            generation,
        )

    async def requests(self, run: str, seqs: list[int]) -> list[dict[str, Any]]:
        """Envelopes and bodies of some steps, for divergence diffs."""
        rows = await self._run(
            "read journaled requests",
            "SELECT seq, envelope, request_headers, request_body FROM durable_steps"
            " WHERE run_id = %s AND seq = ANY(%s) ORDER BY seq",
            (run, seqs),
            fetch="all",
        )
        try:
            return [open_row(self.keyring, row) for row in rows]
        except ValueError as e:
            raise JournalError(f"read journaled requests of run {run}: {e}") from e
