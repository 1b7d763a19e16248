"""What the distributed tests share: brokers, real worker processes, a fleet on PostgreSQL.

Each test gets its own queue names, so tests running side by side on one broker never
take each other's tasks; queues are deleted afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa

from byod import commands
from byod.controlplane import RunStore
from byod.fleet import FleetSummary
from byod.settings import Settings
from byod.workspace import Workspace
from tests.conftest import LOOPBACK_ALLOWED, TEST_KEY, ServerDatabases, make_workspace
from tests.helpers import add_connected
from tests.migration_sets import counter_migrations

BROKERS = {
    "redis": os.environ.get("BYOD_TEST_REDIS", "redis://127.0.0.1:6379/0"),
    "rabbitmq": os.environ.get("BYOD_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//"),
}
BYOD = str(Path(sys.executable).with_name("byod"))


def require_broker(url: str) -> None:
    """Fail in CI, skip elsewhere, when the broker does not answer."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        problem = f"broker {url} is not reachable: {type(exc).__name__}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem)
        pytest.skip(problem)


@dataclass
class Cluster:
    """A PostgreSQL control plane, a broker, the counter migrations, and worker
    processes started (and killed) by the test."""

    ws: Workspace
    broker: str
    folder: Path
    queue: str
    env: dict[str, str]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    queues: set[str] = field(default_factory=set)

    def start_worker(
        self,
        *,
        concurrency: int = 2,
        queues: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
        name: str | None = None,
        args: tuple[str, ...] = (),
        stderr_apart: bool = False,
    ) -> subprocess.Popen[bytes]:
        """A ``byod worker`` process in its own process group; returns once it is ready.
        Its output goes to ``worker-NAME.log`` (with ``stderr_apart``, its stderr to
        ``worker-NAME.err`` and only its stdout there)."""
        names = queues or [self.queue]
        self.queues.update(names)
        log = self.folder.parent / f"worker-{name or len(self.workers)}.log"
        errors = log.with_suffix(".err") if stderr_apart else None
        process = subprocess.Popen(
            [
                BYOD,
                "worker",
                "--concurrency",
                str(concurrency),
                "--queues",
                ",".join(names),
                *args,
            ],
            env={**self.env, **(extra_env or {})},
            cwd=self.folder.parent,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT if errors is None else errors.open("wb"),
            start_new_session=True,
        )
        self.workers.append(process)
        deadline = time.monotonic() + 60
        while b"ready." not in (errors or log).read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker did not start:\n{log.read_text()}")
            time.sleep(0.1)
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """kill -9 of the worker and its pool processes."""
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def byod(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """Run the ``byod`` command with the cluster's settings."""
        return subprocess.run(
            [BYOD, *args],
            env=self.env,
            cwd=self.folder.parent,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def summary(self, completed: subprocess.CompletedProcess[str]) -> dict[str, object]:
        """The summary line of a ``--json`` fleet command."""
        lines = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
        assert lines and "summary" in lines[-1], completed.stdout + completed.stderr
        summary: dict[str, object] = lines[-1]["summary"]
        return summary

    def stop(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        if self.broker.startswith("amqp"):
            _delete_amqp_queues(self.broker, self.queues)
        else:
            _delete_redis_queues(self.broker, self.queues)


def _delete_amqp_queues(url: str, names: set[str]) -> None:
    from kombu import Connection

    with Connection(url) as connection:
        channel = connection.default_channel
        for name in names:
            channel.queue_delete(name)


def _delete_redis_queues(url: str, names: set[str]) -> None:
    import redis

    client = redis.Redis.from_url(url)
    for name in names:
        client.delete(name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}")
    client.close()


@pytest.fixture(params=sorted(BROKERS), ids=lambda name: f"broker_{name}")
def broker(request: pytest.FixtureRequest) -> str:
    url = BROKERS[str(request.param)]
    require_broker(url)
    return url


@pytest.fixture
def redis_broker() -> str:
    url = BROKERS["redis"]
    require_broker(url)
    return url


def make_cluster(pg: ServerDatabases, tmp_path: Path, broker: str) -> Cluster:
    folder = counter_migrations(tmp_path / "migrations")
    control = pg.create()
    ws = make_workspace(control, folder)
    queue = f"byod-test-{uuid.uuid4().hex[:10]}"
    env = {
        **os.environ,
        "BYOD_DATABASE_URL": control,
        "BYOD_MIGRATIONS": str(folder),
        "BYOD_ENCRYPTION_KEY": TEST_KEY,
        "BYOD_BROKER_URL": broker,
        "BYOD_BROKER_VISIBILITY_TIMEOUT": "3",
        "BYOD_QUEUE": queue,
        **LOOPBACK_ALLOWED,
        # the migrations import tests.gates; a PYTHONPATH already set (a worktree's src)
        # stays, so the workers run the code under test
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")) if p
        ),
    }
    env.pop("CI", None)
    ws.settings = Settings.load(database_url=control, env=env)
    return Cluster(ws, broker, folder, queue, env)


@contextmanager
def running_cluster(pg: ServerDatabases, tmp_path: Path, broker: str) -> Iterator[Cluster]:
    """A cluster for one test; its workers killed and its queues deleted afterwards."""
    made = make_cluster(pg, tmp_path, broker)
    try:
        yield made
    finally:
        made.stop()
        made.ws.engine.dispose()


@pytest.fixture
def cluster(pg: ServerDatabases, tmp_path: Path, broker: str) -> Iterator[Cluster]:
    """A cluster on each broker."""
    with running_cluster(pg, tmp_path, broker) as made:
        yield made


@pytest.fixture
def redis_cluster(pg: ServerDatabases, tmp_path: Path, redis_broker: str) -> Iterator[Cluster]:
    """A cluster on Redis (for the tests that need one broker only)."""
    with running_cluster(pg, tmp_path, redis_broker) as made:
        yield made


def sqlite_fleet(cluster: Cluster, count: int, prefix: str = "u") -> dict[str, str]:
    """``count`` users on fresh SQLite files, connected; clerk id -> instance URL."""
    fleet = {}
    for n in range(count):
        path = cluster.folder.parent / f"{prefix}{n}.db"
        path.touch()
        url = f"sqlite:///{path}"
        add_connected(cluster.ws, url, f"{prefix}{n}")
        fleet[f"{prefix}{n}"] = url
    return fleet


def ledger_counts(ws: Workspace) -> dict[tuple[str, str], int]:
    """(migration, status) -> rows, over the whole ledger."""
    with ws.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT migration_id, status, count(*) FROM byod_migrations GROUP BY 1, 2")
        )
        return {(str(m), str(s)): int(n) for m, s, n in rows}


def completed_per_user(ws: Workspace) -> dict[tuple[int, str], int]:
    """(user, migration) -> completed up rows: exactly one each when nothing ran twice."""
    with ws.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT user_id, migration_id, count(*) FROM byod_migrations "
                "WHERE status = 'completed' AND direction = 'up' GROUP BY 1, 2"
            )
        )
        return {(int(u), str(m)): int(n) for u, m, n in rows}


def wait_for(condition: object, timeout: float = 60, what: str = "condition") -> None:
    """Poll ``condition()`` until it is true."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def follow_to_end(cluster: Cluster, run_id: str, timeout: float = 120) -> FleetSummary:
    """Wait (bounded) for the run to end, then its summary as ``byod`` reports it."""
    store = RunStore(cluster.ws.engine)
    wait_for(lambda: store.get(run_id).ended_at is not None, timeout, f"run {run_id} to end")
    return commands.follow(cluster.ws, run_id)
