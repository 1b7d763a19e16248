"""Distributed fleet runs: real brokers (Redis, RabbitMQ), real ``byod worker`` processes,
a PostgreSQL control plane and real instances."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from byod import commands
from byod.controlplane import RunStore, history
from byod.distributed import TaskMessage
from byod.spec import FleetOptions, Selection
from tests.conftest import ServerDatabases, execute
from tests.distributed_kit import (
    BYOD,
    Cluster,
    completed_per_user,
    follow_to_end,
    ledger_counts,
    make_cluster,
    sqlite_fleet,
    wait_for,
)
from tests.helpers import (
    Statements,
    add_connected,
    control_plane_locked,
    counter,
    stamp_ids,
    statuses,
)
from tests.served import free_port
from tests.tcp_proxy import CuttableProxy

pytestmark = pytest.mark.postgres

HEAD = ["001_create", "002_bump", "003_fragile"]


def _task_rows(cluster: Cluster, run_id: str) -> list[sa.Row[tuple[object, ...]]]:
    with cluster.ws.engine.connect() as conn:
        return list(
            conn.execute(
                sa.text("SELECT * FROM byod_run_tasks WHERE run_id = :r ORDER BY user_id"),
                {"r": run_id},
            )
        )


def _parent(pid: int) -> int:
    """The process that started ``pid`` (a worker's pool process -> the worker)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])


def test_two_workers_migrate_40_instances_exactly(cluster: Cluster) -> None:
    fleet = sqlite_fleet(cluster, 40)
    execute(fleet["u7"], "CREATE TABLE break_me (id INTEGER)")  # its data breaks 003
    Path(fleet["u9"].removeprefix("sqlite:///")).unlink()  # unreachable now
    at_head = cluster.ws.directory.find_user("u11")
    assert commands.migrate_user(cluster.ws, "u11").ok  # already at head before the run
    workers = {cluster.start_worker(concurrency=2, name=n).pid for n in ("a", "b")}

    done = cluster.byod("migrate", "--all", "--distributed", "--retries", "0", "--json")

    lines = [json.loads(line) for line in done.stdout.splitlines()]
    summary = cluster.summary(done)
    assert done.returncode == 1, done.stderr  # two users failed
    keys = ("state", "total", "succeeded", "failed", "busy", "up_to_date")
    assert {k: summary[k] for k in keys} == {
        "state": "completed",
        "total": 40,
        "succeeded": 37,
        "failed": 2,
        "busy": 0,
        "up_to_date": 1,  # u11, at head before the run
    }
    assert sorted(e["user"] for e in summary["errors"]) == ["u7", "u9"]  # type: ignore[attr-defined]
    per_user = {line["clerk_id"]: line for line in lines[:-1]}
    assert len(per_user) == len(lines) - 1 == 39  # one line per finished user
    assert per_user["u7"]["outcome"] == "failed"
    assert per_user["u9"]["error_type"] == "UnreachableError"
    assert per_user["u0"]["steps"][0]["migration_id"] == "001_create"
    for clerk_id, url in fleet.items():
        if clerk_id == "u9":
            continue
        if clerk_id == "u7":
            assert stamp_ids(url) == HEAD[:2] and counter(url) == 1
        else:
            assert stamp_ids(url) == HEAD, clerk_id
            assert counter(url) == 11, clerk_id  # each step applied exactly once
    # the ledger: one completed row per (user, migration), nothing left open
    counts = ledger_counts(cluster.ws)
    assert counts[("003_fragile", "completed")] == 38  # 37 + the user at head before
    assert counts[("003_fragile", "failed")] == 1
    assert not any(status in ("running", "pending") for _, status in counts)
    assert set(completed_per_user(cluster.ws).values()) == {1}
    run_id = str(summary["run_id"])
    tasks = _task_rows(cluster, run_id)
    assert len(tasks) == 39 and at_head.id not in {t.user_id for t in tasks}
    assert {_parent(int(t.worker.split(":")[1])) for t in tasks} == workers  # both worked
    record = RunStore(cluster.ws.engine).get(run_id)
    assert record.state == "completed" and record.in_flight == 0
    with cluster.ws.engine.connect() as conn:
        run_ids = conn.execute(
            sa.text("SELECT DISTINCT run_id FROM byod_migrations WHERE user_id <> :u"),
            {"u": at_head.id},
        ).all()
    assert [r[0] for r in run_ids] == [run_id]  # ledger rows carry the run id


def test_kill_9_of_a_worker_inside_a_migration(cluster: Cluster, tmp_path: Path) -> None:
    fleet = sqlite_fleet(cluster, 12)
    hold = tmp_path / "hold"
    hold.mkdir()
    doomed = cluster.start_worker(
        concurrency=1,
        name="doomed",
        extra_env={"BYOD_TEST_HOLD_DIR": str(hold), "BYOD_TEST_HOLD_SECONDS": "300"},
    )
    started = cluster.byod(
        "migrate", "--all", "--distributed", "--detach", "--lease-seconds", "3", "--json"
    )
    assert started.returncode == 0, started.stderr
    run_id = json.loads(started.stdout)["run_id"]
    wait_for(lambda: any(hold.iterdir()), what="a migration held inside its transaction")
    held_user = int(next(hold.iterdir()).name.removeprefix("entered-"))
    cluster.kill(doomed)  # kill -9, mid-transaction
    cluster.start_worker(concurrency=2, name="survivor")

    followed = cluster.byod("runs", "show", run_id, "--follow", "--json")

    summary = cluster.summary(followed)
    assert followed.returncode == 0, followed.stderr
    assert (summary["state"], summary["succeeded"], summary["failed"]) == ("completed", 12, 0)
    for url in fleet.values():
        assert stamp_ids(url) == HEAD
        assert counter(url) == 11  # the held bump was rolled back, then applied once
    counts = ledger_counts(cluster.ws)
    assert not any(status in ("running", "pending") for _, status in counts)
    assert set(completed_per_user(cluster.ws).values()) == {1}
    rows = statuses(cluster.ws, held_user)
    assert ("002_bump", "up", "failed", 1) in rows  # the lost attempt, settled
    assert ("002_bump", "up", "completed", 2) in rows
    held = next(t for t in _task_rows(cluster, run_id) if t.user_id == held_user)
    assert held.deliveries >= 2 and held.outcome == "succeeded"


def _queued_pages(cluster: Cluster) -> list[list[int]]:
    """The users of each task message waiting in the cluster's Redis queue."""
    import base64

    messages = redis.Redis.from_url(cluster.broker).lrange(cluster.queue, 0, -1)
    pages = []
    for raw in messages:
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        pages.append([int(uid) for uid in body[0][1]])
    return pages


def test_a_task_is_a_page_of_users_its_bookkeeping_a_few_statements(
    redis_cluster: Cluster,
) -> None:
    """A run hands its users out as tasks of a page each: the users in flight over
    :data:`PAGES_IN_FLIGHT` (so a small fleet gets one user a task, every worker process
    one), never two queues in a page. A worker takes a page's tasks, claims its leases,
    writes its plans, records its last steps and its tasks' ends a batch at a time: a
    rollout of one migration to a page of 12 users costs a handful of control-plane
    writes, not several a user, and every user still ends moved, recorded and counted
    once."""
    from byod.distributed import Dispatcher, TaskHandler
    from byod.distributed.dispatch import PAGES_IN_FLIGHT, in_pages, task_page_size
    from byod.taskqueue.celery_app import make_app, publisher

    assert [task_page_size(n) for n in (0, 31, 64, 256, 10_000)] == [1, 1, 2, 8, 64]
    assert PAGES_IN_FLIGHT == 32
    assert in_pages("r", [(1, "eu"), (2, None), (3, "eu"), (4, "eu")], 2) == [
        TaskMessage("r", (1, 3), "eu"),
        TaskMessage("r", (4,), "eu"),
        TaskMessage("r", (2,), None),
    ]
    cluster = redis_cluster
    fleet = sqlite_fleet(cluster, 12)
    ids = [cluster.ws.directory.find_user(clerk).id for clerk in fleet]
    runner = cluster.ws.runner()
    assert all(runner.migrate(uid, to_version=2).ok for uid in ids)
    cluster.queues.add(cluster.queue)  # no worker: the test plays one, in-process
    run_id = commands.migrate_distributed(cluster.ws, options=FleetOptions(concurrency=256))
    assert sorted(_queued_pages(cluster)) == [[uid] for uid in ids]  # 12 in flight: 12 tasks
    dispatcher = Dispatcher(cluster.ws.engine, publisher(make_app(cluster.ws.settings)))
    handler = TaskHandler(cluster.ws.runner(), dispatcher, name="test:1")
    statements = Statements(cluster.ws.engine)

    assert handler.handle(run_id, ids) is None  # as a page of a larger fleet's run

    writes = {t: statements.writes(t) for t in ("byod_migrations", "byod_configs")}
    tasks = statements.writes("byod_run_tasks")
    # a claim of the page's tasks and leases, a plan write, then one batch of outcomes
    # (or a few, when the page outlasts a flush interval) with its tasks' ends
    assert writes["byod_migrations"] <= 1 + 4 and writes["byod_configs"] <= 1 + 4, statements.seen
    assert tasks <= 1 + 4, statements.seen
    assert sum(writes.values()) + tasks < len(ids)
    record = RunStore(cluster.ws.engine).get(run_id)
    assert (record.state, record.counts.succeeded, record.in_flight) == ("completed", 12, 0)
    for uid, url in zip(ids, fleet.values(), strict=True):
        assert stamp_ids(url) == HEAD and counter(url) == 11
        rows = [r for r in history(cluster.ws.engine, uid) if r.run_id == run_id]
        assert [(r.migration_id, r.status, r.attempts) for r in rows] == [
            ("003_fragile", "completed", 1)
        ]
        config = cluster.ws.directory.get_config(uid)
        assert (config.schema_version, config.lease_owner) == (3, None)
    assert {(t.state, t.outcome, t.deliveries) for t in _task_rows(cluster, run_id)} == {
        ("done", "succeeded", 1)
    }
    # a duplicate delivery's ends: neither written again nor counted twice
    from byod.controlplane import TaskEnd

    again = [(uid, TaskEnd(outcome="failed", error="duplicate")) for uid in ids]
    assert dispatcher.tasks.finish_page(run_id, again) is None
    after = RunStore(cluster.ws.engine).get(run_id)
    assert (after.counts.succeeded, after.counts.failed, after.in_flight) == (12, 0, 0)
    assert {t.outcome for t in _task_rows(cluster, run_id)} == {"succeeded"}


def test_kill_9_of_a_worker_after_a_commit_and_before_its_batch_is_recorded(
    redis_cluster: Cluster, tmp_path: Path
) -> None:
    """The stamp is the truth on workers too: a worker killed (kill -9) after its
    page's first user committed its last step on its instance, but before the batch
    recording it was written (the control plane's ledger and configs held locked),
    leaves the page's rows ``running``; the next delivery settles them from the stamps
    (completed, recovered; its page mate, planned and never touched, interrupted),
    every user is moved once, counted as moved by the run, and nothing is applied
    twice."""
    cluster = redis_cluster
    fleet = sqlite_fleet(cluster, 64)  # 64 in flight: tasks of 2 users
    ids = [cluster.ws.directory.find_user(clerk).id for clerk in fleet]
    runner = cluster.ws.runner()
    assert all(runner.migrate(uid, to_version=1).ok for uid in ids)
    hold = tmp_path / "hold"
    hold.mkdir()
    held = {"BYOD_TEST_HOLD_DIR": str(hold), "BYOD_TEST_HOLD_SECONDS": "2"}
    doomed = cluster.start_worker(concurrency=1, name="doomed", extra_env=held)
    started = cluster.byod(
        "migrate", "--all", "--to", "2", "--distributed", "--detach",
        "--lease-seconds", "9", "--json",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    run_id = json.loads(started.stdout)["run_id"]
    wait_for(lambda: any(hold.iterdir()), what="the page's first user inside its step")
    first = int(next(hold.iterdir()).name.removeprefix("entered-"))
    first_url = fleet[cluster.ws.directory.get_user(first).clerk_id]
    with control_plane_locked(cluster.ws.engine):  # the batch cannot be written
        wait_for(lambda: stamp_ids(first_url) == HEAD[:2], what="its instance to commit")
        time.sleep(0.3)  # the worker is stuck writing the batch now
        cluster.kill(doomed)
    page = sorted(t.user_id for t in _task_rows(cluster, run_id) if t.state == "running")
    assert len(page) == 2 and first in page
    (mate,) = set(page) - {first}
    bumps = {uid: [s[2] for s in statuses(cluster.ws, uid) if s[0] == "002_bump"] for uid in ids}
    assert bumps[first] == bumps[mate] == ["running"]  # planned before anything was touched
    assert all(bumps[uid] == [] for uid in ids if uid not in page)
    assert stamp_ids(fleet[cluster.ws.directory.get_user(mate).clerk_id]) == HEAD[:1]
    assert {cluster.ws.directory.get_config(uid).schema_version for uid in ids} == {1}
    cluster.start_worker(concurrency=2, name="survivor")

    summary = follow_to_end(cluster, run_id)

    assert (summary.state, summary.succeeded, summary.failed) == ("completed", 64, 0)
    assert [counter(url) for url in fleet.values()] == [1] * 64  # 002 applied once each
    for uid in ids:
        rows = [r for r in history(cluster.ws.engine, uid) if r.migration_id == "002_bump"]
        expected = [("completed", None)]  # newest first
        if uid == first:
            expected = [("completed", "recovered: the instance's stamp shows it done")]
        elif uid == mate:
            expected = [("completed", None), ("failed", "interrupted: runner lost")]
        assert [(r.status, r.error) for r in rows] == expected, uid
        assert cluster.ws.directory.get_config(uid).schema_version == 2
    open_rows = [
        s for uid in ids for s in statuses(cluster.ws, uid) if s[2] in ("running", "pending")
    ]
    assert not open_rows
    delivered = {t.user_id: t.deliveries for t in _task_rows(cluster, run_id)}
    assert delivered[first] >= 2 and delivered[mate] >= 2


def test_a_run_with_a_killed_worker_ends_about_one_lease_after_the_kill(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The killed worker's user is sent again once its lease lapses (not after the
    watcher's five minutes or Redis's ten-minute visibility timeout); each step still
    applies once; a late redelivery after the run closed changes nothing in it."""
    cluster.env["BYOD_BROKER_VISIBILITY_TIMEOUT"] = "600"  # a production-like Redis
    fleet = sqlite_fleet(cluster, 6)
    hold = tmp_path / "hold"
    hold.mkdir()
    doomed = cluster.start_worker(
        concurrency=1,
        name="doomed",
        extra_env={"BYOD_TEST_HOLD_DIR": str(hold), "BYOD_TEST_HOLD_SECONDS": "600"},
    )
    started = cluster.byod(
        "migrate", "--all", "--distributed", "--detach", "--lease-seconds", "6", "--json"
    )
    assert started.returncode == 0, started.stderr
    run_id = json.loads(started.stdout)["run_id"]
    wait_for(lambda: any(hold.iterdir()), what="a migration held inside its transaction")
    held_user = int(next(hold.iterdir()).name.removeprefix("entered-"))
    cluster.kill(doomed)
    killed_at = time.monotonic()
    survivor = cluster.start_worker(concurrency=2, name="survivor")

    followed = cluster.byod("runs", "show", run_id, "--follow", "--json")
    took = time.monotonic() - killed_at

    summary = cluster.summary(followed)
    assert (summary["state"], summary["succeeded"], summary["failed"]) == ("completed", 6, 0)
    assert took < 60, f"the run ended {took:.0f} s after the kill"
    assert all(counter(url) == 11 for url in fleet.values())  # every step applied once
    assert set(completed_per_user(cluster.ws).values()) == {1}
    before = RunStore(cluster.ws.engine).get(run_id)

    log = cluster.folder.parent / "worker-survivor.log"
    handled = log.read_text().count("succeeded in")
    late = TaskMessage(run_id, (held_user,), cluster.queue)
    cluster.ws.broker.publish([late])  # a late redelivery of the held user's task
    wait_for(lambda: log.read_text().count("succeeded in") > handled, what="the late task")
    after = RunStore(cluster.ws.engine).get(run_id)
    assert (after.counts, after.ended_at) == (before.counts, before.ended_at)
    assert all(counter(url) == 11 for url in fleet.values())
    assert survivor.poll() is None


def test_racing_runs_migrate_each_instance_once(redis_cluster: Cluster) -> None:
    cluster = redis_cluster
    fleet = sqlite_fleet(cluster, 60)
    cluster.start_worker(concurrency=2, name="a")
    cluster.start_worker(concurrency=2, name="b")
    options = FleetOptions(concurrency=8, retries=3, retry_base_seconds=0.1)
    run_ids: list[str] = []
    summaries = []

    def distributed() -> None:
        run_id = commands.migrate_distributed(cluster.ws, options=options)
        run_ids.append(run_id)
        summaries.append(commands.follow(cluster.ws, run_id))

    def in_process() -> None:
        summaries.append(commands.migrate_fleet(cluster.ws, options=options))

    threads = [threading.Thread(target=f) for f in (distributed, distributed, in_process)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)

    assert len(summaries) == 3 and len(run_ids) == 2
    for url in fleet.values():
        assert stamp_ids(url) == HEAD and counter(url) == 11
    assert set(completed_per_user(cluster.ws).values()) == {1}
    assert len(completed_per_user(cluster.ws)) == 60 * 3
    # every user counted as moved by exactly one of the three runs
    assert sum(s.succeeded for s in summaries) == 60
    assert all(s.failed == 0 for s in summaries)
    assert not any(status in ("running", "pending") for _, status in ledger_counts(cluster.ws))


def test_canary_failure_halts_and_nothing_after_touches_an_instance(
    redis_cluster: Cluster,
) -> None:
    cluster = redis_cluster
    fleet = sqlite_fleet(cluster, 20)
    for clerk_id in ("u0", "u1"):  # the lowest ids: the canaries
        execute(fleet[clerk_id], "CREATE TABLE break_me (id INTEGER)")
    cluster.start_worker(concurrency=2)

    done = cluster.byod("migrate", "--all", "--distributed", "--canary", "3", "--json")

    summary = cluster.summary(done)
    assert done.returncode == 1
    assert summary["state"] == "halted" and "canary" in str(summary["halt_reason"])
    assert (summary["succeeded"], summary["failed"], summary["not_started"]) == (1, 2, 17)
    assert summary["total"] == 20
    for n in range(3, 20):
        assert stamp_ids(fleet[f"u{n}"]) == []  # never touched
    assert len(_task_rows(cluster, str(summary["run_id"]))) == 3
    with cluster.ws.engine.connect() as conn:
        users_in_ledger = conn.execute(
            sa.text("SELECT count(DISTINCT user_id) FROM byod_migrations")
        ).scalar_one()
    assert users_in_ledger == 3


def test_queued_tasks_of_a_stopped_run_are_discarded(redis_cluster: Cluster) -> None:
    cluster = redis_cluster
    fleet = sqlite_fleet(cluster, 10)
    run_id = commands.migrate_distributed(cluster.ws, options=FleetOptions(concurrency=6))
    assert len(_task_rows(cluster, run_id)) == 6  # the cap on tasks in flight
    stopped = cluster.byod("runs", "stop", run_id)
    assert stopped.returncode == 0, stopped.stderr
    cluster.start_worker(concurrency=2)  # it gets the six queued tasks

    wait_for(lambda: RunStore(cluster.ws.engine).get(run_id).ended_at is not None, what="end")

    record = RunStore(cluster.ws.engine).get(run_id)
    assert record.state == "interrupted"
    assert (record.counts.not_started, record.counts.succeeded, record.counts.total) == (10, 0, 10)
    for url in fleet.values():
        assert stamp_ids(url) == []  # no instance touched
    assert {t.outcome for t in _task_rows(cluster, run_id)} == {"not_started"}
    assert ledger_counts(cluster.ws) == {}


def test_a_user_on_queue_eu_is_migrated_only_by_an_eu_worker(redis_cluster: Cluster) -> None:
    cluster = redis_cluster
    fleet = sqlite_fleet(cluster, 4)
    eu_queue = f"eu-{cluster.queue}"
    eu_path = cluster.folder.parent / "eu.db"
    eu_path.touch()
    eu_url = f"sqlite:///{eu_path}"
    user = cluster.ws.directory.add_user("eu_user")
    _, reach = commands.connect(cluster.ws, "eu_user", eu_url, queue=eu_queue)
    assert reach.status == "connected"
    cluster.start_worker(concurrency=2, name="default")

    run_id = commands.migrate_distributed(cluster.ws)
    store = RunStore(cluster.ws.engine)
    wait_for(lambda: store.get(run_id).counts.succeeded == 4, what="the default queue's users")
    # the eu user's task waits in its own queue, which no running worker consumes
    broker = redis.Redis.from_url(cluster.broker)
    assert broker.llen(eu_queue) == 1 and broker.llen(cluster.queue) == 0
    assert stamp_ids(eu_url) == []
    assert store.get(run_id).in_flight == 1 and store.get(run_id).ended_at is None

    cluster.start_worker(concurrency=1, queues=[eu_queue], name="eu")
    summary = follow_to_end(cluster, run_id)

    assert (summary.state, summary.succeeded) == ("completed", 5)
    assert stamp_ids(eu_url) == HEAD
    assert all(stamp_ids(url) == HEAD for url in fleet.values())
    eu_task = next(t for t in _task_rows(cluster, run_id) if t.user_id == user.id)
    assert eu_task.queue == eu_queue


def test_per_host_cap_limits_concurrent_migrations_on_one_server(
    redis_cluster: Cluster, pg: ServerDatabases
) -> None:
    cluster = redis_cluster
    for n in range(5):
        add_connected(cluster.ws, pg.create(), f"p{n}")
    slow = {"BYOD_TEST_HOLD_DIR": str(cluster.folder.parent), "BYOD_TEST_HOLD_SECONDS": "0.4"}
    cluster.start_worker(concurrency=2, extra_env=slow, name="a")
    cluster.start_worker(concurrency=2, extra_env=slow, name="b")

    run_id = commands.migrate_distributed(cluster.ws, per_host=1)
    summary = follow_to_end(cluster, run_id)

    assert (summary.state, summary.succeeded) == ("completed", 5)
    with cluster.ws.engine.connect() as conn:
        spans = conn.execute(
            sa.text(
                "SELECT started_at, completed_at FROM byod_migrations "
                "WHERE migration_id = '002_bump' ORDER BY started_at"
            )
        ).all()
    assert len(spans) == 5
    for before, after in itertools.pairwise(spans):
        assert after.started_at >= before.completed_at  # one migration at a time on the host


def test_distributed_needs_a_broker_and_a_server_control_plane(
    redis_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = redis_cluster
    sqlite_env = {**cluster.env, "BYOD_DATABASE_URL": f"sqlite:///{tmp_path / 'cp.db'}"}
    cluster.env, pg_env = sqlite_env, cluster.env
    assert cluster.byod("init").returncode == 0
    for args in (["worker"], ["migrate", "--all", "--distributed"]):
        refused = cluster.byod(*args, timeout=60)
        assert refused.returncode == 2, refused.stderr
        assert "PostgreSQL control plane" in refused.stderr
        assert "Traceback" not in refused.stderr
    cluster.env = {k: v for k, v in pg_env.items() if k != "BYOD_BROKER_URL"}
    no_broker = cluster.byod("migrate", "--all", "--distributed")
    assert no_broker.returncode == 2 and "BYOD_BROKER_URL" in no_broker.stderr
    cluster.env = {**pg_env, "BYOD_BROKER_URL": "redis://:hunter2@127.0.0.1:1/0"}
    down = cluster.byod("migrate", "--all", "--distributed")
    assert down.returncode == 1 and "cannot reach the task-queue broker" in down.stderr
    assert "hunter2" not in down.stderr and "Traceback" not in down.stderr
    assert RunStore(cluster.ws.engine).recent(noop=True) == []  # nothing was recorded
    bad = cluster.byod("migrate", "u0", "--distributed")
    assert bad.returncode == 2


def test_library_run_with_selection_and_limit(redis_cluster: Cluster) -> None:
    cluster = redis_cluster
    fleet = sqlite_fleet(cluster, 8)
    cluster.start_worker(concurrency=2)
    run_id = commands.migrate_distributed(
        cluster.ws,
        options=FleetOptions(concurrency=2),
        selection=Selection(
            users=commands.resolve_users(cluster.ws, ("u1", "u2", "u3", "u4")), limit=3
        ),
        to_version=2,
    )
    summary = follow_to_end(cluster, run_id)
    assert (summary.state, summary.total, summary.succeeded) == ("completed", 3, 3)
    moved = [c for c, url in fleet.items() if stamp_ids(url) == HEAD[:2]]
    assert moved == ["u1", "u2", "u3"]
    assert all(stamp_ids(fleet[c]) == [] for c in fleet if c not in moved)


def test_workers_wait_for_a_control_plane_that_went_away(redis_cluster: Cluster) -> None:
    cluster = redis_cluster
    fleet = sqlite_fleet(cluster, 24)
    proxy = CuttableProxy(5432)  # the workers reach the control plane through it
    url = sa.make_url(cluster.env["BYOD_DATABASE_URL"]).set(port=proxy.port)
    slow = {
        "BYOD_DATABASE_URL": url.render_as_string(hide_password=False),
        "BYOD_TEST_HOLD_DIR": str(cluster.folder.parent),
        "BYOD_TEST_HOLD_SECONDS": "0.2",
    }
    try:
        cluster.start_worker(concurrency=2, extra_env=slow)
        run_id = commands.migrate_distributed(cluster.ws, options=FleetOptions(lease_seconds=3))
        store = RunStore(cluster.ws.engine)
        wait_for(lambda: store.get(run_id).counts.succeeded >= 4, what="a few users done")
        proxy.cut()  # every worker connection drops, mid-run; no new one gets through
        time.sleep(3)
        assert store.get(run_id).ended_at is None
        proxy.restore()
        summary = follow_to_end(cluster, run_id)
    finally:
        proxy.close()

    assert (summary.state, summary.succeeded, summary.failed) == ("completed", 24, 0)
    for url_ in fleet.values():
        assert stamp_ids(url_) == HEAD and counter(url_) == 11
    assert set(completed_per_user(cluster.ws).values()) == {1}
    assert not any(status in ("running", "pending") for _, status in ledger_counts(cluster.ws))


def test_failure_ratio_halts_a_distributed_run(redis_cluster: Cluster) -> None:
    cluster = redis_cluster
    fleet = sqlite_fleet(cluster, 30)
    for n in range(8):  # the first users handed out all break at 003
        execute(fleet[f"u{n}"], "CREATE TABLE break_me (id INTEGER)")
    cluster.start_worker(concurrency=2)

    done = cluster.byod(
        "migrate",
        "--all",
        "--distributed",
        "--concurrency",
        "2",
        "--max-failure-ratio",
        "0.5",
        "--json",
    )

    summary = cluster.summary(done)
    assert done.returncode == 1
    assert summary["state"] == "halted" and "max-failure-ratio" in str(summary["halt_reason"])
    assert summary["succeeded"] == 0 and 1 <= summary["failed"] <= 2  # type: ignore[operator]
    assert summary["total"] == 30
    assert summary["failed"] + summary["not_started"] == 30  # type: ignore[operator]
    touched = [c for c, url in fleet.items() if stamp_ids(url)]
    assert len(touched) == summary["failed"]  # nothing after the halt touched an instance


def test_tasks_a_broker_lost_are_sent_again(redis_cluster: Cluster) -> None:

    from byod.distributed.dispatch import Dispatcher
    from byod.taskqueue.celery_app import make_app, publisher

    cluster = redis_cluster
    fleet = sqlite_fleet(cluster, 8)
    run_id = commands.migrate_distributed(cluster.ws, options=FleetOptions(concurrency=8))
    dispatcher = Dispatcher(cluster.ws.engine, publisher(make_app(cluster.ws.settings)))
    ghost = cluster.ws.directory.find_user("u3").id
    assert ghost in dispatcher.claim(run_id, [ghost], "ghost:1")  # taken, then lost
    redis.Redis.from_url(cluster.broker).delete(cluster.queue)  # the broker lost them all
    assert dispatcher.resend_stale(run_id, 3600) == 0  # nothing looks lost yet

    assert dispatcher.resend_stale(run_id, 0) == 8  # 7 queued + 1 taken by a lease-less ghost
    cluster.start_worker(concurrency=2)
    summary = follow_to_end(cluster, run_id)

    assert (summary.state, summary.succeeded) == ("completed", 8)
    assert all(stamp_ids(url) == HEAD for url in fleet.values())


def test_tasks_a_dead_worker_had_taken_are_sent_again_once_the_run_stalls(
    redis_cluster: Cluster,
) -> None:
    # found by bench/soak.py --seed 2: a worker killed -9 holding messages it had taken
    # from a Redis queue but not begun (acks_late; Redis returns them only after its
    # visibility timeout) left the run waiting for RESEND_AFTER_SECONDS (300 s)
    from byod.distributed.dispatch import Dispatcher
    from byod.distributed.run import stall_seconds
    from byod.taskqueue.celery_app import make_app, publisher

    cluster = redis_cluster
    fleet = sqlite_fleet(cluster, 6)
    run_id = commands.migrate_distributed(cluster.ws, options=FleetOptions(concurrency=6))
    dispatcher = Dispatcher(cluster.ws.engine, publisher(make_app(cluster.ws.settings)))
    redis.Redis.from_url(cluster.broker).delete(cluster.queue)  # taken by a worker that died
    assert dispatcher.resend_stale(run_id, 3600, stalled_seconds=30) == 0  # not stalled yet

    time.sleep(1.2)
    assert dispatcher.resend_stale(run_id, 3600, stalled_seconds=1) == 6  # stalled: all queued
    assert dispatcher.resend_stale(run_id, 3600, stalled_seconds=1) == 0  # sent just now
    cluster.start_worker(concurrency=2)
    summary = follow_to_end(cluster, run_id)

    assert (summary.state, summary.succeeded) == ("completed", 6)
    assert all(stamp_ids(url) == HEAD for url in fleet.values())
    assert stall_seconds(30.0) == 90.0 and stall_seconds(1.0) == 10.0  # the watcher's window


def test_a_run_that_moves_has_no_task_sent_early(redis_cluster: Cluster) -> None:
    from byod.controlplane import TaskStore

    cluster = redis_cluster
    sqlite_fleet(cluster, 4)
    run_id = commands.migrate_distributed(cluster.ws, options=FleetOptions(concurrency=4))
    tasks = TaskStore(cluster.ws.engine)
    time.sleep(1.2)
    with cluster.ws.engine.begin() as conn:  # a task of the run ended just now
        conn.execute(
            sa.text("UPDATE byod_runs SET updated_at = timezone('UTC', now()) WHERE id = :id"),
            {"id": run_id},
        )
    assert tasks.send_again(run_id, 3600, stalled_seconds=1) == []  # queued, but it moves


@contextmanager
def _private_redis() -> Iterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    """A Redis of the test's own (the test kills it): its URL, kill -9, start again."""
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    servers: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        servers.append(subprocess.Popen([*args], stdout=subprocess.DEVNULL))
        wait_for(lambda: _answers(port), 10, "the private Redis to answer")

    def kill() -> None:
        servers[-1].kill()
        servers[-1].wait(10)

    start()
    try:
        yield f"redis://127.0.0.1:{port}/0", kill, start
    finally:
        for server in servers:
            server.kill()
            server.wait(10)


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.ConnectionError:
        return False


def test_a_worker_takes_tasks_again_after_its_acknowledgement_met_a_dead_broker(
    pg: ServerDatabases, tmp_path: Path
) -> None:
    # found by bench/soak.py --seed 1 --faults broker_restart: a task that ended while
    # Redis was down could not be acknowledged; kombu kept counting it against the
    # worker's prefetch, and a worker whose every slot was so held took no task again.
    # (With Celery's heartbeat on, the worker's loop waited in the heartbeat's retries
    # and this test timed out waiting for the lost acknowledgement.)
    hold = tmp_path / "hold"
    hold.mkdir()
    with _private_redis() as (broker, kill_broker, start_broker):
        cluster = make_cluster(pg, tmp_path, broker)
        try:
            sqlite_fleet(cluster, 1, "first")
            worker = cluster.start_worker(
                concurrency=1,  # one slot: one lost acknowledgement held it for good
                extra_env={"BYOD_TEST_HOLD_DIR": str(hold), "BYOD_TEST_HOLD_SECONDS": "3"},
            )
            first = commands.migrate_distributed(cluster.ws, options=FleetOptions())
            wait_for(lambda: any(hold.iterdir()), what="the task inside its migration")
            kill_broker()  # the task ends, and is acknowledged, while Redis is down
            log = cluster.folder.parent / "worker-0.log"
            wait_for(lambda: "Couldn't ack" in log.read_text(), what="the lost acknowledgement")
            start_broker()
            assert RunStore(cluster.ws.engine).get(first).ended_at is not None

            fleet = sqlite_fleet(cluster, 3, "second")
            second = commands.migrate_distributed(cluster.ws, options=FleetOptions())
            summary = follow_to_end(cluster, second, timeout=60)

            assert (summary.state, summary.succeeded) == ("completed", 3)
            assert all(stamp_ids(url) == HEAD for url in fleet.values())
            assert worker.poll() is None  # the same worker, not a restarted one
        finally:
            cluster.stop()
            cluster.ws.engine.dispose()


def test_a_slot_whose_acknowledgement_redis_never_took_is_freed_in_the_worker() -> None:
    # the mechanism behind the test above, on a real Redis and kombu's own consumer:
    # a worker whose every slot is held by such a message takes no task again
    from kombu import Connection, Exchange, Queue

    from byod.taskqueue.celery_app import free_slot_kept_by_broker

    with _private_redis() as (broker, kill_broker, _), Connection(broker) as connection:
        channel = connection.channel()
        queue = Queue("slots", Exchange("slots"), "slots", channel=channel)
        connection.Producer(channel).publish(
            {"n": 1}, exchange=queue.exchange, routing_key="slots", declare=[queue]
        )
        taken: list[Any] = []
        consumer = connection.Consumer(
            queues=[queue], channel=channel, callbacks=[lambda _, m: taken.append(m)],
            accept=["json"],
        )  # fmt: skip
        consumer.qos(prefetch_count=1)  # a worker of one slot
        consumer.consume()
        connection.drain_events(timeout=5)
        [message] = taken
        assert not channel.qos.can_consume()  # its one slot is taken

        kill_broker()
        message.ack_log_error(logging.getLogger("test"), connection.connection_errors)

        assert not message.acknowledged  # "Couldn't ack"
        assert not channel.qos.can_consume()  # and the slot stays taken: no task again
        assert free_slot_kept_by_broker(message)
        assert channel.qos.can_consume()
        assert not free_slot_kept_by_broker(message)  # freed once, never twice
        with contextlib.suppress(Exception):  # the connection's close meets no Redis
            channel.close()


def test_ctrl_c_stops_an_attached_distributed_run(redis_cluster: Cluster) -> None:
    cluster = redis_cluster
    fleet = sqlite_fleet(cluster, 30)
    slow = {"BYOD_TEST_HOLD_DIR": str(cluster.folder.parent), "BYOD_TEST_HOLD_SECONDS": "0.3"}
    cluster.start_worker(concurrency=2, extra_env=slow)
    attached = subprocess.Popen(
        [BYOD, "migrate", "--all", "--distributed", "--concurrency", "2", "--json"],
        env=cluster.env,
        cwd=cluster.folder.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    store = RunStore(cluster.ws.engine)
    wait_for(lambda: any(r.counts.succeeded >= 2 for r in store.recent()), what="progress")

    attached.send_signal(signal.SIGINT)
    out, err = attached.communicate(timeout=60)

    assert attached.returncode == 1, err
    summary = json.loads(out.splitlines()[-1])["summary"]
    assert summary["state"] == "interrupted" and summary["failed"] == 0
    assert summary["succeeded"] + summary["not_started"] == summary["total"] == 30
    assert 2 <= summary["succeeded"] < 30
    moved = [c for c, url in fleet.items() if stamp_ids(url)]
    assert len(moved) == summary["succeeded"]  # nothing half-done, nothing after the stop
    assert all(stamp_ids(fleet[c]) == HEAD for c in moved)


def test_operators_start_a_distributed_run_over_http(redis_cluster: Cluster) -> None:
    from fastapi.testclient import TestClient

    from byod.api import AuthSettings, create_app
    from tests.test_api import SECRET, bearer, token

    cluster = redis_cluster
    fleet = sqlite_fleet(cluster, 6)
    cluster.ws.directory.add_user("ops")
    cluster.start_worker(concurrency=2)
    ops = bearer(token("ops", admin=True))
    with TestClient(create_app(cluster.ws, AuthSettings(secret=SECRET))) as client:
        started = client.post(
            "/v1/fleet/runs", headers=ops, json={"distributed": True, "per_host": 2}
        )
        assert started.status_code == 202, started.text
        run_id = started.json()["run_id"]
        follow_to_end(cluster, run_id)
        shown = client.get(f"/v1/fleet/runs/{run_id}", headers=ops).json()

    assert (shown["state"], shown["succeeded"], shown["distributed"]) == ("completed", 6, True)
    assert shown["in_flight"] == 0 and shown["remaining"] == 0
    assert all(stamp_ids(url) == HEAD for url in fleet.values())


def test_a_worker_with_other_migrations_refuses_the_run(redis_cluster: Cluster) -> None:
    cluster = redis_cluster
    fleet = sqlite_fleet(cluster, 3)
    other = cluster.folder.parent / "other-migrations"
    shutil.copytree(cluster.folder, other)
    (other / "003_fragile.py").write_text(
        (other / "003_fragile.py").read_text() + "\nEDITED = True\n"
    )
    cluster.start_worker(concurrency=1, extra_env={"BYOD_MIGRATIONS": str(other)})

    summary = follow_to_end(cluster, commands.migrate_distributed(cluster.ws))

    assert (summary.state, summary.failed, summary.succeeded) == ("completed", 3, 0)
    assert all("other migrations than run" in e.error for e in summary.errors)
    assert all(stamp_ids(url) == [] for url in fleet.values())  # nothing was touched


def test_a_retry_after_an_unrecorded_end_still_counts_the_user_moved(
    redis_cluster: Cluster,
) -> None:
    """The control plane went away after a delivery moved the user but before its end was
    recorded: the retry finds nothing to do, and the user still counts as succeeded."""
    from byod.distributed import Dispatcher, TaskHandler
    from byod.taskqueue.celery_app import make_app, publisher

    cluster = redis_cluster
    fleet = sqlite_fleet(cluster, 2)
    cluster.queues.add(cluster.queue)  # no worker: the test plays one, in-process
    run_id = commands.migrate_distributed(cluster.ws)
    dispatcher = Dispatcher(cluster.ws.engine, publisher(make_app(cluster.ws.settings)))
    handler = TaskHandler(cluster.ws.runner(), dispatcher, name="test:1")
    moved = cluster.ws.directory.find_user("u0")
    first = handler.runner.configured(run_id=run_id, timeout=None, lease_seconds=30)
    assert first.migrate_user(moved).changed  # the first delivery; its end never recorded

    assert handler.handle(run_id, [moved.id]) is None  # the retry
    assert handler.handle(run_id, [cluster.ws.directory.find_user("u1").id]) is None

    record = RunStore(cluster.ws.engine).get(run_id)
    assert record.ended_at is not None and record.state == "completed"
    assert (record.counts.succeeded, record.counts.up_to_date) == (2, 0)
    assert all(stamp_ids(url) == HEAD and counter(url) == 11 for url in fleet.values())


def test_a_retry_of_a_recorded_task_finishes_the_runs_bookkeeping(
    redis_cluster: Cluster,
) -> None:
    """The end of the last task was recorded, then the control plane went away before the
    run was closed: the task's retry (a duplicate now) closes it."""
    from byod.distributed import Dispatcher, TaskHandler
    from byod.taskqueue.celery_app import make_app, publisher

    cluster = redis_cluster
    sqlite_fleet(cluster, 1)
    cluster.queues.add(cluster.queue)
    run_id = commands.migrate_distributed(cluster.ws)
    dispatcher = Dispatcher(cluster.ws.engine, publisher(make_app(cluster.ws.settings)))
    handler = TaskHandler(cluster.ws.runner(), dispatcher, name="test:1")
    user = cluster.ws.directory.find_user("u0")
    runner = handler.runner.configured(run_id=run_id, timeout=None, lease_seconds=30)
    assert runner.migrate_user(user).changed
    with cluster.ws.engine.begin() as conn:  # the end recorded; the run never closed
        conn.execute(
            sa.text(
                "UPDATE byod_run_tasks SET state = 'done', outcome = 'succeeded', "
                "finished_at = now() WHERE run_id = :r"
            ),
            {"r": run_id},
        )
        conn.execute(
            sa.text("UPDATE byod_runs SET in_flight = 0, succeeded = 1, total = 1 WHERE id = :r"),
            {"r": run_id},
        )
    assert RunStore(cluster.ws.engine).get(run_id).ended_at is None

    assert handler.handle(run_id, [user.id]) is None  # the retry

    record = RunStore(cluster.ws.engine).get(run_id)
    assert record.ended_at is not None and record.state == "completed"
    assert record.counts.succeeded == 1


GATED = """
import sqlalchemy as sa
from byod import Migration

def up(ctx):
    ctx.conn.execute(sa.text("CREATE TABLE contracted (id INTEGER)"))

migration = Migration(id="004_contract", version=4, name="contract", description="gated",
                      up=up, gated=True)
"""


def test_workers_stop_each_user_before_a_closed_gate_and_pass_it_once_open(
    redis_cluster: Cluster,
) -> None:
    cluster = redis_cluster
    (cluster.folder / "004_contract.py").write_text(GATED)
    fleet = sqlite_fleet(cluster, 4)
    cluster.start_worker(concurrency=2)

    held = cluster.summary(cluster.byod("migrate", "--all", "--distributed", "--json"))

    assert held["succeeded"] == 4, held
    assert all(stamp_ids(url) == HEAD for url in fleet.values()), "stopped before the gate"
    assert cluster.byod("gate", "open", "004_contract").returncode == 0
    passed = cluster.summary(cluster.byod("migrate", "--all", "--distributed", "--json"))
    assert passed["succeeded"] == 4, passed
    assert all(stamp_ids(url) == [*HEAD, "004_contract"] for url in fleet.values())
