"""The ledger's promises, column by column (status, error, attempts, run_id, started_at,
completed_at), on both control planes: a later run never rewrites an earlier run's row; a
step that never started counts no attempt and has no start time; a write for a step that is
not running is refused, not recorded."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from byod.controlplane import Ledger
from byod.controlplane import ledger as ledger_module
from byod.controlplane.ledger import CompletedStep, PageCounts
from byod.controlplane.schema import ledger
from byod.errors import ControlPlaneError
from byod.registry import Migration, Plan, Step
from byod.workspace import Workspace

STEPS = tuple(
    Step(
        Migration(id=f"00{v}_m", version=v, name="m", description="", up=lambda ctx: None),
        "up",
    )
    for v in (1, 2, 3)
)
COLUMNS = ("migration_id", "status", "error", "attempts", "run_id", "started", "completed")


def rows(ws: Workspace, user_id: int) -> list[dict[str, Any]]:
    """Every column a user reads, oldest row first (times as set or not)."""
    with ws.engine.connect() as conn:
        found = conn.execute(
            sa.select(ledger).where(ledger.c.user_id == user_id).order_by(ledger.c.id)
        ).all()
    return [
        {
            "migration_id": r.migration_id,
            "status": r.status,
            "error": r.error,
            "attempts": r.attempts,
            "run_id": r.run_id,
            "started": r.started_at is not None,
            "completed": r.completed_at is not None,
        }
        for r in found
    ]


def row(*values: Any) -> dict[str, Any]:
    return dict(zip(COLUMNS, values, strict=True))


@pytest.fixture(autouse=True)
def fresh_statements() -> None:
    """Each test builds the ledger's cached statements anew (so a mutation test sees every
    test that relies on them, not only the first to build them)."""
    for built in (ledger_module._planned, ledger_module._start, ledger_module._start_next):
        built.cache_clear()
    ledger_module._completion.cache_clear()


@pytest.fixture
def user(ws: Workspace) -> int:
    """A user with a config (a step's success moves it, in the same statement)."""
    uid = ws.directory.add_user("ledger-user").id
    sealed = ws.sealer.seal("sqlite:///nowhere.db", user_id=uid, field_name="url")
    ws.directory.save_config(
        uid, target_kind="sqlite", sealed_url=sealed, sealed_secret=None, key_id=ws.sealer.key_id
    )
    return uid


def test_a_plan_starts_its_first_step_only(ws: Workspace, user: int) -> None:
    book = Ledger(ws.engine)
    assert book.record_planned(user, Plan("up", 0, 3, STEPS), "run-1") == 1
    assert rows(ws, user) == [
        row("001_m", "running", None, 1, "run-1", True, False),
        row("002_m", "pending", None, 0, "run-1", False, False),
        row("003_m", "pending", None, 0, "run-1", False, False),
    ]
    assert book.record_completed(user, STEPS[0], start_next=STEPS[1]) == 1
    book.record_failed(user, STEPS[1], "MigrationFailedError: boom")
    book.record_skipped(user, STEPS[2:], "skipped: 002_m up failed")
    assert rows(ws, user) == [
        row("001_m", "completed", None, 1, "run-1", True, True),
        row("002_m", "failed", "MigrationFailedError: boom", 1, "run-1", True, True),
        row("003_m", "skipped", "skipped: 002_m up failed", 0, "run-1", False, True),
    ]


def test_a_later_run_never_rewrites_an_earlier_rows(ws: Workspace, user: int) -> None:
    book = Ledger(ws.engine)
    book.record_planned(user, Plan("up", 0, 3, STEPS), "run-1")
    book.record_failed(user, STEPS[0], "UnreachableError: gone")
    book.record_skipped(user, STEPS[1:], "skipped: 001_m up failed")
    earlier = rows(ws, user)

    assert book.record_planned(user, Plan("up", 0, 2, STEPS[:2]), "run-2") == 2
    book.record_failed(user, STEPS[0], "MigrationFailedError: again")
    book.record_skipped(user, STEPS[1:2], "skipped: 001_m up failed again")
    book.record_skipped(user, STEPS, "a stray skip")  # nothing pending is left

    now = rows(ws, user)
    assert now[:3] == earlier, "the first run's rows stay as they were"
    assert now[3:] == [
        row("001_m", "failed", "MigrationFailedError: again", 2, "run-2", True, True),
        row("002_m", "skipped", "skipped: 001_m up failed again", 0, "run-2", False, True),
    ]
    with pytest.raises(ControlPlaneError, match="was not running: not recorded"):
        book.record_completed(user, STEPS[0])
    book.record_failed(user, STEPS[2], "no running row")  # nothing to mark: nothing changes
    assert rows(ws, user) == now


def test_a_failure_before_the_chain_counts_no_attempt(ws: Workspace, user: int) -> None:
    book = Ledger(ws.engine)
    book.record_not_started(user, STEPS[0], "UnreachableError: down", "run-1")
    book.record_not_started(user, STEPS[0], "UnreachableError: still down", "run-1")  # a retry
    book.record_not_started(user, STEPS[0], "UnreachableError: down", None)  # one user, alone
    assert rows(ws, user) == [
        row("001_m", "failed", "UnreachableError: still down", 0, "run-1", False, True),
        row("001_m", "failed", "UnreachableError: down", 0, None, False, True),
    ]
    assert book.record_planned(user, Plan("up", 0, 1, STEPS[:1]), "run-2") == 1, (
        "failures before the chain are no attempts"
    )
    book.record_failed(user, STEPS[0], "MigrationFailedError: real")
    before = rows(ws, user)
    # a retry in run-2 that fails before the chain adds its own row: the started one stays
    book.record_not_started(user, STEPS[0], "UnreachableError: later", "run-2")
    assert rows(ws, user)[:3] == before
    assert rows(ws, user)[3] == row(
        "001_m", "failed", "UnreachableError: later", 0, "run-2", False, True
    )


def test_a_lost_runners_rows_are_settled_by_what_the_instance_says(
    ws: Workspace, user: int
) -> None:
    book = Ledger(ws.engine)
    book.record_planned(user, Plan("up", 0, 3, STEPS), "run-1")
    book.record_completed(user, STEPS[0], start_next=STEPS[1])
    # the runner dies here: 002 running (the instance has it applied), 003 pending
    settled = book.settle_orphans(user, {("001_m", "up"), ("002_m", "up")})
    assert [(s.migration_id, s.direction, s.status, s.run_id) for s in settled] == [
        ("002_m", "up", "completed", "run-1"),
        ("003_m", "up", "skipped", "run-1"),
    ]
    assert rows(ws, user) == [
        row("001_m", "completed", None, 1, "run-1", True, True),
        row(
            "002_m",
            "completed",
            "recovered: the instance's stamp shows it done",
            1,
            "run-1",
            True,
            True,
        ),
        row("003_m", "skipped", "not started: the runner was lost", 0, "run-1", False, True),
    ]
    assert book.moved_in_run(user, "run-1") and not book.moved_in_run(user, "run-2")
    book.record_planned(user, Plan("up", 2, 3, STEPS[2:]), "run-2")
    assert not book.moved_in_run(user, "run-2"), "a running step moved nobody yet"
    assert book.settle_orphans(user, set())[0].status == "failed"  # not applied: interrupted
    assert rows(ws, user)[-1] == row(
        "003_m", "failed", "interrupted: runner lost", 1, "run-2", True, True
    )
    assert book.settle_orphans(user, set()) == [], "nothing left open"


def test_rows_done_and_page_sizes_go_to_the_running_row_only(ws: Workspace, user: int) -> None:
    book = Ledger(ws.engine)
    book.record_planned(user, Plan("up", 0, 2, STEPS[:2]), "run-1")
    book.record_rows(user, STEPS[0], 400, 1_000)
    book.record_rows(user, STEPS[0], 700)  # an estimate once known is kept
    book.record_page_sizes(user, STEPS[0], "t: pages of 200 hit the transaction limit 1 time")
    book.record_rows(user, STEPS[1], 5)  # pending: not running, nothing written
    book.record_page_sizes(user, STEPS[1], "nothing")
    with ws.engine.connect() as conn:
        found = conn.execute(
            sa.select(
                ledger.c.migration_id, ledger.c.rows_done, ledger.c.rows_total, ledger.c.page_sizes
            )
            .where(ledger.c.user_id == user)
            .order_by(ledger.c.id)
        ).all()
    assert [tuple(r) for r in found] == [
        ("001_m", 700, 1_000, "t: pages of 200 hit the transaction limit 1 time"),
        ("002_m", None, None, None),
    ]


def test_an_adoption_is_one_completed_row_that_ran_nothing(ws: Workspace, user: int) -> None:
    book = Ledger(ws.engine)
    book.record_adopted(
        user, STEPS[1].migration, "adopted at revision 4f2a9c1d (alembic_version) by ops"
    )
    assert rows(ws, user) == [
        row(
            "002_m",
            "completed",
            "adopted at revision 4f2a9c1d (alembic_version) by ops",
            0,
            None,
            False,
            True,
        )
    ]
    assert ws.directory.get_config(user).schema_version == 2
    with ws.engine.connect() as conn:
        direction, version = conn.execute(sa.select(ledger.c.direction, ledger.c.version)).one()
    assert (direction, version) == ("up", 2)


@pytest.mark.parametrize(
    ("call", "action"),
    [
        (lambda book: book.record_planned(1, Plan("up", 0, 1, STEPS[:1]), None), "record the plan"),
        (lambda book: book.record_completed(1, STEPS[0]), "record the success"),
        (lambda book: book.record_rows(1, STEPS[0], 1), "record the rows done"),
        (lambda book: book.record_page_sizes(1, STEPS[0], "x"), "record the page sizes"),
        (lambda book: book.record_failed(1, STEPS[0], "x"), "record the failure"),
        (lambda book: book.record_not_started(1, STEPS[0], "x", "run"), "record the failure"),
        (lambda book: book.record_not_started(1, STEPS[0], "x", None), "record the failure"),
        (lambda book: book.record_skipped(1, STEPS, "x"), "record skipped steps"),
        (lambda book: book.record_adopted(1, STEPS[0].migration, "x"), "record the adoption"),
        (lambda book: book.moved_in_run(1, "run"), "read what the run did"),
        (lambda book: book.settle_orphans(1, set()), "settle interrupted attempts"),
        (lambda book: book.page_counts([1]), "read the page's ledger"),
        (lambda book: book.record_planned_page(*PAGE), "record the page's plans"),
        (lambda book: book.drop_planned([1], "run"), "forget the unstarted plans"),
        (lambda book: book.record_last_steps(LAST), "record the successes"),
    ],
)
@pytest.mark.parametrize("plane", ["postgresql", "sqlite"])
def test_a_control_plane_out_of_reach_is_named_with_what_was_being_recorded(
    call: Any, action: str, plane: str, tmp_path: Path
) -> None:
    url = (
        "postgresql+psycopg://postgres@127.0.0.1:1/x?connect_timeout=2"
        if plane == "postgresql"
        else f"sqlite:///{tmp_path / 'no-such-folder' / 'control.db'}"
    )
    engine = sa.create_engine(url)
    try:
        with pytest.raises(ControlPlaneError) as failed:
            call(Ledger(engine))
        assert failed.value.message == f"control plane: cannot {action} (OperationalError)"
    finally:
        engine.dispose()


#: one page's plan for user 1, and the last step of user 1 done (for the calls above)
PAGE = ({1: Plan("up", 0, 1, STEPS[:1])}, PageCounts({1: 0}, {}), "run")
LAST = [CompletedStep(1, STEPS[0], "owner", datetime(2026, 1, 1), datetime(2026, 1, 1))]


def test_nothing_to_count_write_or_forget_costs_no_statement(tmp_path: Path) -> None:
    """An empty page reads nothing, writes nothing and says so (no control plane is
    even asked: this one cannot be reached)."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'no-such-folder' / 'control.db'}")
    book = Ledger(engine)
    assert book.page_counts([]) == PageCounts({}, {})
    assert book.record_planned_page({}, PageCounts({}, {}), "run") == {}
    book.drop_planned([], "run")
    assert book.record_last_steps([]) == 0


def test_a_retried_failure_before_the_chain_rewrites_only_its_own_row(
    ws: Workspace, user: int
) -> None:
    """Another user's row in the same run, and this user's skipped row of the same step,
    stay as they were; the retried row's time moves on."""
    book = Ledger(ws.engine)
    other = ws.directory.add_user("someone-else").id
    book.record_not_started(other, STEPS[0], "UnreachableError: theirs", "run-1")
    book.record_planned(user, Plan("up", 0, 2, STEPS[:2]), "run-1")
    book.record_failed(user, STEPS[0], "MigrationFailedError: x")
    book.record_skipped(user, STEPS[1:2], "skipped: 001_m up failed")
    with ws.engine.connect() as conn:
        first_at = conn.execute(
            sa.select(ledger.c.completed_at).where(ledger.c.user_id == other)
        ).scalar_one()
    book.record_not_started(user, STEPS[1], "UnreachableError: mine", "run-1")
    book.record_not_started(other, STEPS[0], "UnreachableError: theirs again", "run-1")
    assert rows(ws, other) == [
        row("001_m", "failed", "UnreachableError: theirs again", 0, "run-1", False, True)
    ]
    assert rows(ws, user) == [
        row("001_m", "failed", "MigrationFailedError: x", 1, "run-1", True, True),
        row("002_m", "skipped", "skipped: 001_m up failed", 0, "run-1", False, True),
        row("002_m", "failed", "UnreachableError: mine", 0, "run-1", False, True),
    ]
    with ws.engine.connect() as conn:
        again_at = conn.execute(
            sa.select(ledger.c.completed_at).where(ledger.c.user_id == other)
        ).scalar_one()
    assert again_at > first_at, "the retry's time is kept"


def test_each_write_touches_its_own_user_and_step_only(ws: Workspace, user: int) -> None:
    """Two users in one run: every write (start the next step, skip, settle, count the
    attempts, say who moved) stays with its own user, step and direction."""
    book = Ledger(ws.engine)
    other = ws.directory.add_user("other").id
    sealed = ws.sealer.seal("sqlite:///x.db", user_id=other, field_name="url")
    ws.directory.save_config(
        other, target_kind="sqlite", sealed_url=sealed, sealed_secret=None, key_id=ws.sealer.key_id
    )
    book.record_planned(other, Plan("up", 0, 3, STEPS), "run-1")
    theirs = rows(ws, other)
    assert book.record_planned(user, Plan("up", 0, 3, STEPS), "run-1") == 1, "not theirs"
    assert book.record_completed(user, STEPS[0], start_next=STEPS[1]) == 1
    book.record_skipped(user, STEPS[2:], "skipped: stopped")
    assert rows(ws, other) == theirs, "another user's rows are never touched"
    assert [r["status"] for r in rows(ws, user)] == ["completed", "running", "skipped"]
    assert book.moved_in_run(user, "run-1") and not book.moved_in_run(other, "run-1")
    book.settle_orphans(user, set())  # this user's runner was lost: only its rows settle
    assert rows(ws, other) == theirs
    assert [r["status"] for r in rows(ws, user)] == ["completed", "failed", "skipped"]
    # attempts count this user's own earlier attempts of the same step and direction
    assert book.record_planned(user, Plan("up", 1, 2, STEPS[1:2]), "run-2") == 2
    assert book.record_completed(user, STEPS[1]) is None
    down = Plan("down", 2, 1, (Step(STEPS[1].migration, "down"),))
    assert book.record_planned(user, down, "run-3") == 1, "a down is its own step"
    book.record_completed(user, down.steps[0])
    again = Plan("up", 1, 3, STEPS[1:])
    assert book.record_planned(user, again, "run-4") == 3, "completed attempts count too"
    assert book.record_completed(user, STEPS[1], start_next=STEPS[2]) == 1
    assert book.record_completed(user, STEPS[2], start_next=STEPS[0]) is None, (
        "no pending row of that step: nothing started"
    )


def test_the_last_steps_success_gives_the_lease_back(ws: Workspace, user: int) -> None:
    book = Ledger(ws.engine)
    ws.directory.claim_lease(user, "runner-a", 30)
    book.record_planned(user, Plan("up", 0, 1, STEPS[:1]), "run-1")
    assert ws.directory.get_config(user).lease_owner == "runner-a"
    assert book.record_completed(user, STEPS[0], release_owner="runner-a") is None
    config = ws.directory.get_config(user)
    assert (config.lease_owner, config.schema_version) == (None, 1)


def test_a_sqlite_control_plane_out_of_reach_is_named_too(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'missing' / 'byod.db'}")
    try:
        with pytest.raises(ControlPlaneError) as failed:
            Ledger(engine).record_completed(1, STEPS[0])
        assert failed.value.message == "control plane: cannot record the success (OperationalError)"
    finally:
        engine.dispose()


def test_starting_the_next_step_numbers_its_attempt_from_that_steps_own_history(
    ws: Workspace, user: int
) -> None:
    book = Ledger(ws.engine)
    book.record_planned(user, Plan("up", 1, 2, STEPS[1:2]), "run-1")
    book.record_failed(user, STEPS[1], "MigrationFailedError: first try")
    book.record_planned(user, Plan("up", 0, 3, STEPS), "run-2")
    assert book.record_completed(user, STEPS[0], start_next=STEPS[1]) == 2, "its second attempt"
    book.record_skipped(user, STEPS[1:2], "a skip of 002 only")
    assert [r["status"] for r in rows(ws, user)][-2:] == ["running", "pending"], (
        "a skip touches the steps it names, pending ones only"
    )


def test_a_pages_plans_are_the_rows_a_lone_users_plan_would_be(ws: Workspace, user: int) -> None:
    """A page's plans, written in one statement, are what :meth:`record_planned` writes
    for one user: the first step ``running`` numbered after the attempts before it (a
    failure before the chain counts none), the rest ``pending``; a second page's plan is
    numbered after the first. The page's counts say which users a lost runner left open
    rows for."""
    book = Ledger(ws.engine)
    book.record_not_started(user, STEPS[0], "UnreachableError: down", "run-0")
    plan = Plan("up", 0, 3, STEPS)
    counts = book.page_counts([user])
    assert counts.open_rows == {user: 0}
    assert book.record_planned_page({user: plan}, counts, "run-1") == {user: 1}
    assert rows(ws, user)[1:] == [
        row("001_m", "running", None, 1, "run-1", True, False),
        row("002_m", "pending", None, 0, "run-1", False, False),
        row("003_m", "pending", None, 0, "run-1", False, False),
    ]
    assert book.page_counts([user]).open_rows == {user: 3}
    book.record_failed(user, STEPS[0], "boom")
    book.record_skipped(user, STEPS[1:], "skipped: 001_m up failed")
    again = book.page_counts([user])
    assert again.open_rows == {user: 0} and again.tries[(user, "001_m", "up")] == 1
    assert book.record_planned_page({user: plan}, again, "run-2") == {user: 2}
    assert rows(ws, user)[-3]["attempts"] == 2


def test_unstarted_plans_are_forgotten_and_last_steps_recorded_in_a_batch(
    ws: Workspace, user: int
) -> None:
    """:meth:`drop_planned` forgets only this run's rows still ``pending`` or
    ``running`` (nothing ran for them); :meth:`record_last_steps` completes the running
    rows of a batch with each step's own times, moves the config, gives the lease back,
    and leaves a row that is no longer running as it is (counted out)."""
    book = Ledger(ws.engine)
    one = Plan("up", 0, 1, STEPS[:1])
    book.record_planned(user, Plan("up", 0, 3, STEPS), "run-1")
    book.record_failed(user, STEPS[0], "boom")
    book.record_skipped(user, STEPS[1:], "skipped")
    other = ws.directory.add_user("another-ledger-user").id
    three = Plan("up", 0, 3, STEPS)
    book.record_planned_page({user: three, other: three}, book.page_counts([user]), "run-2")
    book.drop_planned([user], "run-1")  # another run's: nothing of run-2's goes
    statuses = ["failed", "skipped", "skipped", "running", "pending", "pending"]
    assert [r["status"] for r in rows(ws, user)] == statuses
    book.drop_planned([user], "run-2")  # this user's only: the other's stay
    assert [r["status"] for r in rows(ws, user)] == ["failed", "skipped", "skipped"]
    assert [r["status"] for r in rows(ws, other)] == ["running", "pending", "pending"]
    book.record_planned_page({user: one}, book.page_counts([user]), "run-3")
    ws.directory.claim_lease(user, "owner-3", 30)
    began = datetime(2026, 1, 2, 3, 4, 5)
    done = [CompletedStep(user, STEPS[0], "owner-3", began, datetime(2026, 1, 2, 3, 4, 6))]
    assert book.record_last_steps(done) == 1
    with ws.engine.connect() as conn:
        last = conn.execute(sa.select(ledger).order_by(ledger.c.id.desc())).first()
    assert last is not None
    assert (last.status, last.attempts, last.run_id, last.error) == ("completed", 2, "run-3", None)
    assert (last.started_at, last.completed_at) == (began, datetime(2026, 1, 2, 3, 4, 6))
    config = ws.directory.get_config(user)
    assert (config.schema_version, config.connection_status, config.lease_owner) == (
        1,
        "connected",
        None,
    )
    assert book.record_last_steps(done) == 0  # completed already: left as it is
    assert rows(ws, user)[-1]["status"] == "completed"
