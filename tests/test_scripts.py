"""The benchmark scripts run (tiny sizes) so they cannot rot; they time nothing that is asserted."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def test_download_benchmark_smoke(pg_dsn: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_download.py"), "--mb", "2", "--dsn", pg_dsn],
        capture_output=True, text=True, timeout=180, env={**os.environ},
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith(("bare", "durable"))]
    assert len(rows) == 3 and all(" True " in row for row in rows)
