"""Fleet runs on real instances: mixes, waves, retries, timeouts, crashes, races, undo."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from byod import commands
from byod.controlplane import RunStore, history
from byod.controlplane.schema import ledger
from byod.controlplane.schema import runs as runs_table
from byod.errors import CredentialsError, DriftError, InputError, IrreversibleError
from byod.fleet import FleetEvent, FleetStarted, UserFinished, migrate_fleet, rollback_run
from byod.runner.pages import FLUSH_SECONDS
from byod.spec import FleetOptions, Selection
from byod.workspace import Workspace
from tests import gates
from tests.conftest import (
    OTHER_KEY,
    TEST_KEY,
    InstanceFactory,
    ServerDatabases,
    child_env,
    execute,
    make_workspace,
)
from tests.helpers import (
    Statements,
    add_connected,
    control_plane_locked,
    counter,
    schema_version,
    stamp_ids,
    statuses,
    wait_for_leases_to_lapse,
    wait_until,
)
from tests.migration_sets import counter_migrations, slow_migrations
from tests.tcp_proxy import CuttableProxy
from tests.test_cli import Cli

FAST_RETRY = {"retry_base_seconds": 0.05, "retry_cap_seconds": 0.2}


def fleet_of(ws: Workspace, new_instance: InstanceFactory, n: int) -> tuple[list[int], list[str]]:
    urls = [new_instance() for _ in range(n)]
    ids = [add_connected(ws, url, f"user_{i:03d}") for i, url in enumerate(urls)]
    return ids, urls


def break_instance(url: str) -> None:
    """Data that makes 003_fragile fail."""
    execute(url, "CREATE TABLE break_me (id INTEGER)")


def make_unreachable(url: str) -> None:
    if url.startswith("sqlite"):
        Path(sa.make_url(url).database or "").unlink()
        return
    name = sa.make_url(url).database
    admin = sa.create_engine(
        sa.make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def test_fleet_mix_summary_and_ledger_are_exact(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    ids, urls = fleet_of(cws, new_instance, 6)
    assert cws.runner().migrate(ids[5]).ok  # already at head
    make_unreachable(urls[3])
    break_instance(urls[4])
    options = FleetOptions(concurrency=3, retries=1, **FAST_RETRY)
    summary = migrate_fleet(cws.runner(), options=options)
    counts = (summary.total, summary.succeeded, summary.failed, summary.busy, summary.up_to_date)
    assert counts == (6, 3, 2, 0, 1)  # the user already at head: counted up to date
    assert summary.not_started == 0 and summary.state == "completed" and not summary.ok
    failed = {(e.user, e.migration) for e in summary.errors}
    assert failed == {("user_003", "001_create"), ("user_004", "003_fragile")}
    assert [schema_version(cws, uid) for uid in ids] == [3, 3, 3, 0, 2, 3]
    assert cws.directory.get_config(ids[3]).connection_status == "error"
    for uid in ids[:3]:
        assert {s[0] for s in statuses(cws, uid) if s[2] == "completed"} == {
            "001_create",
            "002_bump",
            "003_fragile",
        }
    # never reached: the step it would have run is failed, with why, and no attempt
    assert statuses(cws, ids[3]) == [("001_create", "up", "failed", 0)]
    assert (history(cws.engine, ids[3])[0].error or "").startswith("UnreachableError: ")
    assert ("003_fragile", "up", "failed", 1) in statuses(cws, ids[4])
    at_head_rows = history(cws.engine, ids[5])
    assert {r.run_id for r in at_head_rows} == {None}  # the fleet run never touched it
    run_rows = [r for uid in ids for r in history(cws.engine, uid) if r.run_id == summary.run_id]
    assert run_rows and not [r for r in run_rows if r.status in ("running", "pending")]
    record = RunStore(cws.engine).get(summary.run_id)
    assert (record.state, record.counts.succeeded, record.counts.failed) == ("completed", 3, 2)


def test_not_eligible_users_are_counted_and_never_fail_the_run(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    ids, _ = fleet_of(cws, new_instance, 2)
    cws.directory.add_user("no_config")
    cws.directory.set_status(ids[1], "disconnected")
    summary = migrate_fleet(cws.runner())
    assert (summary.total, summary.succeeded, summary.failed, summary.not_eligible) == (1, 1, 0, 2)
    assert summary.ok
    assert schema_version(cws, ids[1]) == 0


def test_canary_failure_halts_before_touching_the_rest(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    ids, urls = fleet_of(cws, new_instance, 8)
    break_instance(urls[1])
    summary = migrate_fleet(cws.runner(), options=FleetOptions(concurrency=4, canary=2))
    assert summary.state == "halted" and "canary" in (summary.halt_reason or "")
    assert (summary.succeeded, summary.failed, summary.not_started, summary.total) == (1, 1, 6, 8)
    for uid in ids[2:]:
        assert schema_version(cws, uid) == 0 and statuses(cws, uid) == []
    assert RunStore(cws.engine).get(summary.run_id).state == "halted"


def test_a_canary_wave_that_passes_lets_the_rest_run_after_it(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """The canary users (the first N) finish before anyone else starts, and when they all
    pass the rest of the fleet runs: the run completes with every user moved."""
    ids, _ = fleet_of(cws, new_instance, 8)
    summary = migrate_fleet(cws.runner(), options=FleetOptions(concurrency=4, canary=2))
    assert (summary.state, summary.halt_reason) == ("completed", None)
    assert (summary.succeeded, summary.failed, summary.not_started) == (8, 0, 0)
    rows = {uid: history(cws.engine, uid) for uid in ids}
    done = {uid: max(r.completed_at for r in rows[uid] if r.completed_at) for uid in ids}
    began = {uid: min(r.started_at for r in rows[uid] if r.started_at) for uid in ids}
    canaries = sorted(ids, key=lambda uid: began[uid])[:2]
    rest = [uid for uid in ids if uid not in canaries]
    assert max(done[uid] for uid in canaries) <= min(began[uid] for uid in rest)


def test_the_halt_policy_rules() -> None:
    """The canary and ratio rules as the fleet asks them, case by case."""
    from byod.fleet.halt import canary_over, canary_room, halt_reason

    wave = FleetOptions(canary=2)
    assert halt_reason(wave, succeeded=2, failed=0, started=2, canary_over=True) is None
    assert halt_reason(wave, succeeded=0, failed=1, started=1, canary_over=False) is None
    assert halt_reason(wave, succeeded=1, failed=1, started=2, canary_over=True) == (
        "a canary failed (1 of 2)"
    )
    ratio = FleetOptions(max_failure_ratio=0.5)
    assert halt_reason(ratio, succeeded=1, failed=1, started=2, canary_over=False) is None
    assert "above --max-failure-ratio 0.5" in str(
        halt_reason(ratio, succeeded=1, failed=2, started=3, canary_over=False)
    )
    assert halt_reason(FleetOptions(), succeeded=0, failed=9, started=9, canary_over=False) is None
    assert canary_room(FleetOptions(), started=0, in_flight=0) is None
    assert canary_room(wave, started=0, in_flight=0) == 2
    assert canary_room(wave, started=1, in_flight=1) == 1
    assert canary_room(wave, started=2, in_flight=1) == 0, "wait for the wave to finish"
    assert canary_room(wave, started=2, in_flight=0) is None, "the wave is over: no limit"
    assert canary_room(wave, started=3, in_flight=2) is None
    assert canary_over(wave, started=2, in_flight=0, exhausted=False)
    assert not canary_over(wave, started=2, in_flight=1, exhausted=False)
    assert not canary_over(wave, started=1, in_flight=0, exhausted=False)
    assert canary_over(wave, started=1, in_flight=0, exhausted=True), "fewer users than N"
    assert not canary_over(FleetOptions(), started=0, in_flight=0, exhausted=True)


def test_failure_ratio_halts_the_rest_and_leaves_nothing_half_done(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    ids, urls = fleet_of(cws, new_instance, 10)
    break_instance(urls[1])
    break_instance(urls[2])
    options = FleetOptions(concurrency=1, max_failure_ratio=0.5)
    summary = migrate_fleet(cws.runner(), options=options)
    # user 0 ok (0/1), user 1 fails (1/2 = 0.5, not above), user 2 fails (2/3): halt.
    assert (summary.succeeded, summary.failed, summary.not_started) == (1, 2, 7)
    assert summary.state == "halted"
    for uid in ids[3:]:
        assert statuses(cws, uid) == []
    assert not [s for uid in ids for s in statuses(cws, uid) if s[2] in ("running", "pending")]


def test_transient_failures_are_retried_with_backoff_but_migration_errors_are_not(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    ids, urls = fleet_of(cws, new_instance, 2)
    make_unreachable(urls[0])
    break_instance(urls[1])
    finished: dict[str, int] = {}

    def seen(event_: FleetEvent) -> None:
        if isinstance(event_, UserFinished):
            finished[event_.result.clerk_id] = event_.tries

    options = FleetOptions(concurrency=2, retries=3, retry_base_seconds=0.1, retry_cap_seconds=1)
    started = time.monotonic()
    migrate_fleet(cws.runner(), options=options, on_event=seen)
    assert finished == {"user_000": 4, "user_001": 1}
    assert time.monotonic() - started >= 0.05 + 0.1 + 0.2  # at least half of each backoff
    assert [s[3] for s in statuses(cws, ids[1]) if s[0] == "003_fragile"] == [1]


def test_backoff_is_exponential_jittered_and_capped() -> None:
    options = FleetOptions(retry_base_seconds=1, retry_cap_seconds=8)
    for attempt, ceiling in [(0, 1), (1, 2), (2, 4), (3, 8), (6, 8)]:
        delays = {options.backoff(attempt) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jitter


def test_timeout_stops_the_work_and_fails_the_attempt(
    control_plane_url: str, new_instance: InstanceFactory, tmp_path: Path
) -> None:
    ws = make_workspace(control_plane_url, slow_migrations(tmp_path / "slow"))
    url = new_instance()
    uid = add_connected(ws, url)
    started = time.monotonic()
    summary = migrate_fleet(ws.runner(), options=FleetOptions(timeout=1.0, retries=0))
    elapsed = time.monotonic() - started
    assert summary.failed == 1
    assert elapsed < 10, f"the work was not stopped ({elapsed:.1f}s)"
    rows = history(ws.engine, uid)
    assert rows[0].status == "failed"
    assert rows[0].error and "InstanceTimeoutError" in rows[0].error
    assert stamp_ids(url) == []
    ws.engine.dispose()


def test_filters_pick_users_version_and_limit(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    ids, _ = fleet_of(cws, new_instance, 5)
    assert cws.runner().migrate(ids[0], to_version=1).ok
    only_v1 = migrate_fleet(cws.runner(), selection=Selection(only_version=1))
    assert only_v1.total == 1 and schema_version(cws, ids[0]) == 3
    user_001 = cws.directory.find_user("user_001").id
    listed = migrate_fleet(cws.runner(), selection=Selection(users=(user_001, ids[2])))
    assert listed.succeeded == 2
    assert [schema_version(cws, uid) for uid in ids] == [3, 3, 3, 0, 0]
    limited = migrate_fleet(cws.runner(), selection=Selection(limit=1))
    assert limited.total == 1 and [schema_version(cws, uid) for uid in ids[3:]] == [3, 0]
    with pytest.raises(InputError, match="99999"):
        migrate_fleet(cws.runner(), selection=Selection(users=(99_999,)))


def test_rollback_run_returns_exactly_the_users_it_moved(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    ids, urls = fleet_of(cws, new_instance, 5)
    for uid in ids:
        assert cws.runner().migrate(uid, to_version=1).ok
    assert cws.runner().migrate(ids[4]).ok  # already at head before the run
    break_instance(urls[2])  # moves 1 -> 2, fails at 3
    make_unreachable(urls[3])  # never moved
    run = migrate_fleet(cws.runner(), options=FleetOptions(retries=0))
    assert (run.succeeded, run.failed) == (2, 2)  # 2 moved 1 -> 2 and failed at 003
    assert [schema_version(cws, uid) for uid in ids] == [3, 3, 2, 1, 3]
    undo = rollback_run(cws.runner(), run.run_id, options=FleetOptions(concurrency=2))
    assert (undo.total, undo.succeeded, undo.failed) == (3, 3, 0)
    assert [schema_version(cws, uid) for uid in ids] == [1, 1, 1, 1, 3]
    assert [counter(u) for u in (urls[0], urls[1], urls[2], urls[4])] == [0, 0, 0, 11]
    assert stamp_ids(urls[4]) == ["001_create", "002_bump", "003_fragile"]
    record = RunStore(cws.engine).get(undo.run_id)
    assert record.kind == "rollback" and record.undoes == run.run_id


def test_rollback_run_refuses_without_down_before_touching_anything(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    ids, urls = fleet_of(cws, new_instance, 3)
    run = migrate_fleet(cws.runner())
    assert run.succeeded == 3
    rows_before = sum(len(history(cws.engine, uid)) for uid in ids)
    with pytest.raises(IrreversibleError, match="001_create"):
        rollback_run(cws.runner(), run.run_id)
    assert [counter(u) for u in urls] == [11, 11, 11]
    assert sum(len(history(cws.engine, uid)) for uid in ids) == rows_before
    with pytest.raises(InputError, match="no-such-run"):
        rollback_run(cws.runner(), "no-such-run")


class RoundTrips:
    """Counts control-plane round trips.

    PostgreSQL: every statement, plus BEGIN and COMMIT of a real transaction. SQLite is
    in-process, so its unit of cost is one use of a connection (a read, a single-statement
    write, or a transaction of several), each one "begin" of SQLAlchemy's.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.count = 0
        self.network = engine.dialect.name == "postgresql"
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "begin", self._begin)
        event.listen(engine, "commit", self._commit)

    @staticmethod
    def _autocommit(conn: sa.Connection) -> bool:
        return conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT"

    def _statement(self, conn: sa.Connection, *args: object) -> None:
        if self.network:
            self.count += 1

    def _begin(self, conn: sa.Connection) -> None:
        if not self.network or not self._autocommit(conn):
            self.count += 1

    def _commit(self, conn: sa.Connection) -> None:
        if self.network and not self._autocommit(conn):
            self.count += 1


def test_a_fleet_runs_bookkeeping_comes_in_pages_not_per_user(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """Leases are claimed, the ledger read and plans written a page of users at a time
    (before any of their instances is touched), and last steps recorded in batches: a
    rollout of one new migration runs no control-plane statement per user at all, so
    the ledger and config writes of 24 users are a handful, not 3 a user. Every user
    ends moved, recorded, its lease given back; a step whose row was written with its
    page keeps when it truly began (not when its page was planned)."""
    ids, urls = fleet_of(cws, new_instance, 24)
    assert migrate_fleet(cws.runner(), to_version=2).succeeded == 24
    statements = Statements(cws.engine)
    started = time.monotonic()
    summary = migrate_fleet(cws.runner(), options=FleetOptions(concurrency=4))
    batches_at_most = (time.monotonic() - started) / FLUSH_SECONDS + 2
    assert (summary.succeeded, summary.failed) == (24, 0)
    # pages of 8 (the pool's size twice; the next claimed ahead at the same size, then
    # doubling): a claim and a plan write each; then batches of recorded steps (each a
    # ledger and a config write), at most one per flush interval, whatever the users
    plans = statements.seen.count(("INSERT", "byod_migrations"))
    batches = statements.seen.count(("UPDATE", "byod_migrations"))
    assert plans <= 3 and batches <= batches_at_most, statements.seen
    assert statements.writes("byod_migrations") == plans + batches, statements.seen
    assert statements.writes("byod_configs") <= plans + batches, statements.seen
    for uid, url in zip(ids, urls, strict=True):
        rows = [r for r in history(cws.engine, uid) if r.run_id == summary.run_id]
        assert [(r.migration_id, r.status, r.attempts) for r in rows] == [
            ("003_fragile", "completed", 1)
        ]
        assert rows[0].started_at is not None and rows[0].completed_at is not None
        assert rows[0].started_at <= rows[0].completed_at
        config = cws.directory.get_config(uid)
        assert (config.schema_version, config.lease_owner) == (3, None)
        assert counter(url) == 11
    # a fleet already at head: no per-user work at all, whatever its size
    statements.seen.clear()
    again = migrate_fleet(cws.runner())
    assert again.total == again.up_to_date == 24 and again.succeeded == 0
    assert statements.writes("byod_migrations") == statements.writes("byod_configs") == 0


def test_a_page_is_planned_before_its_instances_are_touched_and_a_crash_is_settled(
    process_fleet: tuple[Workspace, list[int], list[str], dict[str, str]], tmp_path: Path
) -> None:
    """While the first user's step is held inside its instance transaction, every user of
    its page already has its ``running`` row (written before any instance was touched),
    and so has the next page's, claimed ahead while the first runs; killed there, the
    run leaves rows the next run settles: the held user's attempt failed ("interrupted:
    runner lost"), the others' planned rows too (never started), then each user
    migrated exactly once."""
    ws, ids, urls, env = process_fleet
    proc, hold = start_held(tmp_path, env, 1, "--concurrency", "1", "--lease-seconds", "2")

    def planned() -> list[int]:
        return [uid for uid in ids if any(s[2] == "running" for s in statuses(ws, uid))]

    wait_until(lambda: len(planned()) == 4, "the next page claimed ahead")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    held = {int(p.name.split("-")[1]) for p in hold.iterdir()}
    page = planned()
    # pages of two (the pool's size twice): the first user's, and the next
    assert page == ids[:4] and held == {ids[0]}
    others = set(page) - held
    for uid in held:  # 001 done, 002 held in its transaction
        assert [s[2] for s in statuses(ws, uid)] == ["completed", "running", "pending"]
    for uid in others:
        assert [s[2] for s in statuses(ws, uid)] == ["running", "pending", "pending"]
        assert stamp_ids(urls[ids.index(uid)]) == []  # planned, never touched
    assert not any(statuses(ws, uid) for uid in ids[4:])  # nothing past the next page
    wait_for_leases_to_lapse(ws.engine, page)
    second = byod(tmp_path, "migrate", "--all", "--json", env=env)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert [counter(url) for url in urls] == [11] * len(urls)
    assert not [s for uid in ids for s in statuses(ws, uid) if s[2] in ("running", "pending")]
    lost = {uid: "002_bump" for uid in held} | {uid: "001_create" for uid in others}
    for uid, step in lost.items():
        rows = [r for r in history(ws.engine, uid) if r.migration_id == step]
        assert [(r.status, r.error) for r in reversed(rows)] == [
            ("failed", "interrupted: runner lost"),
            ("completed", None),
        ]


def test_kill_9_after_the_instances_commit_and_before_the_batch_is_recorded(
    cws: Workspace, new_instance: InstanceFactory, tmp_path: Path
) -> None:
    """The stamp is the truth: a run killed after its users' last steps committed on
    their instances but before the batch recording them was written (the control plane
    held locked) leaves those rows ``running``; the next run settles them from the
    stamps (completed, recovered), moves the configs, and applies nothing twice."""
    ws = cws
    ids, urls = fleet_of(ws, new_instance, 4)
    runner = ws.runner()
    for uid in ids:
        assert runner.migrate(uid, to_version=1).ok
    env = {
        "BYOD_DATABASE_URL": ws.settings.database_url,
        "BYOD_MIGRATIONS": str(ws.settings.migrations_dir),
    }
    hold = tmp_path / "hold"
    hold.mkdir()
    hold_env = {"BYOD_TEST_HOLD_DIR": str(hold), "BYOD_TEST_HOLD_SECONDS": "1.5"}
    args = ("--to", "2", "--concurrency", "4", "--lease-seconds", "2")
    proc = byod(tmp_path, "migrate", "--all", *args, env=env | hold_env)
    wait_until(lambda: len(list(hold.iterdir())) == 4, "every user inside its step")
    with control_plane_locked(ws.engine):  # the batch cannot be written
        wait_until(
            lambda: all(stamp_ids(url)[-1:] == ["002_bump"] for url in urls),
            "every instance to commit its step",
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert [[s[2] for s in statuses(ws, uid) if s[0] == "002_bump"] for uid in ids] == [
        ["running"]
    ] * 4
    assert {ws.directory.get_config(uid).schema_version for uid in ids} == {1}
    wait_for_leases_to_lapse(ws.engine, ids)
    again = migrate_fleet(ws.runner(), to_version=2)
    assert (again.up_to_date, again.failed) == (4, 0)
    assert [counter(url) for url in urls] == [1] * 4  # 002 applied once on each
    for uid in ids:
        bumps = [r for r in history(ws.engine, uid) if r.migration_id == "002_bump"]
        assert [(r.status, r.error) for r in bumps] == [
            ("completed", "recovered: the instance's stamp shows it done")
        ]
        assert ws.directory.get_config(uid).schema_version == 2
    assert not [s for uid in ids for s in statuses(ws, uid) if s[2] in ("running", "pending")]


# -- real processes ---------------------------------------------------------------------


def byod(folder: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = child_env()
    full_env.update({"BYOD_ENCRYPTION_KEY": TEST_KEY, **(env or {})})
    return subprocess.Popen(
        [sys.executable, "-m", "byod", *args],
        cwd=folder,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def process_fleet(
    cws: Workspace, new_instance: InstanceFactory, tmp_path: Path
) -> Iterator[tuple[Workspace, list[int], list[str], dict[str, str]]]:
    ids, urls = fleet_of(cws, new_instance, 8)
    env = {
        "BYOD_DATABASE_URL": cws.settings.database_url,
        "BYOD_MIGRATIONS": str(cws.settings.migrations_dir),
    }
    yield cws, ids, urls, env


def start_held(
    folder: Path, env: dict[str, str], held: int, *args: str, hold_seconds: str = "120"
) -> tuple[subprocess.Popen[str], Path]:
    """Start `byod migrate --all ARGS` whose 002 waits inside its instance transaction;
    return once ``held`` users are waiting there."""
    hold = folder / "hold"
    hold.mkdir()
    hold_env = {"BYOD_TEST_HOLD_DIR": str(hold), "BYOD_TEST_HOLD_SECONDS": hold_seconds}
    proc = byod(folder, "migrate", "--all", *args, env=env | hold_env)
    deadline = time.monotonic() + 60
    while len(list(hold.iterdir())) < held and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(list(hold.iterdir())) == held, proc.communicate(timeout=5)
    return proc, hold


def test_kill_9_mid_transaction_then_rerun_applies_each_step_once(
    process_fleet: tuple[Workspace, list[int], list[str], dict[str, str]], tmp_path: Path
) -> None:
    ws, ids, urls, env = process_fleet
    proc, hold = start_held(tmp_path, env, 3, "--concurrency", "3", "--lease-seconds", "2")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    held = {int(p.name.split("-")[1]) for p in hold.iterdir()}
    assert [s[2] for uid in held for s in statuses(ws, uid) if s[0] == "002_bump"] == [
        "running"
    ] * 3
    wait_for_leases_to_lapse(ws.engine, held)
    second = byod(tmp_path, "migrate", "--all", "--json", env=env)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert [schema_version(ws, uid) for uid in ids] == [3] * len(ids)
    assert [counter(url) for url in urls] == [11] * len(urls)  # 002 +1 and 003 +10, once each
    assert not [s for uid in ids for s in statuses(ws, uid) if s[2] in ("running", "pending")]
    for uid in held:
        bumps = [s[2] for s in statuses(ws, uid) if s[0] == "002_bump"]
        assert bumps == ["failed", "completed"]
        errors = [r.error for r in history(ws.engine, uid) if r.status == "failed"]
        assert errors == ["interrupted: runner lost"]


def test_two_processes_at_once_migrate_each_instance_exactly_once(
    process_fleet: tuple[Workspace, list[int], list[str], dict[str, str]], tmp_path: Path
) -> None:
    ws, ids, urls, env = process_fleet
    runs = [byod(tmp_path, "migrate", "--all", "--json", "--concurrency", "3", env=env)]
    runs.append(byod(tmp_path, "migrate", "--all", "--json", "--concurrency", "3", env=env))
    outputs = [run.communicate(timeout=120) for run in runs]
    with ws.engine.connect() as conn:
        rows = conn.execute(
            sa.select(ledger.c.user_id, ledger.c.migration_id, ledger.c.status, ledger.c.error)
        ).all()
    why = (outputs, rows)  # shown if anything below fails
    assert [run.returncode for run in runs] == [0, 0], why
    assert [counter(url) for url in urls] == [11] * len(urls), why
    completed = Counter((r.user_id, r.migration_id) for r in rows if r.status == "completed")
    assert len(completed) == 3 * len(ids), why
    assert set(completed.values()) == {1}, why


def test_ctrl_c_lets_running_users_finish_and_reports_the_rest(
    process_fleet: tuple[Workspace, list[int], list[str], dict[str, str]], tmp_path: Path
) -> None:
    ws, ids, urls, env = process_fleet
    proc, _ = start_held(tmp_path, env, 2, "--json", "--concurrency", "2", hold_seconds="2")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    summary = [line for line in out.splitlines() if '"summary"' in line]
    assert summary, out
    assert '"state": "interrupted"' in summary[0]
    counts = json.loads(summary[0])["summary"]
    # every user is counted: the one taken from the selection but never submitted too
    assert counts["total"] == len(ids) == counts["succeeded"] + counts["not_started"]
    run = RunStore(ws.engine).get(counts["run_id"])
    assert run.planned == run.counts.total == len(ids)
    assert not [s for uid in ids for s in statuses(ws, uid) if s[2] in ("running", "pending")]
    done = [uid for uid in ids if schema_version(ws, uid) == 3]
    assert len(done) == 2
    assert [counter(urls[ids.index(uid)]) for uid in done] == [11, 11]
    assert [stamp_ids(url) for uid, url in zip(ids, urls, strict=True) if uid not in done] == [
        []
    ] * (len(ids) - 2)


def test_a_long_migration_keeps_its_lease_alive(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    from byod.errors import BusyError
    from byod.runner import Runner
    from tests.helpers import held_in_migration

    url = new_instance()
    uid = add_connected(cws, url)
    assert cws.runner().migrate(uid, to_version=1).ok
    runner = Runner(
        cws.engine, cws.registry, cws.sealer, policy=cws.settings.instance_policy, lease_seconds=0.6
    )
    with held_in_migration(url, lambda: runner.migrate(uid)):
        time.sleep(1.5)  # well past the lease's first expiry: renewals kept it
        other = Runner(
            cws.engine, cws.registry, cws.sealer, policy=cws.settings.instance_policy
        ).migrate(uid)
        assert isinstance(other.error, BusyError)
    assert counter(url) == 11


def test_worker_processes_migrate_every_user_once(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """Worker processes run users the parent claimed a page at a time (leases and
    plans); each hands its last step back, and the parent records them in batches: the
    ledger's completions are the parent's statements, every lease is given back."""
    ids, urls = fleet_of(cws, new_instance, 6)
    break_instance(urls[2])
    runner = cws.runner()
    statements = Statements(runner.engine)
    summary = migrate_fleet(runner, options=FleetOptions(processes=2, retries=0))
    assert (summary.total, summary.succeeded, summary.failed) == (6, 5, 1)
    assert [schema_version(cws, uid) for uid in ids] == [3, 3, 2, 3, 3, 3]
    assert [counter(url) for url in urls] == [11, 11, 1, 11, 11, 11]
    assert not [s for uid in ids for s in statuses(cws, uid) if s[2] in ("running", "pending")]
    assert ("UPDATE", "byod_migrations") in statements.seen  # the batches, in the parent
    assert statements.writes("byod_migrations") <= 2 + 6, statements.seen
    assert all(cws.directory.get_config(uid).lease_owner is None for uid in ids)
    for uid in (ids[0], ids[5]):
        rows = [r for r in history(cws.engine, uid) if r.run_id == summary.run_id]
        assert [(r.migration_id, r.status, r.attempts) for r in reversed(rows)] == [
            ("001_create", "completed", 1),
            ("002_bump", "completed", 1),
            ("003_fragile", "completed", 1),
        ]


def test_a_lease_claim_counts_only_that_users_open_rows(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    ids, _ = fleet_of(cws, new_instance, 2)
    cws.runner().ledger.record_planned(ids[1], cws.registry.plan_up(0), None)
    assert cws.directory.claim_lease(ids[0], "me", 30).open_rows == 0
    assert cws.directory.claim_lease(ids[1], "me", 30).open_rows == 3


def test_a_lease_let_go_while_claiming_is_taken_not_a_crash(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """Regression: the holder released between the claim and the look at who holds it."""
    from byod.controlplane import Directory

    ids, _ = fleet_of(cws, new_instance, 1)
    directory = Directory(cws.engine)
    directory.claim_lease(ids[0], "holder", 30)
    original = Directory.get_config

    def release_first(self: Directory, user_id: int):  # type: ignore[no-untyped-def]
        self.release_lease(user_id, "holder")
        return original(self, user_id)

    Directory.get_config = release_first  # type: ignore[method-assign]
    try:
        claimed = directory.claim_lease(ids[0], "me", 30)
    finally:
        Directory.get_config = original  # type: ignore[method-assign]
    assert claimed.lease_owner == "me"


# -- a control plane that blips, and users that end without a runner's result ----------


@pytest.mark.parametrize("pool", [["--concurrency", "4"], ["--processes", "2"]])
def test_a_short_control_plane_outage_mid_run_is_waited_for(
    pg: ServerDatabases, tmp_path: Path, pool: list[str]
) -> None:
    """Regression: a 2 s outage of the control plane failed every user that touched it
    ("cannot claim the lease"), left the run `running 0/0/0/0`, ledger rows `running`
    and users without a JSON line."""
    ws = make_workspace(pg.create(), counter_migrations(tmp_path / "migrations"))
    ids, urls = fleet_of(ws, lambda: _sqlite_file(tmp_path), 24)
    proxy = CuttableProxy(5432)  # the run reaches the control plane through it
    through = sa.make_url(ws.settings.database_url).set(port=proxy.port)
    env = {
        "BYOD_DATABASE_URL": through.render_as_string(hide_password=False),
        "BYOD_MIGRATIONS": str(ws.settings.migrations_dir),
        "BYOD_TEST_HOLD_DIR": str(tmp_path),
        "BYOD_TEST_HOLD_SECONDS": "0.2",
    }
    try:
        run = byod(tmp_path, "migrate", "--all", "--json", "--retries", "0", *pool, env=env)
        deadline = time.monotonic() + 60
        while _completed(ws) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        proxy.cut()  # every connection of the run drops; no new one gets through
        time.sleep(2)
        proxy.restore()
        out, err = run.communicate(timeout=120)
    finally:
        proxy.close()
    assert run.returncode == 0, (out, err)
    lines = [json.loads(line) for line in out.splitlines()]
    summary = lines[-1]["summary"]
    per_user = Counter(line["clerk_id"] for line in lines[:-1])
    assert sorted(per_user) == [f"user_{i:03d}" for i in range(24)]
    assert set(per_user.values()) == {1}  # one JSON line per user
    assert (summary["state"], summary["total"], summary["succeeded"]) == ("completed", 24, 24)
    record = RunStore(ws.engine).get(summary["run_id"])
    c = record.counts
    assert (record.state, c.total, c.succeeded, c.failed) == ("completed", 24, 24, 0)
    assert record.ended_at is not None
    assert [counter(url) for url in urls] == [11] * 24  # nothing applied twice
    assert not [s for uid in ids for s in statuses(ws, uid) if s[2] in ("running", "pending")]
    with ws.engine.connect() as conn:
        done = conn.execute(
            sa.select(ledger.c.user_id, ledger.c.migration_id).where(ledger.c.status == "completed")
        ).all()
    assert len(done) == len(set(done)) == 3 * 24
    ws.engine.dispose()


def _sqlite_file(folder: Path) -> str:
    path = folder / f"instance-{len(list(folder.glob('instance-*.db')))}.db"
    path.touch()
    return f"sqlite:///{path}"


def _completed(ws: Workspace) -> int:
    with ws.engine.connect() as conn:
        query = sa.select(sa.func.count()).where(ledger.c.status == "completed")
        return int(conn.execute(query.select_from(ledger)).scalar_one())


def test_every_user_ends_with_one_event_even_after_an_internal_error(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """Regression: a user whose run raised (no runner result) got no `UserFinished`,
    so no JSON line."""
    from byod.credentials import Credentials, open_instance
    from byod.runner import Runner
    from byod.targets import Target

    ids, _ = fleet_of(cws, new_instance, 3)
    broken = cws.directory.get_config(ids[1])

    def opener(credentials: Credentials, timeout: float) -> Target:
        target = open_instance(credentials, timeout=timeout)
        if str(credentials.url) == str(open_instance_url(cws, broken.user_id)):
            target.close()
            raise RuntimeError("a bug in byod")
        return target

    runner = Runner(
        cws.engine, cws.registry, cws.sealer, policy=cws.settings.instance_policy, opener=opener
    )
    events: list[UserFinished] = []
    summary = migrate_fleet(
        runner,
        options=FleetOptions(concurrency=2),
        on_event=lambda e: events.append(e) if isinstance(e, UserFinished) else None,
    )
    assert sorted(e.result.user_id for e in events) == ids
    assert {e.result.user_id: e.outcome for e in events}[ids[1]] == "failed"
    assert (summary.succeeded, summary.failed) == (2, 1)
    assert "a bug in byod" in summary.errors[0].error


def open_instance_url(ws: Workspace, user_id: int) -> sa.URL:
    from byod.credentials import unseal_config

    config = ws.directory.get_config(user_id)
    return unseal_config(config, ws.sealer, policy=ws.settings.instance_policy).url


# -- busy users, short leases, run counts ----------------------------------------------


def test_a_user_another_runner_holds_is_counted_busy(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    ids, _ = fleet_of(cws, new_instance, 3)
    assert cws.runner().migrate(ids[0], to_version=1).ok
    cws.directory.claim_lease(ids[0], "another-runner", 30)
    cws.runner().migrate(ids[2], to_version=3)  # at head before the run: up to date, not taken
    events: dict[int, UserFinished] = {}
    summary = migrate_fleet(
        cws.runner(),
        options=FleetOptions(retries=0),
        on_event=lambda e: (
            events.update({e.result.user_id: e}) if isinstance(e, UserFinished) else None
        ),
    )
    assert (summary.total, summary.succeeded, summary.busy, summary.up_to_date) == (3, 1, 1, 1)
    assert {uid: e.outcome for uid, e in events.items()} == {ids[0]: "busy", ids[1]: "succeeded"}
    busy = events[ids[0]].result  # its line says where the user stands, not version 0
    assert (busy.from_version, busy.to_version) == (1, 1)
    assert "skipped" not in summary.as_dict()
    counts = RunStore(cws.engine).get(summary.run_id).counts
    assert (counts.busy, counts.succeeded, counts.up_to_date) == (1, 1, 1)
    listed = migrate_fleet(
        cws.runner(), selection=Selection(users=(cws.directory.find_user("user_002").id,))
    )
    assert (listed.total, listed.up_to_date) == (1, 1)


def test_leases_are_short_by_default(cws: Workspace, new_instance: InstanceFactory) -> None:
    """A dead runner's users come back in about 30 s, not 5 minutes."""
    from byod.clock import utcnow
    from byod.spec import RunSpec

    assert FleetOptions().lease_seconds == 30 == RunSpec.from_json("{}").options.lease_seconds
    ids, _ = fleet_of(cws, new_instance, 1)
    runner = cws.runner()
    assert runner.lease_seconds == 30
    claimed = cws.directory.claim_lease(ids[0], runner.owner, runner.lease_seconds)
    assert claimed.lease_expires_at is not None
    assert (claimed.lease_expires_at - utcnow()).total_seconds() <= 30


def test_runs_recorded_before_busy_and_up_to_date_stay_readable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    ws = make_workspace(url)
    with ws.engine.begin() as conn:  # a control plane made before the two columns
        conn.execute(sa.text("ALTER TABLE byod_runs DROP COLUMN busy"))
        conn.execute(sa.text("ALTER TABLE byod_runs DROP COLUMN up_to_date"))
        conn.execute(
            sa.text(
                "INSERT INTO byod_runs (id, kind, started_by, options, state, total, "
                "succeeded, failed, skipped, not_started, not_eligible, started_at, "
                "updated_at, dispatched, in_flight, exhausted) VALUES ('old', 'migrate', "
                "'me', '{}', 'completed', 5, 2, 1, 2, 0, 0, '2024-01-01 00:00:00', "
                "'2024-01-01 00:00:00', 0, 0, 0)"
            )
        )
    ws.engine.dispose()
    again = make_workspace(url)  # `byod init` adds what is missing
    counts = RunStore(again.engine).get("old").counts
    assert (counts.total, counts.succeeded, counts.failed, counts.busy) == (5, 2, 1, 0)
    assert counts.up_to_date == 2  # what the old run counted `skipped`
    again.engine.dispose()


# -- a wrong encryption key ------------------------------------------------------------


def test_a_key_that_opens_nobody_stops_the_run_before_it_starts(
    cws: Workspace, new_instance: InstanceFactory, control_plane_url: str
) -> None:
    """Regression: an operator's wrong key marked every user's instance `error`."""
    ids, _ = fleet_of(cws, new_instance, 3)
    wrong = make_workspace(control_plane_url, cws.settings.migrations_dir, key=OTHER_KEY)
    with pytest.raises(CredentialsError, match="wrong encryption key") as raised:
        migrate_fleet(wrong.runner())
    assert raised.value.exit_code == 1
    with pytest.raises(CredentialsError, match="wrong encryption key"):
        migrate_fleet(
            wrong.runner(), selection=Selection(users=(wrong.directory.find_user("user_001").id,))
        )
    assert RunStore(cws.engine).recent(noop=True) == []  # no run recorded
    for uid in ids:
        config = cws.directory.get_config(uid)
        assert (config.connection_status, config.lease_owner) == ("connected", None)
        assert statuses(cws, uid) == []
    run = migrate_fleet(cws.runner())  # the right key
    with pytest.raises(CredentialsError, match="wrong encryption key"):
        rollback_run(wrong.runner(), run.run_id)
    wrong.engine.dispose()


def test_a_user_sealed_with_another_key_fails_without_marking_its_instance(
    cws: Workspace, new_instance: InstanceFactory, control_plane_url: str
) -> None:
    from byod.commands import connect

    ids, urls = fleet_of(cws, new_instance, 3)
    other = make_workspace(control_plane_url, cws.settings.migrations_dir, key=OTHER_KEY)
    connect(other, "user_001", urls[1])  # sealed with another key
    with cws.engine.begin() as conn:  # corrupt, under the right key
        conn.execute(
            sa.text("UPDATE byod_configs SET sealed_url = 'v1.AAAA' WHERE user_id = :u"),
            {"u": ids[2]},
        )
    summary = migrate_fleet(cws.runner(), options=FleetOptions(retries=0))
    assert (summary.succeeded, summary.failed) == (1, 2)
    foreign = cws.directory.get_config(ids[1])
    assert (foreign.connection_status, foreign.last_error) == ("connected", None)
    assert cws.directory.get_config(ids[2]).connection_status == "error"
    row = history(cws.engine, ids[1])[0]
    assert (row.status, row.run_id) == ("failed", summary.run_id)
    assert (row.error or "").startswith("CredentialsError: ")
    assert "wrong encryption key" in (row.error or "")
    other.engine.dispose()


def test_users_that_finish_while_another_still_runs_are_counted_at_once(
    cws: Workspace, tmp_path: Path
) -> None:
    """Once the selection is used up, a run settles each user as it finishes (events, the
    recorded counts), not all of them when the slowest one ends."""
    urls = {}
    for name in ("slow", "quick"):
        (tmp_path / f"{name}.db").touch()
        urls[name] = f"sqlite:///{tmp_path / name}.db"
        add_connected(cws, urls[name], name)
    execute(urls["slow"], "CREATE TABLE hold_me (id INTEGER)")  # held inside 002
    execute(urls["quick"], "CREATE TABLE break_me (id INTEGER)")  # fails at 003 at once
    gates.reset()
    finished: list[str] = []
    started: list[str] = []

    def on_event(event: FleetEvent) -> None:
        if isinstance(event, UserFinished):
            finished.append(event.outcome)
        elif isinstance(event, FleetStarted):
            started.append(event.run_id)

    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(
            migrate_fleet,
            cws.runner(),
            options=FleetOptions(concurrency=2, retries=0),
            on_event=on_event,
        )
        try:
            assert gates.entered.wait(20)
            deadline = time.monotonic() + 10
            while finished != ["failed"]:
                assert time.monotonic() < deadline, finished
                time.sleep(0.05)
            store = RunStore(cws.engine)
            while store.get(started[0]).counts.failed != 1:  # the recorded counts follow
                assert time.monotonic() < deadline + 5, store.get(started[0]).counts
                time.sleep(0.1)
            assert store.get(started[0]).counts.succeeded == 0  # the slow one still runs
        finally:
            gates.release.set()
        summary = run.result(timeout=60)
    assert (summary.succeeded, summary.failed, finished) == (1, 1, ["failed", "succeeded"])


def test_a_user_failed_while_the_control_plane_is_away_has_unknown_versions(
    ws: Workspace,
) -> None:
    """Regression: such a user's line said ``from_version 0, to_version 0`` although it
    was at version 1: now ``null``, not known."""
    from byod.cli import render
    from byod.controlplane import User
    from byod.fleet.outcome import _no_result
    from byod.runner import Runner
    from tests.test_instance_url import closed_port

    away = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/x")
    runner = Runner(away, ws.registry, ws.sealer)
    result = _no_result(runner, User(7, "u7"), RuntimeError("a bug"))
    away.dispose()
    assert (result.from_version, result.to_version) == (None, None)
    data = render.result_data(result)
    assert (data["from_version"], data["to_version"], data["ok"]) == (None, None, False)
    here = Runner(ws.engine, ws.registry, ws.sealer)
    uid = ws.directory.add_user("known").id
    known = _no_result(here, User(uid, "known"), RuntimeError("a bug"))
    assert (known.from_version, known.to_version) == (None, None)  # no config: not known


def test_an_interrupted_runs_counts_add_up_with_its_ledger(cws: Workspace, tmp_path: Path) -> None:
    """Regression: a run killed between two progress writes showed ``total 1: 0
    succeeded, 1 failed`` while its failures table listed 5 users."""
    ids, urls = fleet_of(cws, lambda: _sqlite_file(tmp_path), 6)
    for url in urls[:5]:
        break_instance(url)
    assert all(cws.runner().migrate(uid, to_version=2).ok for uid in ids[:5])
    env = {
        "BYOD_DATABASE_URL": cws.settings.database_url,
        "BYOD_MIGRATIONS": str(cws.settings.migrations_dir),
    }
    proc, _ = start_held(tmp_path, env, 1, "--concurrency", "2", "--retries", "0")
    deadline = time.monotonic() + 60
    while len(_failed_rows(cws)) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # one user held in 002; five failed 003
    proc.wait(10)
    run = RunStore(cws.engine).recent(1, noop=True)[0]
    with cws.engine.begin() as conn:  # a minute passes: the silent run is taken as lost
        conn.execute(
            sa.update(runs_table)
            .where(runs_table.c.id == run.id)
            .values(updated_at=run.updated_at - timedelta(minutes=5))
        )
    details = commands.show_run(cws, run.id)
    c = details.run.counts
    assert details.run.shown_state == "interrupted"
    assert len(details.failures) == c.failed == 5
    assert c.total >= c.succeeded + c.failed + c.busy + c.up_to_date + c.not_started
    listed = commands.list_runs(cws)[0].counts
    assert listed == c  # the list says the same
    shown = Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY, **env)("runs", "show", run.id)
    assert "5 failed" in shown.out and "the users reached so far" not in shown.out


def _failed_rows(ws: Workspace) -> list[object]:
    with ws.engine.connect() as conn:
        return list(conn.execute(sa.select(ledger.c.id).where(ledger.c.status == "failed")))


def test_rows_done_without_an_estimate_never_say_of_about_zero(cws: Workspace) -> None:
    import dataclasses

    from rich.console import Console

    from byod.cli import render

    uid = add_connected(cws, _sqlite_file(cws.settings.migrations_dir.parent))
    summary = migrate_fleet(cws.runner(), options=FleetOptions(concurrency=1))
    details = commands.show_run(cws, summary.run_id)
    assert cws.directory.get_config(uid).schema_version == 3

    def shown(rows_done: int, rows_total: int) -> str:
        console = Console(record=True, width=200)
        render.run_details(
            dataclasses.replace(details, rows_done=rows_done, rows_total=rows_total), console
        )
        return console.export_text()

    assert "rows done by backfills: 120\n" in shown(120, 0)
    assert "rows done by backfills: 120 of about 500\n" in shown(120, 500)  # an ended run


def test_an_edited_migration_refuses_the_whole_run_once_before_any_user_starts(
    cws: Workspace, new_instance: InstanceFactory, control_plane_url: str
) -> None:
    """Regression: a real edit failed `migrate --all` once per user (one failure each);
    now one DriftError, up front, naming the file and how many users have it."""
    ids, urls = fleet_of(cws, new_instance, 5)
    for uid in ids:
        assert cws.runner().migrate(uid, to_version=2).ok
    folder = cws.settings.migrations_dir
    (folder / "002_bump.py").write_text((folder / "002_bump.py").read_text() + "\nX = 1\n")
    drifted = make_workspace(control_plane_url, folder)
    rows_before = len(_ledger_rows(drifted))
    with pytest.raises(DriftError, match=r"002_bump \(applied on 5 users\)"):
        migrate_fleet(drifted.runner())
    assert len(_ledger_rows(drifted)) == rows_before  # nothing recorded, no user touched
    assert RunStore(drifted.engine).recent(5, noop=True) == []  # no run was recorded
    assert all(stamp_ids(url) == ["001_create", "002_bump"] for url in urls)
    reformatted = folder / "002_bump.py"  # a layout change only: no drift
    reformatted.write_text(reformatted.read_text().replace("\nX = 1\n", "\n\n# a note\n"))
    ok = migrate_fleet(make_workspace(control_plane_url, folder).runner())
    assert (ok.succeeded, ok.failed) == (5, 0)
    drifted.engine.dispose()


def _ledger_rows(ws: Workspace) -> list[object]:
    with ws.engine.connect() as conn:
        return list(conn.execute(sa.select(ledger.c.id)))
