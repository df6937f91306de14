#!/usr/bin/env bash
# The code checks CI runs: ruff (lint and format) and mypy on addon/, configured in pyproject.toml.
. "$(dirname "${BASH_SOURCE[0]}")/venv.sh" test
cd "$ROOT"
"$PY" -m ruff check addon
"$PY" -m ruff format --check addon
"$PY" -m mypy
