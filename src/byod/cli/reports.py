"""Looking without changing: fleet status, a user's history and pending count,
verification, and marking a repaired instance clean."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer
import typer.core
from rich.markup import escape

from byod import commands
from byod.cli import render
from byod.cli.base import (
    MAX_INT,
    All,
    DatabaseUrl,
    Json,
    Migrations,
    OptionalUser,
    UserArg,
    app,
    one_target,
    out,
    workspace_for,
)
from byod.spec import DEFAULT_CONCURRENCY


@app.command()
def status(
    json_out: Json = False, database_url: DatabaseUrl = None, migrations: Migrations = None
) -> None:
    """Fleet status: users per version and connection status, recent failures."""
    result = commands.status(workspace_for(database_url, migrations))
    if json_out:
        out.print(render.dump(render.fleet_status_data(result)))
    else:
        render.fleet_status_tables(result, out)


@app.command()
def repair(user: UserArg, database_url: DatabaseUrl = None, migrations: Migrations = None) -> None:
    """After undoing a half-applied step by hand (MySQL/MariaDB), mark the instance clean."""
    cleared = commands.repair(workspace_for(database_url, migrations), user)
    if cleared:
        out.print(f"marked clean: {escape(', '.join(cleared))} will run again on the next migrate")
    else:
        out.print("the instance was not dirty: nothing to do")


@app.command()
def history(
    user: UserArg,
    limit: Annotated[int | None, typer.Option("--limit", metavar="N", min=1, max=MAX_INT)] = None,
    json_out: Json = False,
    database_url: DatabaseUrl = None,
) -> None:
    """A user's migration history, newest first."""
    found, rows = commands.user_history(workspace_for(database_url, None), user, limit=limit)
    if json_out:
        out.print(render.dump(render.history_data(rows)))
    else:
        out.print(render.history_table(f"history of user {found.id} ({found.clerk_id})", rows))


@app.command()
def pending(
    user: UserArg,
    json_out: Json = False,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Number of migrations pending for a user."""
    count = commands.pending(workspace_for(database_url, migrations), user)
    out.print(render.dump({"pending": count}) if json_out else count)


@app.command()
def verify(
    user: OptionalUser = None,
    every: All = False,
    policy: Annotated[
        bool,
        typer.Option(
            "--policy",
            help="Only list the stored configs today's instance policy refuses "
            "(every user unless USER is given); nothing is connected.",
        ),
    ] = False,
    accept: Annotated[
        str | None,
        typer.Option(
            "--accept",
            metavar="MIGRATION",
            help="After a change to an applied migration's file that changes nothing it "
            "did: its instances' stamps (every user unless USER is given) and the fleet's "
            "record take the file's checksum now; who, when, old and new are recorded.",
        ),
    ] = None,
    json_out: Json = False,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Check instance stamps and checksums against the registry and control plane."""
    ws = workspace_for(database_url, migrations)
    if accept is not None:
        accepted = commands.accept_checksum(ws, accept, user if not every else None)
        if json_out:
            out.print(render.dump([asdict(a) for a in accepted]))
        for a in accepted if not json_out else []:
            said = a.error or ("restamped" if a.old else "nothing to change")
            out.print(f"user {a.user_id} ({render.plain(a.clerk_id)}): {render.plain(said)}")
        if any(a.error for a in accepted):
            raise typer.Exit(1)
        return
    target = user if policy and not every else one_target(user, every)
    reports = commands.verify(ws, target, policy=policy)
    if json_out:
        out.print(render.dump([asdict(r) | {"ok": r.ok} for r in reports]))
    else:
        out.print(render.verify_table(reports, policy=policy))
    if not all(report.ok for report in reports):
        raise typer.Exit(1)


@app.command()
def adopt(
    user: OptionalUser = None,
    every: All = False,
    concurrency: Annotated[
        int, typer.Option("--concurrency", metavar="N", min=1, max=256, help="Users at a time.")
    ] = DEFAULT_CONCURRENCY,
    json_out: Json = False,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Take over instances Alembic manages: write byod's stamp at the revision each
    one's alembic_version names (nothing is run); --migrations names the Alembic history."""
    target = one_target(user, every)
    ws = workspace_for(database_url, migrations)
    adoptions = commands.adopt(ws, target, concurrency=concurrency)
    if json_out:
        out.print(render.dump([asdict(a) for a in adoptions]))
    else:
        out.print(render.adoptions_table(adoptions))
    if any(a.status == "refused" for a in adoptions):
        raise typer.Exit(1)
