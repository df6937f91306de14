#!/usr/bin/env bash
# The main job: an agent crashes mid-run and resumes behind the sidecar, on its embedded PostgreSQL.
# Extra arguments go to scripts/demo.py (e.g. --dsn postgresql://... or --crash-after 5).
. "$(dirname "${BASH_SOURCE[0]}")/venv.sh" demo
exec "$PY" "$ROOT/scripts/demo.py" "$@"
