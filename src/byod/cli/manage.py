"""Setting up: the control plane, users, their databases, migration files; the
service, the task-queue worker and the demo."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.logging import RichHandler
from rich.markup import escape

from byod import commands, errors
from byod.cli import progress, render
from byod.cli.base import (
    MAX_SECONDS,
    All,
    DatabaseUrl,
    Json,
    Migrations,
    OptionalUser,
    UserArg,
    app,
    convex_app,
    err,
    one_target,
    out,
    say,
    users_app,
    workspace_for,
)
from byod.errors import InputError
from byod.extras import require
from byod.logs import json_on_stderr, libraries_log_json


@app.command()
def init(database_url: DatabaseUrl = None, migrations: Migrations = None) -> None:
    """Create the control-plane tables (safe to run again)."""
    result = commands.init(workspace_for(database_url, migrations, create_key=True))
    out.print(f"control plane ready: {escape(result.database)}")
    if result.key.created:
        out.print(f"created a new encryption key: {escape(result.key.description)} (mode 0600)")
        out.print("  keep it safe; in production set BYOD_ENCRYPTION_KEY instead")
    else:
        out.print(f"encryption key: {escape(result.key.description)}")
    out.print(f"migrations head version: {result.head}")


@users_app.command("add")
def users_add(
    clerk_id: Annotated[
        str,
        typer.Option(
            "--clerk-id",
            metavar="ID",
            help="External auth subject (the token's `sub`), stored exactly: not all digits, "
            "no control characters or surrounding spaces.",
        ),
    ],
    email: Annotated[str | None, typer.Option("--email", metavar="EMAIL")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Register a user; prints the new user id."""
    user = commands.add_user(workspace_for(database_url, None), clerk_id, email)
    out.print(user.id)


@users_app.command("list")
def users_list(
    removed: Annotated[
        bool, typer.Option("--removed", help="Removed users too (their clerk id gone).")
    ] = False,
    database_url: DatabaseUrl = None,
    json_out: Json = False,
) -> None:
    """List users: id, clerk id, email, when added."""
    users = commands.list_users(workspace_for(database_url, None), removed=removed)
    if json_out:
        out.print(render.dump([render.user_data(u) for u in users]))
        return
    out.print(render.users_table(users))


@users_app.command("remove")
def users_remove(user: UserArg, database_url: DatabaseUrl = None) -> None:
    """Remove a user: credentials and email deleted, history kept under the byod id; the
    clerk id can be registered again later (as a new user)."""
    removed = commands.remove_user(workspace_for(database_url, None), user)
    out.print(
        f"user {removed.id} removed: credentials and email deleted, its history kept "
        f"(`byod history {removed.id}`)"
    )


def _check_configs(
    ws: Any, user: str | None, concurrency: int, timeout: float, json_out: bool
) -> None:
    if user is not None:
        found = commands.check_pending(ws, concurrency=1, timeout=timeout, only=user)
    else:
        found = commands.check_pending(ws, concurrency=concurrency, timeout=timeout)
    if json_out:
        out.print(render.dump([asdict(c) for c in found]))
    else:
        for c in found:
            shown = f"version {c.schema_version}" if c.error is None else render.plain(c.error)
            if c.note:
                shown += f" ({render.plain(c.note)})"
            out.print(f"user {c.user_id} ({render.plain(c.clerk_id)}): {c.status}, {shown}")
        out.print(f"checked {len(found)}: {sum(c.error is None for c in found)} connected")
    if any(c.error is not None for c in found):
        raise typer.Exit(1)


@users_app.command("import")
def users_import(
    file: Annotated[
        str,
        typer.Argument(
            metavar="FILE",
            help="JSON lines or CSV (header: clerk_id,url[,secret][,email]); '-' reads "
            "standard input. It holds credentials: a file other users can read is refused.",
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would change; change nothing.")
    ] = False,
    json_out: Json = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Add or update users in bulk, each with its database (sealed, status pending, not
    contacted: `byod connect --check --all` checks them); idempotent."""
    ws = workspace_for(database_url, None)
    report = commands.import_users(ws, commands.read_import(file), dry_run=dry_run)
    if json_out:
        out.print(render.dump(asdict(report)))
    else:
        would = "would be " if dry_run else ""
        out.print(
            f"{report.added} {would}added, {report.updated} {would}updated, "
            f"{report.unchanged} unchanged, {len(report.refused)} refused"
        )
        for line, clerk_id, reason in report.refused:
            err.print(
                f"[red]refused:[/] line {line} ({render.plain(clerk_id)}): {render.plain(reason)}"
            )
    if report.refused:
        raise typer.Exit(1)


@app.command()
def token(
    sub: Annotated[
        str,
        typer.Option(
            "--sub", metavar="CLERK_ID", help="The token's subject: a user's clerk id, exactly."
        ),
    ],
    role: Annotated[
        str | None,
        typer.Option(
            "--role",
            metavar="admin",
            help="admin: an operator's token (the role claim of BYOD_JWT_ROLE_CLAIM).",
        ),
    ] = None,
    expires_in: Annotated[
        int, typer.Option("--expires-in", metavar="SECONDS", min=1, max=366 * 86400)
    ] = 3600,
) -> None:
    """Print a test token for `byod serve`, signed with BYOD_JWT_SECRET (development
    only; refused where tokens are verified with a public key or a JWKS). Needs the
    serve extra."""
    require("serve", "byod token")
    from byod.api.auth import AuthSettings, mint_test_token

    if role not in (None, "admin"):
        raise InputError(f"--role takes admin only (a user's token has no role), not {role!r}")
    settings = AuthSettings.from_env()
    out.print(
        mint_test_token(settings, sub, admin=role == "admin", seconds=expires_in),
        soft_wrap=True,
        markup=False,
        highlight=False,
    )


@app.command()
def disconnect(user: UserArg, database_url: DatabaseUrl = None) -> None:
    """Drop a user's database credentials (the user and its history stay)."""
    found, dropped = commands.disconnect(workspace_for(database_url, None), user)
    who = f"user {found.id} ({render.plain(found.clerk_id)})"
    out.print(f"{who} disconnected" if dropped else f"{who} had no database connected")


@app.command()
def connect(
    user: OptionalUser = None,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            metavar="URL",
            help="The user's database: a SQLAlchemy URL, or a Convex deployment "
            "(https://NAME.convex.cloud, convex+https://HOST for a self-hosted one); '-' "
            "reads it from standard input (a hidden prompt on a terminal), out of `ps` and "
            "shell history.",
        ),
    ] = None,
    secret: Annotated[
        str | None,
        typer.Option(
            "--secret",
            metavar="SECRET",
            help="Password, if not in the URL, or a Convex deployment's deploy key "
            "(required); '-' reads it from standard input (after the URL when both are '-').",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", metavar="SECONDS", min=0.1, max=MAX_SECONDS)
    ] = 10.0,
    queue: Annotated[
        str | None,
        typer.Option(
            "--queue",
            metavar="QUEUE",
            help="Task queue of the workers that can reach it (distributed).",
        ),
    ] = None,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Store the new config even when it fails and the user's current one "
            "works (by default a working config is kept).",
        ),
    ] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Check stored configs instead: USER's, or with --all every pending one "
            "(imported, not contacted yet); their status and version are recorded.",
        ),
    ] = False,
    every: All = False,
    concurrency: Annotated[int, typer.Option("--concurrency", metavar="N", min=1, max=256)] = 8,
    json_out: Json = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Seal and store a user's database credentials and check it answers (or, with
    --check, check configs already stored)."""
    ws = workspace_for(database_url, None)
    if check:
        _check_configs(ws, one_target(user, every), concurrency, timeout, json_out)
        return
    if user is None or url is None or every:
        raise InputError("give USER and --url (or --check with USER or --all)")
    url_text = from_stdin("database URL") if url == "-" else url
    secret_text = from_stdin("password or deploy key") if secret == "-" else secret
    found, reach = commands.connect(
        ws, user, url_text, secret=secret_text, timeout=timeout, queue=queue, replace=replace
    )
    if reach.status == "connected":
        out.print(
            f"user {found.id} ({render.plain(found.clerk_id)}) connected, "
            f"instance at version {reach.schema_version}"
        )
        if reach.note:
            out.print(f"[dim]note:[/] {escape(reach.note)}")
        return
    kind = reach.error_type or "UnreachableError"
    error_class = getattr(errors, kind, None)
    hint = getattr(error_class, "hint", "") or "Check the URL and that the instance is up."
    kept = (
        "The new config was not stored: the user keeps the working one (`byod connect "
        "--replace` stores it anyway)."
        if not reach.stored
        else "The config is stored (status error); `byod connect` again replaces it."
    )
    say(
        f"[red]error:[/] {kind}: {render.plain(reach.error or '')}\n"
        f"[dim]hint:[/] {escape(hint)} {kept}",
        level=logging.ERROR,
        error=kind,
        plain=f"{reach.error or ''} (hint: {hint} {kept})",
    )
    raise typer.Exit(1)


@convex_app.command("init")
def convex_init(
    app_dir: Annotated[
        Path,
        typer.Argument(
            metavar="DIR",
            help="The Convex app's project folder (the one holding convex/).",
        ),
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Replace byod's files there when they differ.")
    ] = False,
) -> None:
    """Add byod's module (convex/byod.ts, convex/byodTables.ts) to a Convex app, and say
    what to add to its schema.ts."""
    from byod.commands.convex_app import SCHEMA_SNIPPET, TABLES, init_convex_app

    result = init_convex_app(app_dir, force=force)
    for name in result.written:
        out.print(f"wrote {escape(str(result.folder / name))}")
    for name in result.unchanged:
        out.print(f"{escape(str(result.folder / name))} is up to date")
    if result.schema_ready:
        out.print("schema.ts already spreads byodTables")
    else:
        out.print(
            f"add byod's tables ({', '.join(TABLES)}) to {escape(str(result.folder))}/schema.ts:"
        )
        out.print(escape(SCHEMA_SNIPPET), highlight=False)
    out.print(
        "then deploy the app (npx convex deploy) to each deployment once, or let byod's "
        "deploy step do it; byod finds the app where the migrations folder sits beside "
        f"convex/, else set BYOD_CONVEX_APP={escape(str(result.folder.parent.resolve()))}"
    )


@convex_app.command("local")
def convex_local_deployments(
    app_dir: Annotated[
        Path,
        typer.Argument(
            metavar="DIR", help="The Convex app's project folder (the one holding convex/)."
        ),
    ],
    deployments: Annotated[
        int,
        typer.Option("--deployments", metavar="N", min=1, max=50, help="How many [default: 3]."),
    ] = 3,
    seed: Annotated[
        list[str] | None,
        typer.Option(
            "--seed",
            metavar="TABLE=FILE",
            help="Insert FILE's documents (JSON lines) into TABLE of each (repeat it).",
        ),
    ] = None,
    json_out: Json = False,
) -> None:
    """Start N local deployments of your own Convex app (its own npm packages), print
    their URLs and deploy keys, and keep them running until Ctrl-C: try a migration on
    your app before your fleet."""
    import signal

    from byod.commands import convex_local

    log = Path(tempfile.mkdtemp(prefix="byod-convex-local-")) / "server.log"
    server, made = convex_local.start_local_deployments(
        app_dir,
        deployments,
        tuple(seed or ()),
        log,
        on_install=lambda message: say(escape(message)),
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as Ctrl-C does
    try:
        for d in made:
            if json_out:
                out.print(
                    render.dump({"name": d.name, "url": d.url, "key": d.key, "seeded": d.seeded})
                )
            else:
                seeded = ", ".join(f"{n} {table}" for table, n in d.seeded.items())
                out.print(
                    f"{d.name}: {d.url} key {d.key}" + (f" (seeded: {seeded})" if seeded else "")
                )
        if not json_out:
            out.print(
                "to migrate them with byod (local addresses allowed, the local deploy):\n"
                "  export BYOD_ALLOW_PRIVATE_INSTANCES=1 "
                f"BYOD_CONVEX_DEPLOY={shlex.quote(server.deploy_command)}\n"
                f"  byod connect USER --url {made[0].url} --secret KEY"
            )
        out.print(
            render.dump({"ready": len(made), "deploy": server.deploy_command})
            if json_out
            else f"ready: {len(made)} local deployments (Ctrl-C stops them; their data goes too)"
        )
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        shutil.rmtree(log.parent, ignore_errors=True)


def from_stdin(what: str) -> str:
    """One secret from standard input: a hidden prompt on a terminal, else one line."""
    if sys.stdin.isatty():
        text = str(typer.prompt(what.capitalize(), hide_input=True, err=True))
    else:
        text = sys.stdin.readline().rstrip("\r\n")
    if not text:
        raise InputError(f"no {what} on standard input")
    return text


@app.command()
def worker(
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency",
            metavar="N",
            min=1,
            max=1024,
            help="Worker processes: users migrated at once here.",
        ),
    ] = os.cpu_count() or 2,
    queues: Annotated[
        str | None,
        typer.Option(
            "--queues",
            metavar="A,B",
            help="Comma-separated queues to take tasks from [default: BYOD_QUEUE].",
        ),
    ] = None,
    loglevel: Annotated[
        str, typer.Option("--loglevel", metavar="LEVEL", help="Celery's log level.")
    ] = "INFO",
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            metavar="PORT",
            min=1,
            max=65535,
            help="Serve Prometheus metrics of this worker and its pool processes on "
            "http://HOST:PORT/metrics (no token: bind it where only Prometheus reaches).",
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", metavar="HOST", help="Address for --metrics-port.")
    ] = "127.0.0.1",
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Run a task-queue worker for distributed runs (needs BYOD_BROKER_URL and a
    PostgreSQL control plane); stop it with Ctrl-C (running users finish). Needs the
    celery extra."""
    require("celery", "byod worker")
    names = [q.strip() for q in (queues or "").split(",") if q.strip()]
    if queues is not None and not names:
        raise InputError("--queues names no queue")
    made: str | None = None  # a folder of our own, removed when the worker ends
    if metrics_port is not None:
        # before prometheus-client is first imported: the pool processes' metrics are
        # written to files there and added up at each scrape
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not folder:
            folder = made = tempfile.mkdtemp(prefix="byod-metrics-")
        os.makedirs(folder, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        from byod.metrics import serve_metrics

        serve_metrics(metrics_host, metrics_port)
    from byod.taskqueue import serve_worker

    try:
        serve_worker(
            workspace_for(database_url, migrations),
            concurrency=concurrency,
            queues=names,
            loglevel=loglevel.upper(),
        )
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


@app.command()
def new(
    name: Annotated[
        str,
        typer.Argument(metavar="NAME", help="What the migration does, e.g. 'add archived'."),
    ],
    migrations: Migrations = None,
) -> None:
    """Scaffold the next migration file in the migrations folder."""
    path = commands.new_migration(workspace_for(None, migrations), name)
    out.print(f"created {escape(str(path))}")


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", metavar="HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="PORT", min=1, max=65535)] = 8000,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Serve the HTTP API and the operators' dashboard (BYOD_JWT_* configure tokens).
    Needs the serve extra."""
    require("serve", "byod serve")
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from byod.api import AuthSettings, HttpSettings, create_app

    application = create_app(
        workspace_for(database_url, migrations), AuthSettings.from_env(), HttpSettings.from_env()
    )
    access = logging.getLogger("byod.api.access")  # always on: who called what (no tokens)
    handlers = logging.getLogger("byod").handlers
    if not json_on_stderr() and not any(isinstance(h, RichHandler) for h in handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        access.addHandler(handler)
    # uvicorn's own warnings (a malformed request, …) as JSON too, in JSON mode
    as_json = libraries_log_json({"uvicorn": logging.WARNING})
    listening = _listen(host, port)  # a port in use is an error here, before any banner
    say(f"byod serving on http://{host}:{port} (dashboard: /dashboard)")
    # forwarded headers are the app's decision (BYOD_FORWARDED_ALLOW_IPS), and so is the
    # access log (uvicorn's would print query strings)
    config = uvicorn.Config(
        application,
        log_level="warning",
        proxy_headers=False,
        access_log=False,
        log_config=None if as_json else LOGGING_CONFIG,
    )
    uvicorn.Server(config).run(sockets=[listening])


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (uvicorn listens on it); InputError when the
    address cannot be had (in use, not this machine's)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listening = socket.socket(family, kind, proto)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind(address)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return listening


@app.command()
def demo(
    tenants: Annotated[int, typer.Option("--tenants", metavar="N", min=1, max=100000)] = 5,
    convex: Annotated[
        bool,
        typer.Option(
            "--convex",
            help="A fleet of local Convex test deployments instead (needs Node 20+; the "
            "local backend's npm packages install on first use, into byod's cache folder).",
        ),
    ] = False,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Build a local fleet of SQLite instances (or, with --convex, of Convex test
    deployments) at version 1 and migrate them all to head."""

    ws = workspace_for(database_url, migrations, create_key=True)
    if convex:
        if migrations is not None:
            raise InputError("--convex runs the example Convex app's migrations: drop --migrations")
        from byod.commands.convex_demo import run_convex_demo

        def build(on_event: Callable[[Any], None]) -> commands.DemoResult:
            return run_convex_demo(
                ws.settings,
                tenants=tenants,
                own_database=database_url is None,
                on_event=on_event,
                on_install=lambda message: say(escape(message)),
            )
    else:

        def build(on_event: Callable[[Any], None]) -> commands.DemoResult:
            return commands.run_demo(ws, tenants=tenants, on_event=on_event)

    result = progress.run_fleet(out, err, build, False)
    progress.print_summary(out, err, result.summary, False)
    render.fleet_status_tables(result.status, out)
    out.print(render.history_table(f"history of {result.sample_user}", result.sample_history))
    if convex:
        # the demo's own control plane and migrations: without them `byod status` here
        # would read another control plane, or count against another folder's head
        database = shlex.join(["--database-url", result.database_url or ""])
        folder_flag = shlex.join(["--migrations", str(result.migrations)])
        out.print(
            f"deployments: {result.created} local Convex test deployments (gone with the demo); "
            f"their ledger stays in {escape(result.database_url or '')}: e.g. "
            f"`byod history {result.sample_user} {escape(database)}`, "
            f"`byod status {escape(database)} {escape(folder_flag)}`"
        )
    else:
        out.print(f"instances: {escape(str(result.folder))} ({result.created} created this time)")
    if result.setup.key.created:
        out.print(f"created a local encryption key: {escape(result.setup.key.description)}")
    if not result.summary.ok:
        raise typer.Exit(1)
