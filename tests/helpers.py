"""Helpers shared by the tests: reading instances and the ledger back."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from byod.commands import connect
from byod.controlplane import history
from byod.workspace import Workspace


def add_connected(ws: Workspace, url: str, clerk_id: str = "user_a") -> int:
    user = ws.directory.add_user(clerk_id)
    _, reach = connect(ws, clerk_id, url)
    assert reach.status == "connected", reach.error
    return user.id


def counter(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT n FROM counter")).scalar_one())
    finally:
        engine.dispose()


def stamp_ids(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("byod_schema_stamp"):
                return []
            rows = conn.execute(sa.text("SELECT id FROM byod_schema_stamp ORDER BY version"))
            return [row[0] for row in rows]
    finally:
        engine.dispose()


def schema_version(ws: Workspace, user_id: int) -> int:
    return ws.directory.get_config(user_id).schema_version


def statuses(ws: Workspace, user_id: int) -> list[tuple[str, str, str, int]]:
    """(migration, direction, status, attempts), oldest first."""
    return [
        (r.migration_id, r.direction, r.status, r.attempts)
        for r in reversed(history(ws.engine, user_id))
    ]


@contextmanager
def held_in_migration(url: str, run: Callable[[], object]) -> Iterator[list[object]]:
    """Start ``run`` in a thread; the counter set's 002 then waits inside its instance
    transaction while the block runs, and finishes after it. Yields ``run``'s result
    (in a list, filled once the thread is done)."""
    from tests import gates
    from tests.conftest import execute

    execute(url, "CREATE TABLE hold_me (id INTEGER)")
    gates.reset()
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(run()))
    thread.start()
    try:
        assert gates.entered.wait(20), "the held run never reached its migration"
        yield results
    finally:
        gates.release.set()
        thread.join(30)
