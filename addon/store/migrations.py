"""Versioned schema migrations, applied at start under an advisory lock.

Several sidecars may start at once against one database: the transaction-scoped advisory lock makes
them apply migrations one after another, and each skips the versions already recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg

from . import citus

LOCK_ID = 0x6475726162  # "durab": one advisory lock id for the whole schema

# From version 13 on, a migration is a list of single statements, run one at a time: on a Citus
# cluster (citus.py) DDL on the distributed journal reaches the workers as the query string it came
# in, and a string of several statements is refused there (tests/test_citus.py; single_statements
# below holds them to it). Up to 12, a migration is one string: those run before the journal is
# distributed, or on one PostgreSQL.
MIGRATIONS: list[tuple[int, str | list[str]]] = [
    (
        1,
        """
        CREATE TABLE durable_runs (
            id          text PRIMARY KEY,
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now(),
            labels      jsonb NOT NULL DEFAULT '{}',
            forked_from text,
            last_seq    integer NOT NULL DEFAULT 0
        );

        CREATE TABLE durable_steps (
            run_id           text NOT NULL REFERENCES durable_runs(id) ON DELETE CASCADE,
            seq              integer NOT NULL,
            fingerprint      text NOT NULL,
            fp_version       smallint NOT NULL,
            occurrence       integer NOT NULL,
            step_key         text,
            state            text NOT NULL CHECK (state IN ('pending', 'completed', 'failed')),
            attempt          text NOT NULL,
            method           text NOT NULL,
            url              text NOT NULL,
            envelope         jsonb NOT NULL,
            request_headers  jsonb NOT NULL,
            request_body     bytea,
            idempotency_key  text,
            status           integer,
            reason           text,
            http_version     text,
            response_headers jsonb,
            response_body    bytea,
            error            text,
            streamed         boolean NOT NULL DEFAULT false,
            truncated        boolean NOT NULL DEFAULT false,
            created_at       timestamptz NOT NULL DEFAULT now(),
            started_at       timestamptz NOT NULL DEFAULT now(),
            completed_at     timestamptz,
            duration_ms      double precision,
            replay_count     integer NOT NULL DEFAULT 0,
            PRIMARY KEY (run_id, seq),
            UNIQUE (run_id, fingerprint, occurrence)
        ) /*partitioning*/;

        CREATE INDEX durable_steps_pending ON durable_steps (run_id) WHERE state = 'pending';
        CREATE INDEX durable_runs_updated ON durable_runs (updated_at);

        -- response_body as JSONB where it is JSON (and not content-encoded), NULL otherwise
        CREATE FUNCTION durable_try_jsonb(body bytea, headers jsonb) RETURNS jsonb
        LANGUAGE plpgsql IMMUTABLE AS $$
        BEGIN
            IF body IS NULL OR EXISTS (
                SELECT 1 FROM jsonb_array_elements(headers) h
                WHERE lower(h->>0) = 'content-encoding' AND lower(h->>1) <> 'identity'
            ) THEN
                RETURN NULL;
            END IF;
            RETURN convert_from(body, 'UTF8')::jsonb;
        EXCEPTION WHEN others THEN
            RETURN NULL;
        END $$;

        -- the seed document's table, as a view over the real journal
        CREATE VIEW journal AS
            SELECT run_id,
                   seq AS step_id,
                   fingerprint AS request_hash,
                   durable_try_jsonb(response_body, response_headers) AS response_body,
                   completed_at,
                   state,
                   method,
                   url,
                   status
            FROM durable_steps;
        """,
    ),
    (
        2,
        """
        -- who last served each step and how, for `durable run`'s summary and `durable show`
        ALTER TABLE durable_steps ADD COLUMN last_attempt text;
        ALTER TABLE durable_steps ADD COLUMN last_outcome text;
        -- the field-level diff of a step recorded as a divergence, for `durable diff`
        ALTER TABLE durable_steps ADD COLUMN divergence jsonb;
        -- an operator's `durable resolve --reissue`: re-send this in-doubt step whatever the policy
        ALTER TABLE durable_steps ADD COLUMN approved boolean NOT NULL DEFAULT false;
        -- last replay: a run being replayed is alive, whatever its age
        ALTER TABLE durable_steps ADD COLUMN replayed_at timestamptz;
        UPDATE durable_steps SET last_attempt = attempt, last_outcome = 'recorded';
        """,
    ),
    (
        3,
        """
        -- encryption at rest: which key sealed this row's bodies and headers (NULL: not encrypted)
        ALTER TABLE durable_steps ADD COLUMN key_id text;
        CREATE INDEX durable_steps_key_id ON durable_steps (key_id) WHERE key_id IS NOT NULL;
        """,
    ),
    (
        4,
        """
        -- a streamed answer's chunks as [ms since its headers, bytes], for paced replay
        ALTER TABLE durable_steps ADD COLUMN chunk_timing jsonb;
        """,
    ),
    (
        5,
        """
        -- single flight: the lease id (lease.py) of the sidecar that has this pending step in flight;
        -- NULL once it is answered, failed, or left in doubt with nobody sending it
        ALTER TABLE durable_steps ADD COLUMN owner integer;
        """,
    ),
    (
        6,
        """
        -- HTTP trailers of the answer as [name, value] pairs (gRPC puts its status there); NULL: none
        ALTER TABLE durable_steps ADD COLUMN response_trailers jsonb;
        """,
    ),
    (
        7,
        """
        -- Record a pending step in ONE statement (one round trip, one commit, no explicit transaction):
        -- take the run's row lock first, then, in a statement of its own (a volatile function takes a
        -- fresh snapshot per statement), check that (run, key, occurrence) is not journaled yet and take
        -- the next seq. Checked under the lock, a seq is never taken in vain: seqs stay dense when two
        -- sidecars race to record the same step. NULLs back: someone else journaled it meanwhile.
        CREATE FUNCTION durable_record(
            p_run text, p_key text, p_fpv smallint, p_occ integer, p_step_key text, p_attempt text,
            p_outcome text, p_divergence jsonb, p_key_id text, p_owner integer, p_method text, p_url text,
            p_envelope jsonb, p_headers jsonb, p_body bytea, p_agent_key text, p_mint boolean,
            OUT seq integer, OUT idempotency_key text)
        LANGUAGE plpgsql VOLATILE AS $$
        #variable_conflict use_column
        BEGIN
            INSERT INTO durable_runs AS r (id) VALUES (p_run) ON CONFLICT (id) DO UPDATE SET updated_at = now();
            WITH run AS (
                UPDATE durable_runs SET last_seq = last_seq + 1, updated_at = now()
                WHERE id = p_run AND NOT EXISTS (
                    SELECT 1 FROM durable_steps s
                    WHERE s.run_id = p_run AND s.fingerprint = p_key AND s.occurrence = p_occ)
                RETURNING last_seq
            )
            INSERT INTO durable_steps (run_id, seq, fingerprint, fp_version, occurrence, step_key, state, attempt,
                                       last_attempt, last_outcome, divergence, key_id, owner,
                                       method, url, envelope, request_headers, request_body, idempotency_key)
            SELECT p_run, run.last_seq, p_key, p_fpv, p_occ, p_step_key, 'pending', p_attempt,
                   p_attempt, p_outcome, p_divergence, p_key_id, p_owner,
                   p_method, p_url, p_envelope, p_headers, p_body,
                   COALESCE(p_agent_key, CASE WHEN p_mint THEN
                       'durable-' || left(encode(sha256(convert_to(p_run || ':' || run.last_seq, 'UTF8')), 'hex'), 32)
                   END)
            FROM run
            ON CONFLICT (run_id, fingerprint, occurrence) DO NOTHING
            RETURNING durable_steps.seq, durable_steps.idempotency_key INTO seq, idempotency_key;
        END $$;
        """,
    ),
    (
        8,
        """
        -- a sidecar lease's generation, bumped each time its id is (re)taken (lease.py): a step's owner
        -- counts as dead only when its lock stayed free with the same generation for a grace period
        CREATE TABLE durable_leases (
            id         integer PRIMARY KEY,
            generation bigint NOT NULL DEFAULT 1,
            taken_at   timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        9,
        """
        -- the replay index's name of a step, cursor.digest(fingerprint, occurrence), stored once at
        -- insert (whoever inserts) instead of computed for every step of the run by each new attempt;
        -- IMMUTABLE holds: convert_to's result depends only on the database's encoding, fixed for life
        CREATE FUNCTION durable_digest(p_occ integer, p_key text) RETURNS bigint
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
            SELECT ('x' || encode(substr(sha256(convert_to(p_occ || ':' || p_key, 'UTF8')), 1, 8), 'hex'))
                   ::bit(64)::bigint
        $$;
        ALTER TABLE durable_steps
            ADD COLUMN digest bigint GENERATED ALWAYS AS (durable_digest(occurrence, fingerprint)) STORED;
        -- the same uniqueness as (run_id, fingerprint, occurrence) (the digest is a function of those
        -- two), now in digest order: a new attempt reads its run's whole index from it with no sort
        -- (an index-only scan once vacuum has seen the pages: seq and state are in it), and a lookup
        -- by (run, key, occurrence) names the digest to find its entry
        CREATE UNIQUE INDEX durable_steps_digest ON durable_steps (run_id, digest, fingerprint, occurrence)
            INCLUDE (seq, state);
        ALTER TABLE durable_steps DROP CONSTRAINT durable_steps_run_id_fingerprint_occurrence_key;
        -- Record a pending step with no probe of its run: the run's upsert takes the row lock and the
        -- next seq in one statement; the insert's arbiter is the unique digest index, no planner
        -- choice (a run's probe by the primary key read the whole run while the table had no
        -- statistics); a step someone else journaled gives its seq back, under the same lock, so seqs
        -- stay dense. NULLs back: someone else journaled it.
        CREATE OR REPLACE FUNCTION durable_record(
            p_run text, p_key text, p_fpv smallint, p_occ integer, p_step_key text, p_attempt text,
            p_outcome text, p_divergence jsonb, p_key_id text, p_owner integer, p_method text, p_url text,
            p_envelope jsonb, p_headers jsonb, p_body bytea, p_agent_key text, p_mint boolean,
            OUT seq integer, OUT idempotency_key text)
        LANGUAGE plpgsql VOLATILE AS $$
        #variable_conflict use_column
        DECLARE
            v_seq integer;
        BEGIN
            INSERT INTO durable_runs AS r (id, last_seq) VALUES (p_run, 1)
            ON CONFLICT (id) DO UPDATE SET last_seq = r.last_seq + 1, updated_at = now()
            RETURNING r.last_seq INTO v_seq;
            INSERT INTO durable_steps (run_id, seq, fingerprint, fp_version, occurrence, step_key, state, attempt,
                                       last_attempt, last_outcome, divergence, key_id, owner,
                                       method, url, envelope, request_headers, request_body, idempotency_key)
            VALUES (p_run, v_seq, p_key, p_fpv, p_occ, p_step_key, 'pending', p_attempt,
                    p_attempt, p_outcome, p_divergence, p_key_id, p_owner,
                    p_method, p_url, p_envelope, p_headers, p_body,
                    COALESCE(p_agent_key, CASE WHEN p_mint THEN
                        'durable-' || left(encode(sha256(convert_to(p_run || ':' || v_seq, 'UTF8')), 'hex'), 32)
                    END))
            ON CONFLICT (run_id, digest, fingerprint, occurrence) DO NOTHING
            RETURNING durable_steps.seq, durable_steps.idempotency_key INTO seq, idempotency_key;
            IF seq IS NULL THEN
                UPDATE durable_runs SET last_seq = last_seq - 1 WHERE id = p_run;
            END IF;
        END $$;
        """,
    ),
    (
        10,
        """
        -- A step's answer, failure, let-go and give-back each name their run and seq (and state =
        -- 'pending'), and the planner serves them from this partial index. On (run_id) alone, each
        -- read past every entry its run had left there: an entry stays until vacuum, after its step
        -- is answered, so a run's answers cost more with each step (0.7 ms at its 1,000th, 2.9 ms at
        -- its 4,000th, measured with autovacuum off). On (run_id, seq) each is one lookup.
        CREATE INDEX durable_steps_pending_seq ON durable_steps (run_id, seq) WHERE state = 'pending';
        DROP INDEX durable_steps_pending;
        ALTER INDEX durable_steps_pending_seq RENAME TO durable_steps_pending;
        """,
    ),
    (
        11,
        """
        -- the keyed hash of what in the request chooses its answer but not its fingerprint
        -- (matching/choice.py: credentials, tenant, Accept, Range...): among steps of one fingerprint
        -- an attempt replays the one whose choice matches first. NULL: none (or journaled before)
        ALTER TABLE durable_steps ADD COLUMN choice text;
        DROP FUNCTION durable_record(text, text, smallint, integer, text, text, text, jsonb, text, integer, text,
                                     text, jsonb, jsonb, bytea, text, boolean);
        CREATE FUNCTION durable_record(
            p_run text, p_key text, p_fpv smallint, p_occ integer, p_step_key text, p_attempt text,
            p_outcome text, p_divergence jsonb, p_key_id text, p_owner integer, p_method text, p_url text,
            p_envelope jsonb, p_headers jsonb, p_body bytea, p_agent_key text, p_mint boolean, p_choice text,
            OUT seq integer, OUT idempotency_key text)
        LANGUAGE plpgsql VOLATILE AS $$
        #variable_conflict use_column
        DECLARE
            v_seq integer;
        BEGIN
            INSERT INTO durable_runs AS r (id, last_seq) VALUES (p_run, 1)
            ON CONFLICT (id) DO UPDATE SET last_seq = r.last_seq + 1, updated_at = now()
            RETURNING r.last_seq INTO v_seq;
            INSERT INTO durable_steps (run_id, seq, fingerprint, fp_version, occurrence, step_key, state, attempt,
                                       last_attempt, last_outcome, divergence, key_id, owner,
                                       method, url, envelope, request_headers, request_body, idempotency_key,
                                       choice)
            VALUES (p_run, v_seq, p_key, p_fpv, p_occ, p_step_key, 'pending', p_attempt,
                    p_attempt, p_outcome, p_divergence, p_key_id, p_owner,
                    p_method, p_url, p_envelope, p_headers, p_body,
                    COALESCE(p_agent_key, CASE WHEN p_mint THEN
                        'durable-' || left(encode(sha256(convert_to(p_run || ':' || v_seq, 'UTF8')), 'hex'), 32)
                    END),
                    p_choice)
            ON CONFLICT (run_id, digest, fingerprint, occurrence) DO NOTHING
            RETURNING durable_steps.seq, durable_steps.idempotency_key INTO seq, idempotency_key;
            IF seq IS NULL THEN
                UPDATE durable_runs SET last_seq = last_seq - 1 WHERE id = p_run;
            END IF;
        END $$;
        """,
    ),
    (
        12,
        """
        -- durable_record as in migration 11, but the run's upsert takes its time from the row it
        -- proposes (its default, now()) rather than calling now() in DO UPDATE SET: the same instant,
        -- and Citus (citus.py) accepts only immutable expressions there on a distributed table
        CREATE OR REPLACE FUNCTION durable_record(
            p_run text, p_key text, p_fpv smallint, p_occ integer, p_step_key text, p_attempt text,
            p_outcome text, p_divergence jsonb, p_key_id text, p_owner integer, p_method text, p_url text,
            p_envelope jsonb, p_headers jsonb, p_body bytea, p_agent_key text, p_mint boolean, p_choice text,
            OUT seq integer, OUT idempotency_key text)
        LANGUAGE plpgsql VOLATILE AS $$
        #variable_conflict use_column
        DECLARE
            v_seq integer;
        BEGIN
            INSERT INTO durable_runs AS r (id, last_seq) VALUES (p_run, 1)
            ON CONFLICT (id) DO UPDATE SET last_seq = r.last_seq + 1, updated_at = EXCLUDED.updated_at
            RETURNING r.last_seq INTO v_seq;
            INSERT INTO durable_steps (run_id, seq, fingerprint, fp_version, occurrence, step_key, state, attempt,
                                       last_attempt, last_outcome, divergence, key_id, owner,
                                       method, url, envelope, request_headers, request_body, idempotency_key,
                                       choice)
            VALUES (p_run, v_seq, p_key, p_fpv, p_occ, p_step_key, 'pending', p_attempt,
                    p_attempt, p_outcome, p_divergence, p_key_id, p_owner,
                    p_method, p_url, p_envelope, p_headers, p_body,
                    COALESCE(p_agent_key, CASE WHEN p_mint THEN
                        'durable-' || left(encode(sha256(convert_to(p_run || ':' || v_seq, 'UTF8')), 'hex'), 32)
                    END),
                    p_choice)
            ON CONFLICT (run_id, digest, fingerprint, occurrence) DO NOTHING
            RETURNING durable_steps.seq, durable_steps.idempotency_key INTO seq, idempotency_key;
            IF seq IS NULL THEN
                UPDATE durable_runs SET last_seq = last_seq - 1 WHERE id = p_run;
            END IF;
        END $$;
        """,
    ),
]


def single_statements(sql: str) -> bool:
    """Is `sql` one statement (a trailing `;` allowed)? Dollar-quoted bodies and string literals are
    skipped; enough for migrations, which hold no comments with `;` in them."""
    outside = re.sub(r"(\$\w*\$).*?\1|'(?:[^']|'')*'", "", sql, flags=re.S)
    return ";" not in outside.strip().rstrip(";")


PARTITIONING = "/*partitioning*/"


def partitioned(sql: str, partitions: int) -> str:
    """Migration 1 with durable_steps hash-partitioned by run into `partitions` tables: every key and
    index of the journal starts with run_id, and every statement on the agent's path names one run,
    so each touches one partition. Later migrations (columns, indexes) reach every partition."""
    tables = "".join(
        f"CREATE TABLE durable_steps_p{i} PARTITION OF durable_steps FOR VALUES WITH (MODULUS {partitions}, "
        f"REMAINDER {i});\n"
        for i in range(partitions)
    )
    return sql.replace(PARTITIONING, "PARTITION BY HASH (run_id)") + tables


@dataclass(frozen=True)
class Layout:
    """How durable_steps is laid out: one table, hash partitions, or distributed over a Citus cluster."""

    partitions: int = 0  # hash partitions on one PostgreSQL (0: none)
    shards: int = 0  # Citus shards (0: not distributed)
    workers: int = 0  # the Citus nodes holding them

    def __str__(self) -> str:
        if self.shards:
            return f"distributed by run over {self.shards} shards on {self.workers} Citus workers"
        if self.partitions:
            return f"hash-partitioned by run into {self.partitions} tables"
        return "one table"


async def layout(conn: psycopg.AsyncConnection) -> Layout | None:
    """The journal's layout; None: no journal yet."""
    cur = await conn.execute(
        "SELECT c.relkind, (SELECT count(*) FROM pg_inherits WHERE inhparent = c.oid)"
        " FROM pg_class c WHERE c.oid = to_regclass('durable_steps')"
    )
    row = await cur.fetchone()
    if row is None:
        return None
    if await citus.installed(conn):
        cluster = await citus.describe(conn)
        if cluster.shards:
            return Layout(shards=cluster.shards, workers=cluster.workers)
    return Layout(partitions=int(row[1]) if row[0] == "p" else 0)


class LayoutError(ValueError):
    """A layout this database cannot have."""


async def apply(conn: psycopg.AsyncConnection, partitions: int = 0) -> list[int]:
    """Apply pending migrations; returns the versions applied by this call. `partitions` counts only
    when this call creates the journal (see `partitioned`); an existing journal keeps its layout.
    On a Citus coordinator the journal is distributed by run as it is created (citus.py)."""
    applied_now = []
    on_citus = await citus.installed(conn)
    if on_citus:
        await citus.check_node(conn)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS durable_schema_version ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT version FROM durable_schema_version")
        done = {row[0] for row in await cur.fetchall()}
        creating = 1 not in done
        if creating and on_citus and partitions > 0:
            raise LayoutError(
                "this database is a Citus coordinator: the journal is distributed by run over its workers,"
                " not hash-partitioned (drop --partitions)"
            )
        for version, sql in MIGRATIONS:
            if version in done:
                continue
            for statement in [sql] if isinstance(sql, str) else sql:
                await conn.execute(partitioned(statement, partitions) if version == 1 and partitions > 0 else statement)
            await conn.execute("INSERT INTO durable_schema_version (version) VALUES (%s)", (version,))
            applied_now.append(version)
        if creating and on_citus:
            await citus.distribute(conn)
    return applied_now
