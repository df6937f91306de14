"""`durable`: run an agent durably, and see and steer its runs.

Every command takes --dsn (else $DATABASE_URL, else the embedded PostgreSQL); read commands print
a table for people or, with --json, JSON for scripts. Errors exit non-zero with a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from ..matching import identity
from ..store import crypto, database, embedded
from . import launcher, operations, runner, tables

err = Console(stderr=True, soft_wrap=True, highlight=False)

# options the launcher sets itself: --set cannot change them behind its back
OWN_OPTIONS = {"listen_port": "--port", "listen_host": "--listen-host", "confdir": "--confdir"}


def set_options(args: argparse.Namespace) -> dict[str, str]:
    """The sidecar's options from --set, --dsn and --upstream-ca."""
    cmd, pairs, dsn = args.cmd, args.set, args.dsn
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"durable {cmd}: --set wants KEY=VALUE, got {pair!r}")
        if key in OWN_OPTIONS:
            instead = (
                (
                    "durable run picks a free port; for a fixed one run `durable proxy --port N` and "
                    "`durable run --proxy http://127.0.0.1:N`"
                )
                if cmd == "run" and key != "confdir"
                else f"use {OWN_OPTIONS[key]}"
            )
            raise SystemExit(f"durable {cmd}: --set {key}=... is not passed on: {instead}")
        options[key] = value
    if dsn:
        options["durable_dsn"] = dsn
    if args.upstream_ca:  # mitmproxy's own option, under a name a user looks for
        if not Path(args.upstream_ca).is_file():
            raise SystemExit(f"durable {cmd}: --upstream-ca {args.upstream_ca}: no such file")
        options["ssl_verify_upstream_trusted_ca"] = str(Path(args.upstream_ca).resolve())
    return options


HEADERS = {
    "last_outcome": "outcome",
    "duration_ms": "ms",
    "last_activity": "last activity",
    "forked_from": "forked from",
}


def cell(value: Any) -> str:
    """A table cell: times to the second in local time (--json keeps full precision)."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def emit(args: argparse.Namespace, data: Any, columns: list[str], title: str) -> None:
    """--json: the data as JSON; otherwise a table of `columns` that fits the terminal ($COLUMNS when piped)."""
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return
    rows = data["steps"] if isinstance(data, dict) else data
    wide = {i for i, c in enumerate(columns) if c in ("url", "run", "forked_from")}  # these fold to fit
    print(
        tables.render(
            title, [HEADERS.get(c, c) for c in columns], [[cell(row.get(c)) for c in columns] for row in rows], wide
        )
    )


# -- commands ---------------------------------------------------------------------------------------


def cmd_proxy(args: argparse.Namespace) -> int:
    options = set_options(args)
    with socket.socket() as probe:  # mitmproxy's own message for a busy port names its flags, not ours
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.listen_host, args.port))
        except OSError as e:
            raise SystemExit(
                f"durable proxy: cannot listen on {args.listen_host}:{args.port} ({e.strerror}); "
                f"pick another port: durable proxy --port N"
            ) from e
    confdir = Path(args.confdir or launcher.confdir_default())
    confdir.mkdir(parents=True, exist_ok=True)
    argv = [
        launcher.mitmdump(),
        "-s",
        str(launcher.SCRIPT),
        "--listen-host",
        args.listen_host,
        "-p",
        str(args.port),
        "--set",
        f"confdir={confdir}",
        "--set",
        "connection_strategy=lazy",
    ]
    for key, value in options.items():
        argv += ["--set", f"{key}={value}"]
    err.print(f"durable proxy: {args.listen_host}:{args.port}, CA in {confdir / launcher.CA_CERT}")
    os.execv(argv[0], argv)
    return 0  # not reached


NO_CALLS_HINT = """durable: the agent made no call through the sidecar. Clients that ignore HTTPS_PROXY:
  Node's built-in fetch before Node 22.21 / 24.5 (durable run sets NODE_USE_ENV_PROXY=1, which later ones honour;
  older ones: undici's EnvHttpProxyAgent), Go programs with their own http.Transport, clients built with
  trust_env=False or an explicit proxy=None. See docs/cli.md, "Clients that ignore proxy variables"."""


TLS_HINT = """durable: the sidecar did not trust an upstream's certificate, so those calls never reached it (the agent
  got 502 Certificate verify failed): an upstream with a private or self-signed CA needs it given to the
  sidecar with --upstream-ca FILE (docs/cli.md)."""


def cmd_run(args: argparse.Namespace) -> int:
    if not args.command:
        raise SystemExit("durable run: give the agent's command after --")
    identity.validate_id(args.run, "run id")
    options = set_options(args)
    secret = options.get("durable_auth_secret") or os.environ.get("DURABLE_AUTH_SECRET")
    plan = runner.Plan(
        run=args.run,
        attempt=args.attempt or identity.mint_id("attempt"),
        command=args.command,
        dsn=args.dsn,
        options=options,
        confdir=Path(args.confdir) if args.confdir else None,
        proxy=args.proxy,
        token=identity.run_token(secret, args.run) if secret else None,
    )
    try:
        outcome = runner.execute(plan)
    except runner.Failure as e:
        raise SystemExit(f"durable run: {e}; the agent was not started") from e
    attempt = outcome.attempt
    if outcome.journal is None:
        return outcome.status
    with operations.connect(outcome.journal.dsn, migrate=False) as conn:  # the sidecar migrated it
        s = operations.attempt_summary(conn, args.run, attempt)
    tls = f", {s['tls_failed']} upstream TLS failure{'s' if s['tls_failed'] != 1 else ''}" if s["tls_failed"] else ""
    err.print(
        f"durable: run {args.run} attempt {attempt}: {s['recorded']} recorded, {s['replayed']} replayed, "
        f"{s['reissued']} reissued, {s['diverged']} diverged{tls}; replay saved {s['replayed']} upstream calls "
        f"and {s['tokens_saved']} LLM tokens"
    )
    if s["tls_failed"]:
        err.print(TLS_HINT)
    if not any(v for k, v in s.items() if k != "tokens_saved"):
        err.print(NO_CALLS_HINT)
    return outcome.status


def cmd_test(args: argparse.Namespace) -> int:
    from . import fixture, testing

    if not args.command:
        raise SystemExit("durable test: give the agent's command after --")
    if bool(args.record) == bool(args.file):
        raise SystemExit("durable test: give a fixture to replay (durable test FILE -- CMD) or --record FILE")
    opts = testing.Options(
        args.command, args.dsn, set_options(args), Path(args.confdir) if args.confdir else None, args.keep
    )
    path = Path(args.record or args.file)
    mode = "all" if args.record else args.record_mode
    if mode == "once":
        mode = "none" if path.exists() else "all"
    try:
        if mode == "all":
            status, steps = testing.record(path, opts)
            err.print(f"durable test: recorded {steps} steps into {path}; the command exited {status}")
            return status
        result = testing.replay(path, opts, mode, args.live_after_divergence)
    except runner.Failure as e:
        raise SystemExit(f"durable test: {e}; the agent was not started") from e
    except (fixture.FixtureError, FileNotFoundError) as e:
        raise SystemExit(f"durable test: {e}") from e
    err.print(result.text(), highlight=False, markup=False)
    if args.junit:
        Path(args.junit).write_bytes(result.junit())
    if args.json_report:
        Path(args.json_report).write_text(json.dumps(result.as_json(), indent=2))
    if mode == "new_episodes":
        if result.extra:
            err.print(f"durable test: {len(result.extra)} new calls recorded into {path}")
        return 0 if result.status == 0 else 1
    return 0 if result.passed else 1


def cmd_env(args: argparse.Namespace) -> int:
    """Shell lines that put this shell's next commands behind a running sidecar, with a fresh attempt."""
    identity.validate_id(args.run, "run id")
    address = runner.host_port(args.proxy)
    secret = os.environ.get("DURABLE_AUTH_SECRET")
    url = launcher.proxy_url(
        address,
        args.run,
        args.attempt or identity.mint_id("attempt"),
        identity.run_token(secret, args.run) if secret else None,
    )
    try:
        bundle = launcher.bundle_for(runner.fetch_ca(address, url))
    except runner.Failure as e:
        raise SystemExit(f"durable env: {e}") from e
    print(f"unset {' '.join(launcher.CLEARED)}")
    for name, value in launcher.agent_variables(url, bundle).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    with operations.connect(args.dsn) as conn:
        emit(args, operations.runs(conn), ["run", "created", "steps", "state", "last_activity", "forked_from"], "runs")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with operations.connect(args.dsn) as conn:
        steps = operations.steps(conn, args.run)
    if not args.json:  # an answer encrypted at rest, no key here: its tokens are not blank, they are sealed
        steps = [{**row, "tokens": "sealed"} if row.get("sealed") else row for row in steps]
    data = {"run": args.run, "steps": steps}
    columns = ["seq", "method", "url", "state", "status", "last_outcome", "replays", "duration_ms", "tokens"]
    emit(args, data, columns, f"run {args.run}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    with operations.connect(args.dsn) as conn:
        rows = operations.divergences(conn, args.run)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"run {args.run}: no attempt diverged from the journal")
    for row in rows:
        print(
            f"step {row['seq']} ({row['method']} {row['url']}), attempt {row['attempt']}, "
            f"nearest journaled step {row['expected_step']}:"
        )
        if row["sealed"]:
            print(f"  (the diff is encrypted at rest and cannot be opened here: {row['sealed']})")
        for d in row["diff"] or []:
            print(f"  {d['field']}: {json.dumps(d['journaled'])} -> {json.dumps(d['now'])}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from . import explain

    try:
        parts = explain.from_har(Path(args.har), args.entry) if args.har else explain.parse_curl(args.curl)
    except (ValueError, OSError) as e:
        raise SystemExit(f"durable explain: {e}") from e
    result = explain.explain(parts)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"fingerprint: {result['fingerprint']}")
    for field, value in result["envelope"].items():
        print(f"{field:>8}: {json.dumps(value)}")
    return 0


def cmd_fork(args: argparse.Namespace) -> int:
    identity.validate_id(args.to, "run id")
    with operations.connect(args.dsn) as conn:
        copied = operations.fork(conn, args.run, args.at, args.to)
    print(
        f"run {args.to}: forked from {args.run} with its first {copied} steps; "
        f"an agent on run {args.to} replays them, then goes live"
    )
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    with operations.connect(args.dsn) as conn:
        if args.complete_from:
            message = operations.resolve(
                conn,
                args.run,
                args.seq,
                "complete",
                args.status,
                Path(args.complete_from).read_bytes(),
                args.content_type,
            )
        else:
            message = operations.resolve(conn, args.run, args.seq, "reissue" if args.reissue else "forget")
    print(message)
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    body = Path(args.body_file).read_bytes() if args.body_file else None
    with operations.connect(args.dsn) as conn:
        print(operations.edit(conn, args.run, args.seq, args.status, body))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with operations.connect(args.dsn) as conn:
        count = operations.remove(conn, args.run)
    print(f"run {args.run} deleted ({count} steps)")
    return 0


AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def age_seconds(text: str) -> float:
    """'7d', '12h', '30m', '90s': a unit is required and 0 is refused (it would select every run)."""
    match = AGE.match(text)
    if not match:
        raise SystemExit(f"durable gc: --older-than {text!r}: give a number and a unit, e.g. 7d, 12h, 30m, 90s")
    seconds = float(match.group(1)) * UNITS[match.group(2)]
    if seconds <= 0:
        raise SystemExit("durable gc: --older-than must be more than 0 (0 would delete every run)")
    return seconds


def confirmed(question: str) -> bool:
    """Ask on a terminal; scripts (no terminal) pass --yes or get a refusal."""
    if not sys.stdin.isatty():
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def cmd_gc(args: argparse.Namespace) -> int:
    seconds = age_seconds(args.older_than)
    with operations.connect(args.dsn) as conn:
        doomed = operations.gc(conn, seconds, dry_run=True)
        go = (
            not args.dry_run
            and doomed
            and (
                args.yes
                or confirmed(
                    f"delete {len(doomed)} runs idle for more than {args.older_than} ({', '.join(doomed[:5])}"
                    f"{', ...' if len(doomed) > 5 else ''})?"
                )
            )
        )
        if not args.dry_run and doomed and not go:
            raise SystemExit(
                f"durable gc: nothing deleted ({len(doomed)} runs would be): confirm on a terminal or pass --yes"
            )
        if go:
            operations.gc(conn, seconds, dry_run=False, only=doomed)
    if args.json:
        print(json.dumps({"deleted" if not args.dry_run else "would_delete": doomed}))
    else:
        print(
            f"{'would delete' if args.dry_run else 'deleted'} {len(doomed)} runs idle for more than {args.older_than}"
            + (": " + ", ".join(doomed) if doomed else "")
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import exchange, fixture

    if args.fixture:
        with err.status(f"writing run {args.run} to {args.fixture}"), operations.connect(args.dsn) as conn:
            operations.run_row(conn, args.run)  # an unknown run is an error, not an empty fixture
            count = fixture.save(conn, args.run, Path(args.fixture))
        print(f"exported {count} steps of run {args.run} to {args.fixture} (replay it: durable test FILE -- CMD)")
        return 0
    with err.status(f"reading run {args.run}"), operations.connect(args.dsn) as conn:
        rows = operations.step_rows(conn, args.run)
    with err.status(f"writing {len(rows)} steps to {args.har or args.flows}"):
        flows = exchange.flows(rows)
        if args.har:
            exchange.write_har(Path(args.har), flows)
        if args.flows:
            exchange.write_flows(Path(args.flows), flows)
    print(f"exported {len(flows)} steps of run {args.run} to {args.har or args.flows}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    import asyncio

    from . import exchange, fixture

    identity.validate_id(args.run, "run id")
    path = Path(args.file)
    if fixture.is_fixture(path):
        loaded = fixture.read(path)
        with err.status(f"journaling {len(loaded.steps)} steps into run {args.run}"), operations.connect(args.dsn) as c:
            count = fixture.load(c, args.run, loaded, labels={"fixture": str(path)})
        print(f"imported {count} steps into run {args.run}")
        return 0
    with err.status(f"reading {args.file}"):
        flows = exchange.read(path)
    with err.status(f"journaling {len(flows)} steps into run {args.run}"):
        count = asyncio.run(exchange.import_flows(args.dsn, args.run, flows))
    print(f"imported {count} steps into run {args.run}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    if args.action == "init":
        return db_init(args)
    home = database.durable_home()
    data = {"status": embedded.status, "start": embedded.pin, "stop": embedded.stop}[args.action](home)
    if args.action == "status" and (args.dsn or os.environ.get("DATABASE_URL")):
        data["journal"] = operations.journal_layout(args.dsn)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if "journal" in data:
        found = data["journal"]
        layout = f"durable_steps is {found['layout']}" if found["layout"] else "none yet"
        print(f"journal at {found['journal']}: {layout}")
    state = f"running (pid {data['pid']})" if data["running"] else "stopped"
    print(f"embedded PostgreSQL: {state}" + (", pinned by `durable db start`" if data["pinned"] else ""))
    print(
        f"  data:    {data['pgdata']}" + ("" if data["initialized"] else " (not created yet: the first use creates it)")
    )
    if data["socket_dir"]:
        print(f"  connect: postgresql://postgres@/postgres?host={data['socket_dir']}")
    print(f"  log:     {data['log']}")
    users = data["users"] or []
    print(
        f"  users:   {len(users)}"
        + (
            ""
            if users
            else " (pinned: it runs until `durable db stop`)"
            if data["pinned"]
            else " (it stops a second after its last user exits)"
        )
    )
    for user in users:
        print(f"    {user['pid']}  {user['command'][:100]}")
    if os.environ.get("DATABASE_URL"):
        print("  note: DATABASE_URL is set, so sidecars and commands without --dsn use it, not this one")
    return 0


def db_init(args: argparse.Namespace) -> int:
    created = operations.create_journal(args.dsn, args.partitions)
    if args.json:
        print(json.dumps(created, indent=2))
        return 0
    done = f"created (migrations {created['applied']})" if created["applied"] else "already up to date"
    print(f"journal at {created['journal']}: {done}; durable_steps is {created['layout']}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from . import ui

    ui.serve(args.dsn, args.host, args.port, args.allow_host)
    return 0


def cmd_addon_path(args: argparse.Namespace) -> int:
    print(launcher.SCRIPT)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    print(crypto.new_key_spec(args.kid))
    return 0


def cmd_rekey(args: argparse.Namespace) -> int:
    with operations.connect(args.dsn) as conn:
        count = operations.rekey(conn)
    print(f"re-encrypted {count} steps with key {operations.keyring().active!r}")
    return 0


def cmd_ca(args: argparse.Namespace) -> int:
    from mitmproxy import certs

    confdir = Path(args.confdir or launcher.confdir_default())
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
        return [
            [
                "sudo",
                "security",
                "add-trusted-cert",
                "-d",
                "-r",
                "trustRoot",
                "-k",
                "/Library/Keychains/System.keychain",
                str(ca),
            ]
        ]
    # a non-root Debian user's PATH has no /usr/sbin, where update-ca-certificates lives
    if shutil.which("update-ca-certificates", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])):
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        return [
            sudo + ["cp", str(ca), "/usr/local/share/ca-certificates/durable-sidecar.crt"],
            sudo + ["update-ca-certificates"],
        ]
    raise SystemExit(
        "durable ca install: only Debian/Ubuntu (update-ca-certificates) and macOS are supported; "
        "use `durable ca bundle FILE` and point SSL_CERT_FILE at it"
    )


# -- the parser -------------------------------------------------------------------------------------


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("durable-sidecar")
    except PackageNotFoundError:
        return "(not installed: running from a checkout)"


def parser() -> argparse.ArgumentParser:
    journal = argparse.ArgumentParser(add_help=False)
    journal.add_argument("--dsn", help="journal database (default: $DATABASE_URL, else the embedded PostgreSQL)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")
    certs = argparse.ArgumentParser(add_help=False)
    certs.add_argument("--confdir", help="the sidecar's CA folder (default: $DURABLE_HOME/certs)")
    sidecar_opts = argparse.ArgumentParser(add_help=False)
    sidecar_opts.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a mitmproxy or durable_* option for the sidecar (repeatable)",
    )
    sidecar_opts.add_argument(
        "--upstream-ca",
        metavar="FILE",
        help="also trust this CA (PEM) for upstreams with a private or self-signed certificate "
        "(mitmproxy's ssl_verify_upstream_trusted_ca)",
    )

    p = argparse.ArgumentParser(prog="durable", description=__doc__)
    p.add_argument("--version", action="version", version=f"durable {version()}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(name: str, func: Any, text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        s = sub.add_parser(name, parents=list(parents), help=text, description=text)
        s.set_defaults(func=func)
        return s

    def run_arg(s: argparse.ArgumentParser, text: str = "the run id") -> None:
        s.add_argument("run", help=text)

    s = command("proxy", cmd_proxy, "run the sidecar in the foreground", journal, certs, sidecar_opts)
    s.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s)")
    s.add_argument("--listen-host", default="127.0.0.1", help="address to listen on (default: %(default)s)")

    s = command("run", cmd_run, "run a command durably: durable run --run R -- CMD", journal, certs, sidecar_opts)
    s.add_argument("--run", required=True, help="the run id: the same on every restart of one task")
    s.add_argument("--attempt", help="this attempt's id (default: a fresh one)")
    s.add_argument(
        "--proxy",
        metavar="URL",
        help="use the sidecar at this URL (e.g. http://127.0.0.1:8080) "
        "instead of starting one; its CA is taken from it",
    )
    s.add_argument("command", nargs=argparse.REMAINDER, help="the agent's command, after --")

    s = command(
        "test",
        cmd_test,
        "replay a recorded run to a command, offline, as a test: durable test FILE -- CMD "
        "(record one with --record FILE -- CMD)",
        journal,
        certs,
        sidecar_opts,
    )
    s.add_argument("file", nargs="?", help="the fixture to replay (durable export RUN --fixture FILE writes one)")
    s.add_argument("--record", metavar="FILE", help="run the command live and write its run to FILE")
    s.add_argument(
        "--record-mode",
        choices=["none", "once", "new_episodes", "all"],
        default="none",
        help="vcrpy's modes: none (offline, the default), once (record when FILE does not exist), "
        "new_episodes (calls FILE lacks go live and are added to it), all (record afresh)",
    )
    s.add_argument(
        "--live-after-divergence",
        action="store_true",
        help="a call the recording does not answer goes live (and is paid) instead of failing; FILE is not changed",
    )
    s.add_argument("--junit", metavar="FILE", help="also write the result as JUnit XML (one test case)")
    s.add_argument("--json", dest="json_report", metavar="FILE", help="also write the report as JSON")
    s.add_argument("--keep", action="store_true", help="keep the scratch run in the journal (durable show it)")
    s.set_defaults(command=[])  # the agent's command: what follows `--` (main)

    s = command("env", cmd_env, 'shell lines for an agent behind a running sidecar: eval "$(durable env --run R)"')
    s.add_argument("--run", required=True, help="the run id: the same on every restart of one task")
    s.add_argument("--attempt", help="this attempt's id (default: a fresh one, so run it again on every restart)")
    s.add_argument(
        "--proxy",
        default="http://127.0.0.1:8080",
        metavar="URL",
        help="the running sidecar (default: %(default)s); the CA bundle holds the CA it signs with",
    )

    command("runs", cmd_runs, "list runs", journal, as_json)
    run_arg(command("show", cmd_show, "the steps of a run", journal, as_json))
    run_arg(command("diff", cmd_diff, "where attempts diverged, field by field", journal, as_json))
    run_arg(command("rm", cmd_rm, "delete a run and its steps", journal))

    s = command("explain", cmd_explain, "fingerprint of a curl command line or a HAR entry", as_json)
    s.add_argument("--har", metavar="FILE", help="a HAR file (default: read a curl command line)")
    s.add_argument(
        "--entry", type=int, default=1, help="which HAR entry, counting from 1 like seq (default: %(default)s)"
    )
    s.add_argument("curl", nargs=argparse.REMAINDER, help="a curl command line, after --")

    s = command("fork", cmd_fork, "a new run with the first steps of RUN", journal)
    run_arg(s, "the run to copy steps from")
    s.add_argument("--at", type=int, required=True, metavar="SEQ", help="copy steps 1..SEQ")
    s.add_argument("--to", required=True, metavar="RUN", help="the new run's id")

    s = command("resolve", cmd_resolve, "settle an in-doubt step", journal)
    run_arg(s)
    s.add_argument("seq", type=int, help="the step's seq (durable show lists them)")
    how = s.add_mutually_exclusive_group(required=True)
    how.add_argument("--reissue", action="store_true", help="let the next attempt re-send it with its original key")
    how.add_argument("--forget", action="store_true", help="drop it: the next attempt records the call afresh")
    how.add_argument("--complete-from", metavar="FILE", help="its answer's body, to be replayed")
    s.add_argument(
        "--status", type=int, default=200, help="with --complete-from: the answer's status (default: %(default)s)"
    )
    s.add_argument(
        "--content-type",
        default="application/json",
        help="with --complete-from: the answer's Content-Type (default: %(default)s)",
    )

    s = command("edit", cmd_edit, "change one step's answer in a forked run", journal)
    run_arg(s, "a forked run (durable fork makes one)")
    s.add_argument("seq", type=int, help="the step's seq")
    s.add_argument("--status", type=int, help="the new status (default: keep the journaled one)")
    s.add_argument("--body-file", metavar="FILE", help="the new body, as the agent should read it (default: keep)")

    s = command("gc", cmd_gc, "delete runs idle for longer than a duration", journal, as_json)
    s.add_argument("--older-than", required=True, metavar="AGE", help="idle for longer than this: 7d, 12h, 30m, 90s")
    s.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    s.add_argument("--yes", action="store_true", help="delete without asking (for scripts)")

    s = command("export", cmd_export, "a run as a fixture (durable test), HAR 1.2 or a mitmproxy flow file", journal)
    run_arg(s)
    out = s.add_mutually_exclusive_group(required=True)
    out.add_argument(
        "--fixture", metavar="FILE", help="write a fixture here: every step as journaled, for durable test"
    )
    out.add_argument("--har", metavar="FILE", help="write HAR 1.2 here")
    out.add_argument("--flows", metavar="FILE", help="write a mitmproxy flow file here (mitmweb -r FILE)")

    s = command("import", cmd_import, "a fixture, HAR or flow file as a new run", journal)
    s.add_argument("file", help="a fixture (durable export --fixture), .har or mitmproxy flow file")
    s.add_argument("--run", required=True, help="the new run's id")

    s = command(
        "db",
        cmd_db,
        "the embedded PostgreSQL: status | start (keep it running) | stop; init: create the journal",
        as_json,
        journal,
    )
    s.add_argument(
        "action",
        choices=["status", "start", "stop", "init"],
        help="status: what runs, where its data is, who uses it; start: start it and keep it running until "
        "`durable db stop`; stop: stop it now; init: create the journal's tables in the database (--dsn, "
        "else as every command finds it), hash-partitioned with --partitions",
    )
    s.add_argument(
        "--partitions",
        type=int,
        default=0,
        metavar="N",
        help="with init: split durable_steps into N tables by hash of the run id, for large fleets; chosen "
        "when the journal is created (default: %(default)s, one table)",
    )

    s = command("ui", cmd_ui, "see and steer runs in a browser (DURABLE_AUTH_SECRET, when set, is asked for)", journal)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    s.add_argument("--port", type=int, default=8081, help="port to listen on (default: %(default)s)")
    s.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another Host name the UI answers (a reverse proxy's), besides its address; repeatable",
    )

    addon_help = 'the script to load into your own mitmproxy: mitmdump -s "$(durable addon-path)"'
    command("addon-path", cmd_addon_path, addon_help)

    s = command("keygen", cmd_keygen, "a new encryption key, KID:BASE64 (for DURABLE_ENCRYPTION_KEY)")
    s.add_argument("--kid", default="k1", help="the key id: 1-64 of A-Z a-z 0-9 . _ - (default: %(default)s)")

    command("rekey", cmd_rekey, "re-encrypt the journal with the first key of DURABLE_ENCRYPTION_KEY", journal)

    s = command("ca", cmd_ca, "the sidecar's CA: path | bundle FILE | install", certs)
    s.add_argument(
        "action",
        choices=["path", "bundle", "install"],
        help="path: where it is; bundle: system CAs + it in FILE; install: into the OS trust store",
    )
    s.add_argument("file", nargs="?", help="bundle: where to write it (default: CONFDIR/ca-bundle.pem)")
    s.add_argument("--dry-run", action="store_true", help="install: print the commands only")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # what follows the first `--` is the agent's command (or curl's), whatever precedes it
    head, dashes, tail = (
        (argv[: argv.index("--")], True, argv[argv.index("--") + 1 :]) if "--" in argv else (argv, False, [])
    )
    args = parser().parse_args(head)
    for name in ("command", "curl"):
        if dashes and hasattr(args, name):
            setattr(args, name, tail)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader that left (`| head -1`) is handled below
        sys.exit(code)
    except BrokenPipeError:  # `durable db stop | head -1`: the reader left, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except (operations.OperatorError, identity.IdentityError, ValueError, OSError) as e:
        err.print(f"durable {args.cmd}: {e}", highlight=False)
        sys.exit(1)
    except Exception as e:  # psycopg errors and the like: one line, not a traceback
        err.print(f"durable {args.cmd}: {type(e).__name__}: {e}", highlight=False)
        sys.exit(1)
