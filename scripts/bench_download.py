#!/usr/bin/env python3
"""Download a large body through the sidecar and report the proxy's peak memory, next to bare mitmdump.

The sidecar streams bodies over `durable_body_cap` (default 16 MiB) through a capped tee, so its
memory must not grow with the body. Bare mitmdump buffers whole bodies unless told
`stream_large_bodies`, so it runs twice: as installed, and with `stream_large_bodies=1m`.

Usage: .venv/bin/python scripts/bench_download.py [--mb 300] [--dsn DSN]
(journal: --dsn, else $DATABASE_URL, else the embedded PostgreSQL)
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from durable_sidecar.tools import launcher
from scripts import paid_api  # noqa: E402
from scripts.stage import status_kib  # noqa: E402

PIECE = bytes(range(256)) * 256  # what the paid API's /v1/download repeats


def expected_digest(size: int) -> str:
    digest = hashlib.sha256()
    for offset in range(0, size, len(PIECE)):
        digest.update(PIECE[: size - offset])
    return digest.hexdigest()


def download(proxy_port: int, url: str) -> tuple[int, str, float]:
    proxy = f"http://bench:{time.time_ns()}@127.0.0.1:{proxy_port}"
    digest, size = hashlib.sha256(), 0
    start = time.monotonic()
    with requests.get(url, proxies={"http": proxy}, stream=True, timeout=300) as r:
        r.raise_for_status()
        for chunk in r.iter_content(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest(), time.monotonic() - start


def measure(name: str, args: list[str], url: str, size: int, want: str, workdir: Path) -> dict:
    port = launcher.free_port()
    log = workdir / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args + ["--listen-host", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "listening" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start:\n{log.read_text()}")
            time.sleep(0.05)
        download(port, url.replace(f"mb={size // 2**20}", "mb=1"))  # warm up (and open the journal)
        before = status_kib(proc.pid, "VmRSS")
        got, digest, seconds = download(port, url)
        peak = status_kib(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(10)
    return {
        "name": name,
        "intact": got == size and digest == want,
        "rss_before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "growth_mib": (peak - before) / 1024,
        "mib_per_s": size / 2**20 / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--dsn")
    args = parser.parse_args()
    size = args.mb * 2**20
    want = expected_digest(size)

    with tempfile.TemporaryDirectory(prefix="durable-bench-") as tmp:
        workdir = Path(tmp)
        api, api_port = paid_api.spawn(workdir)
        try:
            url = f"http://127.0.0.1:{api_port}/v1/download?mb={args.mb}"
            base = [launcher.mitmdump(), "--set", f"confdir={workdir / 'conf'}"]
            sidecar = base + ["-s", str(launcher.SCRIPT)] + (["--set", f"durable_dsn={args.dsn}"] if args.dsn else [])
            rows = [
                measure("bare mitmdump", base, url, size, want, workdir),
                measure("bare mitmdump, stream_large_bodies=1m", base + ["--set", "stream_large_bodies=1m"], url, size, want, workdir),
                measure("durable sidecar", sidecar, url, size, want, workdir),
            ]
        finally:
            api.kill()

    print(f"\n{args.mb} MiB download through each proxy (peak = VmHWM of the proxy process)\n")
    print(f"{'proxy':<40} {'intact':>6} {'RSS before':>11} {'peak':>9} {'growth':>9} {'MiB/s':>7}")
    for r in rows:
        print(f"{r['name']:<40} {str(r['intact']):>6} {r['rss_before_mib']:>9.1f}Mi {r['peak_mib']:>7.1f}Mi "
              f"{r['growth_mib']:>7.1f}Mi {r['mib_per_s']:>7.1f}")


if __name__ == "__main__":
    main()
