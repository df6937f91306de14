#!/usr/bin/env bash
# Arize Phoenix, the tracing backend tests/test_tracing.py sends spans to, in a venv of its own
# (.venv-phoenix): it pins packages (anthropic among them) that the test extra pins otherwise.
# Idempotent; about 80 s the first time. Usage: scripts/phoenix.sh  (after scripts/test.sh made .venv)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION=20.26.1
if [ -x "$ROOT/.venv-phoenix/bin/phoenix" ] && "$ROOT/.venv-phoenix/bin/python" -c "import phoenix, sys; sys.exit(phoenix.__version__ != '$VERSION')"; then
    exit 0
fi
PY="${DURABLE_PYTHON:-$ROOT/.venv/bin/python}"  # a Python >= 3.12: .venv's, made by scripts/test.sh
rm -rf "$ROOT/.venv-phoenix"
"$PY" -m venv "$ROOT/.venv-phoenix"
echo "installing arize-phoenix $VERSION into .venv-phoenix" >&2
PYTHONWARNINGS=ignore "$ROOT/.venv-phoenix/bin/pip" install --quiet --disable-pip-version-check "arize-phoenix==$VERSION" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
"$ROOT/.venv-phoenix/bin/phoenix" --help >/dev/null
