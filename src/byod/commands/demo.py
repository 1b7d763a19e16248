"""The embedded demo: a local fleet of SQLite instances, at version 1, then to head.

The first tenant is a large one (``LARGE_TENANT_DOCUMENTS`` documents), so the example
app's backfill (``003_word_counts``) walks it in many batches. Safe to run again: users
and instance files that exist are kept, and the rollout is a no-op once every instance
is at head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from byod.commands.setup import InitResult, init
from byod.controlplane import FleetStatus, LedgerRow, User, fleet_status, history
from byod.credentials import connect_user
from byod.errors import InputError, UnknownUserError
from byod.fleet import FleetEvent, FleetSummary, migrate_fleet
from byod.spec import FleetOptions

if TYPE_CHECKING:
    from collections.abc import Callable

    from byod.workspace import Workspace

__all__ = ["DemoResult", "run_demo"]

_DOCUMENTS = (
    ("Welcome", "Notes can carry #ideas and #todo tags."),
    ("Groceries", "Milk, bread, coffee. #todo #home"),
    ("Plan", "Ship the #byod demo; review #ideas with the team."),
)
#: The first tenant's documents besides the three above: a large instance
LARGE_TENANT_DOCUMENTS = 50_000


@dataclass(frozen=True)
class DemoResult:
    """What the demo built and did."""

    setup: InitResult
    folder: Path
    created: int
    summary: FleetSummary
    status: FleetStatus
    sample_user: str
    sample_history: list[LedgerRow]
    #: the control plane the demo used, when it is not the configured one
    database_url: str | None = None
    #: the migrations folder the demo ran
    migrations: Path | None = None


def run_demo(
    ws: Workspace,
    *,
    tenants: int = 5,
    folder: Path | None = None,
    on_event: Callable[[FleetEvent], None] = lambda event: None,
) -> DemoResult:
    """Build (or reuse) ``tenants`` SQLite instances at version 1, then migrate all to head."""
    if tenants < 1:
        raise InputError("--tenants must be at least 1")
    setup = init(ws)
    folder = folder or Path.cwd() / "byod-demo"
    folder.mkdir(parents=True, exist_ok=True)
    runner = ws.runner()
    created = 0
    for number in range(1, tenants + 1):
        clerk_id = f"demo-tenant-{number:03d}"
        path = folder / f"tenant-{number:03d}.db"
        user = demo_user(ws, clerk_id)
        if path.exists():
            continue
        path.touch()  # an empty file is an empty SQLite database
        connect_user(
            ws.directory,
            ws.sealer,
            user.id,
            f"sqlite:///{path}",
            policy=ws.settings.instance_policy,
        )
        runner.migrate(user.id, to_version=min(1, ws.registry.head))
        _seed(path, LARGE_TENANT_DOCUMENTS if number == 1 else 0)
        created += 1
    summary = migrate_fleet(runner, options=FleetOptions(concurrency=4), on_event=on_event)
    return demo_result(ws, setup, folder, created, summary, "demo-tenant-001")


def demo_user(ws: Workspace, clerk_id: str) -> User:
    """The demo's user ``clerk_id``, added the first time."""
    try:
        return ws.directory.find_user(clerk_id)
    except UnknownUserError:
        return ws.directory.add_user(clerk_id, f"{clerk_id}@example.com")


def demo_result(
    ws: Workspace,
    setup: InitResult,
    folder: Path,
    created: int,
    summary: FleetSummary,
    sample_clerk_id: str,
    database_url: str | None = None,
) -> DemoResult:
    """What a demo did, with the fleet's status and one sample user's history."""
    sample = ws.directory.find_user(sample_clerk_id)
    return DemoResult(
        setup=setup,
        folder=folder,
        created=created,
        summary=summary,
        status=fleet_status(ws.engine, ws.registry.head),
        sample_user=sample.clerk_id,
        sample_history=history(ws.engine, sample.id),
        database_url=database_url,
        migrations=ws.settings.migrations_dir,
    )


def _seed(path: Path, more: int) -> None:
    """The sample documents, and ``more`` generated ones (in one statement)."""
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            if not sa.inspect(conn).has_table("documents"):
                return
            documents = sa.table("documents", sa.column("title"), sa.column("body"))
            conn.execute(documents.insert(), [{"title": t, "body": b} for t, b in _DOCUMENTS])
            if more:
                conn.execute(
                    sa.text(
                        "INSERT INTO documents (title, body) "
                        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                        "WHERE i < :more) "
                        "SELECT 'Note ' || i, 'Note number ' || i || ' of a busy user' FROM n"
                    ),
                    {"more": more},
                )
    finally:
        engine.dispose()
