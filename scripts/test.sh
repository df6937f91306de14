#!/usr/bin/env bash
# The tests. PostgreSQL: $DATABASE_URL if set, else testcontainers (when Docker answers), else embedded.
# Extra arguments go to pytest (e.g. -k replay, -x).
. "$(dirname "${BASH_SOURCE[0]}")/venv.sh" test
cd "$ROOT"
exec "$PY" -m pytest "$@"
