"""A fleet run's pages, part by part, on both control planes: what a page claims and
writes, how a waiting claim is kept or found lost, what a batch of last steps records,
and how the selection is handed out page by page."""

from __future__ import annotations

import logging
from datetime import timedelta
from itertools import islice

import pytest
import sqlalchemy as sa

from byod.clock import utcnow
from byod.controlplane.queries import iter_outdated
from byod.controlplane.schema import applied_checksums, configs, users
from byod.fleet.paging import MAX_PAGE, Pager
from byod.fleet.selection import Item
from byod.runner.pages import Claims, Outcomes
from byod.workspace import Workspace
from tests.conftest import InstanceFactory
from tests.helpers import add_connected, statuses, wait_until


def claims_for(ws: Workspace, run_id: str = "run-p", lease: float = 30.0) -> Claims:
    runner = ws.runner(run_id=run_id)
    return Claims(runner.directory, runner.ledger, runner.owner, run_id, lease)


def test_a_page_claims_its_users_and_writes_their_plans_before_anything_runs(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """One page: the users whose lease is free are claimed (one held by another runner is
    left out, for its own run to say busy), each gets its plan's rows (first step
    ``running``), except a user a lost runner left open rows for (it settles them first)
    and one with nothing to plan; forgetting the page gives every claim back and
    leaves no row."""
    ids = [add_connected(cws, new_instance(), f"page-{n}") for n in range(4)]
    busy, orphaned, nothing = ids[1], ids[2], ids[3]
    cws.directory.claim_lease(busy, "someone-else", 60)
    cws.runner().ledger.record_planned(orphaned, cws.registry.plan_up(0, 1), "lost-run")
    claims = claims_for(cws)
    plan = cws.registry.plan_up(0, None)
    got = claims.claim(ids, lambda config: None if config.user_id == nothing else plan)
    assert got == {ids[0], orphaned, nothing}
    assert [s[2] for s in statuses(cws, ids[0])] == ["running", "pending", "pending"]
    assert [s[2] for s in statuses(cws, orphaned)] == ["running"]  # the lost run's only
    assert statuses(cws, nothing) == []
    assert statuses(cws, ids[0])[0] == ("001_create", "up", "running", 1)
    taken = claims.take(orphaned)
    assert taken is not None and taken.config.open_rows == 1 and taken.planned == ()
    assert claims.take(busy) is None and claims.take(orphaned) is None  # once only
    claims.release_all()  # the run stops: the two still waiting are given back
    assert statuses(cws, ids[0]) == []  # planned, never started: forgotten
    for uid in (ids[0], nothing):
        assert cws.directory.get_config(uid).lease_owner is None
    assert cws.directory.get_config(busy).lease_owner == "someone-else"


def test_a_claim_that_waited_is_renewed_or_found_lost(
    cws: Workspace, new_instance: InstanceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A claim taken after a third of its lease is renewed first; one whose lease lapsed
    and went to another runner meanwhile is not handed out (its worker claims again, the
    lone user's way, and is told busy), said in the log."""
    kept, lost = (add_connected(cws, new_instance(), f"wait-{n}") for n in range(2))
    claims = claims_for(cws, lease=0.6)
    claims.claim([kept, lost], lambda config: None)
    before = cws.directory.get_config(kept).lease_expires_at
    wait_until(lambda: _lapsed(cws, lost), "the lease to lapse")
    cws.directory.claim_lease(lost, "another-runner", 60)
    assert claims.take(kept) is not None
    after = cws.directory.get_config(kept).lease_expires_at
    assert before is not None and after is not None and after > before
    with caplog.at_level(logging.WARNING, logger="byod.runner"):
        assert claims.take(lost) is None
    assert f"user {lost}: its lease lapsed before it started" in caplog.text
    assert cws.directory.get_config(lost).lease_owner == "another-runner"


def _lapsed(ws: Workspace, user_id: int) -> bool:
    expires = ws.directory.get_config(user_id).lease_expires_at
    return expires is not None and expires < utcnow()


def test_a_batch_records_last_steps_and_first_checksums_once(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """What waits in :class:`Outcomes` is written when it flushes (here: on close), each
    migration's checksum as first applied kept once however many users applied it."""
    ids = [add_connected(cws, new_instance(), f"batch-{n}") for n in range(3)]
    claims = claims_for(cws)
    one = cws.registry.plan_up(0, 1)
    claims.claim(ids, lambda config: one)
    outcomes = Outcomes(cws.runner().ledger, seconds=3600)  # only close() flushes
    for uid in ids:
        claimed = claims.take(uid)
        assert claimed is not None
        outcomes.add(uid, one.steps[0], claims.owner, utcnow())
        outcomes.note_applied(one.steps[0].migration)
    assert {s[2] for uid in ids for s in statuses(cws, uid)} == {"running"}
    outcomes.close(patience=5)
    assert {s[2] for uid in ids for s in statuses(cws, uid)} == {"completed"}
    for uid in ids:
        config = cws.directory.get_config(uid)
        assert (config.schema_version, config.lease_owner) == (1, None)
    with cws.engine.connect() as conn:
        kept = conn.execute(sa.select(applied_checksums.c.migration_id)).scalars().all()
    assert kept == ["001_create"]


def test_the_selection_is_handed_out_page_by_page(
    cws: Workspace, new_instance: InstanceFactory
) -> None:
    """A canary wave claims no one past it (and while it runs the next user is handed
    out unclaimed); then pages start at twice the pool and double while they go by
    fast, the next claimed ahead once half of one is handed out; the users left when
    the run stops (the claimed-ahead page too) are given back and counted."""
    ids = [add_connected(cws, new_instance(), f"sel-{n:02d}") for n in range(14)]
    items = iter([Item(cws.directory.get_user(uid), 3) for uid in ids])
    room: list[int | None] = [1]  # a canary wave of one
    claims = claims_for(cws)
    pager = Pager(cws.runner(), claims, items, action="migrate", workers=1, room=lambda: room[0])
    assert pager.size == 2
    canary = next(pager).user.id
    assert canary == ids[0] and claims.take(canary) is not None
    assert statuses(cws, ids[1]) == []  # nothing claimed past the wave, nor ahead
    room[0] = 0  # the wave runs: the next user waits for its verdict, unclaimed
    unclaimed = next(pager)
    assert unclaimed.user.id == ids[1] and claims.take(ids[1]) is None
    room[0] = None  # the wave passed
    page = [next(pager).user.id for _ in range(4)]  # a page of 8: the size doubled twice
    assert pager.size == 8 and page == ids[2:6]
    assert all(claims.take(uid) is not None for uid in page)
    wait_until(lambda: statuses(cws, ids[13]) != [], "the next page claimed ahead")
    assert all(statuses(cws, uid) for uid in ids[6:14])  # the rest of this page, and ahead
    assert pager.left() == 8  # given back: four of this page, four claimed ahead
    for uid in ids[6:14]:
        assert claims.take(uid) is None and statuses(cws, uid) == []
        assert cws.directory.get_config(uid).lease_owner is None
    assert MAX_PAGE == 1000


def test_the_outdated_users_are_read_in_keyset_pages_across_statuses(cws: Workspace) -> None:
    """The selection's pages, a user at a time, walk every eligible user below the target
    once, in (version, user id) order, whatever their connection status: connected and
    errored users interleaved by version, never a user at the target, of another status,
    or touched after the walk began."""
    now = utcnow()
    with cws.engine.begin() as conn:
        for n in range(24):
            conn.execute(users.insert().values(id=100 + n, clerk_id=f"walk-{n}", created_at=now))
            conn.execute(
                configs.insert().values(
                    user_id=100 + n,
                    target_kind="sqlite",
                    sealed_url="-",
                    key_id="k",
                    connection_status=("connected", "error", "pending")[n % 3],
                    schema_version=(2, 0, 1, 3)[n % 4],
                    updated_at=now if n != 7 else now + timedelta(hours=1),
                )
            )
    eligible = [
        (version, uid)
        for n in range(24)
        for uid, status, version in [
            (100 + n, ("connected", "error", "pending")[n % 3], (2, 0, 1, 3)[n % 4])
        ]
        if status != "pending" and version < 3 and n != 7
    ]
    for page_size in (1, 2, 5, 500):
        walked = [  # at most one more than there are: a walk that repeats a page ends
            (row.schema_version, row.user_id)
            for row in islice(
                iter_outdated(
                    cws.engine,
                    3,
                    page_size=page_size,
                    statuses=("connected", "error"),
                    untouched_since=now,
                ),
                len(eligible) + 1,
            )
        ]
        assert walked == sorted(eligible), page_size
    resumed = iter_outdated(
        cws.engine, 3, statuses=("connected", "error"), after=sorted(eligible)[4]
    )
    assert [(r.schema_version, r.user_id) for r in resumed] == sorted(eligible)[5:]
    only_ones = iter_outdated(cws.engine, 3, statuses=("error",), only_version=1)
    assert [r.user_id for r in only_ones] == [
        100 + n for n in range(24) if n % 3 == 1 and n % 4 == 2
    ]
