"""A migration that raises a ``BaseException`` of its own (not an ``Exception``, not
Ctrl-C) fails its step like any other error: the user's chain stops, the rest of the
fleet goes on, the summary is printed and the ledger settled. In the CLI, on Celery
workers, and in ``byod serve``'s self-service runs (tests/test_api.py). The counter
set's 003 raises one, ``Meltdown``, on an instance holding the table ``melt_me``."""

from __future__ import annotations

import json
from pathlib import Path

import sqlalchemy as sa

from byod import commands
from byod.settings import Settings
from byod.workspace import Workspace
from tests.conftest import TEST_KEY, execute
from tests.distributed_kit import Cluster, follow_to_end, sqlite_fleet
from tests.helpers import counter, statuses
from tests.migration_sets import counter_migrations
from tests.test_cli import Cli


def _ledger_rows(ws: Workspace) -> list[tuple[str, str]]:
    with ws.engine.connect() as conn:
        return [
            (str(m), str(s))
            for m, s in conn.execute(sa.text("SELECT migration_id, status FROM byod_migrations"))
        ]


def test_a_base_exception_fails_one_step_and_the_fleet_goes_on(tmp_path: Path) -> None:
    migrations = counter_migrations(tmp_path / "migrations")
    cli = Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY, BYOD_MIGRATIONS=str(migrations))
    assert cli("init").code == 0
    urls = []
    for n in range(4):
        path = tmp_path / f"u{n}.db"
        path.touch()
        urls.append(f"sqlite:///{path}")
        assert cli("users", "add", "--clerk-id", f"u{n}").code == 0
        assert cli("connect", f"u{n}", "--url", urls[-1]).code == 0
    execute(urls[1], "CREATE TABLE melt_me (id INTEGER)")

    ran = cli("migrate", "--all", "--json", "--concurrency", "2")

    assert ran.code == 1, ran.err
    lines = [json.loads(line) for line in ran.out.splitlines() if line.strip()]
    summary = lines[-1]["summary"]
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (4, 3, 1)
    assert summary["errors"][0]["user"] == "u1"
    assert "Meltdown: 003 melted down" in summary["errors"][0]["error"]
    assert [counter(url) for url in urls] == [11, 1, 11, 11]  # 003 rolled back on u1
    run = cli("runs", "--json").json()[0]  # type: ignore[index]
    counts = run["counts"]
    assert (run["state"], counts["succeeded"], counts["failed"]) == ("completed", 3, 1)
    ws = Workspace(Settings.load(cwd=tmp_path, env=cli.env))
    assert ("003_fragile", "running") not in _ledger_rows(ws)
    assert statuses(ws, 2)[-1] == ("003_fragile", "up", "failed", 1)
    ws.engine.dispose()


def test_a_celery_worker_fails_the_step_and_finishes_the_run(redis_cluster: Cluster) -> None:
    cluster = redis_cluster
    fleet = sqlite_fleet(cluster, 3)
    execute(fleet["u1"], "CREATE TABLE melt_me (id INTEGER)")
    cluster.start_worker(concurrency=2)
    run_id = commands.migrate_distributed(cluster.ws)
    summary = follow_to_end(cluster, run_id, timeout=90)
    assert (summary.state, summary.succeeded, summary.failed) == ("completed", 2, 1)
    assert "Meltdown" in summary.errors[0].error
    assert ("003_fragile", "running") not in _ledger_rows(cluster.ws)
    assert [counter(url) for url in fleet.values()] == [11, 1, 11]
