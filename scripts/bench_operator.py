#!/usr/bin/env python3
"""Operator commands on a big run: `durable import` of a HAR of N steps (about 3 KB each: 5,000
steps make a 16 MB file), then `durable show` (table and --json), `durable export --har` and
`--flows` of the imported run, and `durable import` of the exported flow file. Wall time of each
command, as a user runs it (a fresh process, the CLI's own start-up included).

Usage: .venv/bin/python scripts/bench_operator.py [--steps 5000] [--dsn DSN]
(a database of its own on --dsn / $DATABASE_URL / the embedded PostgreSQL, dropped at the end)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from stage import stage

DURABLE = str(Path(sys.executable).with_name("durable"))


def har(steps: int) -> dict:
    """A HAR of `steps` chat completions, each with a 1.5 KB prompt and a 1.5 KB answer."""
    entries = []
    for n in range(steps):
        prompt = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"step {n} " + "x" * 1500}]})
        answer = json.dumps({"id": f"c{n}", "choices": [{"message": {"content": "y" * 1500}}],
                             "usage": {"total_tokens": 700}})
        entries.append({
            "startedDateTime": "2026-11-01T10:00:00.000Z", "time": 12.0,
            "request": {"method": "POST", "url": "https://api.example.com/v1/chat/completions", "httpVersion": "HTTP/1.1",
                        "headers": [{"name": "content-type", "value": "application/json"}], "queryString": [],
                        "cookies": [], "headersSize": -1, "bodySize": len(prompt),
                        "postData": {"mimeType": "application/json", "text": prompt}},
            "response": {"status": 200, "statusText": "OK", "httpVersion": "HTTP/1.1",
                         "headers": [{"name": "content-type", "value": "application/json"}], "cookies": [],
                         "content": {"size": len(answer), "mimeType": "application/json", "text": answer},
                         "redirectURL": "", "headersSize": -1, "bodySize": len(answer)},
            "cache": {}, "timings": {"send": 0, "wait": 12, "receive": 0},
        })
    return {"log": {"version": "1.2", "creator": {"name": "bench_operator", "version": "1"}, "entries": entries}}


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv[1:3])} failed: {out.stderr}")
    return time.perf_counter() - started, out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--dsn")
    args = parser.parse_args()
    with stage(args.dsn, "operator") as st:
        env = {**os.environ, "COLUMNS": "120"}
        src = st.work / "big.har"
        src.write_text(json.dumps(har(args.steps)))
        mib = src.stat().st_size / 2**20
        rows = []
        seconds, out = timed([DURABLE, "import", str(src), "--run", "big", "--dsn", st.dsn], env)
        assert f"imported {args.steps} steps" in out, out
        rows.append((f"import --har ({mib:.1f} MiB)", seconds))
        seconds, out = timed([DURABLE, "show", "big", "--dsn", st.dsn], env)
        rows.append(("show (table)", seconds))
        seconds, out = timed([DURABLE, "show", "big", "--json", "--dsn", st.dsn], env)
        assert len(json.loads(out)["steps"]) == args.steps
        rows.append(("show --json", seconds))
        rows.append(("export --har", timed([DURABLE, "export", "big", "--har", str(st.work / "out.har"), "--dsn", st.dsn], env)[0]))
        rows.append(("export --flows", timed([DURABLE, "export", "big", "--flows", str(st.work / "out.flows"), "--dsn", st.dsn], env)[0]))
        rows.append(("import --flows", timed([DURABLE, "import", str(st.work / "out.flows"), "--run", "big2", "--dsn", st.dsn], env)[0]))
        rows.append(("runs", timed([DURABLE, "runs", "--dsn", st.dsn], env)[0]))
    print(f"{args.steps} steps; wall time of each command (a fresh process each)")
    for name, seconds in rows:
        print(f"  {name:<28} {seconds:>7.2f} s")


if __name__ == "__main__":
    main()
