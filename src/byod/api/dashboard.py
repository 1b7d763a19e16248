"""The operators' dashboard: server-rendered HTML, an inline-SVG chart, no build step.

Sign in with an operator's token (kept in an HttpOnly, SameSite=Strict cookie scoped to
/dashboard, ``Secure`` when the request came over HTTPS). Signing in and out are POSTs
(a cross-site POST is refused by ``Sec-Fetch-Site``); the pages carry no script, so the
CSP (see :mod:`byod.api.guard`) allows only the inline style below, by its hash.
Pages: the fleet (users per version, and after each of the last runs; connection
statuses, latest failures, runs with live progress), one run's own page and one user's
history.
"""

from __future__ import annotations

from html import escape
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from byod import commands
from byod.api.auth import Authenticator
from byod.api.pages import STYLE
from byod.api.pages import page as _page
from byod.api.run_page import render_run, versions_over_runs
from byod.clock import utcnow
from byod.controlplane import FleetStatus, LedgerRow, RunRecord
from byod.errors import (
    AuthError,
    ByodError,
    KeysUnavailableError,
)
from byod.workspace import Workspace

__all__ = ["COOKIE", "STYLE", "install_dashboard"]

COOKIE = "byod_token"
_MAX_TOKEN = 16 * 1024  # a JWT with custom claims is a few KiB at most


def _sign_in(message: str = "", rule: str = "byod_role: admin") -> str:
    note = f'<p class="bad" id="sign-in-error">{escape(message)}</p>' if message else ""
    return _page(
        "byod: sign in",
        f"<h1>byod dashboard</h1><p>Paste an operator token ({escape(rule)}).</p>"
        f"{note}"
        '<form method="post" action="/dashboard/login">'
        '<input type="password" name="token" id="token" size="60" autocomplete="off">'
        '<button type="submit" id="sign-in">Sign in</button></form>',
    )


def _chart(status: FleetStatus) -> str:
    """Users per schema version as an SVG bar chart."""
    versions = sorted(set(status.by_version) | {status.head})
    top = max([status.by_version.get(v, 0) for v in versions] + [1])
    width, height, bar, pad = 80 * len(versions) + 40, 200, 48, 24
    parts = [
        f'<svg id="versions-chart" viewBox="0 0 {width} {height + pad + 30}" width="{width}" '
        f'height="{height + pad + 30}" role="img" '
        f'aria-label="users per schema version">'
    ]
    for index, version in enumerate(versions):
        count = status.by_version.get(version, 0)
        h = round(height * count / top)
        x = 30 + index * 80
        middle = x + bar / 2
        colour = "#2f6fdf" if version == status.head else "#e0872b"
        parts.append(
            f'<rect class="bar" data-version="{version}" data-users="{count}" x="{x}" '
            f'y="{height - h + pad}" width="{bar}" height="{h}" fill="{colour}"></rect>'
            f'<text x="{middle}" y="{height - h + pad - 6}" text-anchor="middle">{count}</text>'
            f'<text x="{middle}" y="{height + pad + 18}" text-anchor="middle">v{version}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _run_row(run: RunRecord, rows: tuple[int, int] | None) -> str:
    c = run.counts
    backfilled = "" if rows is None else f"{rows[0]:,}" + (f"/{rows[1]:,}" if rows[1] else "")
    progress = ""
    if run.planned:
        done = c.done
        progress = f'<progress max="{run.planned}" value="{done}"></progress> {done}/{run.planned}'
    return (
        f'<tr class="run" data-run="{escape(run.id)}"><td>'
        f'<a href="/dashboard/runs/{quote(run.id, safe="")}">{escape(run.id)}</a></td>'
        f"<td>{escape(run.kind)}</td><td>{escape(run.shown_state)}</td><td>{progress}</td>"
        f"<td>{c.succeeded}</td><td class='bad'>{c.failed}</td><td>{c.busy + c.up_to_date}</td>"
        f"<td>{c.not_started}</td><td>{backfilled}</td></tr>"
    )


def _runs_table(table_id: str, runs: list[RunRecord], rows: dict[str, tuple[int, int]]) -> str:
    return (
        f"<table id='{table_id}'><tr><th>run</th><th>kind</th><th>state</th>"
        "<th>progress</th><th>ok</th><th>failed</th><th>busy or up to date</th>"
        "<th>not started</th><th>rows (backfills)</th></tr>"
        f"{''.join(_run_row(r, rows.get(r.id)) for r in runs)}</table>"
    )


def _gates(status: FleetStatus) -> str:
    """The gated migrations and their gates (nothing when the folder has none)."""
    if not status.gates:
        return ""
    rows = "".join(
        f"<tr class='gate' data-gate='{escape(g.migration_id)}' data-state='{g.state}'>"
        f"<td>{escape(g.migration_id)}</td>"
        f"<td class='{'ok' if g.state == 'open' else 'bad'}'>{g.state}</td>"
        f"<td>{g.waiting}</td><td>{g.through}</td>"
        f"<td>{escape(g.changed_by or '')}</td></tr>"
        for g in status.gates
    )
    return (
        "<h2>Gates</h2><p>A gated (contract) step runs on no user until its gate is open "
        "(<code>byod gate open STEP</code>).</p><table id='gates'><tr><th>migration</th>"
        "<th>gate</th><th>not through</th><th>past it</th><th>changed by</th></tr>"
        f"{rows}</table>"
    )


def _overview(
    status: FleetStatus,
    runs: list[RunRecord],
    rows: dict[str, tuple[int, int]],
    over_time: str,
) -> str:
    cards = "".join(
        f'<span class="card" data-status="{escape(state)}">{escape(state)}: <b>{count}</b></span>'
        for state, count in sorted(status.by_connection.items())
    )
    failures = "".join(
        f'<tr class="failure"><td><a href="/dashboard/users/{f.user_id}">'
        f"{f.user_id} ({escape(f.clerk_id)})</a></td><td>{escape(f.migration_id)} "
        f"{escape(f.direction)}</td><td>{escape(f.error or '')}</td>"
        f"<td>{f.at:%Y-%m-%d %H:%M:%S}</td></tr>"
        if f.at
        else ""
        for f in status.recent_failures
    )
    running = any(r.shown_state == "running" for r in runs)
    real = [r for r in runs if r.kind != "rehearse"]
    rehearsals = [r for r in runs if r.kind == "rehearse"]
    return _page(
        "byod: fleet",
        f"<h1>byod fleet</h1><p>head version <b id='head'>{status.head}</b>, "
        f"<b id='users'>{status.users}</b> users, <b id='outdated'>{status.outdated}</b> "
        "below head that a run would take. "
        "<form method='post' action='/dashboard/logout' class='inline'>"
        "<button type='submit' id='sign-out'>sign out</button></form></p>"
        f"<h2>Users per schema version</h2>{_chart(status)}"
        "<h2>Users per version after each of the last runs</h2>"
        f"{over_time}"
        f"<h2>Connection status</h2><div id='connection'>{cards}</div>"
        f"{_gates(status)}"
        "<h2>Latest failures</h2><table id='failures'><tr><th>user</th><th>migration</th>"
        f"<th>error</th><th>when (UTC)</th></tr>{failures}</table>"
        f"<h2>Fleet runs</h2>{_runs_table('runs', real, rows)}"
        "<p class='note'>Runs that moved nobody (every user up to date) are left out: "
        "<a href='/dashboard?noop=1'>show them too</a>.</p>"
        "<h2>Rehearsals</h2><p>Runs that changed nothing: each user's steps rolled back; "
        "<i>ok</i> passed, <i>failed</i> would fail.</p>"
        f"{_runs_table('rehearsals', rehearsals, rows)}"
        "<h2>A user's history</h2><form method='get' action='/dashboard/users'>"
        "<input name='user' placeholder='user id or clerk id'><button>Show</button></form>",
        refresh=running,
    )


def _history(label: str, rows: list[LedgerRow]) -> str:
    body = "".join(
        f"<tr class='step'><td>{escape(r.migration_id)}</td><td>{escape(r.direction)}</td>"
        f"<td class='{'bad' if r.status == 'failed' else 'ok'}'>{escape(r.status)}</td>"
        f"<td>{r.attempts}</td><td>{escape(r.run_id or '')}</td><td>{escape(r.error or '')}</td>"
        f"<td>{r.created_at:%Y-%m-%d %H:%M:%S}</td></tr>"
        for r in rows
    )
    return _page(
        f"byod: {label}",
        f"<p><a href='/dashboard'>&larr; fleet</a></p><h1>History of {escape(label)}</h1>"
        "<table id='history'><tr><th>migration</th><th>dir</th><th>status</th><th>attempt</th>"
        f"<th>run</th><th>error</th><th>created (UTC)</th></tr>{body}</table>",
    )


def _cross_site(request: Request) -> bool:
    """A browser's cross-site request (CSRF); requests without the header are not browsers'."""
    return request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none")


router = APIRouter(include_in_schema=False)


def install_dashboard(app: FastAPI) -> None:
    """Add the /dashboard pages (not part of the OpenAPI document); they use the app's
    workspace and authenticator (``app.state``)."""
    app.include_router(router)


def _ws(request: Request) -> Workspace:
    ws: Workspace = request.app.state.ws
    return ws


def _authenticator(request: Request) -> Authenticator:
    authenticator: Authenticator = request.app.state.authenticator
    return authenticator


def _sign_in_page(request: Request, message: str = "", status_code: int = 200) -> Response:
    rule = _authenticator(request).operator_rule
    return HTMLResponse(_sign_in(message, rule), status_code=status_code)


def _refused(request: Request) -> Response | None:
    """None when an operator's cookie came with the request, else the page to show."""
    token = request.cookies.get(COOKIE)
    if not token:
        return _sign_in_page(request)
    try:
        principal = _authenticator(request).verify(token)
    except AuthError:
        return _sign_in_page(request)
    except KeysUnavailableError as exc:
        return _sign_in_page(request, f"cannot check tokens now: {exc.message}", 503)
    request.state.principal = principal  # for the access log
    return None if principal.admin else _sign_in_page(request)


@router.get("/dashboard")
def dashboard(request: Request) -> Response:
    if (page := _refused(request)) is not None:
        return page
    ws = _ws(request)
    runs = commands.list_runs(ws, limit=10, noop=request.query_params.get("noop") == "1")
    status = commands.status(ws)
    oldest_first = [run for run in reversed(runs) if run.kind != "rehearse"]  # moved users
    over_time = versions_over_runs(
        oldest_first, commands.fleet_over_runs(ws, oldest_first), status.head
    )
    return HTMLResponse(_overview(status, runs, commands.runs_rows(ws, runs), over_time))


@router.get("/dashboard/runs/{run_id}")
def run_page(request: Request, run_id: str) -> Response:
    if (page := _refused(request)) is not None:
        return page
    try:
        timeline = commands.run_timeline(_ws(request), run_id)
    except ByodError as exc:
        return _not_found(exc)
    return HTMLResponse(render_run(timeline, utcnow()))


def _not_found(exc: ByodError) -> Response:
    body = f"<p><a href='/dashboard'>&larr; fleet</a></p><p>{escape(exc.message)}</p>"
    return HTMLResponse(_page("byod: not found", body), status_code=404)


@router.post("/dashboard/login")
async def login(request: Request) -> Response:
    if _cross_site(request):
        return _sign_in_page(request, "cross-site sign-in refused", 403)
    body = await request.body()  # at most BYOD_API_MAX_BODY: the Guard read it
    if len(body) > _MAX_TOKEN:
        return _sign_in_page(request, f"a token is at most {_MAX_TOKEN} bytes", 413)
    token = (parse_qs(body.decode(errors="replace")).get("token") or [""])[0].strip()
    authenticator = _authenticator(request)
    try:
        principal = await run_in_threadpool(authenticator.verify, token)
    except AuthError as exc:
        return _sign_in_page(request, exc.message, 401)
    except KeysUnavailableError as exc:
        return _sign_in_page(request, f"cannot check tokens now: {exc.message}", 503)
    request.state.principal = principal
    if not principal.admin:
        return _sign_in_page(request, f"operators only ({authenticator.operator_rule})", 403)
    response = RedirectResponse("/dashboard", status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        httponly=True,
        samesite="strict",
        path="/dashboard",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/dashboard/logout")
def logout(request: Request) -> Response:
    if _cross_site(request):
        return HTMLResponse(_page("byod", "<p>cross-site sign-out refused</p>"), 403)
    response = RedirectResponse("/dashboard", status_code=303)
    response.delete_cookie(
        COOKIE,
        path="/dashboard",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.get("/dashboard/users")
def find_user(user: str = "") -> Response:
    # matched exactly, as everywhere: never trimmed; any character, "/" too
    return RedirectResponse(f"/dashboard/users/{quote(user or '-', safe='')}", 303)


@router.get("/dashboard/users/{user:path}")
def user_page(request: Request, user: str) -> Response:
    if (page := _refused(request)) is not None:
        return page
    try:
        found, rows = commands.user_history(_ws(request), user, limit=200)
    except ByodError as exc:
        return _not_found(exc)
    return HTMLResponse(_history(f"{found.id} ({found.clerk_id})", rows))
