"""What a run asks of each instance: its stamp read once, in the transaction of the first
step, with the lock (and, on a server, the control-plane check) in one statement."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from sqlalchemy import event
from sqlalchemy.pool import NullPool

from byod.controlplane import history
from byod.fleet import FleetEvent, UserFinished, migrate_fleet
from byod.spec import FleetOptions
from byod.workspace import Workspace
from tests.conftest import InstanceFactory, ServerDatabases
from tests.helpers import add_connected, schema_version
from tests.test_fleet import fleet_of


class InstanceStatements:
    """Every statement byod sends to an instance (any engine but the control plane's)."""

    def __init__(self, control_plane: sa.Engine) -> None:
        self.control_plane = control_plane
        self.sent: list[str] = []
        self.transactions = 0

    def statement(self, conn: sa.Connection, _cursor: object, text: str, *_: object) -> None:
        if conn.engine.url != self.control_plane.url:
            self.sent.append(" ".join(text.split()))

    def begin(self, conn: sa.Connection) -> None:
        if conn.engine.url != self.control_plane.url:
            self.transactions += 1

    def byods(self) -> list[str]:
        """byod's own statements, by what they do (the migration's are left out)."""
        kinds = []
        for text in self.sent:
            if text.startswith("BEGIN"):
                kinds.append("begin")
            elif "pg_try_advisory_xact_lock" in text or "sqlite_master" in text:
                kinds.append("lock and look")
            elif "to_regclass" in text or "byod_control_plane" in text:
                kinds.append("control-plane check")
            elif text.startswith("SELECT") and "byod_schema_stamp" in text:
                kinds.append("stamp read")
            elif "byod_schema_stamp" in text:
                kinds.append("stamp write")
        return kinds


@pytest.fixture
def statements(ws: Workspace) -> Iterator[InstanceStatements]:
    seen = InstanceStatements(ws.engine)
    event.listen(sa.engine.Engine, "before_cursor_execute", seen.statement)
    event.listen(sa.engine.Engine, "begin", seen.begin)
    try:
        yield seen
    finally:
        event.remove(sa.engine.Engine, "before_cursor_execute", seen.statement)
        event.remove(sa.engine.Engine, "begin", seen.begin)


def test_a_step_reads_the_stamp_once_in_its_own_locked_transaction(
    ws: Workspace, new_instance: InstanceFactory, statements: InstanceStatements
) -> None:
    (uid,), (url,) = fleet_of(ws, new_instance, 1)
    runner = ws.runner()
    assert runner.migrate(uid, to_version=1).ok
    statements.sent.clear()
    statements.transactions = 0
    result = runner.migrate(uid, to_version=2)
    assert result.ok and [s.status for s in result.steps] == ["completed"]
    # one transaction: the lock and the stamp read, then the step and its stamp row
    assert statements.transactions == 1
    expected = ["lock and look", "stamp read", "stamp write"]
    if url.startswith("sqlite"):
        expected.insert(0, "begin")  # BEGIN IMMEDIATE, in-process
    assert statements.byods() == expected, statements.sent
    lock = next(
        s for s in statements.sent if "pg_try_advisory_xact_lock" in s or "sqlite_master" in s
    )
    servers = url.startswith("postgresql") and ws.engine.dialect.name == "postgresql"
    # two servers: whether the instance is the control plane is asked in the same statement
    assert ("%(t1)s" in lock) is servers, lock


def test_an_instance_at_head_is_read_and_let_go(
    ws: Workspace, new_instance: InstanceFactory, statements: InstanceStatements
) -> None:
    (uid,), _ = fleet_of(ws, new_instance, 1)
    runner = ws.runner()
    assert runner.migrate(uid).ok
    statements.sent.clear()
    again = runner.migrate(uid)
    assert again.ok and again.steps == ()
    assert "stamp write" not in statements.byods()
    assert statements.byods().count("stamp read") == 1
    # the lock was given back: another runner takes it at once
    assert runner.migrate(uid).ok


@pytest.fixture
def one_slot_role(pg: ServerDatabases) -> Iterator[tuple[str, sa.Engine]]:
    """A database owned by a role allowed one connection at a time; its URL as that role,
    and the server's admin engine."""
    url = sa.make_url(pg.create())
    role = f"byod_slots_{uuid.uuid4().hex[:8]}"
    with pg.admin.connect() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 1'))
        conn.execute(sa.text(f'ALTER DATABASE "{url.database}" OWNER TO "{role}"'))
    try:
        yield url.set(username=role).render_as_string(hide_password=False), pg.admin
    finally:
        with pg.admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
            conn.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))


def take_the_slot(engine: sa.Engine) -> sa.Connection:
    """A connection as the one-slot role, once the server has let go of the last one (a
    backend ends a moment after its client hangs up)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return engine.connect()
        except sa.exc.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_server_out_of_connection_slots_is_retried_never_a_failed_user(
    cws: Workspace, one_slot_role: tuple[str, sa.Engine]
) -> None:
    url, _ = one_slot_role
    uid = add_connected(cws, url, "crowded")
    holder = sa.create_engine(
        url.replace("postgresql://", "postgresql+psycopg://"), poolclass=NullPool
    )
    held = take_the_slot(holder)  # the role's only slot
    events: list[FleetEvent] = []
    retries = REGISTRY.get_sample_value("byod_retries_total", {"target_kind": "postgresql"}) or 0
    timer = threading.Timer(1.5, held.close)  # a slot frees up while the run retries
    timer.start()
    try:
        options = FleetOptions(retries=6, retry_base_seconds=0.3, retry_cap_seconds=1.0)
        summary = migrate_fleet(cws.runner(), options=options, on_event=events.append)
    finally:
        timer.cancel()
        held.close()
        holder.dispose()
    assert (summary.succeeded, summary.failed) == (1, 0), summary.errors
    finished = [e for e in events if isinstance(e, UserFinished)]
    assert finished[0].tries > 1  # refused for want of a slot first, then retried
    counted = REGISTRY.get_sample_value("byod_retries_total", {"target_kind": "postgresql"})
    assert counted == retries + finished[0].tries - 1  # and counted as retries
    assert schema_version(cws, uid) == cws.runner().registry.head
    rows = history(cws.engine, uid)  # newest first
    refused = [row for row in rows if row.status == "failed"]
    # the refusal left a trace where operators look (one row, updated by each retry),
    # as a busy instance, never marking the instance unreachable
    assert len(refused) == 1 and "no connection slot free" in (refused[0].error or "")
    assert (refused[0].error or "").startswith("BusyError")
    assert all(row.status == "completed" for row in rows if row is not refused[0])
    assert cws.directory.get_config(uid).connection_status == "connected"
