"""The benchmark scripts run (tiny sizes) so they cannot rot; they time nothing that is asserted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, fleet_benchmark, on_citus


def test_download_benchmark_smoke(pg_dsn: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_download.py"), "--mb", "2", "--dsn", pg_dsn],
        capture_output=True, text=True, timeout=180, env={**os.environ},
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith(("bare", "durable"))]
    assert len(rows) == 3 and all(" True " in row for row in rows)


def test_bench_smoke(pg_dsn: str, tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--dsn", pg_dsn, "--chart", str(tmp_path / "c.png")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "sidecar replay" in out.stdout and "two-commit floor" in out.stdout and "floor / bare" in out.stdout
    assert "proxy CPU" in out.stdout and "pg CPU" in out.stdout
    assert (tmp_path / "c.png").exists()


def test_fleet_benchmark_smoke(pg_dsn: str) -> None:
    """Both layouts, each beside its floor (clients committing straight to PostgreSQL): every step
    journaled once, seqs dense, the ratio to the floor and the CPU split printed."""
    if on_citus(pg_dsn):
        pytest.skip("hash partitions are for one PostgreSQL; test_citus.py runs this benchmark's --citus")
    rows, out = fleet_benchmark("--sidecars", "2", "--agents", "4", "--calls", "10", "--layouts", "0,2", "--rounds", "1",
                                "--dsn", pg_dsn)
    assert set(rows) == {(layout, path) for layout in ("one table", "2 hash partitions")
                         for path in ("floor", "sidecars")}, out
    assert all(row[0] == "40" and row[-1] == "True" for row in rows.values()), out  # steps, seqs dense
    assert all(float(row[2]) > 0 for row in rows.values()), out  # the ratio to the floor
    assert "CPU ms/step: proxies" in out


def test_fuzz_short_run(pg_server: str) -> None:
    """The fuzzer's CI variant: 10 s of hostile HTTP; it exits non-zero on a traceback, an
    unjournaled forward, a control-client error, or memory past its bound."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz.py"), "--seconds", "10", "--dsn", pg_server],
        capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "unjournaled forwards:    0" in out.stdout and "tracebacks in its log:   0" in out.stdout


def test_big_body_benchmark_smoke(pg_dsn: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_bigbodies.py"), "--seconds", "2", "--mb", "2", "--dsn", pg_dsn],
        capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr
    assert "off the loop" in out.stdout and "inline" in out.stdout


def test_sse_benchmark_smoke(pg_dsn: str) -> None:
    """Every path answers the stream, and bare mitmdump's buffering shows: its first byte waits for
    the upstream's pause, a streaming path's does not."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_sse.py"), "--requests", "5", "--rounds", "1",
         "--pause-ms", "300", "--warm", "1", "--dsn", pg_dsn],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    p50 = {line[:32].strip(): float(line[32:].split()[0]) for line in out.stdout.splitlines()
           if line.startswith(("bare", "floor", "sidecar"))}
    assert set(p50) == {"bare (buffers)", "bare, streaming", "bare, streaming, fast dispatch",
                        "floor, streaming, fast dispatch", "sidecar recording", "sidecar replay"}, out.stdout
    assert p50["bare (buffers)"] >= 300 > p50["bare, streaming"] and p50["sidecar recording"] < 300, out.stdout


def test_index_benchmark_smoke(pg_dsn: str) -> None:
    """The new attempt's index read now walks the digest index with no sort; the old query sorted."""
    if on_citus(pg_dsn):
        pytest.skip("a plan on one PostgreSQL; on Citus a worker plans the run's read (test_journal_statements)")
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_index.py"), "--steps", "2000", "--repeat", "1", "--dsn", pg_dsn],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = {line[:34].strip(): line[34:].split() for line in out.stdout.splitlines() if line.startswith(("now", "before"))}
    now, before = rows["now: stored digest, index order"], rows["before: sha256 per step, sorted"]
    assert now[1] == "False" and "durable_steps_digest" in now and before[1] == "True", out.stdout


def test_journal_benchmark_smoke(pg_dsn: str) -> None:
    """bench_journal.py reports its three paths and the answer's cost per thousand steps of a run."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_journal.py"), "--steps", "50", "--rounds", "1",
         "--long", "2000", "--dsn", pg_dsn],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = {line[:34].strip(): [float(v) for v in line[34:].split()] for line in out.stdout.splitlines()
            if line.startswith(("Journal", "same", "floor"))}
    assert set(rows) == {"Journal (record, complete)", "same statements, one connection", "floor's INSERT and UPDATE"}
    assert all(len(values) == 3 and values[0] > 0 for values in rows.values()), out.stdout
    assert len([line for line in out.stdout.splitlines() if line.strip().startswith("steps ")]) == 2, out.stdout
