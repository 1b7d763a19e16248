"""Fleet rollout benchmark: byod vs Alembic-per-instance vs the bare-driver floor.

Builds a fleet at version 1 (100 documents per instance, some with #hashtags), then times
the rollout to head (002_add_tags: two tables and a backfill). Each configuration runs
on an identical fresh fleet, in its own process (so peak RSS is its own), and prints one
JSON line: instances/s, p50 and p99 seconds per instance, peak RSS. A last line gives
the ratios. Run from the repository root:

    .venv/bin/python bench/fleet.py                                  # sqlite, 2,000
    .venv/bin/python bench/fleet.py --backend postgres --latency-ms 5  # 200 databases
    .venv/bin/python bench/fleet.py --at-head 20000                  # a no-op fleet run
    .venv/bin/python bench/fleet.py --distributed --workers 1,2,4    # Celery workers
    .venv/bin/python bench/fleet.py --only floor,byod --repeat 5     # medians of 5

``--distributed`` instead times Celery workers (``byod worker``, Redis broker, PostgreSQL
control plane) with 1, 2 and 4 worker processes sharing the same total concurrency,
against the in-process runner at that concurrency on the same control plane, and counts
the broker round trips per user through a proxy in front of Redis.

Configurations: ``floor`` (sqlite3/psycopg, one transaction per migration, a stamp row,
two small ledger writes, nothing else), ``byod`` (at --concurrency), ``byod-1``
(concurrency 1), ``byod-rehearse`` (the same rollout rehearsed: each user's steps in one
transaction, rolled back) and ``alembic`` (``alembic.command.upgrade`` once per instance, in a
loop, as teams write it: Alembic's ``op`` is a process global, so it cannot be threaded).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proxy import LatencyProxy

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
KEY = base64.b64encode(b"b" * 32).decode()
#: the benchmark's servers listen on loopback, which instances may not use by default
LOCAL_INSTANCES = {"BYOD_INSTANCE_NETWORKS": "127.0.0.0/8,::1/128"}
WORDS = ["alpha", "beta", "gamma", "delta", "notes", "plan", "idea", "todo", "home", "work"]
#: byod-pN: N worker processes instead of threads (for CPU-bound SQLite fleets)
CONFIGS = (
    "floor",
    "byod",
    f"byod-p{(os.cpu_count() or 2) + 1}",
    "byod-1",
    "byod-rehearse",
    "alembic",
)


# -- building the fleet ------------------------------------------------------------------


def _example(name: str) -> Any:
    from byod.registry import Registry
    from byod.settings import bundled_migrations_dir

    migration = Registry.load(bundled_migrations_dir()).get(name)
    assert migration is not None
    return migration


def _documents(seed: int) -> list[dict[str, str]]:
    rows = []
    for n in range(100):
        words = [WORDS[(seed + n * 7 + k) % len(WORDS)] for k in range(12)]
        if n % 3 == 0:
            words += [f"#{WORDS[(seed + n) % len(WORDS)]}", f"#tag{n % 17}"]
        rows.append({"title": f"doc {n}", "body": " ".join(words)})
    return rows


def _build_base(conn: sa.Connection, tool: str) -> None:
    """Version 1 (byod's 001_initial, via Alembic Operations) + 100 documents + a stamp."""
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    initial = _example("001_initial")
    initial.up(SimpleNamespace(conn=conn, op=Operations(MigrationContext.configure(conn))))
    documents = sa.table("documents", sa.column("title"), sa.column("body"))
    conn.execute(documents.insert(), _documents(7))
    if tool == "byod":
        from byod.targets._sql_base import CREATE_STAMP, stamp_table

        conn.execute(CREATE_STAMP)
        conn.execute(
            stamp_table.insert().values(
                id="001_initial", version=1, checksum=initial.checksum, applied_at=sa.func.now()
            )
        )
    elif tool == "alembic":
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO alembic_version VALUES ('r001')"))
    else:
        conn.execute(sa.text("CREATE TABLE floor_stamp (version INTEGER NOT NULL)"))
        conn.execute(sa.text("INSERT INTO floor_stamp VALUES (1)"))


class Fleet:
    """Identical fresh fleets, one per configuration, of SQLite files or PG databases."""

    def __init__(self, backend: str, instances: int, workdir: Path) -> None:
        self.backend = backend
        self.instances = instances
        self.workdir = workdir
        self.templates: dict[str, str] = {}
        self.databases: list[str] = []
        self.admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")

    def template(self, tool: str) -> str:
        if tool in self.templates:
            return self.templates[tool]
        if self.backend == "sqlite":
            path = self.workdir / f"template-{tool}.db"
            engine = sa.create_engine(f"sqlite:///{path}")
            with engine.begin() as conn:
                _build_base(conn, tool)
            engine.dispose()
            self.templates[tool] = str(path)
        else:
            name = f"bench_tpl_{tool}_{uuid.uuid4().hex[:6]}"
            self._create(name, track=False)
            engine = sa.create_engine(sa.make_url(PG_ADMIN).set(database=name))
            with engine.begin() as conn:
                _build_base(conn, tool)
            engine.dispose()
            self.templates[tool] = name
        return self.templates[tool]

    def _create(self, name: str, template: str | None = None, *, track: bool = True) -> None:
        suffix = f' TEMPLATE "{template}"' if template else ""
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"{suffix}'))
        if track:  # templates live for the whole benchmark; the rest per configuration
            self.databases.append(name)

    def make(self, tool: str, config: str, port: int) -> list[str]:
        """Fresh instances for one configuration; returns their URLs (through ``port``)."""
        template = self.template(tool)
        urls = []
        if self.backend == "sqlite":
            folder = self.workdir / config
            folder.mkdir()
            for n in range(self.instances):
                path = folder / f"i{n:05d}.db"
                shutil.copyfile(template, path)
                urls.append(f"sqlite:///{path}")
            return urls
        for n in range(self.instances):
            name = f"bench_{config.replace('-', '_')}_{n:05d}_{uuid.uuid4().hex[:4]}"
            self._create(name, template)
            urls.append(f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}")
        return urls

    def control_plane(self, config: str, port: int, *, server: bool = False) -> tuple[str, str]:
        """(URL for setup on the real port, URL for the run through ``port``); ``server``:
        a PostgreSQL database even for a SQLite fleet (distributed runs need one)."""
        if self.backend == "sqlite" and not server:
            url = f"sqlite:///{self.workdir / f'control-{config}-{uuid.uuid4().hex[:6]}.db'}"
            return url, url
        name = f"bench_cp_{config.replace('-', '_')}_{uuid.uuid4().hex[:6]}"
        self._create(name)
        base = sa.make_url(PG_ADMIN).set(database=name)
        return base.render_as_string(False), base.set(port=port).render_as_string(False)

    def drop_all(self) -> None:
        with self.admin.connect() as conn:
            for name in self.databases:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.databases.clear()


def _byod_control_plane(setup_url: str, urls: list[str], version: int) -> None:
    """Users and sealed configs in bulk, at ``version`` and connected (setup, not timed)."""
    from byod.clock import utcnow
    from byod.controlplane import create_tables, open_engine
    from byod.controlplane.schema import configs, users
    from byod.crypto import Sealer

    engine = open_engine(setup_url)
    create_tables(engine)
    sealer = Sealer(base64.b64decode(KEY))
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            users.insert(),
            [{"id": n + 1, "clerk_id": f"bench-{n}", "created_at": now} for n in range(len(urls))],
        )
        conn.execute(
            configs.insert(),
            [
                {
                    "user_id": n + 1,
                    "target_kind": sa.make_url(url).get_backend_name(),
                    "sealed_url": sealer.seal(url, user_id=n + 1, field_name="url"),
                    "key_id": sealer.key_id,
                    "connection_status": "connected",
                    "schema_version": version,
                    "updated_at": now,
                }
                for n, url in enumerate(urls)
            ],
        )
    engine.dispose()


# -- the configurations (each in a child process) ---------------------------------------


def child_byod(spec: dict[str, Any]) -> list[float]:
    from byod.fleet import UserFinished, migrate_fleet
    from byod.settings import Settings
    from byod.spec import FleetOptions
    from byod.workspace import Workspace

    settings = Settings.load(
        database_url=spec["control_plane"], env={"BYOD_ENCRYPTION_KEY": KEY, **LOCAL_INSTANCES}
    )
    ws = Workspace(settings)
    times: list[float] = []
    began = time.perf_counter()
    span = [float("inf"), 0.0]  # the first user's start, the last one's end

    def seen(event: object) -> None:
        if isinstance(event, UserFinished):
            now = time.perf_counter()
            times.append(event.result.seconds)
            span[0] = min(span[0], now - event.result.seconds)
            span[1] = max(span[1], now)

    options = FleetOptions(concurrency=spec["concurrency"], processes=spec.get("processes", 1))
    sample_to = os.environ.get("BYOD_BENCH_SAMPLE")  # a per-thread profile, to this file
    sampler = None
    if sample_to:
        from _sampler import Sampler

        sampler = Sampler()
        sampler.start()
    # to 002, as the floor and Alembic go (the example app's head has grown since: 003)
    summary = migrate_fleet(
        ws.runner(), options=options, on_event=seen, to_version=2, rehearse=spec["rehearse"]
    )
    ended = time.perf_counter()
    if sampler is not None:
        sampler.stop()
        Path(sample_to).write_text(json.dumps(sampler.top(20), indent=1))
    assert summary.succeeded == len(spec["urls"]), summary.as_dict()
    # the run's fixed cost: before its first user started, after its last one ended
    FIXED.update(before_first_user_s=span[0] - began, after_last_user_s=ended - span[1])
    return times


#: a byod run's fixed cost, for its JSON line
FIXED: dict[str, float] = {}


_ENV_PY = """
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
engine = engine_from_config(
    config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
    poolclass=pool.NullPool,
)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
"""

_REVISION = """
import importlib.util, logging, types
from pathlib import Path
from alembic import op
import byod.settings

revision = "{rev}"
down_revision = {down}
branch_labels = None
depends_on = None


def upgrade():
    path = Path(byod.settings.bundled_migrations_dir()) / "{file}.py"
    spec = importlib.util.spec_from_file_location("bench_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.up(types.SimpleNamespace(op=op, conn=op.get_bind(), log=logging.getLogger("bench")))
"""


def _alembic_scripts(folder: Path) -> Path:
    versions = folder / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    (folder / "env.py").write_text(_ENV_PY)
    (versions / "r001.py").write_text(_REVISION.format(rev="r001", down=None, file="001_initial"))
    (versions / "r002.py").write_text(
        _REVISION.format(rev="r002", down='"r001"', file="002_add_tags")
    )
    return folder


def child_alembic(spec: dict[str, Any]) -> list[float]:
    from alembic import command
    from alembic.config import Config

    times = []
    for url in spec["urls"]:
        started = time.perf_counter()
        config = Config()
        config.set_main_option("script_location", spec["alembic_scripts"])
        config.set_main_option("sqlalchemy.url", url)
        command.upgrade(config, "head")
        times.append(time.perf_counter() - started)
    return times


_HASHTAG = re.compile(r"(?<![\w#])#([A-Za-z][\w-]{0,63})")


def _floor_backfill(cur: Any, placeholder: str) -> None:
    key = "INTEGER PRIMARY KEY" if placeholder == "?" else "SERIAL PRIMARY KEY"
    cur.execute(f"CREATE TABLE tags (id {key}, name VARCHAR(64) NOT NULL UNIQUE)")
    cur.execute(
        "CREATE TABLE document_tags (document_id INTEGER NOT NULL REFERENCES documents (id), "
        "tag_id INTEGER NOT NULL REFERENCES tags (id), PRIMARY KEY (document_id, tag_id))"
    )
    cur.execute("SELECT id, body FROM documents")
    found = {i: {n.lower() for n in _HASHTAG.findall(b or "")} for i, b in cur.fetchall()}
    found = {i: names for i, names in found.items() if names}
    names = sorted(set().union(*found.values())) if found else []
    p = placeholder
    cur.executemany(f"INSERT INTO tags (name) VALUES ({p})", [(n,) for n in names])
    cur.execute("SELECT name, id FROM tags")
    ids = dict(cur.fetchall())
    cur.executemany(
        f"INSERT INTO document_tags (document_id, tag_id) VALUES ({p}, {p})",
        [(d, ids[n]) for d, ns in sorted(found.items()) for n in sorted(ns)],
    )
    cur.execute("UPDATE floor_stamp SET version = 2")


def child_floor(spec: dict[str, Any]) -> list[float]:
    import psycopg

    sqlite = spec["backend"] == "sqlite"
    local = threading.local()
    cp_url = spec["control_plane"]

    def ledger() -> Any:
        if not hasattr(local, "cp"):
            if sqlite:
                local.cp = sqlite3.connect(sa.make_url(cp_url).database, timeout=30)
                local.cp.execute("PRAGMA journal_mode=WAL")
            else:
                u = sa.make_url(cp_url)
                local.cp = psycopg.connect(
                    host=u.host, port=u.port, user=u.username, dbname=u.database, autocommit=True
                )
        return local.cp

    p = "?" if sqlite else "%s"

    def one(n_url: tuple[int, str]) -> float:
        n, url = n_url
        started = time.perf_counter()
        cp = ledger()
        cp.execute(f"INSERT INTO ledger (user_id, status) VALUES ({p}, 'running')", (n,))
        if sqlite:
            cp.commit()
            conn = sqlite3.connect(sa.make_url(url).database, isolation_level=None)
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            _floor_backfill(cur, p)
            cur.execute("COMMIT")
        else:
            u = sa.make_url(url)
            conn = psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database)
            with conn.transaction():
                _floor_backfill(conn.cursor(), p)
        conn.close()
        cp.execute(f"UPDATE ledger SET status = 'completed' WHERE user_id = {p}", (n,))
        if sqlite:
            cp.commit()
        return time.perf_counter() - started

    with ThreadPoolExecutor(spec["concurrency"]) as pool:
        return list(pool.map(one, enumerate(spec["urls"])))


def _floor_control_plane(setup_url: str) -> None:
    engine = sa.create_engine(setup_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE ledger (user_id INTEGER, status VARCHAR(16))"))
    engine.dispose()


def run_child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    runner = {"floor": child_floor, "alembic": child_alembic}.get(spec["tool"], child_byod)
    # imports are not the rollout's cost (start-up has its own figure: overhead.py --startup)
    import alembic.command  # noqa: F401
    import psycopg  # noqa: F401

    import byod.fleet
    import byod.workspace  # noqa: F401

    started = time.perf_counter()
    times = runner(spec)
    elapsed = time.perf_counter() - started
    times.sort()
    print(
        json.dumps(
            {
                "seconds": round(elapsed, 3),
                "p50_ms": round(statistics.median(times) * 1000, 2),
                "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
            | {name: round(value, 3) for name, value in FIXED.items()}
        )
    )


# -- the parent ------------------------------------------------------------------------


def run_config(
    config: str,
    args: argparse.Namespace,
    fleet: Fleet,
    proxy: LatencyProxy | None,
    *,
    server_control_plane: bool = False,
) -> dict[str, Any]:
    tool = "byod" if config.startswith("byod") else config
    port = proxy.port if proxy else 5432
    urls = fleet.make(tool, config, port)
    setup_cp, run_cp = fleet.control_plane(config, port, server=server_control_plane)
    if tool == "byod":
        setup_urls = [re.sub(r":\d+/", ":5432/", u) if proxy else u for u in urls]
        _byod_control_plane(setup_cp, urls, 1)
        assert setup_urls
    elif tool == "floor":
        _floor_control_plane(setup_cp)
    spec = {
        "tool": tool,
        "backend": args.backend,
        "urls": urls,
        "control_plane": run_cp,
        "concurrency": 1 if config in ("byod-1", "alembic") else args.concurrency,
        "processes": int(config[6:]) if config.startswith("byod-p") else 1,
        # the same rollout rehearsed: every step in one transaction, rolled back
        "rehearse": config == "byod-rehearse",
        "alembic_scripts": str(_alembic_scripts(fleet.workdir / "alembic-scripts")),
    }
    spec_path = fleet.workdir / f"spec-{config}.json"
    spec_path.write_text(json.dumps(spec))
    trips_before = proxy.round_trips if proxy else 0
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(spec_path)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
    )
    if done.returncode != 0:
        raise SystemExit(f"{config} failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    line: dict[str, Any] = {
        "config": config,
        "backend": args.backend,
        "instances": len(urls),
        "concurrency": spec["concurrency"],
        "processes": spec["processes"],
        "latency_ms": args.latency_ms,
        "instances_per_s": round(len(urls) / figures["seconds"], 1),
        **figures,
    }
    if proxy:
        line["round_trips_per_instance"] = round((proxy.round_trips - trips_before) / len(urls), 1)
    fleet.drop_all()  # PostgreSQL databases (instances or control plane), if any
    if args.backend == "sqlite":
        shutil.rmtree(fleet.workdir / config)
    return line


def run_distributed(
    workers: int, args: argparse.Namespace, fleet: Fleet, proxy: LatencyProxy | None
) -> dict[str, Any]:
    """``workers`` byod worker processes sharing ``--concurrency``, through a counting
    proxy in front of Redis; timed from the run's start to its end in the control plane."""
    from byod.cli import celery_broker
    from byod.commands import migrate_distributed
    from byod.controlplane import RunStore
    from byod.settings import Settings
    from byod.spec import FleetOptions
    from byod.workspace import Workspace

    config = f"distributed-w{workers}"
    port = proxy.port if proxy else 5432
    urls = fleet.make("byod", config, port)
    setup_cp, run_cp = fleet.control_plane(config, port, server=True)
    _byod_control_plane(setup_cp, urls, 1)
    broker_proxy = LatencyProxy(6379, 0).start()
    env = {
        **os.environ,
        **LOCAL_INSTANCES,
        "BYOD_DATABASE_URL": run_cp,
        "BYOD_ENCRYPTION_KEY": KEY,
        "BYOD_BROKER_URL": f"redis://127.0.0.1:{broker_proxy.port}/0",
        "BYOD_QUEUE": f"bench-{uuid.uuid4().hex[:8]}",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
    }
    per_worker = max(1, args.concurrency // workers)
    processes = _start_workers(workers, per_worker, env, fleet.workdir / config)
    # the starter and its polling use the real port: the proxy counts the workers' trips
    ws = Workspace(Settings.load(env={**env, "BYOD_DATABASE_URL": setup_cp}), broker=celery_broker)
    store = RunStore(ws.engine)
    trips_before, pg_before = broker_proxy.round_trips, proxy.round_trips if proxy else 0
    started = time.perf_counter()
    # the cap on tasks in flight: enough queued that no worker waits for the next top-up
    run_id = migrate_distributed(ws, options=FleetOptions(concurrency=4 * args.concurrency))
    while store.get(run_id).ended_at is None:
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    trips = broker_proxy.round_trips - trips_before
    record = store.get(run_id)
    assert record.counts.succeeded == len(urls), record
    with ws.engine.connect() as conn:
        times = sorted(
            conn.execute(
                sa.text("SELECT seconds FROM byod_run_tasks WHERE run_id = :r"), {"r": run_id}
            ).scalars()
        )
    _stop_workers(processes, env["BYOD_QUEUE"])
    ws.engine.dispose()
    broker_proxy.stop()
    line: dict[str, Any] = {
        "config": config,
        "backend": args.backend,
        "instances": len(urls),
        "workers": workers,
        "concurrency": per_worker * workers,
        "latency_ms": args.latency_ms,
        "instances_per_s": round(len(urls) / elapsed, 1),
        "seconds": round(elapsed, 3),
        "p50_ms": round(statistics.median(times) * 1000, 2),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 2),
        "broker_round_trips_per_user": round(trips / len(urls), 2),
        "peak_rss_mb_worst_worker": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
        ),
    }
    if proxy:
        line["pg_round_trips_per_instance"] = round((proxy.round_trips - pg_before) / len(urls), 1)
    fleet.drop_all()  # PostgreSQL databases (instances or control plane)
    if args.backend == "sqlite":
        shutil.rmtree(fleet.workdir / config)
    return line


def _start_workers(
    workers: int, per_worker: int, env: dict[str, str], logs: Path
) -> list[subprocess.Popen[bytes]]:
    """``workers`` real ``byod worker`` processes, returned once each says it is ready."""
    paths = [Path(f"{logs}-worker-{n}.log") for n in range(workers)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "byod", "worker", "--concurrency", str(per_worker)],
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for log in paths
    ]
    for log in paths:  # started together, each ready before the clock starts
        while b"ready." not in log.read_bytes():
            time.sleep(0.1)
    return processes


def _stop_workers(processes: list[subprocess.Popen[bytes]], queue: str) -> None:
    """Stop the workers and remove their queue from Redis."""
    import redis

    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(60)
    redis.Redis().delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


def at_head(args: argparse.Namespace, workdir: Path) -> None:
    """A fleet already at head: `byod migrate --all` must touch no instance at all."""
    url = f"sqlite:///{workdir / 'control-at-head.db'}"
    from byod.registry import Registry
    from byod.settings import bundled_migrations_dir

    head = Registry.load(bundled_migrations_dir()).head  # the migrations the command uses
    missing = [f"sqlite:///{workdir / 'nowhere' / f'{n}.db'}" for n in range(args.at_head)]
    _byod_control_plane(url, missing, head)  # instances that do not even exist
    env = {**os.environ, **LOCAL_INSTANCES, "BYOD_DATABASE_URL": url, "BYOD_ENCRYPTION_KEY": KEY}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "byod", "migrate", "--all", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    elapsed = time.perf_counter() - started
    summary = json.loads(done.stdout.strip().splitlines()[-1])["summary"]
    print(
        json.dumps(
            {
                "config": "byod migrate --all, fleet at head",
                "instances": args.at_head,
                "seconds_whole_command": round(elapsed, 3),
                "exit": done.returncode,
                "total_selected": summary["total"],
            }
        )
    )


def distributed(args: argparse.Namespace, fleet: Fleet, proxy: LatencyProxy | None) -> None:
    """In-process at --concurrency (PostgreSQL control plane), then 1, 2, 4... workers."""
    inline = run_config("byod", args, fleet, proxy, server_control_plane=True)
    inline["config"] = "in-process (PostgreSQL control plane)"
    print(json.dumps(inline), flush=True)
    rates = {}
    for workers in (int(n) for n in args.workers.split(",")):
        line = run_distributed(workers, args, fleet, proxy)
        rates[workers] = line["instances_per_s"]
        print(json.dumps(line), flush=True)
    base = inline["instances_per_s"]
    ratios = {f"w{n}_vs_in_process": round(rate / base, 2) for n, rate in rates.items()}
    print(json.dumps({"ratios": ratios}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--instances", type=int)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--only", default=",".join(CONFIGS))
    parser.add_argument("--at-head", type=int, default=0)
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--child")
    parser.add_argument("--repeat", type=int, default=1, help="rounds (order alternating); medians")
    args = parser.parse_args()
    if args.child:
        run_child(args.child)
        return
    workdir = Path(tempfile.mkdtemp(prefix="byod-bench-"))
    try:
        if args.at_head:
            at_head(args, workdir)
            return
        args.instances = args.instances or (2000 if args.backend == "sqlite" else 200)
        proxy = None
        if args.latency_ms and args.backend == "postgres":
            proxy = LatencyProxy(5432, args.latency_ms).start()
        fleet = Fleet(args.backend, args.instances, workdir)
        lines = {}
        try:
            if args.distributed:
                distributed(args, fleet, proxy)
                return
            configs = args.only.split(",")
            runs: dict[str, list[dict[str, Any]]] = {config: [] for config in configs}
            for round_ in range(args.repeat):
                for config in configs if round_ % 2 == 0 else reversed(configs):
                    line = run_config(config, args, fleet, proxy)
                    runs[config].append(line)
                    print(json.dumps(line), flush=True)
            lines = {config: _median_of(found) for config, found in runs.items()}
            if args.repeat > 1:
                for line in lines.values():
                    print(json.dumps({"median_of": args.repeat, **line}), flush=True)
        finally:
            if args.backend == "postgres" or args.distributed:
                fleet.templates.clear()
                fleet.drop_all()
                with fleet.admin.connect() as conn:
                    for name in conn.execute(
                        sa.text("SELECT datname FROM pg_database WHERE datname LIKE 'bench_%'")
                    ).scalars():
                        conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        print(json.dumps({"ratios": _ratios(lines, args, proxy)}))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _median_of(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's runs as one line: each number its median."""
    merged = dict(lines[0])
    for key, value in lines[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            merged[key] = round(statistics.median(line[key] for line in lines), 3)
    return merged


def _ratios(
    lines: dict[str, dict[str, Any]], args: argparse.Namespace, proxy: LatencyProxy | None
) -> dict[str, Any]:
    """byod against Alembic, the floor and its own bound; a rehearsal against the run."""
    rate = {c: line["instances_per_s"] for c, line in lines.items()}
    ratios: dict[str, Any] = {}
    for config in (c for c in rate if c.startswith("byod")):
        if "alembic" in rate:
            ratios[f"{config}_vs_alembic"] = round(rate[config] / rate["alembic"], 2)
        if "floor" in rate:
            ratios[f"{config}_vs_floor"] = round(rate[config] / rate["floor"], 3)
    if "byod-rehearse" in rate and "byod" in rate:  # how much longer a rehearsal takes
        ratios["rehearse_seconds_vs_byod"] = round(rate["byod"] / rate["byod-rehearse"], 2)
    if proxy and "byod" in lines:
        trips = lines["byod"]["round_trips_per_instance"]
        bound = args.concurrency / (trips * args.latency_ms / 1000)
        ratios["byod_bound_instances_per_s"] = round(bound, 1)
        ratios["byod_vs_bound"] = round(rate["byod"] / bound, 3)
    return ratios


if __name__ == "__main__":
    main()
