"""``byod gate list``, ``byod gate open`` and ``byod gate close``: the fleet's gates (a gated
migration is a contract step)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from byod import commands
from byod.cli import render
from byod.cli.base import DatabaseUrl, Json, Migrations, gate_app, out, workspace_for

Step = Annotated[
    str, typer.Argument(metavar="STEP", help="The gated migration: its id or its version.")
]
Excluding = Annotated[
    list[str] | None,
    typer.Option(
        "--excluding",
        metavar="USER",
        help="A user left behind (not through yet): it does not hold the gate (repeat it, "
        "or give a,b,c).",
    ),
]


@gate_app.command("list")
def gate_list(
    json_out: Json = False, database_url: DatabaseUrl = None, migrations: Migrations = None
) -> None:
    """Every gated migration: open or closed, and the users before and past it."""
    views = commands.list_gates(workspace_for(database_url, migrations))
    if json_out:
        out.print(render.dump([asdict(v) for v in views]))
        return
    if not views:
        out.print("no gated migration in the migrations folder")
        return
    out.print(render.gates_table(views))


@gate_app.command("open")
def gate_open(
    step: Step,
    excluding: Excluding = None,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Open a gate: refused while eligible users are not through the steps before it
    (unless --excluding names them); then runs take users through it."""
    _change(step, "open", excluding, database_url, migrations)


@gate_app.command("close")
def gate_close(
    step: Step,
    excluding: Excluding = None,
    database_url: DatabaseUrl = None,
    migrations: Migrations = None,
) -> None:
    """Close a gate again so rollbacks may cross below it: refused while users are past
    it (unless --excluding names them)."""
    _change(step, "closed", excluding, database_url, migrations)


def _change(
    step: str,
    state: str,
    excluding: list[str] | None,
    database_url: str | None,
    migrations: Path | None,
) -> None:
    refs = tuple(ref.strip() for item in excluding or () for ref in item.split(",") if ref.strip())
    view = commands.change_gate(workspace_for(database_url, migrations), step, state, refs)
    left = f"; left behind: {', '.join(map(str, view.excluded))}" if view.excluded else ""
    out.print(f"gate {view.migration_id} is {view.state}{left}")
