#!/usr/bin/env bash
# The tests. PostgreSQL: $DATABASE_URL if set, else testcontainers (when Docker answers), else embedded.
# Extra arguments go to pytest (e.g. -k replay, -x). Two test processes (pytest-xdist), each with a
# database, an upstream and sidecars of its own; DURABLE_TEST_WORKERS=0 runs everything in one.
. "$(dirname "${BASH_SOURCE[0]}")/venv.sh" test
cd "$ROOT"
exec "$PY" -m pytest -n "${DURABLE_TEST_WORKERS:-2}" "$@"
