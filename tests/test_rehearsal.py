"""Rehearsals (``byod migrate USER --rehearse``): every pending step, backfills included,
in one instance transaction, then rolled back: nothing committed, the ledger untouched."""

from __future__ import annotations

import hashlib
import json
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from byod import commands
from byod.api import AuthSettings, create_app
from byod.clock import utcnow
from byod.controlplane import RunStore, history
from byod.controlplane.schema import runs
from byod.errors import InputError, RehearsalError
from byod.spec import FleetOptions
from byod.workspace import Workspace
from tests.conftest import (
    TEST_KEY,
    InstanceFactory,
    ServerDatabases,
    execute,
    make_workspace,
    write_migrations,
)
from tests.helpers import add_connected, counter, stamp_ids, wait_for_leases_to_lapse
from tests.test_api import SECRET, bearer, token
from tests.test_cli import Cli
from tests.test_fleet import byod, process_fleet, start_held

__all__ = ["process_fleet"]  # the fixture, shared with the fleet's tests

#: 001 makes a table whose titles repeat for some users; 002 puts a UNIQUE index on them
#: and fills a column in batches first (a backfill, rehearsed batch by batch)
UNIQUE_SET = {
    "001_notes.py": """
        import sqlalchemy as sa
        from byod import Migration

        def up(ctx):
            ctx.op.create_table(
                "notes",
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("title", sa.String(100), nullable=False),
            )

        migration = Migration(id="001_notes", version=1, name="notes", description="", up=up)
    """,
    "002_unique_titles.py": """
        import sqlalchemy as sa
        from byod import Backfill, Migration

        def up(ctx):
            ctx.op.add_column("notes", sa.Column("length", sa.Integer, nullable=True))

        def fill(ctx, rows):
            for key, title in rows:
                ctx.conn.execute(
                    sa.text("UPDATE notes SET length = :n WHERE id = :id"),
                    {"n": len(title), "id": key},
                )

        def finalize(ctx):
            ctx.op.create_index("ux_notes_title", "notes", ["title"], unique=True)

        migration = Migration(
            id="002_unique_titles", version=2, name="unique titles", description="",
            up=up, finalize=finalize,
            backfills=(Backfill(table="notes", key="id", columns=("title",), batch_size=7,
                                apply=fill),),
        )
    """,
}


def fingerprint(url: str) -> object:
    """What an instance holds: its file's bytes (SQLite), or its tables and rows."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return hashlib.sha256(Path(parsed.database or "").read_bytes()).hexdigest()
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            shape = {}
            for table in sorted(inspector.get_table_names()):
                columns = [c["name"] for c in inspector.get_columns(table)]
                indexes = sorted(i["name"] or "" for i in inspector.get_indexes(table))
                rows = conn.execute(sa.text(f'SELECT * FROM "{table}" ORDER BY 1')).all()
                shape[table] = (columns, indexes, [tuple(r) for r in rows])
            return shape
    finally:
        engine.dispose()


@pytest.fixture
def rws(control_plane_url: str, tmp_path: Path) -> Workspace:
    return make_workspace(control_plane_url, write_migrations(tmp_path / "m", UNIQUE_SET))


def seeded(
    ws: Workspace, new_instance: InstanceFactory, name: str, duplicate: bool
) -> tuple[int, str]:
    url = new_instance()
    uid = add_connected(ws, url, name)
    assert ws.runner().migrate(uid, to_version=1).ok
    titles = [f"note {n}" for n in range(20)] + (["note 3"] if duplicate else [])
    execute(url, *(f"INSERT INTO notes (title) VALUES ('{t}')" for t in titles))
    return uid, url


def test_a_rehearsal_finds_the_user_whose_data_breaks_the_index_and_keeps_nothing(
    rws: Workspace, new_instance: InstanceFactory
) -> None:
    good, good_url = seeded(rws, new_instance, "good", duplicate=False)
    bad, bad_url = seeded(rws, new_instance, "bad", duplicate=True)
    before = {url: fingerprint(url) for url in (good_url, bad_url)}
    ledgers = {uid: history(rws.engine, uid) for uid in (good, bad)}
    configs = {uid: rws.directory.get_config(uid) for uid in (good, bad)}
    passed = commands.rehearse_user(rws, "good")
    assert passed.ok, passed.error
    assert [(s.migration_id, s.status, s.rows) for s in passed.steps] == [
        ("002_unique_titles", "rehearsed", 20)  # every batch of 7 ran
    ]
    failed = commands.rehearse_user(rws, "bad")
    assert failed.error is not None
    assert "002_unique_titles" in failed.error.message
    assert "ux_notes_title" in failed.error.message or "UNIQUE" in failed.error.message.upper()
    assert [s.status for s in failed.steps] == ["failed"]
    for url in (good_url, bad_url):  # nothing committed: the same bytes, or the same rows
        assert fingerprint(url) == before[url]
        assert stamp_ids(url) == ["001_notes"]
    for uid in (good, bad):  # the ledger and the config as they were; the lease given back
        assert history(rws.engine, uid) == ledgers[uid]
        after = rws.directory.get_config(uid)
        assert (after.schema_version, after.connection_status) == (1, "connected")
        assert after.lease_owner is None
        assert after.schema_version == configs[uid].schema_version
    # the real run then does what the rehearsal said
    assert rws.runner().migrate(good).ok
    assert rws.runner().migrate(bad).error is not None


def test_instances_whose_ddl_commits_on_its_own_are_refused_untouched(
    rws: Workspace, mysql: ServerDatabases
) -> None:
    url = mysql.create()
    uid = add_connected(rws, url, "maria")
    assert rws.runner().migrate(uid, to_version=1).ok
    before = history(rws.engine, uid)
    with pytest.raises(RehearsalError, match="cannot be rehearsed"):
        commands.rehearse_user(rws, "maria", options=FleetOptions())
    assert history(rws.engine, uid) == before
    assert rws.directory.get_config(uid).lease_owner is None


def ledger_rows(ws: Workspace) -> list[tuple[object, ...]]:
    with ws.engine.connect() as conn:
        return [
            tuple(r) for r in conn.execute(sa.text("SELECT * FROM byod_migrations ORDER BY id"))
        ]


def test_a_fleet_rehearsal_names_exactly_the_users_that_would_fail_and_changes_nothing(
    rws: Workspace, new_instance: InstanceFactory
) -> None:
    fleet = ten(rws, new_instance)
    before = {url: fingerprint(url) for _, url in fleet.values()}
    ledger_before = ledger_rows(rws)
    summary = commands.rehearse_fleet(rws, options=FleetOptions(concurrency=4))
    assert (summary.succeeded, summary.failed, summary.total) == (7, 3, 10)
    details = commands.show_run(rws, summary.run_id)
    assert details.run.kind == "rehearse"
    failed = sorted((clerk, migration) for _, clerk, migration, _ in details.failures)
    assert failed == [(f"user_{n:02d}", "002_unique_titles") for n in BROKEN]
    assert all("unique" in (error or "").lower() for *_, error in details.failures)
    assert {url: fingerprint(url) for _, url in fleet.values()} == before
    assert ledger_rows(rws) == ledger_before  # not one row
    assert {rws.directory.get_config(uid).schema_version for uid, _ in fleet.values()} == {1}
    with pytest.raises(InputError, match="rehearsal"):
        commands.rollback_fleet_run(rws, summary.run_id)
    real = commands.migrate_fleet(rws)  # the real run meets what the rehearsal said
    assert (real.succeeded, real.failed) == (7, 3)


BROKEN = (2, 5, 8)


def ten(ws: Workspace, new_instance: InstanceFactory) -> dict[str, tuple[int, str]]:
    """Ten users at version 1; three have a duplicate title that breaks 002's index."""
    return {
        f"user_{n:02d}": seeded(ws, new_instance, f"user_{n:02d}", duplicate=n in BROKEN)
        for n in range(10)
    }


def test_rehearse_first_touches_nothing_until_every_user_passes(
    rws: Workspace, new_instance: InstanceFactory
) -> None:
    fleet = ten(rws, new_instance)
    before = {url: fingerprint(url) for _, url in fleet.values()}
    ledger_before = ledger_rows(rws)
    rehearsal, real = commands.rehearse_then_migrate(rws, options=FleetOptions(concurrency=4))
    assert real is None and rehearsal.failed == 3  # stopped: nothing touched
    assert {url: fingerprint(url) for _, url in fleet.values()} == before
    assert ledger_rows(rws) == ledger_before
    for n in BROKEN:  # the operator fixes the three users' data
        execute(fleet[f"user_{n:02d}"][1], "DELETE FROM notes WHERE id = 21")
    rehearsal, real = commands.rehearse_then_migrate(rws, options=FleetOptions(concurrency=4))
    assert rehearsal.failed == 0 and real is not None
    assert (real.succeeded, real.failed) == (10, 0)
    assert {rws.directory.get_config(uid).schema_version for uid, _ in fleet.values()} == {2}


def test_rehearse_first_with_a_failure_ratio_leaves_the_failing_users_out(
    rws: Workspace, tmp_path: Path
) -> None:
    cli = Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY)
    env = {
        "BYOD_DATABASE_URL": rws.settings.database_url,
        "BYOD_MIGRATIONS": str(rws.settings.migrations_dir),
    }
    counter_of = iter(range(100))
    make = lambda: sqlite_url(tmp_path, next(counter_of))  # noqa: E731
    users = {n: seeded(rws, make, f"u{n}", duplicate=n == 1) for n in range(4)}
    stopped = cli("migrate", "--all", "--rehearse-first", **env)
    assert stopped.code == 1 and "nothing was touched" in stopped.err
    assert "u1" in stopped.err and "002_unique_titles" in stopped.err
    went = cli("migrate", "--all", "--rehearse-first", "--max-failure-ratio", "0.3", **env)
    assert went.code == 1  # one user left out, and said so
    assert "1 failed and left out" in went.err and "left out: u1 at 002_unique_titles" in went.err
    versions = {n: rws.directory.get_config(uid).schema_version for n, (uid, _) in users.items()}
    assert versions == {0: 2, 1: 1, 2: 2, 3: 2}
    as_json = cli("migrate", "--all", "--rehearse-first", "--json", **env)  # u1 still fails
    assert as_json.code == 1
    last = json.loads(as_json.out.splitlines()[-1])
    assert (last["rehearsal"]["failed"], last["rehearsal"]["succeeded"]) == (1, 0)
    retried = cli("migrate", "u1", "--rehearse", "--retries", "1", **env)  # a plain failure
    assert retried.code == 1 and "002_unique_titles" in retried.err
    bad = cli("migrate", "u0", "--rehearse-first", **env)
    assert bad.code == 2 and "use --all" in bad.err
    both = cli("migrate", "--all", "--rehearse", "--rehearse-first", **env)
    assert both.code == 2


def sqlite_url(folder: Path, n: int) -> str:
    path = folder / f"i{n}.db"
    path.touch()
    return f"sqlite:///{path}"


def test_a_fleet_rehearsal_refuses_users_it_cannot_rehearse_before_touching_anyone(
    rws: Workspace, new_instance: InstanceFactory, mysql: ServerDatabases
) -> None:
    _, url = seeded(rws, new_instance, "fine", duplicate=False)
    maria = add_connected(rws, mysql.create(), "maria")
    assert rws.runner().migrate(maria, to_version=1).ok
    before = fingerprint(url)
    with pytest.raises(RehearsalError, match="maria"):
        commands.rehearse_fleet(rws)
    assert commands.list_runs(rws) == []  # no run recorded
    assert fingerprint(url) == before


def test_kill_9_during_a_rehearsal_leaves_nothing_and_the_next_run_migrates(
    process_fleet: tuple[Workspace, list[int], list[str], dict[str, str]], tmp_path: Path
) -> None:
    ws, ids, urls, env = process_fleet
    proc, _ = start_held(
        tmp_path, env, 3, "--rehearse", "--concurrency", "3", "--lease-seconds", "2"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    (rehearsal,) = commands.list_runs(ws)
    assert (rehearsal.kind, rehearsal.state) == ("rehearse", "running")
    assert ledger_rows(ws) == []  # nothing recorded but the run
    wait_for_leases_to_lapse(ws.engine, ids)  # the dead rehearsal's
    assert [stamp_ids(url) for url in urls] == [[]] * len(urls)  # nothing committed anywhere
    real = byod(tmp_path, "migrate", "--all", "--json", env=env)
    _, err = real.communicate(timeout=120)
    assert real.returncode == 0, err
    assert [counter(url) for url in urls] == [11] * len(urls)  # each step once, for real
    with ws.engine.begin() as conn:  # a minute later, nobody has heard from it
        conn.execute(
            sa.update(runs)
            .where(runs.c.id == rehearsal.id)
            .values(updated_at=utcnow() - timedelta(minutes=2))
        )
    assert RunStore(ws.engine).get(rehearsal.id).shown_state == "interrupted"
    assert len(ids) == 8


def test_operators_start_a_rehearsal_over_http_and_the_dashboard_shows_it_apart(
    rws: Workspace, new_instance: InstanceFactory
) -> None:
    good, good_url = seeded(rws, new_instance, "good", duplicate=False)
    _, bad_url = seeded(rws, new_instance, "bad", duplicate=True)
    rws.directory.add_user("ops")
    before = {url: fingerprint(url) for url in (good_url, bad_url)}
    client = TestClient(create_app(rws, AuthSettings(secret=SECRET)))
    ops = bearer(token("ops", admin=True))
    refused = client.post(
        "/v1/fleet/runs", headers=ops, json={"rehearse": True, "distributed": True}
    )
    assert refused.status_code == 422
    started = client.post("/v1/fleet/runs", headers=ops, json={"rehearse": True})
    assert started.status_code == 202, started.text
    run_id = started.json()["run_id"]
    store = RunStore(rws.engine)
    deadline = time.monotonic() + 30
    while store.get(run_id).ended_at is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    shown = client.get(f"/v1/fleet/runs/{run_id}", headers=ops).json()
    assert (shown["kind"], shown["succeeded"], shown["failed"]) == ("rehearse", 1, 1)
    assert {url: fingerprint(url) for url in (good_url, bad_url)} == before
    client.cookies.set("byod_token", token("ops", admin=True))
    fleet_page = client.get("/dashboard").text
    rehearsals = fleet_page.split("id='rehearsals'")[1]
    assert run_id in rehearsals and run_id not in fleet_page.split("id='rehearsals'")[0]
    run_page = client.get(f"/dashboard/runs/{run_id}").text
    assert "/dashboard/users/" in run_page.split("id='failures'")[1]  # the failing user
    assert "002_unique_titles" in run_page
    assert rws.directory.get_config(good).schema_version == 1


def test_a_rehearsals_output_never_reads_like_a_real_run(
    rws: Workspace, tmp_path: Path, new_instance: InstanceFactory
) -> None:
    """The human summary, the run list and ``runs show`` say nothing was changed;
    ``--json`` lines carry ``"rehearsal": true`` (and real runs ``false``), every other
    value as before."""
    for n in range(3):
        seeded(rws, new_instance, f"user_{n}", duplicate=n == 1)
    env = {
        "BYOD_DATABASE_URL": rws.settings.database_url,
        "BYOD_MIGRATIONS": str(rws.settings.migrations_dir),
        "BYOD_ENCRYPTION_KEY": TEST_KEY,
    }
    cli = Cli(tmp_path, **env)
    human = cli("migrate", "--all", "--rehearse")
    assert human.code == 1
    assert "rehearsal — nothing was changed" in human.out
    lines = [
        json.loads(line)
        for line in cli("migrate", "--all", "--rehearse", "--json").out.splitlines()
    ]
    assert all(
        line.get("rehearsal", line.get("summary", {}).get("rehearsal")) is True for line in lines
    )
    assert lines[-1]["summary"]["failed"] == 1
    one = cli("migrate", "user_0", "--rehearse")
    assert one.code == 0 and "rehearsal — nothing was changed" in one.out
    listed = cli("runs")
    assert "rehearsal (nothing changed)" in listed.out
    run_id = lines[-1]["summary"]["run_id"]
    assert "rehearsal — nothing was changed" in cli("runs", "show", run_id).out
    real = [json.loads(line) for line in cli("migrate", "--all", "--json").out.splitlines()]
    assert real[-1]["summary"]["rehearsal"] is False
    assert all(line["rehearsal"] is False for line in real[:-1])
    row = next(
        line for line in cli("runs").out.splitlines() if real[-1]["summary"]["run_id"] in line
    )
    assert "rehearsal" not in row and "migrate" in row
