# Sourced by demo.sh and test.sh: find a Python >= 3.12 and prepare .venv with the given extra.
# Usage: . scripts/venv.sh EXTRA   (sets PY to the venv's python)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRA="$1"

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
    local candidates=()
    [ -n "${DURABLE_PYTHON:-}" ] && candidates+=("$DURABLE_PYTHON")
    candidates+=(python3.13 python3.12 python3)
    local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
    for dir in "$pyenv_root"/versions/3.1[2-9]* /usr/local/bin /opt/homebrew/bin; do
        for exe in "$dir"/bin/python3 "$dir"/python3.13 "$dir"/python3.12; do
            [ -x "$exe" ] && candidates+=("$exe")
        done
    done
    for candidate in "${candidates[@]}"; do
        if python_ok "$candidate"; then command -v "$candidate"; return 0; fi
    done
    echo "durable-sidecar needs Python >= 3.12: install python3.12 or python3.13, or set DURABLE_PYTHON=/path/to/python" >&2
    return 1
}

if [ ! -x "$ROOT/.venv/bin/python" ] || ! python_ok "$ROOT/.venv/bin/python"; then
    BASE_PY="$(find_python)"
    echo "creating .venv with $BASE_PY ($("$BASE_PY" --version))" >&2
    rm -rf "$ROOT/.venv"
    "$BASE_PY" -m venv "$ROOT/.venv"
fi
PY="$ROOT/.venv/bin/python"

# reinstall only when pyproject.toml changed since the last install of this extra
STAMP="$ROOT/.venv/.installed-$EXTRA-$(cksum < "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ]; then
    echo "installing durable-sidecar[$EXTRA] into .venv" >&2
    "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    # PYTHONWARNINGS: setuptools' boxed "Editable installation" notice says nothing a user can act on
    PYTHONWARNINGS=ignore "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT[$EXTRA]" >&2
    touch "$STAMP"
fi
