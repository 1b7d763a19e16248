"""A fleet of many users on a PostgreSQL control plane, instances simulated in-process.

What the control plane costs when the fleet is large: ``--users`` users (default
100,000; ``--users 1000000`` for a million) on a fresh PostgreSQL database, their
instances simulated by a target kind only this bench knows (each call waits
``--latency-ms``, the stamp kept in memory), rolled from version 1 to 2 by the real
fleet runner (threads, pages, batches) at ``--concurrency``. Prints one figure a line:

- ``control-plane bookkeeping``: users/s of the control plane's writes alone (a page's
  claim, ledger read and plans, then its batch of last steps; no instance, no runner);
- the control plane's statements per user and the time the runner waited on them;
- end-to-end users/s at each ``--latency-ms`` (a fresh fleet each), the runner's CPU per
  user, and with ``--profile N`` a profile's top lines at the first latency;
- peak memory (RSS) and the time to roll the whole fleet.

Each figure is the median of ``--repeat`` rounds (5 by default; the latencies' order
alternating, the fleet reset to version 1 before each run). Run from the repository
root (the local PostgreSQL server, trust auth):

    .venv/bin/python bench/scale.py --users 20000 --latency-ms 0,40
    .venv/bin/python bench/scale.py --users 1000000 --latency-ms 0 --repeat 1
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import io
import pstats
import resource
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from byod.clock import utcnow  # noqa: E402
from byod.commands.setup import init  # noqa: E402
from byod.controlplane import NewConfig  # noqa: E402
from byod.controlplane.schema import configs  # noqa: E402
from byod.credentials import Credentials  # noqa: E402
from byod.fleet import migrate_fleet  # noqa: E402
from byod.registry import Migration, Step  # noqa: E402
from byod.runner import Runner  # noqa: E402
from byod.runner.pages import Claims, Outcomes  # noqa: E402
from byod.settings import Settings  # noqa: E402
from byod.spec import FleetOptions  # noqa: E402
from byod.targets import StampEntry  # noqa: E402
from byod.targets.base import check_position  # noqa: E402
from byod.workspace import Workspace  # noqa: E402

KEY = base64.b64encode(b"s" * 32).decode()
SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/"
MIGRATIONS = {
    "001_start.py": """from byod import Migration

migration = Migration(id="001_start", version=1, name="start", description="", up=lambda ctx: None)
""",
    "002_next.py": """from byod import Migration

migration = Migration(id="002_next", version=2, name="next", description="", up=lambda ctx: None)
""",
}


class Simulated:
    """An instance that exists only in this process: each call waits the latency. Its
    stamp is one version a user (a byte in ``versions``, indexed by user id), so the
    simulation's memory stays flat and the process's peak is the runner's."""

    kind = "sqlite"
    versions = bytearray()
    #: the stamp of each version (its entries made once)
    stamp_at: ClassVar[dict[int, list[StampEntry]]] = {}
    lock = threading.Lock()

    def __init__(self, user_id: int, latency: float) -> None:
        self.user_id = user_id
        self.latency = latency

    def _wait(self) -> None:
        if self.latency:
            time.sleep(self.latency)

    def holds_control_plane(self, control_plane_id: str) -> bool:
        return False

    def defer_control_plane_check(self, control_plane_id: str) -> bool:
        return True

    def prepare(self, first: Migration | None = None) -> None:
        pass

    def finish(self, at: Migration | None, head: bool) -> None:
        pass

    def read_stamp(self) -> list[StampEntry]:
        with self.lock:
            return list(self.stamp_at[self.versions[self.user_id]])

    def begin(self, deadline: float | None = None) -> list[StampEntry]:
        self._wait()  # the lock and the stamp read, one round trip
        return self.read_stamp()

    def apply(self, step: Step, body: Any, deadline: float | None = None, phase: str = "") -> bool:
        self._wait()  # the step and its stamp, committed
        stamp = self.read_stamp()
        if not check_position(step, stamp):
            return False
        version = step.migration.version
        with self.lock:
            if version not in self.stamp_at:
                entry = StampEntry(step.migration.id, version, step.migration.checksum, _now())
                self.stamp_at[version] = [*self.stamp_at[version - 1], entry]
            self.versions[self.user_id] = version
        return True

    def in_progress(self) -> list[str]:
        return []

    def clear_dirty(self) -> list[str]:
        return []

    def close(self) -> None:
        pass

    def __enter__(self) -> Simulated:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def _now() -> datetime:
    return datetime.now(UTC)


def opener(latency: float) -> Any:
    def open_simulated(credentials: Credentials, timeout: float) -> Simulated:
        name = Path(sa.make_url(credentials.url).database or "").stem  # "sim-<user id>"
        return Simulated(int(name.split("-")[1]), latency)

    return open_simulated


@contextmanager
def control_plane() -> Iterator[str]:
    """A fresh database on the local server, dropped afterwards."""
    name = f"byod_scale_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(SERVER + "postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield SERVER + name
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def fleet(url: str, users: int, folder: Path) -> Workspace:
    """``users`` users at version 1, their simulated instances stamped there."""
    migrations = folder / "migrations"
    migrations.mkdir(exist_ok=True)
    for name, source in MIGRATIONS.items():
        (migrations / name).write_text(source)
    env = {"BYOD_ENCRYPTION_KEY": KEY, "BYOD_MIGRATIONS": str(migrations)}
    ws = Workspace(Settings.load(database_url=url, env=env))
    init(ws)
    first = ws.registry.get("001_start")
    assert first is not None
    page = 10_000
    for start in range(0, users, page):
        clerks = [(f"u{n:07d}", None) for n in range(start, min(users, start + page))]

        def sealed(ids: dict[str, int]) -> list[NewConfig]:
            return [
                NewConfig(
                    uid,
                    "sqlite",
                    ws.sealer.seal(f"sqlite:////sim/sim-{uid}.db", user_id=uid, field_name="url"),
                    None,
                    ws.sealer.key_id,
                    False,
                )
                for uid in ids.values()
            ]

        ws.directory.import_page(clerks, sealed)
    with ws.engine.begin() as conn:
        conn.execute(configs.update().values(connection_status="connected", schema_version=1))
        ids = [int(uid) for uid in conn.execute(sa.select(configs.c.user_id)).scalars()]
    with ws.engine.connect() as conn:  # statistics, as autovacuum keeps them on a live fleet
        conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(sa.text("VACUUM ANALYZE users, byod_configs"))
    Simulated.stamp_at = {1: [StampEntry(first.id, 1, first.checksum, _now())]}
    Simulated.versions = bytearray(max(ids) + 1)
    for uid in ids:
        Simulated.versions[uid] = 1
    return ws


class Statements:
    """The control plane's statements and the time the client waited on them, in all and
    by statement (its first words)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.count = 0
        self.seconds = 0.0
        self.by_statement: dict[str, float] = {}
        self._started = threading.local()
        sa.event.listen(engine, "before_cursor_execute", self._before)
        sa.event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, *args: object) -> None:
        self._started.at = time.perf_counter()

    def _after(self, conn: object, cursor: object, statement: str, *args: object) -> None:
        waited = time.perf_counter() - getattr(self._started, "at", time.perf_counter())
        self.count += 1
        self.seconds += waited
        words = " ".join(statement.split()[:3])
        self.by_statement[words] = self.by_statement.get(words, 0.0) + waited

    def stop(self) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._before)
        sa.event.remove(self.engine, "after_cursor_execute", self._after)


def bookkeeping(ws: Workspace, users: int, waits: dict[str, list[float]]) -> float:
    """Users/s of the control plane's writes alone: pages of 1,000 claimed and planned,
    then their last steps recorded in one batch each, no instance touched. ``waits``
    gets, per statement, the milliseconds a page waited on it."""
    runner = ws.runner(run_id="bench-bookkeeping")
    claims = Claims(runner.directory, runner.ledger, runner.owner, runner.run_id, 300)
    outcomes = Outcomes(runner.ledger, seconds=3600)
    with ws.engine.connect() as conn:
        ids = [int(uid) for uid in conn.execute(sa.select(configs.c.user_id)).scalars()]
    steps = runner.registry.plan_up(1, 2)
    step = steps.steps[0]
    statements = Statements(ws.engine)
    started = time.perf_counter()
    for at in range(0, len(ids), 1000):
        page = ids[at : at + 1000]
        claims.claim(page, lambda config: steps)
        for uid in page:
            claims.take(uid)
            outcomes.add(uid, step, runner.owner, utcnow())
        outcomes.flush()
    seconds = time.perf_counter() - started
    statements.stop()
    pages = (len(ids) + 999) // 1000
    for words, waited in statements.by_statement.items():
        waits.setdefault(words, []).append(waited / pages * 1000)
    waits.setdefault("(all)", []).append(statements.seconds / pages * 1000)
    waits.setdefault("(the whole page)", []).append(seconds / pages * 1000)
    outcomes.close(10)
    _reset(ws)  # back to version 1 for the runs that follow
    return len(ids) / seconds


def run(ws: Workspace, latency: float, concurrency: int, profile: int) -> dict[str, float]:
    runner = Runner(
        ws.engine,
        ws.registry,
        ws.sealer,
        opener=opener(latency),
        policy=ws.settings.instance_policy,
    )
    statements = Statements(ws.engine)
    profiler = cProfile.Profile() if profile else None
    cpu = time.process_time()
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    summary = migrate_fleet(runner, options=FleetOptions(concurrency=concurrency), to_version=2)
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    statements.stop()
    users = summary.succeeded
    assert users and not summary.failed, summary.as_dict()
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(profile)
        print(text.getvalue())
    return {
        "seconds": seconds,
        "users_per_s": users / seconds,
        "cpu_ms_per_user": cpu / users * 1000,
        "statements_per_user": statements.count / users,
        "waited_ms_per_user": statements.seconds / users * 1000,
    }


def _reset(ws: Workspace) -> None:
    """The fleet back at version 1: no ledger rows, every simulated stamp at 001."""
    with ws.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM byod_migrations"))
        conn.execute(configs.update().values(schema_version=1))
    with ws.engine.connect() as conn:  # the dead rows gone, as autovacuum keeps a live one
        conn.execution_options(isolation_level="AUTOCOMMIT")
        # the configs analyzed; the ledger only vacuumed (statistics of it empty would
        # plan each page's ledger read as a scan of the whole table once it has grown)
        conn.execute(sa.text("VACUUM ANALYZE byod_configs"))
        conn.execute(sa.text("VACUUM byod_migrations"))
    for uid, version in enumerate(Simulated.versions):
        if version:
            Simulated.versions[uid] = 1


def _runs(values: list[float], digits: int = 0) -> str:
    return ", ".join(f"{v:,.{digits}f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--latency-ms", default="0,40")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--profile", type=int, default=0, metavar="LINES")
    parser.add_argument(
        "--repeat", type=int, default=5, help="rounds (latencies alternating); medians"
    )
    args = parser.parse_args()
    import tempfile

    latencies = [float(ms) for ms in args.latency_ms.split(",")]
    with tempfile.TemporaryDirectory(prefix="byod-bench-scale-") as tmp, control_plane() as url:
        built = time.perf_counter()
        ws = fleet(url, args.users, Path(tmp))
        print(f"fleet built: {args.users:,} users in {time.perf_counter() - built:.1f} s")
        waits: dict[str, list[float]] = {}
        rates = [bookkeeping(ws, args.users, waits) for _ in range(args.repeat)]
        print(
            f"control-plane bookkeeping: {statistics.median(rates):,.0f} users/s "
            f"(median of {args.repeat}: {_runs(rates)})"
        )
        print("  a page of 1,000 users waited on (ms, medians; the rest is the client's CPU):")
        for words, ms in sorted(waits.items(), key=lambda kv: -statistics.median(kv[1])):
            print(f"    {statistics.median(ms):6.1f}  {words}")
        found: dict[float, list[dict[str, float]]] = {ms: [] for ms in latencies}
        profiled = False
        for round_ in range(args.repeat):
            for ms in latencies if round_ % 2 == 0 else list(reversed(latencies)):
                _reset(ws)
                profile = 0 if profiled else args.profile
                profiled = True
                found[ms].append(run(ws, ms / 1000, args.concurrency, profile))
        for ms, figures in found.items():
            med = {key: statistics.median(f[key] for f in figures) for key in figures[0]}
            print(
                f"end to end at {ms:g} ms per instance call, concurrency {args.concurrency}: "
                f"{med['users_per_s']:,.0f} users/s (median of {len(figures)}: "
                f"{_runs([f['users_per_s'] for f in figures])}), "
                f"the fleet of {args.users:,} in {med['seconds']:.1f} s"
            )
            print(f"  runner CPU per user: {med['cpu_ms_per_user']:.3f} ms")
            print(
                f"  control-plane statements per user: {med['statements_per_user']:.3f}, "
                f"waited on per user: {med['waited_ms_per_user']:.3f} ms"
            )
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak memory: {rss:.0f} MB")
        ws.engine.dispose()


if __name__ == "__main__":
    main()
