"""Running one user against real instances (SQLite files and PostgreSQL databases)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from byod.clock import utcnow
from byod.commands import connect
from byod.controlplane import history
from byod.controlplane.schema import applied_checksums, configs, ledger
from byod.credentials import Credentials, open_instance
from byod.errors import (
    BusyError,
    ByodError,
    CredentialsError,
    DriftError,
    InstanceTimeoutError,
    IrreversibleError,
    MigrationFailedError,
    NotConnectedError,
    PlanError,
    SettingsError,
    UnreachableError,
)
from byod.notify import Notice
from byod.registry import Registry, Step
from byod.results import StepResult
from byod.runner import Runner
from byod.runner.pages import Claims, Outcomes
from byod.targets import StepBody, Target
from byod.workspace import Workspace
from tests.conftest import (
    OTHER_KEY,
    InstanceFactory,
    ServerDatabases,
    count_rows,
    execute,
    has_table,
    make_workspace,
    write_migrations,
)
from tests.helpers import (
    add_connected,
    counter,
    held_in_migration,
    schema_version,
    stamp_checksums,
    stamp_ids,
    statuses,
)


def test_migrations_run_in_version_order_and_are_recorded(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    result = cws.runner().migrate(uid)
    assert result.ok, result.error
    assert (result.user_id, result.clerk_id, result.from_version, result.to_version) == (
        uid,
        "user_a",
        0,
        3,
    )
    assert [s.migration_id for s in result.steps] == ["001_create", "002_bump", "003_fragile"]
    assert stamp_ids(url) == ["001_create", "002_bump", "003_fragile"]
    assert counter(url) == 11
    assert schema_version(cws, uid) == 3
    assert statuses(cws, uid) == [
        ("001_create", "up", "completed", 1),
        ("002_bump", "up", "completed", 1),
        ("003_fragile", "up", "completed", 1),
    ]
    rows = history(cws.engine, uid)
    assert [r.migration_id for r in rows] == ["003_fragile", "002_bump", "001_create"]
    assert all(r.started_at and r.completed_at and r.started_at <= r.completed_at for r in rows)


def test_failed_migration_rolls_back_and_skips_the_rest(
    cws: Workspace, new_instance: InstanceFactory, tmp_path: Path
) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid, to_version=1).ok
    execute(url, "CREATE TABLE break_me (id INTEGER)")
    result = cws.runner().migrate(uid)
    assert not result.ok
    assert (result.from_version, result.to_version) == (1, 2)  # 002 stands, 003 failed
    assert isinstance(result.error, MigrationFailedError)
    assert "003_fragile" in result.error.message
    assert "data breaks 003" in result.error.message
    assert f"user {uid}" in result.error.message
    assert result.failed_migration == "003_fragile"
    # 003's own changes (table t3, counter + 10) were rolled back with it; 002 stays.
    assert not has_table(url, "t3")
    assert counter(url) == 1
    assert stamp_ids(url) == ["001_create", "002_bump"]
    assert schema_version(cws, uid) == 2
    failed = [r for r in history(cws.engine, uid) if r.status == "failed"]
    assert len(failed) == 1
    assert failed[0].error is not None and "RuntimeError: data breaks 003" in failed[0].error


def test_failure_before_the_end_marks_later_migrations_skipped(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    # bumped already exists, so 002's create_table fails and 003 must not run.
    execute(url, "CREATE TABLE bumped (id INTEGER)")
    result = cws.runner().migrate(uid)
    assert isinstance(result.error, MigrationFailedError)
    assert [s.status for s in result.steps] == ["completed", "failed", "skipped"]
    assert statuses(cws, uid) == [
        ("001_create", "up", "completed", 1),
        ("002_bump", "up", "failed", 1),
        ("003_fragile", "up", "skipped", 0),
    ]
    assert schema_version(cws, uid) == 1
    assert counter(url) == 0


def test_rerun_is_a_no_op(cws: Workspace, new_instance: InstanceFactory) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid).ok
    rows_before = len(history(cws.engine, uid))
    again = cws.runner().migrate(uid)
    assert again.ok and again.steps == () and not again.changed
    assert (again.user_id, again.clerk_id, again.from_version, again.to_version) == (
        uid,
        "user_a",
        3,
        3,
    )
    assert len(history(cws.engine, uid)) == rows_before
    assert counter(url) == 11


def test_retry_after_failure_counts_attempts_and_keeps_history(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    execute(url, "CREATE TABLE break_me (id INTEGER)")
    assert not cws.runner().migrate(uid).ok
    assert not cws.runner().migrate(uid).ok
    execute(url, "DROP TABLE break_me")
    assert cws.runner().migrate(uid).ok
    fragile = [s for s in statuses(cws, uid) if s[0] == "003_fragile"]
    assert fragile == [
        ("003_fragile", "up", "failed", 1),
        ("003_fragile", "up", "failed", 2),
        ("003_fragile", "up", "completed", 3),
    ]
    assert counter(url) == 11


class Crash(BaseException):
    """Stands for the process dying: nothing in byod catches it."""


def crashing_runner(ws: Workspace, crash_on: str, run_id: str | None = None) -> Runner:
    """A runner whose process 'dies' right after the instance committed ``crash_on``."""
    return spied(ws, lambda target: Spy(target, crash_after=crash_on), run_id=run_id)


def test_crash_between_instance_commit_and_ledger_does_not_apply_twice(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    with pytest.raises(Crash):
        crashing_runner(cws, "002_bump").migrate(uid)
    assert counter(url) == 1
    assert schema_version(cws, uid) == 1  # the control plane never heard of 002
    assert ("002_bump", "up", "running", 1) in statuses(cws, uid)
    result = cws.runner().migrate(uid)
    assert result.ok, result.error
    assert [s.migration_id for s in result.steps] == ["003_fragile"]
    assert counter(url) == 11  # 002's +1 once, 003's +10 once
    assert schema_version(cws, uid) == 3
    assert not [s for s in statuses(cws, uid) if s[2] in ("running", "pending")]
    recovered = [r for r in history(cws.engine, uid) if r.migration_id == "002_bump"]
    assert recovered[0].status == "completed" and "recovered" in (recovered[0].error or "")


def test_a_step_recovered_for_the_same_run_counts_as_moved_by_it(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """A task delivered again after its worker was lost past the last commit: the run
    moved the user, so the retry reports it moved (not "nothing to do")."""
    urls = [new_instance(), new_instance()]
    same, other = (add_connected(cws, url, f"user_{n}") for n, url in enumerate(urls))
    for uid in (same, other):
        with pytest.raises(Crash):
            crashing_runner(cws, "003_fragile", run_id="run-1").migrate(uid)
    again = cws.runner().configured(run_id="run-1", timeout=None, lease_seconds=300)
    result = again.migrate(same)
    assert result.ok and result.changed
    assert [(s.migration_id, s.status) for s in result.steps] == [("003_fragile", "recovered")]
    assert (result.from_version, result.to_version) == (2, 3)
    later = cws.runner().configured(run_id="run-2", timeout=None, lease_seconds=300)
    result = later.migrate(other)  # another run found it done: it moved nothing
    assert result.ok and not result.changed and result.steps == ()
    assert [counter(url) for url in urls] == [11, 11]


def test_hashtags_move_once_even_after_a_crash(
    ws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(ws, url)
    assert ws.runner().migrate(uid, to_version=1).ok
    execute(
        url,
        "INSERT INTO documents (title, body) VALUES ('a', 'see #Ideas and #todo, not a#b')",
        "INSERT INTO documents (title, body) VALUES ('b', '#todo twice #todo')",
        "INSERT INTO documents (title, body) VALUES ('c', 'no tags here')",
    )
    with pytest.raises(Crash):
        crashing_runner(ws, "002_add_tags").migrate(uid)
    assert ws.runner().migrate(uid).ok
    assert count_rows(url, "tags") == 2  # ideas, todo
    assert count_rows(url, "document_tags") == 3  # a: ideas, todo; b: todo
    assert schema_version(ws, uid) == 3


def test_the_example_apps_word_counts_are_filled_then_rolled_back(
    ws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(ws, url)
    assert ws.runner().migrate(uid, to_version=2).ok
    execute(
        url,
        "INSERT INTO documents (title, body) VALUES ('a', 'see #Ideas and #todo, not a#b')",
        "INSERT INTO documents (title, body) VALUES ('b', '#todo twice #todo')",
        "INSERT INTO documents (title, body) VALUES ('c', '')",
    )
    result = ws.runner().migrate(uid)
    assert result.ok, result.error
    assert result.steps[-1].migration_id == "003_word_counts" and result.steps[-1].rows == 3
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            words = conn.execute(sa.text("SELECT title, words FROM documents ORDER BY id"))
            assert words.all() == [("a", 6), ("b", 3), ("c", 0)]
            column = [c for c in sa.inspect(conn).get_columns("documents") if c["name"] == "words"]
            assert column[0]["nullable"] is False  # the finalize made it NOT NULL
        back = ws.runner().rollback(uid, 1)
        assert back.ok, back.error
        with engine.connect() as conn:
            names = {c["name"] for c in sa.inspect(conn).get_columns("documents")}
            assert "words" not in names and not sa.inspect(conn).has_table("tags")
            assert conn.execute(sa.text("SELECT count(*) FROM documents")).scalar_one() == 3
    finally:
        engine.dispose()


def test_rollback_runs_down_newest_first(cws: Workspace, new_instance: InstanceFactory) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid).ok
    result = cws.runner().rollback(uid, 1)
    assert result.ok, result.error
    assert [(s.migration_id, s.direction) for s in result.steps] == [
        ("003_fragile", "down"),
        ("002_bump", "down"),
    ]
    assert counter(url) == 0
    assert not has_table(url, "t3") and not has_table(url, "bumped")
    assert stamp_ids(url) == ["001_create"]
    assert schema_version(cws, uid) == 1
    assert statuses(cws, uid)[-2:] == [
        ("003_fragile", "down", "completed", 1),
        ("002_bump", "down", "completed", 1),
    ]
    # and forward again: the same steps apply cleanly
    assert cws.runner().migrate(uid).ok
    assert counter(url) == 11


def test_rollback_refuses_without_down_before_touching_anything(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid).ok
    rows_before = len(history(cws.engine, uid))
    with pytest.raises(IrreversibleError, match="001_create has no down"):
        cws.runner().rollback(uid, 0)
    assert stamp_ids(url) == ["001_create", "002_bump", "003_fragile"]
    assert counter(url) == 11
    assert len(history(cws.engine, uid)) == rows_before
    assert cws.directory.get_config(uid).lease_owner is None


def test_failing_down_stops_the_rollback_and_rolls_back_its_step(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid).ok
    execute(url, "CREATE TABLE break_down (id INTEGER)")
    result = cws.runner().rollback(uid, 1)
    assert isinstance(result.error, MigrationFailedError)
    assert [s.status for s in result.steps] == ["failed", "skipped"]
    assert has_table(url, "t3") and counter(url) == 11
    assert schema_version(cws, uid) == 3


def test_unreachable_instance_is_marked_and_the_user_notified(
    cws: Workspace, new_instance: InstanceFactory, instance_kind: str
) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    # make the instance disappear
    if instance_kind == "sqlite":
        Path(sa.make_url(url).database or "").unlink()
    else:
        name = sa.make_url(url).database
        admin = sa.create_engine(
            sa.make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
    notices: list[Notice] = []
    runner = Runner(
        cws.engine,
        cws.registry,
        cws.sealer,
        policy=cws.settings.instance_policy,
        notify=notices.append,
    )
    result = runner.migrate(uid)
    assert isinstance(result.error, UnreachableError)
    assert "unreachable" in result.error.message
    assert result.error.hint
    config = cws.directory.get_config(uid)
    assert config.connection_status == "error"
    assert config.last_error and "unreachable" in config.last_error
    assert config.lease_owner is None
    assert [(n.kind, n.user_id) for n in notices] == [("unreachable", uid)]


def test_drift_is_refused_by_migrate(
    cws: Workspace, new_instance: InstanceFactory, control_plane_url: str
) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid, to_version=2).ok
    folder = cws.settings.migrations_dir
    edited = folder / "002_bump.py"
    edited.write_text(edited.read_text() + "\nEDITED_AFTER_IT_WAS_APPLIED = True\n")
    drifted = make_workspace(control_plane_url, folder)
    result = drifted.runner().migrate(uid)
    assert isinstance(result.error, DriftError)
    assert "002_bump changed after it was applied" in result.error.message
    assert stamp_ids(url) == ["001_create", "002_bump"]
    assert not has_table(url, "t3")


def test_wrong_key_is_a_credentials_error_and_no_secret_leaks(
    cws: Workspace, new_instance: InstanceFactory, control_plane_url: str
) -> None:
    uid = add_connected(cws, new_instance())
    other = make_workspace(control_plane_url, cws.settings.migrations_dir, key=OTHER_KEY)
    result = other.runner().migrate(uid)
    assert isinstance(result.error, CredentialsError)
    assert "wrong encryption key" in result.error.message
    assert result.error.exit_code == 1
    # the operator's key, not the user's instance: nothing about the user is touched
    config = cws.directory.get_config(uid)
    assert (config.connection_status, config.last_error, config.lease_owner) == (
        "connected",
        None,
        None,
    )
    assert statuses(cws, uid) == []
    assert isinstance(other.runner().rollback(uid, 0).error, CredentialsError)
    assert cws.directory.get_config(uid).connection_status == "connected"


def test_ciphertext_moved_between_users_does_not_open(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    first = add_connected(cws, new_instance(), "user_a")
    second = add_connected(cws, new_instance(), "user_b")
    with cws.engine.begin() as conn:
        sealed = conn.execute(
            sa.select(configs.c.sealed_url).where(configs.c.user_id == first)
        ).scalar_one()
        conn.execute(configs.update().where(configs.c.user_id == second).values(sealed_url=sealed))
    result = cws.runner().migrate(second)
    assert isinstance(result.error, CredentialsError)
    assert "moved from another user" in result.error.message


def test_two_runs_for_one_user_at_once_one_is_busy(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid, to_version=1).ok
    with held_in_migration(url, lambda: cws.runner().migrate(uid)) as first:
        second = cws.runner().migrate(uid)
        assert isinstance(second.error, BusyError)
        assert "busy" in second.error.message
    assert first and first[0].ok  # type: ignore[attr-defined]
    assert counter(url) == 11  # 002's bump applied once
    completed = [s for s in statuses(cws, uid) if s[2] == "completed"]
    assert [s[0] for s in completed] == ["001_create", "002_bump", "003_fragile"]


def test_instance_lock_stops_a_second_control_plane(
    cws: Workspace, new_instance: InstanceFactory, tmp_path: Path
) -> None:
    """Two control planes (say staging and production) pointed at one instance."""
    url = new_instance()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid, to_version=1).ok
    other = make_workspace(f"sqlite:///{tmp_path / 'other.db'}", cws.settings.migrations_dir)
    other_uid = add_connected(other, url, "same_instance")
    with held_in_migration(url, lambda: cws.runner().migrate(uid)):
        runner = Runner(
            other.engine,
            other.registry,
            other.sealer,
            policy=other.settings.instance_policy,
            connect_timeout=0.5,
        )
        second = runner.migrate(other_uid)
        assert isinstance(second.error, BusyError | UnreachableError)
    assert counter(url) == 11
    assert other.runner().migrate(other_uid).ok  # adopts what the first applied
    assert counter(url) == 11
    assert schema_version(other, other_uid) == 3


def test_every_step_is_logged_with_user_migration_attempt_and_duration(
    cws: Workspace, new_instance: InstanceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    execute(url, "CREATE TABLE break_me (id INTEGER)")
    with caplog.at_level(logging.INFO, logger="byod"):
        cws.runner().migrate(uid)
    messages = [r.getMessage() for r in caplog.records]
    assert f"user {uid}: 001_create up started (attempt 1)" in messages
    assert any(
        m.startswith(f"user {uid}: 001_create up completed (attempt 1) in ") for m in messages
    )
    failure = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert failure
    text = failure[0].getMessage()
    assert "003_fragile" in text and "attempt 1" in text and "RuntimeError" in text


def test_no_secret_in_messages_logs_or_ledger(
    cws: Workspace, pg: object, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "Sup3r-Secret-pw"
    url = pg.create()  # type: ignore[attr-defined]
    with_password = sa.make_url(url).set(password=secret).render_as_string(hide_password=False)
    uid = add_connected(cws, with_password)
    execute(url, "CREATE TABLE break_me (id INTEGER)")
    unreachable = sa.make_url(url).set(password=secret, port=1)
    down_id = cws.directory.add_user("user_down").id
    with caplog.at_level(logging.DEBUG, logger="byod"):
        failed = cws.runner().migrate(uid)
        _, reach = connect(cws, "user_down", unreachable.render_as_string(hide_password=False))
        down = cws.runner().migrate(down_id)
    assert failed.error is not None and reach.status == "error" and down.error is not None
    texts = [failed.error.message, reach.error or "", down.error.message]
    texts += [r.getMessage() for r in caplog.records]
    with cws.engine.connect() as conn:
        texts += [str(tuple(row)) for row in conn.execute(sa.select(ledger))]
        texts += [str(tuple(row)) for row in conn.execute(sa.select(configs))]
    assert len(texts) > 3, "the log and the tables were read"
    assert any(
        "password authentication" in t or "refused" in t or "Unreachable" in t for t in texts
    )
    assert not [t for t in texts if secret in t]


def test_many_users_one_failing_does_not_stop_the_others(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    from byod.fleet import migrate_fleet
    from byod.spec import FleetOptions

    urls = [new_instance() for _ in range(6)]
    ids = [add_connected(cws, url, f"user_{n}") for n, url in enumerate(urls)]
    execute(urls[2], "CREATE TABLE break_me (id INTEGER)")
    summary = migrate_fleet(cws.runner(), options=FleetOptions(concurrency=3))
    assert (summary.total, summary.succeeded, summary.failed) == (6, 5, 1)
    assert [(e.user, e.migration) for e in summary.errors] == [("user_2", "003_fragile")]
    assert [schema_version(cws, uid) for uid in ids] == [3, 3, 2, 3, 3, 3]
    assert [counter(url) for url in urls] == [11, 11, 1, 11, 11, 11]
    assert Registry.load(cws.settings.migrations_dir).head == 3


def test_a_migration_that_calls_sys_exit_fails_its_step(
    ws: Workspace, tmp_path: Path, new_instance: InstanceFactory
) -> None:
    folder = write_migrations(
        tmp_path / "exiting",
        {
            "001_exit.py": """
                import sys
                import sqlalchemy as sa
                from byod import Migration

                def up(ctx):
                    ctx.op.create_table("t", sa.Column("id", sa.Integer, primary_key=True))
                    sys.exit(0)

                migration = Migration(id="001_exit", version=1, name="Exit", description="",
                                      up=up)
            """
        },
    )
    url = new_instance()
    uid = add_connected(ws, url)
    runner = Runner(ws.engine, Registry.load(folder), ws.sealer, policy=ws.settings.instance_policy)
    result = runner.migrate(uid)
    assert isinstance(result.error, MigrationFailedError)
    assert "called sys.exit(0)" in result.error.message
    assert statuses(ws, uid) == [("001_exit", "up", "failed", 1)]
    assert not has_table(url, "t")  # rolled back with the step


def test_page_sizes_halve_on_a_limit_and_double_back_after_pages_pass() -> None:
    from byod.phased import GROW_AFTER, PageSizer

    sizer = PageSizer(200)
    assert sizer.summary("t") is None
    assert sizer.shrink() and sizer.size == 100
    assert sizer.shrink() and sizer.size == 50
    for _ in range(GROW_AFTER - 1):
        sizer.passed()
    assert sizer.size == 50, "not before enough pages passed"
    sizer.passed()
    assert sizer.size == 100
    for _ in range(GROW_AFTER * 3):
        sizer.passed()
    assert sizer.size == 200, "never past the declared size"
    one = PageSizer(1)
    assert not one.shrink(), "one row that does not fit fails the step"
    assert (
        sizer.summary("t")
        == "t: pages of 200 hit the transaction limit 2 times; 50 the smallest, 200 the last"
    )


def test_a_failed_step_and_the_ones_it_skips_are_reported_field_by_field(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """The user's result names the failed step exactly (id, version, direction, time, the
    error's type and text as the ledger keeps it) and each step skipped after it; the
    error keeps its hint. (Kills the runner's ``_step_failed`` field mutants.)"""
    url = new_instance()
    uid = add_connected(cws, url)
    execute(url, "CREATE TABLE bumped (id INTEGER)")  # 002's create_table fails
    result = cws.runner().migrate(uid)
    assert (result.user_id, result.from_version, result.to_version) == (uid, 0, 1)
    done, failed, skipped = result.steps
    assert (done.migration_id, done.version, done.direction, done.status) == (
        "001_create",
        1,
        "up",
        "completed",
    )
    assert (failed.migration_id, failed.version, failed.direction, failed.status) == (
        "002_bump",
        2,
        "up",
        "failed",
    )
    (row,) = [r for r in history(cws.engine, uid) if r.status == "failed"]
    assert failed.error == row.error and failed.error is not None
    assert failed.error.startswith("MigrationFailedError: ") and "bumped" in failed.error
    assert 0 < failed.seconds < 3600
    assert skipped == StepResult("003_fragile", 3, "up", "skipped")
    assert isinstance(result.error, MigrationFailedError)
    assert result.error.message.startswith(f"user {uid} (user_a): 002_bump up failed: ")
    assert result.error.hint and "byod migrate" in result.error.hint


def test_an_instance_lost_in_the_middle_of_a_step_is_marked_unreachable(
    cws: Workspace, pg: ServerDatabases, tmp_path: Path
) -> None:
    """The connection dies inside a step (the server ends the session): the step fails,
    the user's status says unreachable with the error, and the operator is told."""
    folder = write_migrations(
        tmp_path / "lost",
        {
            "001_lost.py": """
                import sqlalchemy as sa
                from byod import Migration

                def up(ctx):
                    ctx.op.create_table("t", sa.Column("id", sa.Integer))
                    ctx.conn.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))

                migration = Migration(id="001_lost", version=1, name="Lost", description="", up=up)
            """
        },
    )
    ws = make_workspace(cws.settings.database_url, folder)
    url = pg.create()
    uid = add_connected(ws, url)
    notices: list[Notice] = []
    runner = Runner(
        ws.engine, ws.registry, ws.sealer, policy=ws.settings.instance_policy, notify=notices.append
    )
    result = runner.migrate(uid)
    assert isinstance(result.error, UnreachableError), result.error
    assert [s.status for s in result.steps] == ["failed"]
    config = ws.directory.get_config(uid)
    assert config.connection_status == "error"
    assert config.last_error == result.steps[0].error.partition(": ")[2]  # type: ignore[union-attr]
    assert [(n.kind, n.user_id) for n in notices] == [("unreachable", uid)]
    assert stamp_ids(url) == [] and not has_table(url, "t")


def test_each_control_plane_keeps_the_checksums_its_users_were_first_migrated_with(
    tmp_path: Path, new_instance: InstanceFactory
) -> None:
    """Two control planes in one process: each records every migration applied through
    it, once (kills ``_note_applied``'s cache mutants: a cache keyed without the control
    plane, or asked the wrong way round, leaves a control plane without its record)."""
    from byod.controlplane.schema import applied_checksums
    from tests.migration_sets import counter_migrations

    folder = counter_migrations(tmp_path / "migrations")
    for name in ("first", "second"):
        ws = make_workspace(f"sqlite:///{tmp_path / name}.db", folder)
        uid = add_connected(ws, new_instance())
        assert ws.runner().migrate(uid, to_version=2).ok
        with ws.engine.connect() as conn:
            kept = conn.execute(
                sa.select(applied_checksums.c.migration_id, applied_checksums.c.checksum)
            ).all()
        assert sorted(kept) == [(m.id, m.checksum) for m in ws.registry if m.version <= 2]
        ws.engine.dispose()


def test_a_stamp_an_older_byod_wrote_takes_the_new_checksum_at_the_next_step(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """Only the row stamped with the file's bytes' checksum is restamped, in the next
    step's transaction; a row stamped with today's checksum is left as it is."""
    url = new_instance()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid, to_version=2).ok
    create = cws.registry.get("001_create")
    assert create is not None and create.legacy_checksum != create.checksum
    old = create.legacy_checksum
    execute(url, f"UPDATE byod_schema_stamp SET checksum = '{old}' WHERE id = '001_create'")
    assert cws.runner().migrate(uid).ok
    assert stamp_checksums(url) == {m.id: m.checksum for m in cws.registry}


def test_an_unknown_migration_in_the_stamp_is_drift_not_a_crash(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid, to_version=1).ok
    execute(
        url,
        "INSERT INTO byod_schema_stamp (id, version, checksum, applied_at) "
        "VALUES ('002_elsewhere', 2, 'x', '2026-01-01')",
    )
    execute(url, "UPDATE byod_schema_stamp SET checksum = 'edited' WHERE id = '001_create'")
    result = cws.runner().migrate(uid)
    assert isinstance(result.error, DriftError), result.error
    assert stamp_ids(url) == ["001_create", "002_elsewhere"]
    problems = cws.directory.get_config(uid).last_error or ""  # each problem, kept
    create = cws.registry.get("001_create")
    assert create is not None
    assert problems == (
        f"001_create changed after it was applied (checksum edited applied, "
        f"{create.checksum[:12]} in the file now); 002_elsewhere (version 2) is applied on "
        "the instance but is not in the migrations folder"
    )
    assert result.error.message.endswith(f"drift: {problems}")


class Spy:
    """A real target that notes what the runner asks of it; optionally it fails a step
    with a given error, says a step was applied already (without running it), lacks
    ``restamp_later`` (as a Convex deployment does), is not ready at first, or 'dies'
    (raises :class:`Crash`) right after the instance committed a given step."""

    def __init__(
        self,
        inner: Target,
        *,
        fail: dict[str, Exception] | None = None,
        already: tuple[str, ...] = (),
        restamps: bool = True,
        unready: bool = False,
        undeployable: Exception | None = None,
        crash_after: str | None = None,
    ) -> None:
        self.inner = inner
        self.crash_after = crash_after
        self.undeployable = undeployable
        self.fail = fail or {}
        self.already = already
        self.restamps = restamps
        self.unready = unready
        self.calls: list[tuple[str, object]] = []

    def prepare(self, first: Any = None) -> None:
        self.calls.append(("prepare", None if first is None else first.id))
        self.unready = False
        self.inner.prepare(first)

    def finish(self, at: Any, head: bool) -> None:
        self.calls.append(("finish", (None if at is None else at.id, head)))
        if self.undeployable is not None:
            raise self.undeployable
        self.inner.finish(at, head)

    def begin(self, deadline: float | None = None) -> Any:
        self.calls.append(("begin", deadline))
        if self.unready:
            from byod.errors import DeployError

            raise DeployError("byod's part of the instance is not there yet")
        return self.inner.begin(deadline)

    def apply(self, step: Step, body: StepBody, deadline: float | None = None) -> bool:
        self.calls.append(("apply", deadline))
        if step.migration.id in self.fail:
            raise self.fail[step.migration.id]
        if step.migration.id in self.already:
            return False
        done = self.inner.apply(step, body, deadline)
        if step.migration.id == self.crash_after:
            raise Crash
        return done

    def __getattr__(self, name: str) -> Any:  # the rest of the Target protocol
        if name == "restamp_later" and not self.restamps:
            raise AttributeError(name)
        return getattr(self.inner, name)


def spied(
    ws: Workspace,
    spy: Callable[[Target], Spy],
    timeout: float | None = None,
    run_id: str | None = None,
) -> Runner:
    def opener(credentials: Credentials, connect_timeout: float) -> Target:
        return spy(open_instance(credentials, timeout=connect_timeout))  # type: ignore[return-value]

    return Runner(
        ws.engine,
        ws.registry,
        ws.sealer,
        policy=ws.settings.instance_policy,
        opener=opener,
        timeout=timeout,
        run_id=run_id,
    )


def test_the_chain_asks_the_target_in_order_with_each_transactions_deadline(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """The first step's code is made ready before it (``prepare`` with that step, once);
    the stamp read and every step get their own transaction's deadline; a target not
    ready yet is made ready with the first migration, then read again."""
    url = new_instance()
    uid = add_connected(cws, url)
    spies: list[Spy] = []
    runner = spied(cws, lambda t: spies.append(Spy(t, unready=True)) or spies[-1], timeout=30)
    assert runner.migrate(uid).ok
    (spy,) = spies
    names = [name for name, _ in spy.calls]
    assert names == ["begin", "prepare", "begin", "prepare", "apply", "apply", "apply", "finish"]
    assert spy.calls[-1] == ("finish", ("003_fragile", True))  # at the head
    assert [arg for name, arg in spy.calls if name == "prepare"] == ["001_create", "001_create"]
    deadlines = [arg for name, arg in spy.calls if name in ("begin", "apply")]
    assert all(isinstance(d, float) and d > 0 for d in deadlines), deadlines
    spies.clear()
    runner = spied(cws, lambda t: spies.append(Spy(t)) or spies[-1], timeout=30)
    assert runner.rollback(uid, 1).ok
    assert [arg for name, arg in spies[0].calls if name == "prepare"] == ["003_fragile"]
    assert spies[0].calls[-1] == ("finish", ("001_create", False))


def test_a_step_error_keeps_its_own_hint_and_is_counted(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    from prometheus_client import REGISTRY

    from byod.errors import InstanceError

    url = new_instance()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid, to_version=1).ok
    kind = cws.directory.get_config(uid).target_kind or ""
    labels = {"migration": "002_bump", "direction": "up", "target_kind": kind, "outcome": "failed"}
    before = REGISTRY.get_sample_value("byod_steps_total", labels) or 0.0
    refusal = InstanceError("the instance refused", hint="Ask its owner for room.")
    result = spied(cws, lambda t: Spy(t, fail={"002_bump": refusal})).migrate(uid)
    assert isinstance(result.error, InstanceError)
    assert result.error.hint == "Ask its owner for room."
    assert (result.from_version, result.to_version) == (1, 1)  # the first step failed
    assert REGISTRY.get_sample_value("byod_steps_total", labels) == before + 1


def test_a_step_the_target_found_applied_already_is_reported_so(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    result = spied(cws, lambda t: Spy(t, already=("003_fragile",))).migrate(uid)
    assert result.ok, result.error
    assert [s.status for s in result.steps] == ["completed", "completed", "already-applied"]
    assert all(0 < s.seconds < 3600 for s in result.steps)


def test_a_target_that_cannot_restamp_still_runs_with_an_old_stamp(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid, to_version=2).ok
    create = cws.registry.get("001_create")
    assert create is not None
    old = create.legacy_checksum
    execute(url, f"UPDATE byod_schema_stamp SET checksum = '{old}' WHERE id = '001_create'")
    result = spied(cws, lambda t: Spy(t, restamps=False)).migrate(uid)
    assert result.ok, result.error
    assert stamp_checksums(url)["001_create"] == old  # left for a target that can


def test_the_lease_is_held_until_the_last_step_is_recorded(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    runner = cws.runner()
    with held_in_migration(url, lambda: runner.migrate(uid)) as result:
        assert cws.directory.get_config(uid).lease_owner == runner.owner  # inside 002
    assert result[0].ok  # type: ignore[attr-defined]
    assert cws.directory.get_config(uid).lease_owner is None


def test_a_user_found_reachable_again_is_connected_and_its_version_adopted(
    cws: Workspace, new_instance: InstanceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid, to_version=1).ok
    cws.directory.set_status(uid, "error", error="unreachable last time", schema_version=0)
    with caplog.at_level(logging.WARNING, logger="byod.runner"):
        assert cws.runner().migrate(uid).ok
    config = cws.directory.get_config(uid)
    assert (config.connection_status, config.last_error, config.schema_version) == (
        "connected",
        None,
        3,
    )
    said = [r.getMessage() for r in caplog.records if "adopting" in r.getMessage()]
    assert said == [
        f"user {uid}: control plane said version 0, the instance's stamp says 1; "
        "adopting the instance's"
    ]
    caplog.clear()
    cws.directory.set_status(uid, "error", error="unreachable again", schema_version=3)
    with caplog.at_level(logging.WARNING, logger="byod.runner"):
        assert cws.runner().migrate(uid).ok  # nothing to run: reached, so connected
    assert not [r for r in caplog.records if "adopting" in r.getMessage()]
    config = cws.directory.get_config(uid)
    assert (config.connection_status, config.last_error) == ("connected", None)


def test_a_rollback_lost_after_or_before_a_commit_is_settled_by_the_stamp(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """A down step committed before its runner was lost is completed (recovered; the
    same run counts the user from the version before it); one lost before its commit
    failed, and runs again."""
    url = new_instance()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid).ok
    with pytest.raises(Crash):
        crashing_runner(cws, "003_fragile", run_id="undo-1").rollback(uid, 1)
    again = cws.runner().configured(run_id="undo-1", timeout=None, lease_seconds=300)
    result = again.rollback(uid, 1)
    assert result.ok, result.error
    assert [(s.migration_id, s.status) for s in result.steps] == [
        ("003_fragile", "recovered"),
        ("002_bump", "completed"),
    ]
    assert (result.from_version, result.to_version) == (3, 1)

    assert cws.runner().migrate(uid).ok
    with pytest.raises(Crash):  # 003's down commits, 002's never does
        spied(cws, lambda t: Spy(t, fail={"002_bump": Crash()})).rollback(uid, 1)
    assert stamp_ids(url) == ["001_create", "002_bump"]
    assert cws.runner().rollback(uid, 1).ok
    downs = [(m, s, a) for m, d, s, a in statuses(cws, uid) if d == "down"]
    assert downs[-3:] == [
        ("003_fragile", "completed", 2),
        ("002_bump", "failed", 2),
        ("002_bump", "completed", 3),
    ]
    assert stamp_ids(url) == ["001_create"] and counter(url) == 0


def test_steps_that_stand_when_the_code_of_their_version_does_not_deploy(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """The steps are applied and recorded; the user's result carries the deploy's error
    (with its hint), and its status says so while staying connected."""
    from byod.errors import DeployError

    url = new_instance()
    uid = add_connected(cws, url)
    refused = DeployError("the deploy was refused", hint="Deploy by hand, then run again.")
    result = spied(cws, lambda t: Spy(t, undeployable=refused)).migrate(uid)
    assert isinstance(result.error, DeployError)
    assert result.error.message == (
        f"user {uid} (user_a): at version 3, but the app code of that version did not "
        "deploy: the deploy was refused"
    )
    assert result.error.hint == "Deploy by hand, then run again."
    assert [s.status for s in result.steps] == ["completed"] * 3
    assert (result.from_version, result.to_version) == (0, 3)
    config = cws.directory.get_config(uid)
    assert (config.connection_status, config.schema_version) == ("connected", 3)
    assert config.last_error == result.error.message


# -- refusals before the chain starts (the runner's lease held): what each leaves behind


def refused_row(ws: Workspace, uid: int) -> tuple[str, str, str | None]:
    """The one ledger row a refusal leaves: (migration, status, error)."""
    (row,) = history(ws.engine, uid)
    return row.migration_id, row.status, row.error


def test_a_user_disconnected_after_it_was_chosen_is_given_up_untouched(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid, to_version=1).ok
    user = cws.directory.get_user(uid)
    # between the fleet's selection and this user's turn (as an older byod marked it)
    cws.directory.set_status(uid, "disconnected")
    result = cws.runner().migrate_user(user)
    assert isinstance(result.error, NotConnectedError)
    assert result.error.message == f"user {uid} (user_a): it is disconnected"
    assert (result.user_id, result.from_version, result.to_version, result.steps) == (
        uid,
        1,
        1,
        (),
    )
    assert stamp_ids(url) == ["001_create"] and len(history(cws.engine, uid)) == 1


def test_a_fleet_runner_with_another_key_refuses_the_user_with_a_trail(
    cws: Workspace, new_instance: InstanceFactory, control_plane_url: str
) -> None:
    uid = add_connected(cws, new_instance())
    other = make_workspace(control_plane_url, cws.settings.migrations_dir, key=OTHER_KEY)
    result = other.runner().migrate_user(cws.directory.get_user(uid))
    assert isinstance(result.error, CredentialsError)
    said = (
        f"its credentials were sealed with key {cws.sealer.key_id}, but the configured key "
        f"is {other.sealer.key_id}: wrong encryption key; nothing was changed"
    )
    assert result.error.message == f"user {uid} (user_a): {said}"
    assert [(s.migration_id, s.status) for s in result.steps] == [("001_create", "failed")]
    assert refused_row(cws, uid) == ("001_create", "failed", f"CredentialsError: {said}")
    assert cws.directory.get_config(uid).connection_status == "connected"  # the key's fault
    other.engine.dispose()


def test_credentials_that_do_not_open_with_the_right_key_mark_the_user(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    uid = add_connected(cws, new_instance())
    with cws.engine.begin() as conn:  # another user's sealed URL, moved here
        other = cws.sealer.seal("sqlite:///elsewhere.db", user_id=uid + 1, field_name="url")
        conn.execute(configs.update().where(configs.c.user_id == uid).values(sealed_url=other))
    result = cws.runner().migrate(uid)
    assert isinstance(result.error, CredentialsError)
    config = cws.directory.get_config(uid)
    assert config.connection_status == "error"
    assert config.last_error == result.error.message.removeprefix(f"user {uid} (user_a): ")
    assert refused_row(cws, uid) == (
        "001_create",
        "failed",
        f"CredentialsError: {config.last_error}",
    )


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (SettingsError("this instance is the control plane"), "error"),
        (BusyError("no connection slot is free"), "connected"),
        (UnreachableError("the instance is unreachable"), "error"),
    ],
    ids=["settings", "busy", "unreachable"],
)
def test_an_instance_that_cannot_be_opened_is_refused_with_a_trail(
    cws: Workspace, new_instance: InstanceFactory, error: ByodError, status: str
) -> None:
    uid = add_connected(cws, new_instance())

    def opener(credentials: Credentials, timeout: float) -> Target:
        raise error

    policy = cws.settings.instance_policy
    runner = Runner(cws.engine, cws.registry, cws.sealer, opener=opener, policy=policy)
    result = runner.migrate(uid)
    assert type(result.error) is type(error)
    assert result.error.message == f"user {uid} (user_a): {error.message}"
    assert [(s.migration_id, s.status) for s in result.steps] == [("001_create", "failed")]
    name = type(error).__name__
    assert refused_row(cws, uid) == ("001_create", "failed", f"{name}: {error.message}")
    config = cws.directory.get_config(uid)
    assert config.connection_status == status
    assert config.last_error == (None if status == "connected" else error.message)


@pytest.mark.parametrize(
    ("error", "status", "trail"),
    [
        (SettingsError("the instance turned out to be the control plane"), "error", True),
        (UnreachableError("the connection dropped"), "error", True),
        (InstanceTimeoutError("no answer in time"), "connected", True),
        (PlanError("a plan that cannot be made"), "connected", False),
    ],
    ids=["settings", "unreachable", "timeout", "other"],
)
def test_what_goes_wrong_reading_the_stamp_is_refused_or_given_up(
    cws: Workspace,
    new_instance: InstanceFactory,
    error: ByodError,
    status: str,
    trail: bool,
) -> None:
    uid = add_connected(cws, new_instance())
    notices: list[Notice] = []

    class Failing(Spy):
        def begin(self, deadline: float | None = None) -> Any:
            raise error

    runner = spied(cws, Failing)
    runner.notify = notices.append
    result = runner.migrate(uid)
    assert type(result.error) is type(error)
    assert result.error.message == f"user {uid} (user_a): {error.message}"
    assert (result.from_version, result.to_version) == (0, 0)
    config = cws.directory.get_config(uid)
    assert config.connection_status == status
    if trail:
        assert refused_row(cws, uid) == (
            "001_create",
            "failed",
            f"{type(error).__name__}: {error.message}",
        )
    else:
        assert history(cws.engine, uid) == [] and result.steps == ()
    unreachable = isinstance(error, UnreachableError)
    assert [n.kind for n in notices] == (["unreachable"] if unreachable else [])
    assert config.last_error == (error.message if status == "error" else None)


def test_the_connect_waits_no_longer_than_what_is_left_of_the_timeout(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """With --timeout shorter than the connect timeout, the connect gets what is left of
    the timeout (never less than 0.1 s), not its own 10 s."""
    uid = add_connected(cws, new_instance())
    given: list[float] = []

    def opener(credentials: Credentials, timeout: float) -> Target:
        given.append(timeout)
        return open_instance(credentials, timeout=timeout)

    runner = Runner(
        cws.engine,
        cws.registry,
        cws.sealer,
        policy=cws.settings.instance_policy,
        opener=opener,
        timeout=0.5,
        connect_timeout=10.0,
    )
    assert runner.migrate(uid).ok
    assert len(given) == 1 and 0.1 <= given[0] <= 0.5


# -- a fleet run's pages: the chain on rows its page wrote, records that wait for a batch


class LedgerWrites:
    """The INSERT and DELETE statements run on the ledger (a plan written, one forgotten)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.seen: list[str] = []
        sa.event.listen(engine, "before_cursor_execute", self._statement)

    def _statement(self, conn: sa.Connection, cursor: object, sql: str, *args: object) -> None:
        verb = sql.split(None, 1)[0].upper()
        if "byod_migrations" in sql and verb in ("INSERT", "DELETE"):
            self.seen.append(verb)


def paged(ws: Workspace, run_id: str = "paged-run") -> tuple[Runner, Claims, Outcomes]:
    """A runner as a fleet run makes it: users claimed a page at a time, last steps
    waiting for a batch (here: until the test closes it)."""
    runner = ws.runner().configured(run_id=run_id, timeout=None, lease_seconds=300)
    runner.claims = Claims(runner.directory, runner.ledger, runner.owner, run_id, 300)
    runner.outcomes = Outcomes(runner.ledger, seconds=3600)
    return runner, runner.claims, runner.outcomes


def test_a_user_runs_on_the_rows_its_page_wrote_and_keeps_its_lease_until_recorded(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """A user whose page wrote its plan runs on those rows (no plan written again, none
    forgotten); each step keeps when it began on the instance, not when its page was
    planned; its last step waits for the batch with the user's lease still held (so no
    other runner settles it meanwhile) and the migrations' first checksums with it; the
    batch completes the row, moves the config and gives the lease back."""
    url = new_instance()
    uid = add_connected(cws, url)
    one_step = add_connected(cws, new_instance(), "one-step")  # its last step is its first
    assert cws.runner().migrate(one_step, to_version=2).ok
    runner, claims, outcomes = paged(cws)
    plan_for = lambda config: cws.registry.plan_up(config.schema_version, None)  # noqa: E731
    claims.claim([uid, one_step], plan_for)
    planned_at = max(r.started_at for r in history(cws.engine, uid) if r.started_at)
    writes = LedgerWrites(cws.engine)
    began = utcnow()
    assert began > planned_at
    result = runner.migrate_user(cws.directory.get_user(uid))
    assert result.ok and result.to_version == 3
    assert writes.seen == []  # the page's rows were the plan
    rows = sorted(history(cws.engine, uid), key=lambda r: r.version)
    assert [(r.status, r.attempts, r.run_id) for r in rows] == [
        ("completed", 1, "paged-run"),
        ("completed", 1, "paged-run"),
        ("running", 1, "paged-run"),  # the last step: done on the instance, waiting
    ]
    assert all(r.started_at is not None and r.started_at >= began for r in rows)
    config = cws.directory.get_config(uid)
    assert (config.lease_owner, config.schema_version) == (runner.owner, 2)
    with cws.engine.connect() as conn:
        kept = set(conn.execute(sa.select(applied_checksums.c.migration_id)).scalars())
    assert "003_fragile" not in kept  # with the batch, not at once
    outcomes.close(patience=5)
    last = max(history(cws.engine, uid), key=lambda r: r.version)
    assert last.status == "completed" and last.started_at is not None
    assert last.started_at >= began
    config = cws.directory.get_config(uid)
    assert (config.lease_owner, config.schema_version) == (None, 3)
    with cws.engine.connect() as conn:
        kept = set(conn.execute(sa.select(applied_checksums.c.migration_id)).scalars())
    assert kept >= {"001_create", "002_bump", "003_fragile"}
    assert counter(url) == 11
    assert runner.migrate_user(cws.directory.get_user(one_step)).ok
    outcomes.flush()
    (third,) = [r for r in history(cws.engine, one_step) if r.run_id == "paged-run"]
    assert third.status == "completed" and third.started_at is not None
    assert third.started_at >= began  # when it began, not when its page was planned


def test_a_page_plan_for_another_version_is_forgotten_before_the_chain(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """The instance is not where the control plane said when its page was planned: that
    plan's rows are forgotten (nothing ran for them) and the chain plans what it runs,
    so the ledger holds this run's real steps only, nothing left open."""
    url = new_instance()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid, to_version=1).ok
    with cws.engine.begin() as conn:  # the control plane's view went stale
        conn.execute(configs.update().where(configs.c.user_id == uid).values(schema_version=0))
    runner, claims, outcomes = paged(cws)
    claims.claim([uid], lambda config: cws.registry.plan_up(config.schema_version, None))
    result = runner.migrate_user(cws.directory.get_user(uid))
    outcomes.close(patience=5)
    assert result.ok and (result.from_version, result.to_version) == (1, 3)
    mine = [r for r in history(cws.engine, uid) if r.run_id == "paged-run"]
    assert sorted((r.migration_id, r.status) for r in mine) == [
        ("002_bump", "completed"),
        ("003_fragile", "completed"),
    ]
    assert counter(url) == 11


def test_a_user_with_nothing_to_do_costs_no_config_write(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """A user at head whose control plane agrees: its run changes nothing in its config
    (no status write: its last error and its time stay as they were)."""
    uid = add_connected(cws, new_instance())
    assert cws.runner().migrate(uid).ok
    with cws.engine.begin() as conn:
        conn.execute(
            configs.update().where(configs.c.user_id == uid).values(last_error="kept as it is")
        )
    before = cws.directory.get_config(uid)
    result = cws.runner().migrate(uid)
    assert result.ok and result.steps == ()
    after = cws.directory.get_config(uid)
    assert (after.updated_at, after.last_error) == (before.updated_at, "kept as it is")


def test_a_step_recovered_from_a_lost_runner_keeps_its_checksum_as_first_applied(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """The lost runner applied 002 and died before recording it (or its checksum): the
    next run, settling its rows from the stamp, keeps 002's checksum as first applied;
    a step the lost runner never finished is not kept as applied."""
    url = new_instance()
    uid = add_connected(cws, url)
    with pytest.raises(Crash):
        crashing_runner(cws, "002_bump").migrate(uid)
    with cws.engine.begin() as conn:
        conn.execute(sa.delete(applied_checksums))  # as if none had been kept
        conn.execute(  # and a second open row the lost runner left: a step not done
            ledger.update()
            .where(ledger.c.user_id == uid, ledger.c.migration_id == "003_fragile")
            .values(status="running")
        )
    result = cws.runner().migrate(uid, to_version=2)  # nothing left to run
    assert result.ok
    with cws.engine.connect() as conn:
        kept = set(conn.execute(sa.select(applied_checksums.c.migration_id)).scalars())
    assert kept == {"002_bump"}
