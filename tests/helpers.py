"""Helpers shared by the tests: reading instances and the ledger back."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy import event

from byod.clock import utcnow
from byod.commands import connect
from byod.controlplane import Directory, history
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


def stamp_checksums(url: str) -> dict[str, str]:
    """Each migration id in the instance's stamp with the checksum recorded for it."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, checksum FROM byod_schema_stamp"))
            return {row[0]: row[1] for row in rows}
    finally:
        engine.dispose()


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 60.0) -> None:
    """Poll ``condition`` until it holds (a row written, a lease lapsed); fail, naming
    ``what``, after ``seconds``: a test waits for what happens, never for a clock."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {seconds:.0f}s for {what}"
        time.sleep(0.05)


def wait_for_leases_to_lapse(engine: sa.Engine, user_ids: Iterable[int]) -> None:
    """Wait until no runner holds a live lease on these users (a dead runner's lapse):
    each lease is released or past its expiry by the control plane's own rule."""
    directory = Directory(engine)

    def lapsed() -> bool:
        for user_id in user_ids:
            config = directory.get_config(user_id)
            expires = config.lease_expires_at
            if config.lease_owner is not None and expires is not None and expires > utcnow():
                return False
        return True

    wait_until(lapsed, "the dead runner's leases to lapse")


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


class Statements:
    """The control-plane statements run, each as its verb and the table it names."""

    def __init__(self, engine: sa.Engine) -> None:
        self.seen: list[tuple[str, str]] = []
        event.listen(engine, "before_cursor_execute", self._statement)

    def _statement(self, conn: sa.Connection, cursor: object, sql: str, *args: object) -> None:
        verb = sql.split(None, 1)[0].upper()
        tables = (
            "byod_migrations",
            "byod_configs",
            "byod_run_tasks",
            "byod_runs",
            "byod_applied_checksums",
        )
        table = next((t for t in tables if t in sql), "other")
        self.seen.append((verb, table))

    def writes(self, table: str) -> int:
        return sum(1 for verb, t in self.seen if t == table and verb != "SELECT")


@contextmanager
def control_plane_locked(engine: sa.Engine) -> Iterator[None]:
    """No one else can write the control plane's ledger and configs while this lasts."""
    if engine.dialect.name == "sqlite":
        raw = sqlite3.connect(engine.url.database or "", timeout=30, isolation_level=None)
        raw.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            raw.execute("ROLLBACK")
            raw.close()
        return
    with engine.connect() as conn:
        conn.execute(sa.text("LOCK TABLE byod_migrations, byod_configs IN EXCLUSIVE MODE"))
        try:
            yield
        finally:
            conn.rollback()
