"""Turning command results into Rich tables and JSON-ready data (command line only)."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from byod.clock import rfc3339
from byod.spec import OUTCOMES, RunCounts
from byod.text import printable

if TYPE_CHECKING:
    from rich.console import Console

    from byod.adoption import Adoption
    from byod.commands import RunDetails, UserPlan, VerifyReport
    from byod.controlplane import FleetStatus, LedgerRow, RunRecord, User
    from byod.controlplane.gates import GateView
    from byod.results import UserResult

__all__ = [
    "REHEARSAL_NOTE",
    "adoptions_table",
    "counts_line",
    "dump",
    "fleet_status_data",
    "fleet_status_tables",
    "history_data",
    "history_table",
    "plain",
    "plans_data",
    "plans_table",
    "result_data",
    "run_data",
    "run_details",
    "runs_table",
    "user_data",
    "users_table",
    "verify_table",
]


def _default(value: object) -> Any:
    if isinstance(value, datetime):
        return rfc3339(value)
    raise TypeError(type(value).__name__)


def plain(text: str) -> str:
    """Text from outside (a clerk id, an error) shown as it is: control characters
    escaped (no terminal codes reach the screen) and Rich markup not interpreted."""
    return escape(printable(text))


def dump(data: object) -> str:
    """One line of JSON."""
    return json.dumps(data, default=_default, sort_keys=False)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _rows(done: int | None, total: int | None) -> str:
    if done is None:
        return ""
    return f"{done:,}" if total is None else f"{done:,}/{total:,}"


#: What a rehearsal's human output says, so it never reads like a real run.
REHEARSAL_NOTE = "rehearsal — nothing was changed (every instance rolled back)"


def counts_line(counts: RunCounts) -> str:
    """``total T: N succeeded, N failed, …``: every counter of :data:`OUTCOMES`, in order."""
    parts = ", ".join(f"{getattr(counts, name)} {name.replace('_', ' ')}" for name in OUTCOMES)
    return f"total {counts.total}: {parts}"


def history_data(rows: list[LedgerRow]) -> list[dict[str, Any]]:
    """Ledger rows as plain data."""
    return [asdict(row) for row in rows]


def history_table(title: str, rows: list[LedgerRow]) -> Table:
    """Ledger rows, newest first."""
    table = Table(title=plain(title))
    for column in ("when", "migration", "dir", "status", "attempt", "rows", "run", "error"):
        table.add_column(column, overflow="fold")
    colours = {"completed": "green", "failed": "red", "skipped": "yellow", "running": "cyan"}
    for row in rows:
        colour = colours.get(row.status, "")
        table.add_row(
            _when(row.completed_at or row.started_at or row.created_at),
            row.migration_id,
            row.direction,
            f"[{colour}]{row.status}[/]" if colour else row.status,
            str(row.attempts or ""),
            _rows(row.rows_done, row.rows_total),
            row.run_id or "",
            plain("; ".join(text for text in (row.error, row.page_sizes) if text)),
        )
    return table


def fleet_status_data(status: FleetStatus) -> dict[str, Any]:
    """Fleet status as plain data."""
    data = asdict(status)
    data["by_version"] = {str(k): v for k, v in status.by_version.items()}
    return data


def fleet_status_tables(status: FleetStatus, console: Console) -> None:
    """Print fleet status: versions, connection states, recent failures."""
    in_error = f" ({status.outdated_in_error} of them in error)" if status.outdated_in_error else ""
    console.print(
        f"head version [bold]{status.head}[/], {status.users} users, "
        f"{status.outdated} below head that a run would take{in_error}"
    )
    versions = Table(title="users per schema version")
    versions.add_column("version", justify="right")
    versions.add_column("users", justify="right")
    for version, count in status.by_version.items():
        mark = "" if version == status.head else " (behind)"
        versions.add_row(f"{version}{mark}", str(count))
    console.print(versions)
    states = Table(title="connection status")
    states.add_column("status")
    states.add_column("users", justify="right")
    for state, count in sorted(status.by_connection.items()):
        states.add_row(state, str(count))
    console.print(states)
    if status.gates:
        console.print(gates_table(status.gates))
    if status.recent_failures:
        failures = Table(title="recent failures")
        for column in ("when", "user", "migration", "error"):
            failures.add_column(column, overflow="fold")
        for failure in status.recent_failures:
            failures.add_row(
                _when(failure.at),
                f"{failure.user_id} ({plain(failure.clerk_id)})",
                f"{failure.migration_id} {failure.direction}",
                plain(failure.error or ""),
            )
        console.print(failures)


def plans_data(plans: list[UserPlan]) -> list[dict[str, Any]]:
    """Plans as plain data."""
    return [
        {
            "user_id": p.user_id,
            "clerk_id": p.clerk_id,
            "from_version": p.plan.from_version,
            "to_version": p.plan.to_version,
            "steps": [
                {"migration": s.migration.id, "version": s.migration.version, "direction": "up"}
                for s in p.plan.steps
            ],
            "held": None if p.held is None else {"migration": p.held[0], "reason": p.held[1]},
        }
        for p in plans
    ]


def plans_table(plans: list[UserPlan]) -> Table:
    """What would run where."""
    table = Table(title="plan (dry run: nothing is changed)")
    for column in ("user", "from", "to", "would run"):
        table.add_column(column, overflow="fold")
    for p in plans:
        steps = ", ".join(s.migration.id for s in p.plan.steps)
        if p.held is not None:
            held = f"stops before {p.held[0]} (its gate is not open)"
            steps = f"{steps}; then {held}" if steps else f"nothing: {held}"
        steps = steps or "nothing (up to date)"
        table.add_row(
            f"{p.user_id} ({plain(p.clerk_id)})",
            str(p.plan.from_version),
            str(p.plan.to_version),
            steps,
        )
    return table


def gates_table(views: list[GateView]) -> Table:
    """The gated migrations: state, who changed it, users before and past each."""
    table = Table(title="gates")
    for column in ("migration", "state", "changed", "not through", "past it", "left behind"):
        table.add_column(column, overflow="fold")
    for v in views:
        changed = f"{_when(v.changed_at)} by {plain(v.changed_by)}" if v.changed_by else ""
        colour = "green" if v.state == "open" else "yellow"
        table.add_row(
            v.migration_id,
            f"[{colour}]{v.state}[/]",
            changed,
            str(v.waiting),
            str(v.through),
            ", ".join(map(str, v.excluded)),
        )
    return table


def result_data(result: UserResult) -> dict[str, Any]:
    """One user's outcome as plain data."""
    return {
        "user_id": result.user_id,
        "clerk_id": result.clerk_id,
        "ok": result.ok,
        "from_version": result.from_version,
        "to_version": result.to_version,
        "steps": [asdict(step) for step in result.steps],
        "error": result.error.message if result.error else None,
        "error_type": type(result.error).__name__ if result.error else None,
        "rehearsal": result.rehearsal,
        "held": None
        if result.held is None
        else {"migration": result.held[0], "reason": result.held[1]},
    }


def adoptions_table(adoptions: list[Adoption]) -> Table:
    """What ``byod adopt`` did, per user."""
    table = Table(title="adopt: byod's stamp at each instance's alembic_version")
    for column in ("user", "result", "revision", "version"):
        table.add_column(column, overflow="fold")
    shown = {
        "adopted": "[green]adopted[/]",
        "already": "already adopted",
        "nothing": "nothing to adopt (no Alembic revision there)",
    }
    for a in adoptions:
        result = shown.get(a.status) or f"[red]refused: {plain(a.error or '')}[/]"
        version = "" if a.version is None else str(a.version)
        table.add_row(f"{a.user_id} ({plain(a.clerk_id)})", result, a.revision or "", version)
    return table


def user_data(user: User) -> dict[str, Any]:
    """A user as plain data."""
    return asdict(user)


def users_table(users: list[User]) -> Table:
    """Users, by id."""
    table = Table(title=f"users ({len(users)})")
    for column in ("id", "clerk id", "email", "added"):
        table.add_column(column, overflow="fold")
    for user in users:
        shown = "(removed)" if user.removed_at is not None else plain(user.clerk_id)
        table.add_row(str(user.id), shown, plain(user.email or ""), _when(user.created_at))
    return table


def verify_table(reports: list[VerifyReport], *, policy: bool = False) -> Table:
    """Per-user verification (``policy``: of the stored configs against the policy)."""
    if policy:
        table = Table(title="verify --policy: stored configs vs today's instance policy")
        columns: tuple[str, ...] = ("user", "result")
    else:
        table = Table(title="verify: instance stamps vs registry and control plane")
        columns = ("user", "control plane", "instance", "result")
    for column in columns:
        table.add_column(column, overflow="fold")
    for report in reports:
        verdict = "[green]ok[/]" if report.ok else f"[red]{plain('; '.join(report.problems))}[/]"
        instance = "?" if report.instance_version is None else str(report.instance_version)
        cells = [f"{report.user_id} ({plain(report.clerk_id)})"]
        if not policy:
            cells += [str(report.control_version), instance]
        table.add_row(*cells, verdict)
    return table


def run_data(run: RunRecord) -> dict[str, Any]:
    """A fleet run as plain data."""
    data = asdict(run)
    data["state"] = run.shown_state
    return data


def runs_table(records: list[RunRecord]) -> Table:
    """Fleet runs, newest first."""
    table = Table(
        title="fleet runs (counts: ok / failed / busy / up to date / not started of total)"
    )
    table.add_column("run", no_wrap=True)
    table.add_column("kind")
    table.add_column("state")
    table.add_column("started (UTC)", no_wrap=True)
    table.add_column("counts", no_wrap=True)
    for run in records:
        c = run.counts
        kind = f"undo {run.undoes}" if run.undoes else run.kind
        if run.kind == "rehearse":
            kind = "rehearsal (nothing changed)"
        if run.noop:
            kind += " (no-op)"
        table.add_row(
            run.id,
            kind,
            run.shown_state,
            _when(run.started_at),
            f"{c.succeeded}/{c.failed}/{c.busy}/{c.up_to_date}/{c.not_started} of {c.total}",
        )
    return table


def run_details(details: RunDetails, console: Console) -> None:
    """One fleet run with its options and failures."""
    run, c = details.run, details.run.counts
    console.print(f"run [bold]{run.id}[/] ({run.kind}) {run.shown_state}")
    if run.kind == "rehearse":
        console.print(REHEARSAL_NOTE)
    if run.halt_reason:
        console.print(f"halted: {plain(run.halt_reason)}")
    console.print(
        f"started {_when(run.started_at)} by {plain(run.started_by)}; ended {_when(run.ended_at)}"
    )
    console.print(counts_line(c))
    if details.rows_done:
        total = f" of about {details.rows_total:,}" if details.rows_total else ""
        reached = " (the users reached so far)" if run.ended_at is None else ""
        console.print(f"rows done by backfills: {details.rows_done:,}{total}{reached}")
    console.print("options: " + ", ".join(f"{k}={v}" for k, v in sorted(run.spec.flat().items())))
    if details.failures:
        table = Table(title="failures")
        for column in ("user", "migration", "error"):
            table.add_column(column, overflow="fold")
        for user_id, clerk_id, migration, error in details.failures:
            table.add_row(f"{user_id} ({plain(clerk_id)})", migration, plain(error or ""))
        console.print(table)
