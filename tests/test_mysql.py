"""MariaDB instances: the same guarantees where DDL commits on its own, plus "dirty"."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from byod.errors import BusyError, DirtyInstanceError, MigrationFailedError
from byod.runner import Runner
from byod.workspace import Workspace
from tests.conftest import ServerDatabases, execute, has_table
from tests.helpers import add_connected, counter, schema_version, stamp_ids, statuses


def test_migrations_run_in_order_on_mariadb(cws: Workspace, mysql: ServerDatabases) -> None:
    url = mysql.create()
    uid = add_connected(cws, url)
    result = cws.runner().migrate(uid)
    assert result.ok, result.error
    assert stamp_ids(url) == ["001_create", "002_bump", "003_fragile"]
    assert counter(url) == 11
    assert schema_version(cws, uid) == 3
    assert cws.runner().migrate(uid).steps == ()  # a rerun is a no-op
    rolled = cws.runner().rollback(uid, 1)
    assert rolled.ok, rolled.error
    assert counter(url) == 0 and stamp_ids(url) == ["001_create"]


def test_a_step_failing_after_its_ddl_leaves_the_instance_dirty_until_repaired(
    cws: Workspace, mysql: ServerDatabases
) -> None:
    url = mysql.create()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid, to_version=2).ok
    execute(url, "CREATE TABLE break_me (id INTEGER)")
    failed = cws.runner().migrate(uid)
    assert isinstance(failed.error, DirtyInstanceError)
    assert "003_fragile failed halfway" in failed.error.message
    assert "data breaks 003" in failed.error.message
    assert has_table(url, "t3")  # MariaDB committed 003's CREATE TABLE on its own
    assert ("003_fragile", "up", "failed", 1) in statuses(cws, uid)
    rows_before = len(statuses(cws, uid))
    refused = cws.runner().migrate(uid)
    assert isinstance(refused.error, DirtyInstanceError)
    assert "byod repair" in refused.error.message
    # nothing was attempted: the refusal leaves only its trail, a row never started
    assert statuses(cws, uid)[rows_before:] == [("003_fragile", "up", "failed", 0)]
    # the operator undoes the half-applied step and the bad data, then says so
    execute(url, "DROP TABLE t3", "DROP TABLE break_me")
    assert cws.runner().repair(uid) == ["003_fragile"]
    assert cws.runner().repair(uid) == []
    healed = cws.runner().migrate(uid)
    assert healed.ok, healed.error
    assert counter(url) == 11 and schema_version(cws, uid) == 3


def test_a_failure_before_any_ddl_rolls_back_cleanly(
    cws: Workspace, mysql: ServerDatabases, tmp_path: object
) -> None:
    url = mysql.create()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid, to_version=1).ok
    execute(url, "UPDATE counter SET n = 5")
    execute(url, "CREATE TABLE bumped (id INTEGER)")  # 002's first DDL fails
    result = cws.runner().migrate(uid)
    assert isinstance(result.error, MigrationFailedError | DirtyInstanceError)
    assert counter(url) == 5


def test_the_named_lock_makes_a_second_runner_busy(cws: Workspace, mysql: ServerDatabases) -> None:
    url = mysql.create()
    uid = add_connected(cws, url)
    name = f"byod_migrations:{sa.make_url(url).database}"
    holder = sa.create_engine(url)
    with holder.connect() as conn:
        assert conn.execute(sa.text("SELECT GET_LOCK(:n, 0)"), {"n": name}).scalar() == 1
        result = Runner(
            cws.engine, cws.registry, cws.sealer, policy=cws.settings.instance_policy
        ).migrate(uid)
        assert isinstance(result.error, BusyError)
        conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": name})
    holder.dispose()
    assert cws.runner().migrate(uid).ok
    assert counter(url) == 11


def test_the_example_app_runs_on_mariadb(ws: Workspace, mysql: ServerDatabases) -> None:
    url = mysql.create()
    uid = add_connected(ws, url)
    assert ws.runner().migrate(uid, to_version=1).ok
    execute(url, "INSERT INTO documents (title, body) VALUES ('a', 'hello #World #x')")
    assert ws.runner().migrate(uid).ok
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        names = conn.execute(sa.text("SELECT name FROM tags ORDER BY name")).scalars().all()
    engine.dispose()
    assert names == ["world", "x"]


pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class DriverCommands:
    """Every command PyMySQL sends to a server (each one round trip), as text: a spy on
    the driver's one method that sends them, the command still sent."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import pymysql.connections

        self.sent: list[str] = []
        send = pymysql.connections.Connection._execute_command

        def spy(connection: object, command: int, sql: str | bytes) -> object:
            text = sql.decode() if isinstance(sql, bytes) else str(sql)
            self.sent.append(" ".join(text.split()))
            return send(connection, command, sql)  # type: ignore[arg-type]

        monkeypatch.setattr(pymysql.connections.Connection, "_execute_command", spy)

    def byods(self) -> list[str]:
        """byod's own commands after the connect (the migration's left out), by kind."""
        start = next(i for i, text in enumerate(self.sent) if "GET_LOCK" in text)
        kinds = {
            "GET_LOCK": "lock and look",
            "UNION ALL": "stamp and dirty read",
            "INSERT INTO byod_schema_dirty": "dirty mark",
            "INSERT INTO byod_schema_stamp": "stamp write",
            "DELETE FROM byod_schema_dirty": "dirty clear",
            "RELEASE_LOCK": "release",
        }
        found = []
        for text in self.sent[start:]:
            kind = next((k for marker, k in kinds.items() if marker in text), None)
            found.append(kind or (text if text in ("COMMIT", "ROLLBACK") else "migration"))
        return [kind for kind in found if kind != "migration"]


def test_a_step_on_mariadb_costs_the_round_trips_the_docs_state(
    cws: Workspace, mysql: ServerDatabases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MySQL/MariaDB instance, where DDL commits on its own: the session's named lock
    and which of byod's tables exist in one round trip, the stamp and the dirty markers
    in one, then the step (its dirty marker, the migration, the stamp row, the marker
    cleared, the commit) and the lock given back: 7 of byod's own, as the docs' round-trip
    table says (15 before). An instance at head: 3."""
    url = mysql.create()
    uid = add_connected(cws, url)
    runner = cws.runner()
    assert runner.migrate(uid, to_version=1).ok
    commands = DriverCommands(monkeypatch)

    assert runner.migrate(uid, to_version=2).ok

    assert commands.byods() == [
        "lock and look",
        "stamp and dirty read",
        "dirty mark",
        "stamp write",
        "dirty clear",
        "COMMIT",
        "release",
    ], commands.sent
    connect = commands.sent.index(next(t for t in commands.sent if "GET_LOCK" in t))
    assert connect <= 9, commands.sent[:connect]  # the driver's and SQLAlchemy's set-up
    assert counter(url) == 1 and stamp_ids(url) == ["001_create", "002_bump"]
    commands.sent.clear()
    assert runner.migrate(uid, to_version=2).steps == ()
    assert commands.byods() == ["lock and look", "stamp and dirty read", "release"]
    # the lock was given back: another runner takes it at once
    assert runner.migrate(uid).ok and counter(url) == 11
