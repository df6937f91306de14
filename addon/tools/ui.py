"""`durable ui`: the journal in a browser. Runs, a run's timeline and steps (live), a step's request
and answer, and the operator's actions (fork, edit, resolve, delete, download).

A small server-rendered tornado app (tornado comes with mitmproxy): pages work with JavaScript off;
a few lines of script only poll for new steps. Every action is the CLI's own code path (operations.py,
exchange.py) and asks for confirmation (a required checkbox). It binds 127.0.0.1 by default; with
DURABLE_AUTH_SECRET set it asks for that secret (HTTP Basic, any user).

Another page in the operator's browser must not drive it. The UI answers only requests addressed to
it (the `Host` it listens on, `localhost` for a loopback address, and names given with --allow-host):
a page on a rebound DNS name is refused. An action must come from the UI's own pages (`Origin` and
`Sec-Fetch-Site` checked where the browser sends them) and carry the action token, which is bound to
a secret of this process, not to a cookie: cookies are not isolated by port, so a page on another
local port could set a double-submit cookie of its own choosing.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
import secrets
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import tornado.web
from tornado.template import Loader

from ..matching import identity
from ..store import database, registry
from . import operations

PAGE_SIZE = 50
TIMELINE_BARS = 400  # the timeline draws the first steps of a very long run
TEMPLATES = Loader(str(Path(__file__).with_name("templates")))  # autoescaped: journal data is shown escaped


def render(name: str, **values: Any) -> bytes:
    return TEMPLATES.load(name).generate(**values)


OUTCOMES = ("recorded", "replayed", "reissued", "diverged", "in-doubt", "failed", "forked", "edited", "imported")


def when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else ""


def url(value: str) -> str:
    return quote(value, safe="")


def outcome(step: dict[str, Any]) -> str:
    if step["state"] == "pending":
        return "in-doubt"
    if step["state"] == "failed":
        return "failed"
    return step["last_outcome"] or "recorded"


def shown(body: bytes | None) -> str:
    """A body as text: JSON pretty-printed, anything else as it decodes."""
    if not body:
        return ""
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except ValueError:
        return body.decode("utf-8", "replace")


def events(body: bytes | None, headers: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    """An event stream's events (name, data), when the answer is one."""
    kind = next((v for k, v in headers or [] if k.lower() == "content-type"), "")
    if not body or "text/event-stream" not in kind:
        return []
    found = []
    for block in body.decode("utf-8", "replace").replace("\r\n", "\n").split("\n\n"):
        lines = [line for line in block.split("\n") if line]
        if lines:
            name = next((line[6:].strip() for line in lines if line.startswith("event:")), "message")
            data = "\n".join(line[5:].strip() for line in lines if line.startswith("data:"))
            found.append((name, shown(data.encode()) if data.startswith(("{", "[")) else data))
    return found


def timeline(steps: list[dict[str, Any]], width: int = 900) -> tuple[list[dict[str, Any]], float]:
    """One bar per step over the run's time: x from its start, width its duration (at least 2 px)."""
    drawn = steps[:TIMELINE_BARS]
    if not drawn:
        return [], 0.0
    start = min(s["started_at"] for s in drawn)
    end = max((s["completed_at"] or s["started_at"]) for s in drawn)
    span = max((end - start).total_seconds(), 0.001)
    bars = []
    for row, s in enumerate(drawn):
        x = (s["started_at"] - start).total_seconds() / span * width
        w = ((s["completed_at"] or s["started_at"]) - s["started_at"]).total_seconds() / span * width
        bars.append({"seq": s["seq"], "row": row, "x": round(x, 1), "w": round(max(w, 2.0), 1), "outcome": outcome(s)})
    return bars, span


class Handler(tornado.web.RequestHandler):
    """Shared by every page: the secret, the journal (a connection per request, in a thread), the layout."""

    def initialize(self, dsn: str, secret: str | None, hosts: frozenset[str], action_token: str) -> None:
        self.dsn, self.secret, self.hosts, self.action_token = dsn, secret, hosts, action_token

    def prepare(self) -> None:
        host = self.request.headers.get("Host", "").lower()
        if host not in self.hosts:  # DNS rebinding: a foreign name that resolves here
            raise tornado.web.HTTPError(403, f"this UI answers only {', '.join(sorted(self.hosts))}")
        if self.request.method not in ("GET", "HEAD") and not self._from_this_ui():
            raise tornado.web.HTTPError(403, "actions are taken only from the UI's own pages")
        if not self.secret:
            return
        given = self.request.headers.get("Authorization", "")
        password = ""
        if given.startswith("Basic "):
            try:
                password = base64.b64decode(given[6:]).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                password = ""
        if not hmac.compare_digest(password.encode(), self.secret.encode()):
            self.set_status(401)
            self.set_header("WWW-Authenticate", 'Basic realm="durable ui: the DURABLE_AUTH_SECRET"')
            self.finish("the durable ui asks for DURABLE_AUTH_SECRET as the password")

    def _from_this_ui(self) -> bool:
        origin = self.request.headers.get("Origin")
        if origin is not None and origin.lower() not in {f"http://{h}" for h in self.hosts}:
            return False
        return self.request.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none")

    @property
    def xsrf_token(self) -> bytes:
        """The action token: the same for every page of this process, and known only to it."""
        return self.action_token.encode()

    def check_xsrf_cookie(self) -> None:
        given = self.get_argument("_xsrf", None) or self.request.headers.get("X-Xsrftoken") or ""
        if not hmac.compare_digest(given.encode(), self.xsrf_token):
            raise tornado.web.HTTPError(403, "the action token is missing or wrong: reload the page")

    async def journal(self, work: Callable[..., Any], *args: Any) -> Any:
        def call() -> Any:
            with operations.connect(self.dsn, migrate=False) as conn:
                return work(conn, *args)

        return await asyncio.to_thread(call)

    def page(self, title: str, body: bytes) -> None:
        self.finish(render("layout.html", title=title, body=body.decode()))

    def confirmed(self) -> None:
        if self.get_body_argument("confirm", "") != "yes":
            raise tornado.web.HTTPError(400, reason="not confirmed: tick the confirm box")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        text = str(error) if error is not None else self._reason
        if isinstance(error, tornado.web.HTTPError):  # the UI's own refusals say why; tornado's give a reason
            text = error.log_message % error.args if error.log_message else self._reason
        self.finish(render("layout.html", title=f"{status_code}", body=f"<p>{tornado.escape.xhtml_escape(text)}</p>"))

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, operations.OperatorError | ValueError):  # a request the journal cannot honour: say why
            self.send_error(404 if isinstance(e, operations.NotFound) else 400, exc_info=(type(e), e, None))
            return
        super()._handle_request_exception(e)


class Runs(Handler):
    async def get(self) -> None:
        prefix, state = self.get_argument("prefix", ""), self.get_argument("state", "")
        page = max(int(self.get_argument("page", "0") or 0), 0)
        rows = await self.journal(
            operations.runs, prefix, state if state in operations.RUN_STATES else "", PAGE_SIZE + 1, page * PAGE_SIZE
        )

        def query(n: int) -> str:
            return urlencode({"prefix": prefix, "state": state, "page": n})

        body = render(
            "runs.html",
            runs=rows[:PAGE_SIZE],
            more=len(rows) > PAGE_SIZE,
            page=page,
            prefix=prefix,
            state=state,
            states=operations.RUN_STATES,
            when=when,
            url=url,
            query=query,
        )
        self.page("runs", body)


class Run(Handler):
    async def get(self, run: str) -> None:
        version = await self.journal(operations.run_version, run)
        steps = await self.journal(operations.steps, run)
        live = self.live(run, steps)
        body = render(
            "run.html",
            run=run,
            steps=steps,
            live=live,
            version=version,
            outcomes=OUTCOMES,
            xsrf=self.xsrf_form_html(),
            url=url,
        )
        self.page(f"run {run}", body)

    def live(self, run: str, steps: list[dict[str, Any]]) -> str:
        bars, span = timeline(steps)
        return render(
            "live.html", run=run, steps=steps, bars=bars, span=span, width=900, url=url, outcome=outcome
        ).decode()


class Live(Run):
    """Polled every second by an open run page: 204 and nothing more while the run is unchanged
    (a 5,000-step run's page is 1.5 MB), the steps again only when they changed."""

    async def get(self, run: str) -> None:
        self.set_header("Cache-Control", "no-store")
        version = await self.journal(operations.run_version, run)
        if version == self.get_argument("since", None):
            self.set_status(204)
            self.finish()
            return
        html = self.live(run, await self.journal(operations.steps, run))
        self.finish({"version": version, "html": html})


class StepPage(Handler):
    async def get(self, run: str, seq: str) -> None:
        step = await self.journal(operations.step_detail, run, int(seq))
        forked = (await self.journal(operations.run_row, run))["forked_from"] is not None
        body = render(
            "step.html",
            run=run,
            s=step,
            outcome=outcome(step),
            when=when,
            url=url,
            dumps=json.dumps,
            forked=forked,
            request_body=shown(step["request_body"]),
            response_body=shown(step["response_body"]),
            events=events(step["response_body"], step["response_headers"]),
            xsrf=self.xsrf_form_html(),
        )
        self.page(f"run {run} · step {seq}", body)


class Fork(Handler):
    async def post(self, run: str) -> None:
        self.confirmed()
        to = identity.validate_id(self.get_body_argument("to"), "run id")
        await self.journal(operations.fork, run, int(self.get_body_argument("at")), to)
        self.redirect(f"/runs/{url(to)}")


class Delete(Handler):
    async def post(self, run: str) -> None:
        self.confirmed()
        await self.journal(operations.remove, run)
        self.redirect("/")


class Resolve(Handler):
    async def post(self, run: str, seq: str) -> None:
        self.confirmed()
        how = self.get_body_argument("how")
        if how == "complete":
            await self.journal(
                operations.resolve,
                run,
                int(seq),
                "complete",
                int(self.get_body_argument("status", "200")),
                self.get_body_argument("body", "").encode(),
                self.get_body_argument("content_type", "application/json"),
            )
        elif how in ("reissue", "forget"):
            await self.journal(operations.resolve, run, int(seq), how)
        else:
            raise tornado.web.HTTPError(400, reason=f"resolve how? {how!r}")
        self.redirect(f"/runs/{url(run)}" if how == "forget" else f"/runs/{url(run)}/steps/{seq}")


class Edit(Handler):
    async def post(self, run: str, seq: str) -> None:
        self.confirmed()
        status, body = self.get_body_argument("status", ""), self.get_body_argument("body", None)
        await self.journal(  # a form without a body keeps the answer's body, as `durable edit` does
            operations.edit, run, int(seq), int(status) if status else None, None if body is None else body.encode()
        )
        self.redirect(f"/runs/{url(run)}/steps/{seq}")


class Export(Handler):
    async def get(self, run: str, kind: str) -> None:
        from . import exchange

        rows = await self.journal(operations.step_rows, run)
        data = await asyncio.to_thread(exchange.dump, exchange.flows(rows), kind)
        self.set_header("Content-Type", "application/json" if kind == "har" else "application/octet-stream")
        self.set_header("Content-Disposition", f'attachment; filename="{run}.{kind}"')
        self.finish(data)


class NoIcon(tornado.web.RequestHandler):
    """Browsers ask every page for /favicon.ico: nothing to show, and not a 404 in every console."""

    def get(self) -> None:
        self.set_status(204)
        self.finish()


def allowed_hosts(host: str, port: int, names: list[str]) -> frozenset[str]:
    """The `Host` values the UI answers: its address (and `localhost` for a loopback one) with its
    port, and each of `names` (with this port, unless the name gives one: a reverse proxy's)."""
    hosts = {host} | ({"localhost", "127.0.0.1"} if host in ("127.0.0.1", "::1", "localhost") else set())
    allowed = {f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in hosts}
    allowed |= {n.lower() if ":" in n else f"{n.lower()}:{port}" for n in names}
    return frozenset(allowed)


def app(dsn: str, secret: str | None, hosts: frozenset[str]) -> tornado.web.Application:
    state = {"dsn": dsn, "secret": secret, "hosts": hosts, "action_token": secrets.token_urlsafe(32)}
    run = r"/runs/([^/]+)"
    return tornado.web.Application(
        [
            (r"/", Runs, state),
            (r"/favicon\.ico", NoIcon),
            (run, Run, state),
            (run + "/live", Live, state),
            (run + r"/steps/(\d+)", StepPage, state),
            (run + "/fork", Fork, state),
            (run + "/delete", Delete, state),
            (run + r"/steps/(\d+)/resolve", Resolve, state),
            (run + r"/steps/(\d+)/edit", Edit, state),
            (run + r"/export\.(har|flows)", Export, state),
        ],
        xsrf_cookies=True,
        cookie_secret=secrets.token_hex(32),
    )


def serve(dsn: str | None, host: str, port: int, allow_hosts: list[str] | None = None) -> None:
    """Run the UI until interrupted (the journal migrated first, as every command does)."""
    with operations.connect(dsn):
        pass
    target = database.resolve(dsn)
    secret = os.environ.get("DURABLE_AUTH_SECRET") or None

    async def main() -> None:
        app(target.dsn, secret, allowed_hosts(host, port, allow_hosts or [])).listen(port, host)
        print(f"durable ui: http://{host}:{port}/ (journal: {target.origin})", flush=True)
        await asyncio.Event().wait()

    try:
        with registry.serving("ui", port):  # a sidecar never journals a call to it
            asyncio.run(main())
    except KeyboardInterrupt:
        pass
