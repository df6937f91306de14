#!/usr/bin/env python3
"""The demo: an agent crashes mid-run and resumes behind durable-sidecar, paying for nothing twice.

1. starts a local HTTPS "paid API" that bills every call and honours Idempotency-Key;
2. starts the sidecar (`mitmdump -s addon/durable.py`) on its embedded PostgreSQL (or --dsn);
3. runs an unmodified agent (openai SDK, requests, httpx) through it; the agent SIGKILLs itself
   mid-run, and the sidecar is SIGKILLed too;
4. restarts both with the same run id and a new attempt: completed calls come back from the
   journal, the rest go live; then prints the upstream's books and the journal.

Run it with scripts/demo.sh (which prepares .venv), or: .venv/bin/python scripts/demo.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from durable_sidecar.store import database
from durable_sidecar.tools import launcher
from scripts import paid_api  # noqa: E402

STEPS = 4
CALLS_PER_STEP = 3


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def start_paid_api(workdir: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    proc, port = paid_api.spawn(workdir, tls=True)
    return proc, f"https://127.0.0.1:{port}", workdir / "tls" / "ca.pem"


def books(api: str, ca: Path) -> dict:
    return requests.get(f"{api}/_books", verify=str(ca), proxies={"https": ""}, timeout=10).json()


def run_agent(sidecar: launcher.Sidecar, bundle: Path, api: str, run: str, attempt: str, crash_after: int | None) -> int:
    args = [sys.executable, str(ROOT / "scripts" / "demo_agent.py"), "--api", api, "--steps", str(STEPS)]
    if crash_after:
        args += ["--crash-after", str(crash_after)]
    print(f"   HTTPS_PROXY={sidecar.proxy_url(run, attempt)}  SSL_CERT_FILE={bundle}", flush=True)
    return subprocess.run(args, env=launcher.agent_env(sidecar.proxy_url(run, attempt), bundle)).returncode


def show_journal(run: str, dsn: str | None, env: dict[str, str]) -> None:
    """The operator's view of the run: `durable show RUN` (replay counts are written in the background)."""
    time.sleep(0.5)
    durable = Path(sys.executable).with_name("durable")
    subprocess.run([str(durable), "show", run] + (["--dsn", dsn] if dsn else []), env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="journal in this PostgreSQL instead of the embedded one")
    parser.add_argument("--crash-after", type=int, default=7, help="the agent dies after this many calls")
    args = parser.parse_args()

    confdir = launcher.confdir_default()  # the one CA folder: $DURABLE_HOME/certs
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # the demo shows the embedded default
    options = {"durable_dsn": args.dsn} if args.dsn else {}
    run = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    total = STEPS * CALLS_PER_STEP

    with tempfile.TemporaryDirectory(prefix="durable-demo-") as tmp:
        api_proc, api, api_ca = start_paid_api(Path(tmp))
        options["ssl_verify_upstream_trusted_ca"] = str(api_ca)
        sidecar = None
        try:
            say(f"paid API at {api}: bills every call, honours Idempotency-Key")
            say("starting the sidecar: mitmdump -s addon/durable.py (journal: "
                + ("--dsn" if args.dsn else "embedded PostgreSQL, first start takes a few seconds") + ")")
            sidecar = launcher.start_sidecar(confdir, options, env=env)
            where = args.dsn and "--dsn" or f"embedded PostgreSQL in {database.durable_home() / 'pgdata'}"
            print(f"   sidecar on 127.0.0.1:{sidecar.port}; its CA in {confdir}/; journal: {where}")
            bundle = launcher.bundle_for(sidecar.ca_cert.read_bytes())

            say(f"attempt 1 of run {run}: the agent runs {STEPS} steps of {CALLS_PER_STEP} paid calls, and crashes")
            code = run_agent(sidecar, bundle, api, run, "attempt-1", args.crash_after)
            charged = books(api, api_ca)["charges"]
            print(f"   agent exit status {code} (killed); upstream has booked {charged} charges so far")

            say("the sidecar is SIGKILLed too, then started again: the journal lives in PostgreSQL")
            sidecar.kill()
            sidecar = launcher.start_sidecar(confdir, options, env=env)

            say(f"attempt 2 of run {run}: same run id, new attempt id")
            code = run_agent(sidecar, bundle, api, run, "attempt-2", None)
            if code != 0:
                raise SystemExit(f"the agent failed on resume (exit {code}); sidecar log: {sidecar.log_path}")

            ledger = books(api, api_ca)
            say("the upstream's books")
            naive = charged + total
            print(f"   {ledger['charges']} charges booked, not {naive}: "
                  f"{charged} calls before the crash were answered from the journal on resume")
            print(f"   upstream requests received: {ledger['calls']} (deduplicated by key: {ledger['deduplicated']})")
            say(f"the journal of run {run}: durable show {run}")
            show_journal(run, args.dsn, env)
            if ledger["charges"] != total:
                raise SystemExit(f"expected {total} charges, got {ledger['charges']}")
            say("done: every logical call was billed exactly once")
        finally:
            if sidecar:
                sidecar.stop()
            api_proc.kill()


if __name__ == "__main__":
    main()
