#!/usr/bin/env bash
# Mutation testing: mutmut changes one small thing at a time in a module where a bug costs money or
# leaks data (an operator, a constant, a condition), runs the tests that cover that module, and
# counts the mutants no test noticed. Not run by CI (hours for all modules); docs/development.md
# gives the last result and the survivors judged harmless.
#
# Usage: scripts/mutate.sh [MODULE ...]     e.g. scripts/mutate.sh cursor fingerprint
#   no MODULE: every module below. Results: .mutmut/MODULE.cache, one per module (to see one
#   module's survivors: `cp .mutmut/MODULE.cache .mutmut-cache; .venv-mutmut/bin/mutmut results`,
#   then `.venv-mutmut/bin/mutmut show ID`). mutmut edits addon/*/*.py in place and restores each file
#   after its mutant; do not edit the checkout (or kill -9 the script) meanwhile. Set DATABASE_URL
#   for speed (else each test run starts the embedded PostgreSQL). MUTATE_FAST=1: the fast tier
#   only (a module's survivors are then read by hand, or run again without it: `mutmut run ID`).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/venv.sh" test
cd "$ROOT"

# mutmut 2 mutates the files in place, which is what this layout needs: the package is
# durable_sidecar, its code in addon/ (mutmut 3 copies the code elsewhere and cannot map the name).
# It lives in a venv of its own, beside the project's.
if [ ! -x .venv-mutmut/bin/mutmut ]; then
    "$("$PY" -c 'import sys; print(sys._base_executable)')" -m venv .venv-mutmut
    .venv-mutmut/bin/pip install --quiet --disable-pip-version-check "mutmut==2.5.1"
fi

# module -> the tests that hold it: "FAST | SLOW". The fast ones (unit tests, one process) run first
# and most mutants die there in a second or two; only a mutant they miss pays for the slow ones
# (live sidecars, two workers)
declare -A TESTS=(
    [cursor]="tests/test_cursor.py | tests/test_journal_statements.py"
    [fingerprint]="tests/test_fingerprint_pinned.py tests/test_fingerprint.py | tests/test_fingerprint_v2.py tests/test_properties.py"
    [inflight]="tests/test_inflight.py | tests/test_exactly_once.py tests/test_sidecar_unit.py"
    [redaction]="tests/test_redaction.py | tests/test_security.py"
    [crypto]="tests/test_crypto.py | tests/test_security.py"
    [bodies]="tests/test_bodies.py | tests/test_body_bounds.py"
    [sessions]="tests/test_sessions.py | tests/test_mcp.py"
    [conversations]="tests/test_conversations.py | tests/test_websocket.py tests/test_streams.py"
    [lease]="tests/test_lease.py | tests/test_journal_statements.py"
    [repairs]="tests/test_repairs.py | tests/test_connection_failures.py"
    [lifecycle]="tests/test_lifecycle.py tests/test_sidecar_unit.py | tests/test_exactly_once.py tests/test_crash_resume.py tests/test_agent_failures.py"
    [journal]="tests/test_journal_statements.py tests/test_lifecycle.py | tests/test_lease.py tests/test_journal_db.py tests/test_exactly_once.py"
    [ui]="tests/test_ui_pages.py | tests/test_ui.py"
    [launcher]="tests/test_launcher_parts.py | tests/test_launcher.py"
    [runner]="tests/test_runner.py | tests/test_launcher.py"
)
ORDER=(cursor fingerprint inflight redaction crypto bodies sessions conversations lease repairs lifecycle journal ui launcher runner)
modules=("$@")
[ ${#modules[@]} -eq 0 ] && modules=("${ORDER[@]}")

for module in "${modules[@]}"; do
    tests="${TESTS[$module]:?unknown module $module (known: ${ORDER[*]})}"
    fast="${tests%%|*}" slow="${tests#*|}"
    path=$(ls addon/*/"$module".py)
    echo "== $path: $fast, then $slow" >&2
    # a mutant that hangs the tests (a loop that never ends) is caught when its tier runs out of
    # time: mutmut's own timeout ends only the shell, not the pytest it started
    pytest="timeout -k 5 ${MUTATE_TIER_TIMEOUT:-300} $PY -m pytest -x -q -p no:cacheprovider"
    runner="$pytest -p no:xdist $fast && $pytest -n 2 $slow"
    [ -z "${fast// }" ] && runner="$pytest -n 2 $slow"
    [ -n "${MUTATE_FAST:-}" ] && [ -n "${fast// }" ] && runner="$pytest -p no:xdist $fast"
    # a cache of its own per module: mutmut 2.5.1 reusing one cache across modules stops with
    # "Mutant.line is required" part-way through. The module's last cache is taken up again: its
    # killed mutants stay killed, the rest are tested again when the tests changed (MUTATE_FRESH=1:
    # start over)
    rm -f .mutmut-cache
    if [ -f ".mutmut/$module.cache" ] && [ -z "${MUTATE_FRESH:-}" ]; then cp ".mutmut/$module.cache" .mutmut-cache; fi
    # mutmut counts a mutant killed only on exit code 1; a mutant that breaks the import (pytest's 2)
    # is killed too
    .venv-mutmut/bin/mutmut run --paths-to-mutate "$path" --tests-dir tests \
        --runner "bash -c '($runner) || exit 1'" \
        || true  # its exit code reports survivors: the table below says it all
    .venv-mutmut/bin/mutmut results || true
    mkdir -p .mutmut && mv .mutmut-cache ".mutmut/$module.cache"
done
"$PY" - <<'EOF'
"""The kill rate per module, from each module's mutmut cache."""
import pathlib
import sqlite3

table: dict[str, dict[str, int]] = {}
for cache in sorted(pathlib.Path(".mutmut").glob("*.cache")):
    rows = sqlite3.connect(cache).execute(
        "SELECT SourceFile.filename, Mutant.status, count(*) FROM Mutant JOIN Line ON Mutant.line = Line.id"
        " JOIN SourceFile ON Line.sourcefile = SourceFile.id GROUP BY 1, 2"
    ).fetchall()
    for filename, status, n in rows:
        table.setdefault(filename, {})[status] = n
# a mutant that makes the tests hang (a timeout) is caught too
print(f"{'module':36} {'mutants':>8} {'killed':>7} {'timeout':>8} {'survived':>9} {'untested':>9} {'caught':>7}")
for filename, counts in sorted(table.items()):
    total = sum(counts.values())
    caught = counts.get("ok_killed", 0) + counts.get("bad_timeout", 0)
    print(f"{filename:36} {total:8} {counts.get('ok_killed', 0):7} {counts.get('bad_timeout', 0):8}"
          f" {counts.get('bad_survived', 0) + counts.get('ok_suspicious', 0):9} {counts.get('untested', 0):9}"
          f" {caught / total:7.0%}")
EOF
