"""`durable`: run an agent durably, and see and steer its runs.

Every command takes --dsn (else $DATABASE_URL, else the embedded PostgreSQL); read commands print
a table for people or, with --json, JSON for scripts. Errors exit non-zero with a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from . import crypto, database, exchange, explain, identity, launcher, operator, settings
from .journal import REPLAY_FLUSH_S

err = Console(stderr=True, soft_wrap=True)


def confdir_default() -> Path:
    return database.durable_home() / "certs"


def set_options(pairs: list[str], dsn: str | None) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"durable: --set wants KEY=VALUE, got {pair!r}")
        options[key] = value
    if dsn:
        options["durable_dsn"] = dsn
    return options


def emit(args: argparse.Namespace, data: Any, columns: list[str], title: str) -> None:
    """--json: the data as JSON; otherwise a table of `columns`."""
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return
    rows = data["steps"] if isinstance(data, dict) else data
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    Console(width=None if sys.stdout.isatty() else 240).print(table)  # piped: do not squeeze to 80 columns


# -- commands ---------------------------------------------------------------------------------------


def cmd_proxy(args: argparse.Namespace) -> int:
    argv = [launcher.mitmdump(), "-s", str(launcher.SCRIPT), "--listen-host", args.listen_host, "-p", str(args.port),
            "--set", f"confdir={args.confdir}", "--set", "connection_strategy=lazy"]
    for key, value in set_options(args.set, args.dsn).items():
        argv += ["--set", f"{key}={value}"]
    Path(args.confdir).mkdir(parents=True, exist_ok=True)
    os.execv(argv[0], argv)
    return 0  # not reached


def why(failure: Exception) -> str:
    """The one line of a sidecar's failed start that says why (its configuration error, else the first)."""
    lines = [line.strip() for line in str(failure).splitlines() if line.strip()]
    return next((line for line in lines if "configuration error" in line), lines[0] if lines else "unknown")


def cmd_run(args: argparse.Namespace) -> int:
    if not args.command:
        raise SystemExit("durable run: give the agent's command after --")
    identity.validate_id(args.run, "run id")
    attempt = args.attempt or identity.mint_id("attempt")
    confdir = Path(args.confdir)
    options = set_options(args.set, args.dsn)
    secret = options.get("durable_auth_secret") or os.environ.get("DURABLE_AUTH_SECRET")
    token = identity.run_token(secret, args.run) if secret else None
    sidecar = None
    if args.proxy:
        host_port = args.proxy.split("://")[-1].split("@")[-1].rstrip("/")
        proxy_url, ca = launcher.proxy_url(host_port, args.run, attempt, token), confdir / launcher.CA_CERT
    else:
        try:
            sidecar = launcher.start_sidecar(confdir, options)
        except (RuntimeError, TimeoutError) as e:
            raise SystemExit(f"durable run: the sidecar is not serving, so the agent was not started: {why(e)}") from e
        proxy_url, ca = sidecar.proxy_url(args.run, attempt, token), sidecar.ca_cert
    try:
        if not ca.exists():
            raise SystemExit(f"durable run: no CA certificate at {ca} (use --confdir of the sidecar at --proxy)")
        bundle = launcher.write_ca_bundle(ca, confdir / "ca-bundle.pem")
        err.print(f"[dim]durable: run {args.run}, attempt {attempt}, proxy {proxy_url.split('@')[-1]}[/dim]")
        code = subprocess.run(args.command, env=launcher.agent_env(proxy_url, bundle)).returncode
    finally:
        if sidecar:
            time.sleep(2 * REPLAY_FLUSH_S)  # the sidecar writes its last replay counts in the background
            sidecar.stop()
    with operator.connect(args.dsn) as conn:
        s = operator.attempt_summary(conn, args.run, attempt)
    err.print(
        f"durable: run {args.run} attempt {attempt}: {s['recorded']} recorded, {s['replayed']} replayed, "
        f"{s['reissued']} reissued, {s['diverged']} diverged; replay saved {s['replayed']} upstream calls "
        f"and {s['tokens_saved']} LLM tokens"
    )
    return 128 - code if code < 0 else code  # killed by a signal: the shell's convention


def cmd_runs(args: argparse.Namespace) -> int:
    with operator.connect(args.dsn) as conn:
        emit(args, operator.runs(conn), ["run", "created", "steps", "state", "last_activity", "forked_from"], "runs")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with operator.connect(args.dsn) as conn:
        steps = operator.steps(conn, args.run)
    data = {"run": args.run, "steps": steps}
    columns = ["seq", "method", "url", "state", "status", "last_outcome", "replays", "duration_ms", "tokens"]
    emit(args, data, columns, f"run {args.run}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    with operator.connect(args.dsn) as conn:
        rows = operator.divergences(conn, args.run)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"run {args.run}: no attempt diverged from the journal")
    for row in rows:
        print(f"step {row['seq']} ({row['method']} {row['url']}), attempt {row['attempt']}, "
              f"nearest journaled step {row['expected_step']}:")
        if row["sealed"]:
            print(f"  (the diff is encrypted at rest and cannot be opened here: {row['sealed']})")
        for d in row["diff"] or []:
            print(f"  {d['field']}: {json.dumps(d['journaled'])} -> {json.dumps(d['now'])}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        parts = explain.from_har(Path(args.har), args.entry) if args.har else explain.parse_curl(args.curl)
    except (ValueError, OSError) as e:
        raise SystemExit(f"durable explain: {e}")
    print(json.dumps(explain.explain(parts), indent=None if args.json else 2))
    return 0


def cmd_fork(args: argparse.Namespace) -> int:
    identity.validate_id(args.to, "run id")
    with operator.connect(args.dsn) as conn:
        copied = operator.fork(conn, args.run, args.at, args.to)
    print(f"run {args.to}: forked from {args.run} with its first {copied} steps; "
          f"an agent on run {args.to} replays them, then goes live")
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    with operator.connect(args.dsn) as conn:
        if args.complete_from:
            message = operator.resolve(conn, args.run, args.seq, "complete", args.status,
                                       Path(args.complete_from).read_bytes(), args.content_type)
        else:
            message = operator.resolve(conn, args.run, args.seq, "reissue" if args.reissue else "forget")
    print(message)
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    body = Path(args.body_file).read_bytes() if args.body_file else None
    with operator.connect(args.dsn) as conn:
        print(operator.edit(conn, args.run, args.seq, args.status, body))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with operator.connect(args.dsn) as conn:
        count = operator.remove(conn, args.run)
    print(f"run {args.run} deleted ({count} steps)")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    seconds = settings.parse_duration(args.older_than)
    with operator.connect(args.dsn) as conn:
        doomed = operator.gc(conn, seconds, args.dry_run)
    if args.json:
        print(json.dumps({"deleted" if not args.dry_run else "would_delete": doomed}))
    else:
        print(f"{'would delete' if args.dry_run else 'deleted'} {len(doomed)} runs idle for more than {args.older_than}"
              + (": " + ", ".join(doomed) if doomed else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with operator.connect(args.dsn) as conn:
        rows = operator.step_rows(conn, args.run)
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task(f"exporting {args.run}", total=len(rows))
        flows = []
        for row in rows:
            flows += exchange.flows([row])
            progress.advance(task)
    if args.har:
        exchange.write_har(Path(args.har), flows)
    if args.flows:
        exchange.write_flows(Path(args.flows), flows)
    print(f"exported {len(flows)} steps of run {args.run} to {args.har or args.flows}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    identity.validate_id(args.run, "run id")
    flows = exchange.read(Path(args.file))
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task(f"importing {args.file}", total=len(flows))
        count = exchange.import_file(args.dsn, args.run, Path(args.file), lambda n: progress.update(task, completed=n))
    print(f"imported {count} steps into run {args.run}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    print(crypto.new_key_spec(args.kid))
    return 0


def cmd_rekey(args: argparse.Namespace) -> int:
    with operator.connect(args.dsn) as conn:
        count = operator.rekey(conn)
    print(f"re-encrypted {count} steps with key {operator.keyring().active!r}")
    return 0


def cmd_ca(args: argparse.Namespace) -> int:
    from mitmproxy import certs

    confdir = Path(args.confdir)
    confdir.mkdir(parents=True, exist_ok=True)
    certs.CertStore.from_store(str(confdir), "mitmproxy", 2048)  # creates the CA on first use
    ca = confdir / launcher.CA_CERT
    if args.action == "path":
        print(ca)
    elif args.action == "bundle":
        print(launcher.write_ca_bundle(ca, Path(args.file or confdir / "ca-bundle.pem")))
    else:
        steps = install_commands(ca)
        for step in steps:
            print(("would run: " if args.dry_run else "running: ") + " ".join(step))
            if not args.dry_run:
                subprocess.run(step, check=True)
    return 0


def install_commands(ca: Path) -> list[list[str]]:
    """How to make the OS trust the CA: Debian/Ubuntu and macOS."""
    if platform.system() == "Darwin":
        return [["sudo", "security", "add-trusted-cert", "-d", "-r", "trustRoot",
                 "-k", "/Library/Keychains/System.keychain", str(ca)]]
    # a non-root Debian user's PATH has no /usr/sbin, where update-ca-certificates lives
    if shutil.which("update-ca-certificates", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])):
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        return [sudo + ["cp", str(ca), "/usr/local/share/ca-certificates/durable-sidecar.crt"],
                sudo + ["update-ca-certificates"]]
    raise SystemExit("durable ca install: only Debian/Ubuntu (update-ca-certificates) and macOS are supported; "
                     "use `durable ca bundle FILE` and point SSL_CERT_FILE at it")


# -- the parser -------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dsn", help="journal database (default: $DATABASE_URL, else the embedded PostgreSQL)")
    common.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")
    certs = argparse.ArgumentParser(add_help=False)
    certs.add_argument("--confdir", default=str(confdir_default()), help="where the sidecar keeps its CA")
    sidecar_opts = argparse.ArgumentParser(add_help=False)
    sidecar_opts.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a mitmproxy option")

    p = argparse.ArgumentParser(prog="durable", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("proxy", parents=[common, certs, sidecar_opts], help="run the sidecar (127.0.0.1:8080)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--listen-host", default="127.0.0.1")
    s.set_defaults(func=cmd_proxy)

    s = sub.add_parser("run", parents=[common, certs, sidecar_opts], help="run a command durably: durable run --run R -- CMD")
    s.add_argument("--run", required=True)
    s.add_argument("--attempt", help="default: a fresh attempt id")
    s.add_argument("--proxy", help="use the sidecar at this URL instead of starting one")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_run)

    sub.add_parser("runs", parents=[common], help="list runs").set_defaults(func=cmd_runs)
    for name, func, text in [("show", cmd_show, "the steps of a run"), ("diff", cmd_diff, "where attempts diverged"),
                             ("rm", cmd_rm, "delete a run")]:
        s = sub.add_parser(name, parents=[common], help=text)
        s.add_argument("run")
        s.set_defaults(func=func)

    s = sub.add_parser("explain", parents=[common], help="fingerprint of a curl command line or a HAR entry")
    s.add_argument("--har")
    s.add_argument("--entry", type=int, default=0)
    s.add_argument("curl", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_explain)

    s = sub.add_parser("fork", parents=[common], help="a new run with the first SEQ steps of RUN")
    s.add_argument("run")
    s.add_argument("--at", type=int, required=True)
    s.add_argument("--to", required=True)
    s.set_defaults(func=cmd_fork)

    s = sub.add_parser("resolve", parents=[common], help="settle an in-doubt step")
    s.add_argument("run")
    s.add_argument("seq", type=int)
    how = s.add_mutually_exclusive_group(required=True)
    how.add_argument("--reissue", action="store_true", help="let the next attempt re-send it with its original key")
    how.add_argument("--forget", action="store_true", help="drop it: the next attempt records the call afresh")
    how.add_argument("--complete-from", metavar="FILE", help="its answer's body, to be replayed")
    s.add_argument("--status", type=int, default=200)
    s.add_argument("--content-type", default="application/json")
    s.set_defaults(func=cmd_resolve)

    s = sub.add_parser("edit", parents=[common], help="change one step's answer in a forked run")
    s.add_argument("run")
    s.add_argument("seq", type=int)
    s.add_argument("--status", type=int)
    s.add_argument("--body-file")
    s.set_defaults(func=cmd_edit)

    s = sub.add_parser("gc", parents=[common], help="delete runs idle for longer than a duration")
    s.add_argument("--older-than", required=True, help="e.g. 7d, 12h")
    s.add_argument("--dry-run", action="store_true")
    s.set_defaults(func=cmd_gc)

    s = sub.add_parser("export", parents=[common], help="a run as HAR 1.2 or a mitmproxy flow file")
    s.add_argument("run")
    out = s.add_mutually_exclusive_group(required=True)
    out.add_argument("--har")
    out.add_argument("--flows")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("import", parents=[common], help="a HAR or flow file as a new run")
    s.add_argument("file")
    s.add_argument("--run", required=True)
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("keygen", parents=[common], help="a new encryption key, KID:BASE64 (for DURABLE_ENCRYPTION_KEY)")
    s.add_argument("--kid", default="k1")
    s.set_defaults(func=cmd_keygen)

    sub.add_parser("rekey", parents=[common], help="re-encrypt the journal with the first key of DURABLE_ENCRYPTION_KEY"
                   ).set_defaults(func=cmd_rekey)

    s = sub.add_parser("ca", parents=[common, certs], help="the sidecar's CA: path | bundle FILE | install")
    s.add_argument("action", choices=["path", "bundle", "install"])
    s.add_argument("file", nargs="?")
    s.add_argument("--dry-run", action="store_true", help="install: print the commands only")
    s.set_defaults(func=cmd_ca)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if getattr(args, "command", None) and args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if getattr(args, "curl", None) and args.curl[:1] == ["--"]:
        args.curl = args.curl[1:]
    try:
        sys.exit(args.func(args))
    except (operator.OperatorError, identity.IdentityError, ValueError, OSError) as e:
        err.print(f"durable {args.cmd}: {e}", highlight=False)
        sys.exit(1)
    except Exception as e:  # psycopg errors and the like: one line, not a traceback
        err.print(f"durable {args.cmd}: {type(e).__name__}: {e}", highlight=False)
        sys.exit(1)
