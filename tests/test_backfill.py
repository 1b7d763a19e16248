"""Backfills: a data change in batches, each with its cursor in its own instance
transaction, resumed from that cursor after an interruption or a failed batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from byod import commands
from byod.api import AuthSettings, create_app
from byod.controlplane import history
from byod.credentials import Credentials, open_instance
from byod.errors import (
    DriftError,
    IrreversibleError,
    MigrationFailedError,
    RegistryError,
    StoppedError,
    UnreachableError,
)
from byod.fleet import RowsProgress
from byod.phased import Batching
from byod.registry import Registry, Step
from byod.runner import Runner
from byod.spec import FleetOptions
from byod.targets import Target
from byod.targets.backfill import Progress
from byod.workspace import Workspace
from tests.conftest import (
    TEST_KEY,
    InstanceFactory,
    ServerDatabases,
    child_env,
    count_rows,
    execute,
    make_workspace,
    write_migrations,
)
from tests.helpers import (
    add_connected,
    stamp_ids,
    statuses,
    wait_for_leases_to_lapse,
    wait_until,
)
from tests.test_api import SECRET, token

ROWS = 5_000

BACKFILL_SET = {
    "001_items.py": f"""
        import os

        import sqlalchemy as sa
        from byod import Migration

        def up(ctx):
            ctx.op.create_table(
                "items",
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("n", sa.Integer, nullable=False),
                sa.Column("bad", sa.Integer, nullable=False),
            )
            rows = int(os.environ.get("BYOD_TEST_ROWS", "{ROWS}"))
            ctx.conn.execute(
                sa.text("INSERT INTO items (id, n, bad) VALUES (:id, 0, 0)"),
                [{{"id": i}} for i in range(1, rows + 1)],
            )

        def down(ctx):
            ctx.op.drop_table("items")

        migration = Migration(id="001_items", version=1, name="Items", description="", up=up,
                              down=down)
    """,
    "002_bump.py": """
        import os
        import time

        import sqlalchemy as sa
        from byod import Backfill, Migration

        def up(ctx):
            ctx.op.add_column("items", sa.Column("seen", sa.Integer, nullable=True))

        def bump(ctx, rows):
            if any(bad for _key, bad in rows):
                raise RuntimeError("a bad row")
            marks = os.environ.get("BYOD_TEST_BATCH_DIR")
            if marks:  # a test kills the process while it waits here, inside a batch
                open(os.path.join(marks, f"batch-{rows[0][0]}"), "w").close()
                hold = int(os.environ.get("BYOD_TEST_BATCH_HOLD", "0"))
                waited = 0
                while hold and len(os.listdir(marks)) >= hold and waited < 1200:
                    if os.path.exists(marks + ".go"):  # the test has signalled: finish
                        break
                    time.sleep(0.05)  # held inside this batch until the test acts
                    waited += 1
            time.sleep(float(os.environ.get("BYOD_TEST_BATCH_SLEEP", "0")))
            ids = [key for key, _bad in rows]
            statement = sa.text("UPDATE items SET n = n + 1, seen = 1 WHERE id IN :ids")
            ctx.conn.execute(statement.bindparams(sa.bindparam("ids", expanding=True)),
                             {"ids": ids})

        def finalize(ctx):
            ctx.op.create_index("ix_items_seen", "items", ["seen"])

        def down(ctx):
            ctx.op.drop_index("ix_items_seen", table_name="items")
            ctx.op.drop_column("items", "seen")

        migration = Migration(
            id="002_bump", version=2, name="Bump", description="", up=up, down=down,
            backfills=[Backfill(table="items", key="id", columns=("bad",), apply=bump,
                                batch_size=500)],
            finalize=finalize,
        )
    """,
}


@pytest.fixture
def bws(control_plane_url: str, tmp_path: Path) -> Iterator[Workspace]:
    workspace = make_workspace(control_plane_url, write_migrations(tmp_path / "m", BACKFILL_SET))
    yield workspace
    workspace.engine.dispose()


def counts(url: str) -> dict[int, int]:
    """How often each value of ``n`` occurs."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT n, count(*) FROM items GROUP BY n")).all()
            return {int(n): int(c) for n, c in rows}
    finally:
        engine.dispose()


def progress_rows(url: str) -> list[Any]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("byod_schema_progress"):
                return []
            return list(conn.execute(sa.text("SELECT * FROM byod_schema_progress")).all())
    finally:
        engine.dispose()


class CutAfter:
    """A real target whose connection is cut after ``batches`` backfill batches."""

    def __init__(self, target: Target, batches: int) -> None:
        self.target, self.left = target, batches

    def apply_batch(self, *args: Any, **kwargs: Any) -> Any:
        if self.left == 0:
            raise UnreachableError("connection cut by the test")
        self.left -= 1
        return self.target.apply_batch(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


def cutting_runner(ws: Workspace, batches: int) -> Runner:
    def opener(credentials: Credentials, timeout: float) -> Any:
        return CutAfter(open_instance(credentials, timeout=timeout), batches)

    return Runner(
        ws.engine, ws.registry, ws.sealer, policy=ws.settings.instance_policy, opener=opener
    )


def test_a_backfill_changes_every_row_once_in_batches(
    bws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(bws, url)
    result = bws.runner().migrate(uid)
    assert result.ok, result.error
    assert counts(url) == {1: ROWS}
    assert stamp_ids(url) == ["001_items", "002_bump"]
    assert progress_rows(url) == []  # the finalize ended the step
    assert statuses(bws, uid)[-1] == ("002_bump", "up", "completed", 1)
    assert result.steps[-1].rows == ROWS  # in the result (and the JSON lines)
    row = history(bws.engine, uid)[0]
    assert (row.rows_done, row.rows_total) == (ROWS, ROWS)  # done, of the estimated total
    assert bws.runner().migrate(uid).steps == ()  # nothing to do again


def test_an_interrupted_backfill_resumes_at_its_cursor(
    bws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(bws, url)
    cut = cutting_runner(bws, batches=3).migrate(uid)
    assert isinstance(cut.error, UnreachableError)
    assert counts(url) == {1: 1_500, 0: ROWS - 1_500}  # three batches committed, no more
    [progress] = progress_rows(url)
    assert (progress.backfill, progress.rows_done) == (0, 1_500)
    assert stamp_ids(url) == ["001_items"]  # in progress: no stamp yet
    resumed = bws.runner().migrate(uid)
    assert resumed.ok, resumed.error
    assert counts(url) == {1: ROWS}  # every row changed exactly once
    assert resumed.steps[-1].rows == ROWS  # the step's rows, the resumed attempt's too
    assert stamp_ids(url) == ["001_items", "002_bump"] and progress_rows(url) == []
    assert [s for s in statuses(bws, uid) if s[0] == "002_bump"] == [
        ("002_bump", "up", "failed", 1),
        ("002_bump", "up", "completed", 2),
    ]


def test_a_failed_batch_names_its_keys_and_the_fixed_data_resumes_there(
    bws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(bws, url)
    assert bws.runner().migrate(uid, to_version=1).ok
    execute(url, "UPDATE items SET bad = 1 WHERE id = 2345")
    failed = bws.runner().migrate(uid)
    assert isinstance(failed.error, MigrationFailedError)
    assert "batch of keys 2001 to 2500" in failed.error.message
    assert counts(url) == {1: 2_000, 0: ROWS - 2_000}  # the cursor stays before the batch
    execute(url, "UPDATE items SET bad = 0")
    fixed = bws.runner().migrate(uid)
    assert fixed.ok, fixed.error
    assert counts(url) == {1: ROWS}


def test_the_timeout_bounds_each_batch_not_the_whole_backfill(
    bws: Workspace, new_instance: InstanceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = new_instance()
    uid = add_connected(bws, url)
    assert bws.runner().migrate(uid, to_version=1).ok
    monkeypatch.setenv("BYOD_TEST_BATCH_SLEEP", "0.1")  # ten batches: about a second
    runner = bws.runner().configured(run_id=None, timeout=0.6, lease_seconds=30)
    started = time.monotonic()
    result = runner.migrate(uid)
    assert result.ok, result.error
    assert time.monotonic() - started > 0.6  # longer than the timeout, as a whole
    assert counts(url) == {1: ROWS}


def test_a_phased_step_rolls_back_with_its_down(
    bws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(bws, url)
    assert bws.runner().migrate(uid).ok
    rolled = bws.runner().rollback(uid, 1)
    assert rolled.ok, rolled.error
    assert stamp_ids(url) == ["001_items"]
    assert Registry.load(bws.settings.migrations_dir).head == 2


def test_mariadb_backfill_batches_are_transactional_and_resume(
    bws: Workspace, mysql: ServerDatabases
) -> None:
    url = mysql.create()
    uid = add_connected(bws, url)
    cut = cutting_runner(bws, batches=2).migrate(uid)
    assert isinstance(cut.error, UnreachableError)  # not dirty: batches are InnoDB's
    assert counts(url) == {1: 1_000, 0: ROWS - 1_000}
    resumed = bws.runner().migrate(uid)
    assert resumed.ok, resumed.error
    assert counts(url) == {1: ROWS}
    assert stamp_ids(url) == ["001_items", "002_bump"] and progress_rows(url) == []


class StopAfter(CutAfter):
    """A real target whose run is stopped (as by Ctrl-C) after ``batches`` batches."""

    def __init__(self, target: Target, batches: int, stop: threading.Event) -> None:
        super().__init__(target, batches)
        self.stop = stop

    def apply_batch(self, *args: Any, **kwargs: Any) -> Any:
        done = self.target.apply_batch(*args, **kwargs)
        self.left -= 1
        if self.left == 0:
            self.stop.set()
        return done


def test_a_stopped_run_ends_after_the_current_batch_with_its_cursor(
    bws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(bws, url)
    stop = threading.Event()

    def opener(credentials: Credentials, timeout: float) -> Any:
        return StopAfter(open_instance(credentials, timeout=timeout), 2, stop)

    runner = Runner(
        bws.engine,
        bws.registry,
        bws.sealer,
        opener=opener,
        batching=Batching(stop=stop),
        policy=bws.settings.instance_policy,
    )
    stopped = runner.migrate(uid)
    assert isinstance(stopped.error, StoppedError)
    assert counts(url) == {1: 1_000, 0: ROWS - 1_000}  # two whole batches, kept
    assert bws.runner().migrate(uid).ok
    assert counts(url) == {1: ROWS}


def test_kill_9_mid_backfill_then_rerun_changes_every_row_once(
    bws: Workspace, new_instance: InstanceFactory, tmp_path: Path
) -> None:
    big = 50_000
    url = new_instance()
    env = child_env()
    env |= {
        "BYOD_ENCRYPTION_KEY": TEST_KEY,
        "BYOD_DATABASE_URL": bws.settings.database_url,
        "BYOD_MIGRATIONS": str(bws.settings.migrations_dir),
        "BYOD_TEST_ROWS": str(big),
    }
    os.environ["BYOD_TEST_ROWS"] = str(big)  # this process's runner reads the same set
    try:
        uid = add_connected(bws, url)
        assert bws.runner().migrate(uid, to_version=1).ok
        marks = tmp_path / "marks"
        marks.mkdir()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "byod",
                "migrate",
                str(uid),
                "--batch-size",
                "1000",
                "--lease-seconds",
                "2",
            ],
            env=env | {"BYOD_TEST_BATCH_DIR": str(marks), "BYOD_TEST_BATCH_HOLD": "6"},
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: len(list(marks.iterdir())) == 6, "the sixth batch to start")
        proc.send_signal(signal.SIGKILL)  # held inside the sixth batch's transaction
        proc.wait(10)
        assert counts(url).get(1, 0) == 5000  # the five whole batches before it only
        wait_for_leases_to_lapse(bws.engine, [uid])
        resumed = bws.runner().migrate(uid)
        assert resumed.ok, resumed.error
        assert counts(url) == {1: big}  # every row changed exactly once
        rows = [(s, a) for m, _, s, a in statuses(bws, uid) if m == "002_bump"]
        assert rows == [("failed", 1), ("completed", 2)]  # the lost attempt, the resumed one
        assert history(bws.engine, uid)[0].rows_done == big
        assert progress_rows(url) == []
    finally:
        os.environ.pop("BYOD_TEST_ROWS", None)


def write_at_once(url: str) -> bool:
    """Whether the user's own app can update a row right now, without waiting for a lock
    (SQLite: no busy wait; PostgreSQL: a lock timeout of 100 ms)."""
    wait = {"timeout": 0} if url.startswith("sqlite") else {}
    engine = sa.create_engine(url, connect_args=wait)
    try:
        with engine.begin() as conn:
            if url.startswith("postgresql"):
                conn.execute(sa.text("SET LOCAL lock_timeout = '100ms'"))
            conn.execute(sa.text("UPDATE items SET bad = 0 WHERE id = 1"))
        return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


def test_batches_hold_the_instance_only_a_batch_at_a_time(
    bws: Workspace, new_instance: InstanceFactory
) -> None:
    """Between two batches the instance is free: the user's app writes there at once (a
    lock left held by a batch, or one transaction for the whole change, would refuse it
    — shown below). No clock: each write is tried where it must pass or must not."""
    url = new_instance()
    uid = add_connected(bws, url)
    assert bws.runner().migrate(uid, to_version=1).ok
    between: list[bool] = []
    runner = bws.runner().configured(
        run_id=None,
        timeout=None,
        lease_seconds=30,
        on_rows=lambda progress: between.append(write_at_once(url)),
    )
    assert runner.migrate(uid).ok
    assert len(between) >= ROWS // 500 and all(between), between
    # the same change as one transaction: the app cannot write while it is open
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE items SET n = n + 1"))
            assert not write_at_once(url)
    finally:
        engine.dispose()


def test_a_fleet_run_reports_the_rows_its_backfills_did(
    bws: Workspace, new_instance: InstanceFactory
) -> None:
    for name in ("a", "b"):
        add_connected(bws, new_instance(), name)
    heard: list[RowsProgress] = []
    summary = commands.migrate_fleet(
        bws,
        options=FleetOptions(batch_size=2_000),
        on_event=lambda e: heard.append(e) if isinstance(e, RowsProgress) else None,
    )
    assert (summary.succeeded, summary.failed) == (2, 0)
    for user in {e.user_id for e in heard}:  # each batch told, as it is done
        seen = [(e.rows_done, e.rows_total) for e in heard if e.user_id == user]
        assert seen == [(0, ROWS), (2_000, ROWS), (4_000, ROWS), (ROWS, ROWS)]
    assert len({e.user_id for e in heard}) == 2
    details = commands.show_run(bws, summary.run_id)
    assert (details.rows_done, details.rows_total) == (2 * ROWS, 2 * ROWS)
    app = create_app(bws, AuthSettings(secret=SECRET))
    with TestClient(app) as client:
        page = client.get("/dashboard", cookies={"byod_token": token("ops", admin=True)})
    assert page.status_code == 200 and "10,000/10,000" in page.text  # the runs table


def test_a_batch_whose_cursor_moved_under_it_rolls_back(
    bws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(bws, url)
    assert isinstance(cutting_runner(bws, batches=2).migrate(uid).error, UnreachableError)
    step = Step(bws.registry.get("002_bump"), "up")  # type: ignore[arg-type]
    migration = step.migration
    policy = bws.settings.instance_policy
    target = open_instance(Credentials(url=sa.engine.make_url(url), policy=policy), timeout=10)
    try:
        stale = Progress(0, None, 0)  # where another runner found it, two batches ago
        with pytest.raises(DriftError, match="progress changed"):
            target.apply_batch(
                step,
                stale,
                migration.backfills[0],
                500,
                lambda conn, rows: conn.execute(sa.text("UPDATE items SET n = n + 100")),
            )
    finally:
        target.close()
    assert counts(url) == {1: 1_000, 0: ROWS - 1_000}  # the batch's change rolled back
    assert bws.runner().migrate(uid).ok
    assert counts(url) == {1: ROWS}


def test_postgres_batches_commit_without_waiting_for_the_disk_and_finalize_durably(
    ws: Workspace, tmp_path: Path, pg: ServerDatabases
) -> None:
    folder = write_migrations(
        tmp_path / "sync",
        {
            "001_seen.py": """
                import sqlalchemy as sa
                from byod import Backfill, Migration

                SEEN = "INSERT INTO seen VALUES (:phase, current_setting('synchronous_commit'))"

                def up(ctx):
                    ctx.op.create_table("seen", sa.Column("phase", sa.Text),
                                        sa.Column("sync", sa.Text))
                    ctx.op.create_table("things", sa.Column("id", sa.Integer, primary_key=True))
                    ctx.conn.execute(sa.text("INSERT INTO things SELECT generate_series(1, 5)"))
                    ctx.conn.execute(sa.text(SEEN), {"phase": "schema"})

                def batch(ctx, rows):
                    ctx.conn.execute(sa.text(SEEN), {"phase": "batch"})

                def finalize(ctx):
                    ctx.conn.execute(sa.text(SEEN), {"phase": "finalize"})

                migration = Migration(
                    id="001_seen", version=1, name="Seen", description="", up=up,
                    backfills=[Backfill(table="things", key="id", apply=batch, batch_size=2)],
                    finalize=finalize,
                )
            """
        },
    )
    sws = make_workspace(ws.settings.database_url, folder)
    try:
        url = pg.create()
        uid = add_connected(sws, url)
        assert sws.runner().configured(run_id=None, timeout=5, lease_seconds=30).migrate(uid).ok
    finally:
        sws.engine.dispose()
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            seen = conn.execute(sa.text("SELECT phase, sync FROM seen")).all()
    finally:
        engine.dispose()
    assert seen == [
        ("schema", "on"),
        ("batch", "off"),
        ("batch", "off"),
        ("batch", "off"),
        ("finalize", "on"),
    ]


def test_a_backfill_on_a_key_that_cannot_be_a_cursor_fails_clearly(
    ws: Workspace, tmp_path: Path, new_instance: InstanceFactory, instance_kind: str
) -> None:
    folder = write_migrations(
        tmp_path / "dated",
        {
            "001_dated.py": """
                import datetime as dt
                import sqlalchemy as sa
                from byod import Backfill, Migration

                def up(ctx):
                    ctx.op.create_table("events", sa.Column("at", sa.DateTime, primary_key=True))
                    start = dt.datetime(2026, 1, 1)
                    ctx.conn.execute(sa.text("INSERT INTO events (at) VALUES (:at)"),
                                     [{"at": start + dt.timedelta(minutes=i)} for i in range(5)])

                def touch(ctx, rows):
                    pass

                migration = Migration(
                    id="001_dated", version=1, name="Dated", description="", up=up,
                    backfills=[Backfill(table="events", key="at", apply=touch, batch_size=2)],
                )
            """
        },
    )
    url = new_instance()
    uid = add_connected(ws, url)
    result = Runner(
        ws.engine, Registry.load(folder), ws.sealer, policy=ws.settings.instance_policy
    ).migrate(uid)
    if instance_kind == "sqlite":  # SQLite keeps a datetime as ISO text: a fine cursor
        assert result.ok, result.error
        return
    assert isinstance(result.error, MigrationFailedError)
    assert "must be an integer or text column" in result.error.message


@pytest.mark.parametrize(
    ("values", "flaw"),
    [
        ("SELECT i % 7, 0 FROM s", "is not unique (993 rows repeat another row's key)"),
        ("SELECT CASE WHEN i <= 10 THEN NULL ELSE i END, 0 FROM s", "is NULL in 10 rows"),
    ],
    ids=["duplicates", "nulls"],
)
def test_a_backfill_key_that_would_skip_rows_fails_the_step_before_any_batch(
    ws: Workspace, tmp_path: Path, new_instance: InstanceFactory, values: str, flaw: str
) -> None:
    folder = write_migrations(
        tmp_path / "keys",
        {
            "001_groups.py": f"""
                import sqlalchemy as sa
                from byod import Backfill, Migration

                def up(ctx):
                    ctx.op.create_table("rows_", sa.Column("grp", sa.Integer, nullable=True),
                                        sa.Column("n", sa.Integer, nullable=False))
                    ctx.conn.execute(sa.text(
                        "INSERT INTO rows_ (grp, n) WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL "
                        "SELECT i + 1 FROM s WHERE i < 1000) {values}"))

                def bump(ctx, rows):
                    ctx.conn.execute(sa.text("UPDATE rows_ SET n = n + 1"))

                migration = Migration(
                    id="001_groups", version=1, name="Groups", description="", up=up,
                    backfills=[Backfill(table="rows_", key="grp", apply=bump, batch_size=100)],
                )
            """
        },
    )
    url = new_instance()
    uid = add_connected(ws, url)
    result = Runner(
        ws.engine, Registry.load(folder), ws.sealer, policy=ws.settings.instance_policy
    ).migrate(uid)
    assert isinstance(result.error, MigrationFailedError)
    assert f"its key grp {flaw}" in result.error.message
    assert count_rows(url, "rows_") == -1  # the schema change rolled back with it
    assert stamp_ids(url) == []


def test_a_rollback_below_a_step_in_progress_is_refused(
    bws: Workspace, new_instance: InstanceFactory
) -> None:
    url = new_instance()
    uid = add_connected(bws, url)
    assert isinstance(cutting_runner(bws, batches=1).migrate(uid).error, UnreachableError)
    with pytest.raises(IrreversibleError, match="002_bump is in progress"):
        bws.runner().rollback(uid, 0)
    assert counts(url) == {1: 500, 0: ROWS - 500}  # nothing touched
    assert bws.runner().migrate(uid).ok  # finishing it first works


def test_a_backfill_of_a_missing_table_fails_the_step_and_touches_nothing(
    ws: Workspace, tmp_path: Path, new_instance: InstanceFactory
) -> None:
    folder = write_migrations(
        tmp_path / "typo",
        {
            "001_typo.py": """
                import sqlalchemy as sa
                from byod import Backfill, Migration

                def up(ctx):
                    ctx.op.create_table("notes", sa.Column("id", sa.Integer, primary_key=True))

                migration = Migration(
                    id="001_typo", version=1, name="Typo", description="", up=up,
                    backfills=[Backfill(table="nots", key="id", apply=lambda ctx, rows: None)],
                )
            """
        },
    )
    url = new_instance()
    uid = add_connected(ws, url)
    result = Runner(
        ws.engine, Registry.load(folder), ws.sealer, policy=ws.settings.instance_policy
    ).migrate(uid)
    assert isinstance(result.error, MigrationFailedError)  # the migration's mistake
    assert "backfill of nots (key id): cannot count its rows" in result.error.message
    assert stamp_ids(url) == [] and progress_rows(url) == []


def test_ctrl_c_on_one_user_stops_after_the_current_batch_without_a_traceback(
    bws: Workspace, tmp_path: Path
) -> None:
    (tmp_path / "one.db").touch()  # the signal handling is the same whatever the instance
    url = f"sqlite:///{tmp_path / 'one.db'}"
    uid = add_connected(bws, url)
    assert bws.runner().migrate(uid, to_version=1).ok
    env = child_env()
    env |= {
        "BYOD_ENCRYPTION_KEY": TEST_KEY,
        "BYOD_DATABASE_URL": bws.settings.database_url,
        "BYOD_MIGRATIONS": str(bws.settings.migrations_dir),
        "BYOD_TEST_BATCH_HOLD": "3",
        "BYOD_LOG_FILE": str(tmp_path / "byod.log"),
    }
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "byod", "migrate", str(uid), "--batch-size", "250"],
        env=env | {"BYOD_TEST_BATCH_DIR": str(marks)},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: len(list(marks.iterdir())) == 3, "the third batch to start")
    proc.send_signal(signal.SIGINT)  # while the third batch is held inside its transaction
    log = tmp_path / "byod.log"
    wait_until(lambda: "stopping after the current batch" in log.read_text(), "Ctrl-C heard")
    Path(f"{marks}.go").touch()  # the third batch may finish now
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    assert "StoppedError" in err and "Traceback" not in err
    done = counts(url).get(1, 0)
    assert done == 750  # whole batches: the current (third) one finished, no fourth began
    row = history(bws.engine, uid)[0]
    assert (row.status, row.rows_done) == ("failed", done)  # the stopped attempt's rows
    assert bws.runner().migrate(uid).ok
    assert counts(url) == {1: ROWS}


def test_a_failed_finalize_is_named_and_runs_alone_next_time(
    ws: Workspace, tmp_path: Path, new_instance: InstanceFactory
) -> None:
    folder = write_migrations(
        tmp_path / "fin",
        {
            "001_fin.py": """
                import os
                import sqlalchemy as sa
                from byod import Backfill, Migration

                def up(ctx):
                    ctx.op.create_table("t", sa.Column("id", sa.Integer, primary_key=True),
                                        sa.Column("n", sa.Integer, nullable=False))
                    ctx.conn.execute(sa.text("INSERT INTO t (id, n) VALUES (1, 0), (2, 0)"))

                def bump(ctx, rows):
                    ctx.conn.execute(sa.text("UPDATE t SET n = n + 1"))

                def finalize(ctx):
                    if os.path.exists(os.environ["BYOD_TEST_FINALIZE_FAILS"]):
                        raise RuntimeError("finalize boom")

                migration = Migration(
                    id="001_fin", version=1, name="Fin", description="", up=up,
                    backfills=[Backfill(table="t", key="id", apply=bump, batch_size=10)],
                    finalize=finalize,
                )
            """
        },
    )
    flag = tmp_path / "fail"
    flag.touch()
    os.environ["BYOD_TEST_FINALIZE_FAILS"] = str(flag)
    try:
        url = new_instance()
        uid = add_connected(ws, url)
        runner = Runner(
            ws.engine, Registry.load(folder), ws.sealer, policy=ws.settings.instance_policy
        )
        failed = runner.migrate(uid)
        assert isinstance(failed.error, MigrationFailedError)
        assert "001_fin: its finalize failed" in failed.error.message
        assert "finalize boom" in failed.error.message
        assert history(ws.engine, uid)[0].rows_done == 2  # the failed attempt's rows
        flag.unlink()
        assert runner.migrate(uid).ok
    finally:
        del os.environ["BYOD_TEST_FINALIZE_FAILS"]
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:  # the backfill ran once: the finalize alone again
            assert conn.execute(sa.text("SELECT sum(n) FROM t")).scalar_one() == 2
    finally:
        engine.dispose()


def test_a_step_left_in_progress_is_reported_and_guarded(
    bws: Workspace, new_instance: InstanceFactory, tmp_path: Path
) -> None:
    url = new_instance()
    uid = add_connected(bws, url)
    assert isinstance(cutting_runner(bws, batches=2).migrate(uid).error, UnreachableError)
    [report] = commands.verify(bws, str(uid))
    assert not report.ok
    assert any("002_bump is in progress" in p for p in report.problems), report.problems
    # the step's own file edited halfway: drift, nothing run
    source = bws.settings.migrations_dir
    edited = write_migrations(
        tmp_path / "edited",
        {
            "001_items.py": (source / "001_items.py").read_text(),
            "002_bump.py": (source / "002_bump.py").read_text() + "\nEDITED = True\n",
        },
    )
    changed = Runner(
        bws.engine, Registry.load(edited), bws.sealer, policy=bws.settings.instance_policy
    ).migrate(uid)
    assert isinstance(changed.error, DriftError)
    assert "002_bump changed since its schema change ran" in changed.error.message
    assert counts(url) == {1: 1_000, 0: ROWS - 1_000}
    # the folder's 002 replaced by another phased step halfway: drift, nothing run
    replaced = write_migrations(
        tmp_path / "replaced",
        {
            "001_items.py": (bws.settings.migrations_dir / "001_items.py").read_text(),
            "002_other.py": """
                import sqlalchemy as sa
                from byod import Backfill, Migration

                def up(ctx):
                    ctx.op.add_column("items", sa.Column("other", sa.Integer, nullable=True))

                def touch(ctx, rows):
                    pass

                migration = Migration(
                    id="002_other", version=2, name="Other", description="", up=up,
                    backfills=[Backfill(table="items", key="id", apply=touch)],
                )
            """,
        },
    )
    other = Runner(
        bws.engine, Registry.load(replaced), bws.sealer, policy=bws.settings.instance_policy
    ).migrate(uid)
    assert isinstance(other.error, DriftError)
    assert "002_bump is in progress on this instance" in other.error.message
    assert counts(url) == {1: 1_000, 0: ROWS - 1_000}  # nothing moved
    assert bws.runner().migrate(uid).ok  # the right folder finishes it
    assert commands.verify(bws, str(uid))[0].ok


@pytest.mark.parametrize(
    ("declaration", "message"),
    [
        ('Backfill(table="t", key="id", apply=f, columns="body")', "columns must be a tuple"),
        ('Backfill(table="t", key="id", apply=None)', "apply must be a function"),
        ('Backfill(table="t", key="id", apply=f, batch_size="100")', "must be a whole number"),
        ('[Backfill(table="t", key="id", apply=f)][0]', "backfills must be a list"),
    ],
    ids=["columns string", "apply None", "batch size text", "not a list"],
)
def test_a_mistaken_backfill_declaration_is_refused_when_the_folder_loads(
    tmp_path: Path, declaration: str, message: str
) -> None:
    folder = write_migrations(
        tmp_path / "bad",
        {
            "001_bad.py": f"""
                from byod import Backfill, Migration

                def f(ctx, rows):
                    pass

                migration = Migration(
                    id="001_bad", version=1, name="Bad", description="", up=lambda ctx: None,
                    backfills={declaration},
                )
            """
        },
    )
    with pytest.raises(RegistryError, match=message):
        Registry.load(folder)


def test_json_log_records_of_backfills_carry_the_user_and_the_migration(
    bws: Workspace, tmp_path: Path
) -> None:
    from tests.test_cli import Cli

    path = tmp_path / "one.db"
    path.touch()
    uid = add_connected(bws, f"sqlite:///{path}", "one")
    cli = Cli(
        tmp_path,
        BYOD_DATABASE_URL=bws.settings.database_url,
        BYOD_MIGRATIONS=str(bws.settings.migrations_dir),
        BYOD_ENCRYPTION_KEY=TEST_KEY,
    )
    ran = cli("--log-format", "json", "migrate", "--all", "--json")
    assert ran.code == 0, ran.err
    logged = [json.loads(line) for line in ran.err.splitlines() if line.strip()]
    phases = [r for r in logged if "backfill of" in r["message"] or "finalized" in r["message"]]
    assert len(phases) == 2, logged
    run_id = ran.json_lines()[-1]["summary"]["run_id"]
    for record in phases:
        assert (record["user_id"], record["clerk_id"]) == (uid, "one")
        assert (record["migration"], record["direction"]) == ("002_bump", "up")
        assert record["run_id"] == run_id


FINALIZE_ONLY = {
    "001_notes.py": """
        import sqlalchemy as sa
        from byod import Migration

        def up(ctx):
            ctx.op.create_table("notes", sa.Column("id", sa.Integer, primary_key=True),
                                sa.Column("title", sa.Text, nullable=True))
            ctx.conn.execute(sa.text("INSERT INTO notes (id, title) VALUES (1, NULL), (2, 'b')"))

        def finalize(ctx):
            ctx.conn.execute(sa.text("UPDATE notes SET title = 'untitled' WHERE title IS NULL"))
            with ctx.op.batch_alter_table("notes") as batch:
                batch.alter_column("title", existing_type=sa.Text, nullable=False)

        migration = Migration(id="001_notes", version=1, name="Notes", description="",
                              up=up, finalize=finalize)
    """,
}


def test_a_finalize_without_backfills_runs_and_ends_the_step(
    control_plane_url: str, tmp_path: Path, new_instance: InstanceFactory
) -> None:
    """A migration with a ``finalize`` and no backfill is phased: its finalize runs (in
    its own transaction, with the stamp) — the phased test must not lose its second half."""
    ws = make_workspace(control_plane_url, write_migrations(tmp_path / "m", FINALIZE_ONLY))
    try:
        assert ws.registry.get("001_notes").phased  # type: ignore[union-attr]
        url = new_instance()
        uid = add_connected(ws, url)
        result = ws.runner().migrate(uid)
        assert result.ok, result.error
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                titles = conn.execute(sa.text("SELECT title FROM notes ORDER BY id")).scalars()
                assert list(titles) == ["untitled", "b"], "the finalize ran"
                columns = {c["name"]: c for c in sa.inspect(conn).get_columns("notes")}
                assert columns["title"]["nullable"] is False
        finally:
            engine.dispose()
        assert stamp_ids(url) == ["001_notes"] and progress_rows(url) == []
    finally:
        ws.engine.dispose()
