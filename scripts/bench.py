#!/usr/bin/env python3
"""Side by side, in one run: bare mitmdump, `mitmdump -w` (recorder), the two-commit floor (an addon
doing only the two trivial commits per call the design needs: scripts/floor_addon.py), the sidecar
recording, `mitmdump --server-replay` (replayer) and the sidecar replaying, plus concurrency,
journal scale and the cost of one journal write. Prints ratios against bare mitmdump, the CPU per
request of each proxy and of PostgreSQL (read from /proc, so PostgreSQL must run on this machine to
be counted), and writes a PNG chart.

Usage: .venv/bin/python scripts/bench.py [--requests 400] [--rounds 5] [--scale 100,10000,100000]
       [--concurrency 1,8,32] [--dsn DSN] [--chart docs/bench.png] [--quick] [--redraw docs/bench.json]
(journal: --dsn, else $DATABASE_URL, else the embedded PostgreSQL; a database of its own is created
and dropped on that server)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from durable_sidecar.store import database
from durable_sidecar.tools import launcher

BODY = b'{"model": "bench", "messages": [{"role": "user", "content": "%d"}]}'
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ANSWER = b'{"id": "x", "choices": [{"message": {"content": "ok"}}], "usage": {"total_tokens": 3}}'


# -- a fast local upstream ------------------------------------------------------------------------


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            writer.write(response)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def start_upstream(serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]] = _serve) -> int:
    """A local upstream on a thread of its own, answering with `serve`; its port."""
    ready: list[int] = []

    def run() -> None:
        async def main() -> None:
            server = await asyncio.start_server(serve, "127.0.0.1", 0)
            ready.append(server.sockets[0].getsockname()[1])
            await server.serve_forever()

        asyncio.run(main())

    threading.Thread(target=run, daemon=True).start()
    while not ready:
        time.sleep(0.01)
    return ready[0]


# -- proxies --------------------------------------------------------------------------------------


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    port: int

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_s(self) -> float:
        return process_cpu_s(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(15)


def process_cpu_s(pid: int | str) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def postgres_cpu_s() -> float:
    """CPU seconds used by this machine's PostgreSQL processes (the journal is on loopback)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "postgres":
                total += process_cpu_s(entry.name)
        except OSError:
            pass  # exited meanwhile
    return total


def start_proxy(args: list[str], confdir: Path, log: Path, env: dict[str, str] | None = None) -> Proxy:
    port = launcher.free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [launcher.mitmdump(), "--set", f"confdir={confdir}", "--listen-host", "127.0.0.1", "-p", str(port),
             "--set", "termlog_verbosity=warn", "--set", "flow_detail=0", *args],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
            return Proxy(process, port)
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"proxy {args} exited:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
    raise SystemExit(f"proxy {args} did not start")


def sidecar_args(dsn: str) -> list[str]:
    return ["-s", str(launcher.SCRIPT), "--set", f"durable_dsn={dsn}"]


DISPATCH_ARGS = ["-s", str(ROOT / "scripts" / "dispatch_addon.py")]  # bare mitmdump + the sidecar's hook dispatch


def floor_args(dsn: str, thread: bool = False) -> list[str]:
    return ["-s", str(ROOT / "scripts" / "floor_addon.py"), "--set", f"floor_dsn={dsn}",
            "--set", f"floor_thread={str(thread).lower()}"]


# -- clients --------------------------------------------------------------------------------------


def client_loop(proxy_port: int, upstream: int, run: str, attempt: str, ids: range) -> list[float]:
    """Sequential keep-alive POSTs through the proxy; returns latencies in ms."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=30)
    auth = "Basic " + base64.b64encode(f"{run}:{attempt}".encode()).decode()
    url = f"http://127.0.0.1:{upstream}/v1/chat/completions"
    latencies = []
    for i in ids:
        body = BODY % i
        start = time.perf_counter()
        conn.request("POST", url, body=body, headers={"Content-Type": "application/json", "Proxy-Authorization": auth})
        response = conn.getresponse()
        response.read()
        latencies.append((time.perf_counter() - start) * 1000)
        if response.status != 200:
            raise SystemExit(f"status {response.status} through the proxy: {response.headers}")
    conn.close()
    return latencies


def run_threads(threads: list[threading.Thread]) -> float:
    """Start them all, wait for them all; the seconds it took."""
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def drive(
    proxy: Proxy, upstream: int, run: str, attempt: str, requests: int, clients: int = 1, offset: int = 0
) -> dict[str, float]:
    """Requests through `proxy`: req/s, p50 and p99 ms, and the CPU ms per request that the proxy
    process and PostgreSQL spent (what bounds throughput on a machine this size)."""
    per_client = requests // clients
    results: list[list[float]] = [[] for _ in range(clients)]

    def work(c: int) -> None:
        results[c] = client_loop(proxy.port, upstream, f"{run}-{c}" if clients > 1 else run, attempt,
                                 range(offset + c * per_client, offset + (c + 1) * per_client))

    proxy_cpu, pg_cpu = proxy.cpu_s(), postgres_cpu_s()
    elapsed = run_threads([threading.Thread(target=work, args=(c,)) for c in range(clients)])
    proxy_cpu, pg_cpu = proxy.cpu_s() - proxy_cpu, postgres_cpu_s() - pg_cpu
    latencies = sorted(x for r in results for x in r)
    return {
        "rps": len(latencies) / elapsed,
        "p50": latencies[len(latencies) // 2],
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "proxy_cpu_ms": proxy_cpu * 1000 / len(latencies),
        "pg_cpu_ms": pg_cpu * 1000 / len(latencies),
    }


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


# -- the sections ---------------------------------------------------------------------------------


def plain_paths(dsn: str, recorder: Path | None = None) -> dict[str, list[str]]:
    """The paths measured beside the sidecar, with their mitmdump arguments: bare mitmdump, mitmproxy's
    recorder (writing `recorder`, when given) and the two-commit floors, each also on the sidecar's
    hook dispatch."""
    return {
        "bare": [],
        "bare, fast dispatch": DISPATCH_ARGS,
        **({"mitmdump -w": ["-w", str(recorder)]} if recorder else {}),
        "two-commit floor": floor_args(dsn),
        "floor, thread": floor_args(dsn, thread=True),
        "floor, fast dispatch": DISPATCH_ARGS + floor_args(dsn),
    }


def warm(args: list[str], work: Path, name: str, upstream: int, env: dict[str, str] | None = None) -> Proxy:
    """A fresh proxy, warmed by 50 calls nobody measures (its imports, connections, the journal's
    pool): each round starts its own, so no path keeps an unlucky process for the whole run."""
    proxy = start_proxy(args, work / "conf", work / f"{name.replace(', ', '-').replace(' ', '-')}.log", env)
    drive(proxy, upstream, f"warm-{uuid.uuid4().hex[:8]}", "warm", 50)
    return proxy


def warm_all(paths: dict[str, list[str]], dsn: str, work: Path, upstream: int) -> dict[str, Proxy]:
    """Every path of `paths` and the sidecar ("sidecar"), fresh and warmed."""
    return {name: warm(args, work, name, upstream) for name, args in {**paths, "sidecar": sidecar_args(dsn)}.items()}


def sequential(dsn: str, upstream: int, work: Path, requests: int, rounds: int) -> dict[str, dict[str, float]]:
    """The judged comparison: every path, in interleaved rounds of fresh proxies, so drift and an
    unlucky process hit them all alike."""
    plain = list(plain_paths(dsn, work / "recorder.flows"))
    results: dict[str, list[dict[str, float]]] = {
        k: [] for k in (*plain, "sidecar record", "--server-replay", "sidecar replay")
    }
    for r in range(rounds):
        flows = work / f"round{r}.flows"
        proxies = warm_all(plain_paths(dsn, flows), dsn, work, upstream)
        try:
            for name in plain:
                results[name].append(drive(proxies[name], upstream, "bench", "x", requests))
            proxies["mitmdump -w"].stop()  # its flow file complete: what --server-replay serves
            run = f"bench-{uuid.uuid4().hex[:8]}"
            results["sidecar record"].append(drive(proxies["sidecar"], upstream, run, "record", requests))
            proxies["--server-replay"] = warm(["--server-replay", str(flows), "--set", "server_replay_extra=500",
                                               "--set", "server_replay_reuse=true"], work, "replayer", upstream)
            results["--server-replay"].append(drive(proxies["--server-replay"], upstream, "bench", "x", requests))
            results["sidecar replay"].append(drive(proxies["sidecar"], upstream, run, "replay", requests))
        finally:
            for proxy in proxies.values():
                if proxy.process.poll() is None:
                    proxy.stop()
    return {k: median_of(v) for k, v in results.items()}


def concurrency(
    dsn: str, upstream: int, work: Path, requests: int, levels: list[int], rounds: int
) -> dict[str, dict[int, dict[str, float]]]:
    """drive() at each level of concurrency, median of `rounds` interleaved rounds of fresh proxies."""
    plain = plain_paths(dsn)
    samples: dict[str, dict[int, list[dict[str, float]]]] = {
        k: {c: [] for c in levels} for k in (*plain, "sidecar record", "sidecar replay")
    }
    for _ in range(rounds):
        proxies = warm_all(plain, dsn, work, upstream)
        try:
            for clients in levels:
                n = max(requests, clients * 25)
                for name in plain:
                    samples[name][clients].append(drive(proxies[name], upstream, "bench", "x", n, clients))
                run = f"conc-{uuid.uuid4().hex[:8]}"
                samples["sidecar record"][clients].append(drive(proxies["sidecar"], upstream, run, "record", n, clients))
                samples["sidecar replay"][clients].append(drive(proxies["sidecar"], upstream, run, "replay", n, clients))
        finally:
            for proxy in proxies.values():
                proxy.stop()
    return {k: {c: median_of(v) for c, v in series.items()} for k, series in samples.items()}


def fill_run(dsn: str, run: str, steps: int, upstream: int) -> None:
    """Journal a run of `steps` completed steps directly (recording 100,000 through a proxy takes minutes)."""
    from durable_sidecar.matching import fingerprint

    url = f"http://127.0.0.1:{upstream}/v1/chat/completions"
    rows = []
    for i in range(steps):
        parts = fingerprint.RequestParts("POST", "http", "127.0.0.1", upstream, "/v1/chat/completions",
                                         [("Content-Type", "application/json")], BODY % i)
        env = fingerprint.envelope(parts)
        rows.append((run, i + 1, f"v1:{fingerprint.fingerprint(env)}", json.dumps(env)))
    headers = json.dumps([["Content-Type", "application/json"], ["Content-Length", str(len(ANSWER))]])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO durable_runs (id, last_seq) VALUES (%s, %s)", (run, steps))
        with conn.cursor().copy(
            "COPY durable_steps (run_id, seq, fingerprint, fp_version, occurrence, state, attempt, method, url,"
            " envelope, request_headers, request_body, status, reason, http_version, response_headers, response_body,"
            " completed_at) FROM STDIN"
        ) as copy:
            for run_id, seq, fp, env in rows:
                copy.write_row((run_id, seq, fp, 1, 0, "completed", "fill", "POST", url, env, "[]", BODY % (seq - 1),
                                200, "OK", "HTTP/1.1", headers, ANSWER, "now"))


def scale(dsn: str, upstream: int, work: Path, sizes: list[int], sample: int) -> dict[int, dict[str, float]]:
    """Resuming runs of each size, as an agent does: a new attempt replays the run from its start,
    its first answer timed alone (the run's index arrives meanwhile), then `sample` more answers.
    Medians of 3 attempts; the sidecar's memory with every index held."""
    out = {}
    sidecar = start_proxy(sidecar_args(dsn), work / "conf", work / "sidecar-s.log")
    try:
        client_loop(sidecar.port, upstream, "scale-warm-up", "w", range(0, 1))  # the pool's start is not a run's
        for size in sizes:
            run = f"scale-{size}-{uuid.uuid4().hex[:6]}"
            fill_run(dsn, run, size, upstream)
            firsts, p50s = [], []
            for n in range(3):
                firsts.append(client_loop(sidecar.port, upstream, run, f"resume-{n}", range(0, 1))[0])
                p50s.append(drive(sidecar, upstream, run, f"resume-{n}", sample, offset=1)["p50"])
            out[size] = {"first_ms": statistics.median(firsts), "p50": statistics.median(p50s),
                         "rss_mib": sidecar.rss_mib()}
    finally:
        sidecar.stop()
    return out


def journal_write_floor(dsn: str, n: int = 300) -> float:
    """p50 of one INSERT commit on loopback: the physical floor of a journal write. A logged table
    (a TEMP one skips the WAL flush that every journal commit pays)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_commit (id int PRIMARY KEY, payload text)")
        times = []
        for i in range(n):
            start = time.perf_counter()
            conn.execute("INSERT INTO bench_commit VALUES (%s, %s)", (i, "x" * 200))
            times.append((time.perf_counter() - start) * 1000)
        conn.execute("DROP TABLE bench_commit")
    return statistics.median(times)


# -- main -----------------------------------------------------------------------------------------


def targets(seq: dict[str, dict[str, float]], conc: dict[str, dict[int, dict[str, float]]],
            scaled: dict[int, dict[str, float]]) -> list[tuple[str, float, str, bool]]:
    """The performance rounds' targets against this run: (what, measured, target, met). Recording is
    judged against the two-commit floor on the same hook dispatch (round 3)."""
    top = max(conc["bare"])
    record, floor = seq["sidecar record"], seq["floor, fast dispatch"]
    replay, replayer = seq["sidecar replay"], seq["--server-replay"]
    first = max(r["first_ms"] for r in scaled.values())
    return [
        ("recording p50 / floor p50 (same dispatch), sequential", record["p50"] / floor["p50"], "<= 1.15",
         record["p50"] <= 1.15 * floor["p50"]),
        (f"recording req/s / bare req/s, {top} agents", conc["sidecar record"][top]["rps"] / conc["bare"][top]["rps"],
         ">= 0.8", conc["sidecar record"][top]["rps"] >= 0.8 * conc["bare"][top]["rps"]),
        ("replay req/s / --server-replay req/s", replay["rps"] / replayer["rps"], ">= 1.0", replay["rps"] >= replayer["rps"]),
        ("replay p50 / --server-replay p50", replay["p50"] / replayer["p50"], "<= 1.0", replay["p50"] <= replayer["p50"]),
        (f"first answer of an attempt, longest run ({max(scaled)} steps), ms", first, "< 50", first < 50),
    ]


def chart(path: Path, seq: dict[str, dict[str, float]], conc: dict[str, dict[int, dict[str, float]]],
          scaled: dict[int, dict[str, float]]) -> None:
    """Every path of the tables, with the two-commit floor and the targets drawn as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.8))
    names = list(seq)
    left.bar(names, [seq[n]["p50"] for n in names],
             color=["#888", "#666", "#aaa", "#cc9", "#dd8", "#bb7", "#2a7", "#99c", "#27a"])
    bare = seq["bare"]["p50"]
    left.axhline(seq["two-commit floor"]["p50"], color="#a80", linestyle=":", label="two-commit floor")
    left.axhline(1.5 * bare, color="black", linestyle="--", label="target: recording <= 1.5x bare")
    left.axhline(seq["--server-replay"]["p50"], color="black", linestyle="-.", label="target: replay <= --server-replay")
    left.set_ylabel("p50 latency, ms (lower is better)")
    left.set_title("sequential keep-alive POSTs")
    plt.setp(left.get_xticklabels(), rotation=35, ha="right")
    left.legend(fontsize=7, loc="upper left")
    for name, series in conc.items():
        levels = sorted(series)
        style = {"linestyle": ":"} if "floor" in name else {}
        middle.plot(levels, [series[c]["rps"] for c in levels], marker="o", label=name, **style)
    levels = sorted(conc["bare"])
    middle.plot(levels, [0.8 * conc["bare"][c]["rps"] for c in levels], color="black", linestyle="--",
                label="target: recording >= 0.8x bare")
    middle.set_xlabel("concurrent clients")
    middle.set_ylabel("requests/s (higher is better)")
    middle.set_title("throughput under concurrency")
    middle.legend(fontsize=7)
    sizes = sorted(scaled)
    right.plot(sizes, [scaled[n]["first_ms"] for n in sizes], marker="o", label="first answer of an attempt")
    right.plot(sizes, [scaled[n]["p50"] for n in sizes], marker="o", label="replay p50 after it")
    right.axhline(50, color="black", linestyle="--", label="target: first answer < 50 ms")
    right.set_xscale("log")
    right.set_xlabel("steps in the run")
    right.set_ylabel("ms")
    right.set_title("resuming a long run")
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def startup(dsn: str, work: Path, rounds: int, embedded: bool = True) -> dict[str, float]:
    """Wall time of `durable run -- true` (the launcher's own cost around an agent that does nothing),
    on a DSN and on the embedded PostgreSQL with its data directory in place, beside what any
    per-command proxy pays: bare mitmdump from exec to listening, then stopped. Medians, ms."""
    durable = str(Path(sys.executable).with_name("durable"))
    home = work / "startup-home"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | {"DURABLE_HOME": str(home)}
    if embedded:  # its data directory made first, and kept up between rounds
        subprocess.run([durable, "db", "start"], env=env, check=True, capture_output=True)

    def timed(argv: list[str]) -> float:
        started = time.perf_counter()
        subprocess.run(argv, env=env, check=True, capture_output=True)
        return (time.perf_counter() - started) * 1000

    def bare_mitmdump() -> float:
        port = launcher.free_port()
        started = time.perf_counter()
        proc = subprocess.Popen([launcher.mitmdump(), "-p", str(port), "--set", f"confdir={home / 'certs'}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
                break
            except OSError:
                time.sleep(0.01)
        proc.send_signal(2)
        proc.wait()
        return (time.perf_counter() - started) * 1000

    samples: dict[str, list[float]] = {"true alone": [], "bare mitmdump start+stop": [],
                                       "durable run -- true (DSN)": [], "durable run -- true (embedded)": [],
                                       "durable run --proxy -- true": []}
    running = launcher.start_sidecar(home / "certs", {"durable_dsn": dsn}, log_path=work / "startup-proxy.log")
    try:
        for _ in range(rounds):
            samples["true alone"].append(timed(["true"]))
            samples["bare mitmdump start+stop"].append(bare_mitmdump())
            samples["durable run -- true (DSN)"].append(timed([durable, "run", "--run", "bench-start", "--dsn", dsn, "--", "true"]))
            if embedded:
                samples["durable run -- true (embedded)"].append(timed([durable, "run", "--run", "bench-start", "--", "true"]))
            samples["durable run --proxy -- true"].append(timed([durable, "run", "--run", "bench-start", "--dsn", dsn,
                                                                 "--proxy", f"http://127.0.0.1:{running.port}", "--", "true"]))
    finally:
        running.stop()
        subprocess.run([durable, "db", "stop"], env=env, capture_output=True)
    return {name: statistics.median(values) for name, values in samples.items() if values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--scale", default="100,10000,100000")
    parser.add_argument("--dsn")
    parser.add_argument("--chart", default=str(ROOT / "docs" / "bench.png"))
    parser.add_argument("--startup-rounds", type=int, default=5, help="rounds of the start-up measurement")
    parser.add_argument("--quick", action="store_true", help="a tiny run that only proves the script works")
    parser.add_argument("--redraw", metavar="JSON", help="measure nothing: report and chart the results file of a run")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds, args.concurrency, args.scale, args.startup_rounds = 20, 1, "1,2", "10,50", 1

    if args.redraw:  # the report and chart of a run measured before, from its results file
        results = json.loads(Path(args.redraw).read_text())
        args.requests, args.rounds, args.startup_rounds = results["requests"], results["rounds"], results["startup_rounds"]
    else:
        results = measure(args)
    seq, floor, started = results["seq"], results["floor"], results["started"]
    conc = {name: {int(c): r for c, r in series.items()} for name, series in results["conc"].items()}
    scaled = {int(size): r for size, r in results["scaled"].items()}

    bare = seq["bare"]
    print(f"\nsequential keep-alive POSTs ({args.requests} per round, median of {args.rounds} interleaved rounds)")
    print(f"{'path':<20} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p50 / bare':>11} {'req/s / bare':>13}"
          f" {'proxy CPU':>10} {'pg CPU':>8}  (CPU: ms per request)")
    for name, r in seq.items():
        print(f"{name:<20} {r['rps']:>8.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['p50'] / bare['p50']:>11.2f} "
              f"{r['rps'] / bare['rps']:>13.2f} {r['proxy_cpu_ms']:>10.2f} {r['pg_cpu_ms']:>8.2f}")
    print(f"sidecar replay req/s / --server-replay req/s: {seq['sidecar replay']['rps'] / seq['--server-replay']['rps']:.2f}")
    print(f"one journal write (INSERT commit on this PostgreSQL), p50: {floor:.2f} ms; "
          f"over bare mitmdump's p50, sidecar recording adds {seq['sidecar record']['p50'] - bare['p50']:.2f} ms, "
          f"the two-commit floor {seq['two-commit floor']['p50'] - bare['p50']:.2f} ms")

    print(f"\nthroughput, req/s, by concurrent clients (each client its own run; median of {args.rounds} rounds)")
    levels = sorted(conc["bare"])
    print(f"{'path':<20} " + " ".join(f"{c:>9}" for c in levels))
    for name, series in conc.items():
        print(f"{name:<20} " + " ".join(f"{series[c]['rps']:>9.0f}" for c in levels))
    for name in ("bare, fast dispatch", "two-commit floor", "floor, thread", "floor, fast dispatch", "sidecar record",
                 "sidecar replay"):
        label = {"two-commit floor": "floor"}.get(name, name if "," in name else name.split()[-1])
        print(f"{label + ' / bare':<20} " + " ".join(f"{conc[name][c]['rps'] / conc['bare'][c]['rps']:>9.2f}" for c in levels))
    print("proxy CPU, ms per request (mitmdump runs on one core: at saturation, req/s ~ 1000 / this)")
    for name, series in conc.items():
        print(f"{name:<20} " + " ".join(f"{series[c]['proxy_cpu_ms']:>9.2f}" for c in levels))

    print("\njournal scale: resuming a run of N steps (a new attempt's first answer, then the replay p50 of the"
          " next ones; medians of 3 attempts)")
    print(f"{'steps':>8} {'first ms':>9} {'p50 ms':>8} {'RSS MiB':>8}")
    for size, r in scaled.items():
        print(f"{size:>8} {r['first_ms']:>9.2f} {r['p50']:>8.2f} {r['rss_mib']:>8.1f}")
    smallest, largest = min(scaled), max(scaled)
    print(f"replay p50 at {largest} steps / at {smallest} steps: {scaled[largest]['p50'] / scaled[smallest]['p50']:.2f}")

    print(f"\nstart-up: wall time in ms, median of {args.startup_rounds} rounds")
    for name, ms in started.items():
        print(f"{name:<32} {ms:>8.0f} {ms / started['bare mitmdump start+stop']:>6.2f}x bare mitmdump")

    print("\ntargets (performance rounds 2 and 3), this run")
    for what, measured, target, met in targets(seq, conc, scaled):
        print(f"{what:<58} {measured:>8.2f}  target {target:<6} {'met' if met else 'NOT met'}")

    if args.chart:
        chart(Path(args.chart), seq, conc, scaled)
        if not args.redraw:
            Path(args.chart).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nchart: {args.chart} (its numbers: {args.redraw or Path(args.chart).with_suffix('.json')})")


def measure(args: argparse.Namespace) -> dict:
    """Every section, on a database of its own on the journal's server."""
    server = database.resolve(args.dsn).dsn
    dsn = database.create_database(server, "durable_bench")
    upstream = start_upstream()
    try:
        with tempfile.TemporaryDirectory(prefix="durable-bench-") as tmp:
            work = Path(tmp)
            return {
                "requests": args.requests,
                "rounds": args.rounds,
                "startup_rounds": args.startup_rounds,
                "floor": journal_write_floor(dsn),
                "seq": sequential(dsn, upstream, work, args.requests, args.rounds),
                "conc": concurrency(dsn, upstream, work, args.requests, [int(c) for c in args.concurrency.split(",")],
                                    args.rounds),
                "scaled": scale(dsn, upstream, work, sizes := [int(s) for s in args.scale.split(",")],
                                min(args.requests, min(sizes)) - 1),
                "started": startup(dsn, work, args.startup_rounds, embedded=not args.quick),  # quick: no initdb
            }
    finally:
        database.drop_database(server, dsn)


if __name__ == "__main__":
    main()
