"""A fault soak: real rollouts of a mixed fleet with faults injected at random moments from
a seed, and every invariant checked from the instances' own data and the control plane
after each settle.

The fleet: SQLite files, PostgreSQL databases (through a proxy that can be cut) and
MariaDB databases, on a PostgreSQL control plane reached through a proxy of its own. The
chain: ``001_tables`` (applied before the soak), ``002_count`` (a non-idempotent counter),
``003_bump`` (its counter, then a backfill adding 1 to every row, then its finalize),
``004_count`` and ``005_contract`` (gated: it waits until the soak opens its gate). Each
``up`` adds 1 to its migration's ``ups`` counter inside the step, each ``down`` 1 to its
``downs``: on every instance ``ups - downs`` must equal 1 exactly where the stamp says the
step is applied, else 0, and every row's ``n`` 1 exactly where ``003_bump`` is applied.

Beside it, a Convex fleet (``--convex N``, :mod:`_soak_convex`): local deployments of
byod's example app on a control plane of their own, checked from their own documents.

The schedule, drawn from ``--seed``: runs (``byod migrate --all`` on threads, on
``--processes 2``, on Celery workers over a private Redis or the machine's RabbitMQ;
rollbacks of an earlier run; rehearsals; two runs at once; the Convex fleet forward or
back beside each), each with one to three faults at random moments, overlapping, or
none: ``kill -9`` or SIGINT of a runner, a Celery worker killed, the broker restarted
(RabbitMQ: its connections cut), the control plane cut, a PostgreSQL instance's server
cut or slowed, SQLite writes past a file size limit (a full disk), a 429 storm on the
Convex deployments. After each, the soak
settles: faults healed, leases left to lapse, the rollback or ``byod migrate --all`` again
until it is done, then the checker runs.

    .venv/bin/python bench/soak.py --minutes 10 --seed 1     # a fixed schedule
    .venv/bin/python bench/soak.py --minutes 10              # a random seed (printed)
    .venv/bin/python bench/soak.py --minutes 2 --sqlite 24 --postgres 6 --mysql 4

Prints a report (faults by kind, runs, steps applied, checks passed, the longest time a
user waited to be free again after a fault) and writes it as JSON (``--report``). On a
violation it prints the seed and the fault history: ``--seed`` replays the schedule.
Exit status: 0 every invariant held, 1 a violation.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _soak_convex import TOP as CONVEX_TOP  # noqa: E402
from _soak_convex import ConvexFleet  # noqa: E402
from tests.tcp_proxy import CuttableProxy  # noqa: E402

from byod.targets.dialects import STAMP_TABLE  # noqa: E402

PG = os.environ.get("BYOD_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
MYSQL = os.environ.get("BYOD_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/mysql")
BYOD = str(Path(sys.executable).with_name("byod"))
HEAD = 5
GATED = "005_contract"
ROWS = 120  # rows per instance: the backfill walks them in batches of 25
COUNTED = ("002_count", "003_bump", "004_count", "005_contract")
#: the kinds of forward round, drawn evenly (the common ones twice)
ROUNDS = ("threads", "threads", "processes", "distributed", "distributed", "rehearse", "two")
REDIS_FLAGS = ("--save", "", "--appendonly", "no")
AMQP_PORT = 5672  # the machine's RabbitMQ, shared: the soak cuts a proxy, never the server
BROKERS = ("redis", "rabbitmq")
#: how many faults a round draws (duplicates fall away): one, often two or three
FAULTS_PER_ROUND = (1, 1, 2, 3)
#: every fault the soak injects (``worker_kill9`` and ``broker_restart`` in distributed
#: rounds only, ``convex_429`` with a Convex fleet only)
FAULTS = (
    "none", "kill9", "sigint", "cp_cut", "instance_cut", "instance_slow", "disk_full",
    "convex_429", "worker_kill9", "broker_restart",
)  # fmt: skip
#: secrets that must never show in a log, a message or the ledger
PG_PASSWORD = "soak-pg-" + secrets.token_hex(6)
MYSQL_PASSWORD = "soak-my-" + secrets.token_hex(6)

MIGRATIONS = {
    "001_tables.py": """
        import sqlalchemy as sa
        from byod import Migration

        COUNTED = ("002_count", "003_bump", "004_count", "005_contract")

        def up(ctx):
            ctx.op.create_table(
                "items",
                sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
                sa.Column("n", sa.Integer, nullable=False),
            )
            ctx.op.create_table(
                "counts",
                sa.Column("name", sa.String(40), primary_key=True),
                sa.Column("ups", sa.Integer, nullable=False),
                sa.Column("downs", sa.Integer, nullable=False),
            )
            ctx.op.bulk_insert(
                sa.table("items", sa.column("id"), sa.column("n")),
                [{"id": i, "n": 0} for i in range(1, ROWS + 1)],
            )
            ctx.op.bulk_insert(
                sa.table("counts", sa.column("name"), sa.column("ups"), sa.column("downs")),
                [{"name": name, "ups": 0, "downs": 0} for name in COUNTED],
            )

        migration = Migration(id="001_tables", version=1, name="Tables", description="", up=up)
    """,
    "002_count.py": """
        from byod import Migration
        from soak_steps import count

        migration = Migration(id="002_count", version=2, name="Count", description="",
                              up=count("002_count", "ups"), down=count("002_count", "downs"))
    """,
    "003_bump.py": """
        import sqlalchemy as sa
        from byod import Backfill, Migration
        from soak_steps import count

        def bump(ctx, rows):
            ids = [row[0] for row in rows]
            ctx.conn.execute(
                sa.text("UPDATE items SET n = n + 1 WHERE id IN :ids").bindparams(
                    sa.bindparam("ids", expanding=True)
                ),
                {"ids": ids},
            )

        def down(ctx):
            ctx.conn.execute(sa.text("UPDATE items SET n = n - 1"))
            count("003_bump", "downs")(ctx)

        migration = Migration(
            id="003_bump", version=3, name="Bump", description="",
            up=count("003_bump", "ups"), down=down,
            backfills=[Backfill(table="items", key="id", apply=bump, batch_size=25)],
        )
    """,
    "004_count.py": """
        from byod import Migration
        from soak_steps import count

        migration = Migration(id="004_count", version=4, name="Count", description="",
                              up=count("004_count", "ups"), down=count("004_count", "downs"))
    """,
    "005_contract.py": """
        from byod import Migration
        from soak_steps import count

        migration = Migration(id="005_contract", version=5, name="Contract", description="",
                              up=count("005_contract", "ups"), down=count("005_contract", "downs"),
                              gated=True)
    """,
}
STEPS_MODULE = """
import os
import time

import sqlalchemy as sa


def count(name, column):
    def step(ctx):
        ctx.conn.execute(
            sa.text(f"UPDATE counts SET {column} = {column} + 1 WHERE name = :name"),
            {"name": name},
        )
        time.sleep(float(os.environ.get("SOAK_STEP_SECONDS", "0")))  # a window for faults

    return step
"""


@dataclass
class Fault:
    """One fault injected: what, into which run, when (seconds into the soak), how long."""

    kind: str
    run: int
    at: float
    seconds: float = 0.0
    note: str = ""


@dataclass
class Report:
    """What the soak did and found."""

    seed: int
    minutes: float
    instances: dict[str, int]
    runs: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    steps_applied: int = 0
    steps_undone: int = 0
    checks_passed: int = 0
    settles: int = 0
    longest_recovery_seconds: float = 0.0
    convex_429s_answered: int = 0
    settle_seconds: list[float] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    history: list[Fault] = field(default_factory=list)


class Soak:
    """The fleet, its servers and proxies, the schedule and the checker."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.folder = Path(tempfile.mkdtemp(prefix=f"byod-soak-{args.seed}-"))
        self.logs = self.folder / "logs"
        self.logs.mkdir()
        self.tag = f"byod_soak_{secrets.token_hex(4)}"
        self.report = Report(
            seed=args.seed,
            minutes=args.minutes,
            instances={
                "sqlite": args.sqlite,
                "postgresql": args.postgres,
                "mysql": args.mysql,
                "convex": args.convex,
            },
        )
        self.started = time.monotonic()
        self.pg_proxy = CuttableProxy(5432)  # the instances' PostgreSQL server
        self.cp_proxy = CuttableProxy(5432)  # the control plane's
        self.amqp_proxy = CuttableProxy(AMQP_PORT)  # RabbitMQ, as the workers reach it
        self.redis_port = _free_port()
        self.redis: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, list[subprocess.Popen[bytes]]] = {b: [] for b in BROKERS}
        self.pg_dbs: list[str] = []
        self.my_dbs: list[str] = []
        self.sqlite_files: list[Path] = []
        self.gate_open = False
        self.log_count = 0
        self.key = base64.b64encode(os.urandom(32)).decode()
        self.cp_db = f"{self.tag}_cp"
        self.cp_url = f"postgresql+psycopg://postgres@127.0.0.1:{self.cp_proxy.port}/{self.cp_db}"
        self.cp = sa.create_engine(
            f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.cp_db}", poolclass=sa.NullPool
        )
        self.convex = (
            ConvexFleet(
                self.folder,
                self.tag,
                self.cp_proxy.port,
                args.convex,
                args.convex_documents,
                random.Random(args.seed + 1),
            )
            if args.convex
            else None
        )
        self.convex_undoing: str | None = None

    # -- set-up and tear-down ----------------------------------------------------------

    def broker_env(self, broker: str) -> dict[str, str]:
        """The settings that put a byod process on ``broker``: the private Redis, or the
        machine's RabbitMQ through the soak's proxy on a queue of the soak's own."""
        if broker == "redis":
            return {}
        url = f"amqp://guest:guest@127.0.0.1:{self.amqp_proxy.port}//"
        return {"BYOD_BROKER_URL": url, "BYOD_QUEUE": self.tag}

    def env(self, **extra: str) -> dict[str, str]:
        """A byod process's environment: the soak's control plane, key, migrations."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("BYOD_")}
        return (
            base
            | {
                "BYOD_DATABASE_URL": self.cp_url,
                "BYOD_ENCRYPTION_KEY": self.key,
                "BYOD_MIGRATIONS": str(self.folder / "migrations"),
                "BYOD_ALLOW_PRIVATE_INSTANCES": "1",
                "BYOD_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "PYTHONPATH": str(self.folder / "lib"),  # soak_steps: a team's own helpers
                "SOAK_STEP_SECONDS": str(self.args.step_seconds),
                "ROWS": str(ROWS),
            }
            | extra
        )

    def setup(self) -> None:
        """The servers' databases, the migrations, the fleet connected at version 1."""
        _admin(PG, f'CREATE DATABASE "{self.cp_db}"')
        _admin(MYSQL, f"CREATE USER '{self.tag}'@'%%' IDENTIFIED BY '{MYSQL_PASSWORD}'")
        migrations = self.folder / "migrations"
        migrations.mkdir()
        for name, text in MIGRATIONS.items():
            body = textwrap.dedent(text).replace("ROWS + 1", f"{ROWS} + 1")
            (migrations / name).write_text(body)
        (self.folder / "lib").mkdir()
        (self.folder / "lib" / "soak_steps.py").write_text(STEPS_MODULE)
        rows = []
        for n in range(self.args.sqlite):
            path = self.folder / "instances" / f"s{n:03d}.db"
            path.parent.mkdir(exist_ok=True)
            sqlite3.connect(path).close()
            self.sqlite_files.append(path)
            rows.append({"clerk_id": f"sqlite-{n:03d}", "url": f"sqlite:///{path}"})
        for n in range(self.args.postgres):
            name = f"{self.tag}_pg{n:03d}"
            _admin(PG, f'CREATE DATABASE "{name}"')
            self.pg_dbs.append(name)
            url = f"postgresql://postgres:{PG_PASSWORD}@127.0.0.1:{self.pg_proxy.port}/{name}"
            rows.append({"clerk_id": f"pg-{n:03d}", "url": url})
        for n in range(self.args.mysql):
            name = f"{self.tag}_my{n:03d}"
            _admin(MYSQL, f"CREATE DATABASE `{name}`")
            _admin(MYSQL, f"GRANT ALL ON `{name}`.* TO '{self.tag}'@'%%'")
            self.my_dbs.append(name)
            url = f"mysql://{self.tag}:{MYSQL_PASSWORD}@127.0.0.1:3306/{name}"
            rows.append({"clerk_id": f"my-{n:03d}", "url": url})
        users = self.folder / "users.jsonl"
        users.write_text("".join(json.dumps(r) + "\n" for r in rows))
        users.chmod(0o600)
        self.byod("init")
        self.byod("users", "import", str(users))
        self.byod("connect", "--check", "--all")
        self.start_redis()
        for broker in BROKERS:
            self.start_workers(broker, 2)
        done = self.byod("migrate", "--all", "--to", "1", "--concurrency", "16", check=False)
        if done.returncode != 0 or not self.all_at(1):
            raise SystemExit(f"the fleet did not reach version 1: {done.stdout[-2000:]}")
        if self.convex is not None:
            _admin(PG, f'CREATE DATABASE "{self.convex.cp_db}"')
            users = self.convex.start()
            extra = self.convex.env()
            self.byod("init", extra=extra)
            self.byod("users", "import", str(users), extra=extra)
            self.byod("connect", "--check", "--all", extra=extra)
            done = self.byod("migrate", "--all", "--to", "1", check=False, extra=extra)
            if done.returncode != 0 or not _all_at(self.convex.cp, 1, self.convex.count):
                raise SystemExit(f"the Convex fleet did not reach 1: {done.stdout[-2000:]}")

    def teardown(self) -> None:
        """Stop every process, drop every database the soak made (kept, with the folder,
        after a violation, to look at)."""
        for worker in [w for workers in self.workers.values() for w in workers]:
            _stop(worker)
        if self.redis is not None:
            _stop(self.redis)
        if self.convex is not None:
            self.convex.close()
        self.cp.dispose()
        self.pg_proxy.close()
        self.cp_proxy.close()
        self.amqp_proxy.close()
        _delete_amqp_queue(self.tag)
        if self.report.violations:
            print(f"kept for a look: {self.folder}, control plane {self.cp_db}")
            return
        convex_db = [self.convex.cp_db] if self.convex is not None else []
        for name in [self.cp_db, *convex_db, *self.pg_dbs]:
            _admin(PG, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        for name in self.my_dbs:
            _admin(MYSQL, f"DROP DATABASE IF EXISTS `{name}`")
        _admin(MYSQL, f"DROP USER IF EXISTS '{self.tag}'@'%%'")
        if not self.args.keep:
            shutil.rmtree(self.folder, ignore_errors=True)

    def start_redis(self) -> None:
        """A private Redis (the broker): the soak may restart it."""
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", *REDIS_FLAGS],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.redis_port)

    def start_workers(self, broker: str, count: int) -> None:
        """``count`` more ``byod worker`` processes on ``broker``."""
        for _ in range(count):
            self.log_count += 1
            log = (self.logs / f"worker-{broker}-{self.log_count}.log").open("wb")
            self.workers[broker].append(
                subprocess.Popen(
                    [BYOD, "worker", "--concurrency", "2"],
                    env=self.env(**self.broker_env(broker)),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def byod(
        self, *args: str, check: bool = True, extra: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a byod command to its end (its output kept in the logs), with the settings
        ``extra`` adds."""
        self.log_count += 1
        done = subprocess.run(
            [BYOD, *args],
            env=self.env(**(extra or {})),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        (self.logs / f"{self.log_count:04d}-{args[0]}.log").write_text(
            f"$ byod {' '.join(args)}\n{done.stdout}\n{done.stderr}\nexit {done.returncode}\n"
        )
        if check and done.returncode != 0:
            raise SystemExit(f"byod {' '.join(args)} failed: {done.stderr[-2000:]}")
        return done

    # -- the schedule --------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.started

    def run(self) -> Report:
        """Rounds until the time is up, a settle and the checks after each; a final
        settle to head (every user at the target) at the end."""
        deadline = self.args.minutes * 60
        number = 0
        while self.now() < deadline and number < self.args.max_runs:
            number += 1
            undoing = self.one_round(number)
            self.settle(number, undoing)
            if self.report.violations:
                break
        if not self.report.violations:
            self.convex_undoing = None
            self.settle(number + 1, None)
        return self.report

    def one_round(self, number: int) -> str | None:
        """A round: the fleet at the top is rolled back (the last run that moved users
        undone), else moved forward (threads, processes, workers on Redis or RabbitMQ,
        two runs at once, a rehearsal); the Convex fleet likewise beside it; with one to
        three faults at random moments, overlapping, or none. Returns the run undone."""
        undoing = self.last_forward_run(self.cp) if self.all_at(self.expected()) else None
        kind = "rollback" if undoing else self.rng.choice(self.args.rounds or ROUNDS)
        commands = self.commands_for(kind, undoing)
        if kind == "distributed":
            kind += "-rabbitmq" if "BYOD_QUEUE" in commands[0][1] else "-redis"
        _bump(self.report.runs, kind)
        if self.convex is not None:
            commands.append(self.convex_command())
        drawn = self.rng.choice(FAULTS_PER_ROUND)
        faults = list(dict.fromkeys(self.rng.choice(self.faults_for(kind)) for _ in range(drawn)))
        limit_files = "disk_full" in faults
        processes = [self.start(args, extra, limit_files=limit_files) for args, extra in commands]
        lasting: list[threading.Timer] = []  # cuts and slows end on their own, overlapping
        for fault in faults:
            time.sleep(self.rng.uniform(0.1, 2.0))
            if fault != "none":
                lasting += self.inject(fault, number, processes, kind)
        for process in processes:
            try:
                process.wait(timeout=self.args.hang_seconds)
            except subprocess.TimeoutExpired:
                self.violation(
                    f"run {number}: a byod process did not end in {self.args.hang_seconds} s"
                )
                self.dump_state(number)
                _stop(process)
        for timer in lasting:
            timer.join()
        return undoing

    def convex_command(self) -> tuple[list[str], dict[str, str]]:
        """The Convex fleet's part of a round: the rollback of its last forward run when
        it is at the top, else a forward run."""
        assert self.convex is not None
        lease = ["--lease-seconds", str(self.args.lease_seconds)]
        at_top = _all_at(self.convex.cp, CONVEX_TOP, self.convex.count)
        self.convex_undoing = self.last_forward_run(self.convex.cp) if at_top else None
        _bump(self.report.runs, "convex-rollback" if self.convex_undoing else "convex-migrate")
        if self.convex_undoing is not None:
            args = ["rollback", "--run", self.convex_undoing, *lease]
        else:
            args = ["migrate", "--all", "--retries", "1", "--timeout", "30", *lease]
        return args, self.convex.env()

    def dump_state(self, number: int) -> None:
        """The control plane's runs, tasks and leases as they are, into the logs."""
        with self.cp.connect() as conn:
            state = {
                table: [dict(r) for r in conn.execute(sa.text(query)).mappings()]
                for table, query in (
                    ("runs", "SELECT * FROM byod_runs WHERE state = 'running'"),
                    ("tasks", "SELECT * FROM byod_run_tasks WHERE state <> 'done'"),
                    (
                        "leases",
                        "SELECT user_id, lease_owner, lease_expires_at, schema_version "
                        "FROM byod_configs WHERE lease_owner IS NOT NULL",
                    ),
                    ("now", "SELECT now() AT TIME ZONE 'utc' AS now"),
                )
            }
        path = self.logs / f"state-after-run-{number}.json"
        path.write_text(json.dumps(state, indent=1, default=str))

    @staticmethod
    def last_forward_run(engine: sa.Engine) -> str | None:
        """The latest migrate run that moved users (its ledger rows, as byod counts what a
        run moved: a killed run's counts may fall short) and no rollback undid yet; never
        the set-up's run from version 0 (the first step has no ``down``)."""
        with engine.connect() as conn:
            found: str | None = conn.execute(
                sa.text(
                    "SELECT r.id FROM byod_runs r WHERE r.kind = 'migrate' "
                    "AND r.id NOT IN (SELECT undoes FROM byod_runs WHERE undoes IS NOT NULL) "
                    "AND EXISTS (SELECT 1 FROM byod_migrations m WHERE m.run_id = r.id "
                    "AND m.direction = 'up' AND m.status = 'completed') "
                    "AND NOT EXISTS (SELECT 1 FROM byod_migrations m WHERE m.run_id = r.id "
                    "AND m.direction = 'up' AND m.version = 1) "
                    "ORDER BY r.started_at DESC LIMIT 1"
                )
            ).scalar()
        return found

    def commands_for(
        self, kind: str, undoing: str | None
    ) -> list[tuple[list[str], dict[str, str]]]:
        """The byod command lines of a round, each with the settings it adds."""
        lease = ["--lease-seconds", str(self.args.lease_seconds)]
        if undoing is not None:
            return [(["rollback", "--run", undoing, *lease], {})]
        forward = ["migrate", "--all", "--retries", "1", "--timeout", "30", *lease]
        if kind == "processes":
            return [([*forward, "--processes", "2"], {})]
        if kind == "distributed":
            broker = self.rng.choice(self.args.brokers)
            return [([*forward, "--distributed", "--concurrency", "16"], self.broker_env(broker))]
        if kind == "rehearse":
            return [(["migrate", "--all", "--rehearse", "--rehearse-skip-unsupported", *lease], {})]
        if kind == "two":
            return [([*forward, "--concurrency", "4"], {}), ([*forward, "--concurrency", "4"], {})]
        return [([*forward, "--concurrency", "8"], {})]

    def faults_for(self, kind: str) -> list[str]:
        common = ["none", "kill9", "sigint", "cp_cut", "instance_cut", "instance_slow"]
        common.append("disk_full")
        if self.convex is not None:
            common.append("convex_429")
        if kind.startswith("distributed"):
            common += ["worker_kill9", "broker_restart"]
        chosen = [f for f in common if not self.args.faults or f in self.args.faults]
        return chosen or ["none"]

    def start(
        self, args: list[str], extra: dict[str, str], *, limit_files: bool
    ) -> subprocess.Popen[str]:
        """A byod command in the background, its own process group; its output goes
        through a pipe (a file size limit must not reach its log) to its log file."""
        self.log_count += 1
        log = (self.logs / f"{self.log_count:04d}-{args[0]}.log").open("w")
        log.write(f"$ byod {' '.join(args)}\n")
        log.flush()

        def limits() -> None:
            if limit_files:  # every SQLite write past 8 KB fails: a full disk
                resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

        process = subprocess.Popen(
            [BYOD, *args],
            env=self.env(**extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=limits,  # noqa: PLW1509 - only setrlimit, before exec
        )

        def drain() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
            log.close()

        threading.Thread(target=drain, daemon=True).start()
        return process

    def inject(
        self, fault: str, number: int, processes: list[subprocess.Popen[str]], kind: str
    ) -> list[threading.Timer]:
        """Do the fault now; record it. A cut, a slow or a broker down lasts 0.5 to 4 s
        while the round goes on: its end (a timer, returned) heals it."""
        record = Fault(fault, number, round(self.now(), 2))
        victim = self.rng.choice(processes)
        rabbit = kind == "distributed-rabbitmq"
        _bump(self.report.faults, fault)
        self.report.history.append(record)
        if fault == "kill9":
            _signal_group(victim, signal.SIGKILL)
        elif fault == "sigint":
            _signal_group(victim, signal.SIGINT)
        elif fault == "worker_kill9":
            alive = [w for w in self.workers["rabbitmq" if rabbit else "redis"] if w.poll() is None]
            if alive:
                _signal_group(self.rng.choice(alive), signal.SIGKILL)
        elif fault == "convex_429" and self.convex is not None:
            record.note = self.convex.storm()
        elif fault in ("cp_cut", "instance_cut", "broker_restart", "instance_slow"):
            record.seconds = round(self.rng.uniform(0.5, 4.0), 2)
            undo = self.start_lasting(fault, record, rabbit)
            timer = threading.Timer(record.seconds, undo)
            timer.start()
            return [timer]
        # disk_full was set when the runner started
        return []

    def start_lasting(self, fault: str, record: Fault, rabbit: bool) -> Callable[[], None]:
        """Begin a fault that lasts; what ends it."""
        if fault == "cp_cut":
            self.cp_proxy.cut()
            return self.cp_proxy.restore
        if fault == "instance_cut":
            self.pg_proxy.cut()
            return self.pg_proxy.restore
        if fault == "instance_slow":
            delay = self.rng.uniform(0.02, 0.3)
            record.note = f"{delay * 1000:.0f} ms a chunk"
            self.pg_proxy.slow(delay)
            if self.convex is not None:
                self.convex.slow(delay * 1000)

            def fast_again() -> None:
                self.pg_proxy.slow(0)
                if self.convex is not None:
                    self.convex.slow(0)

            return fast_again
        if rabbit:  # the machine's RabbitMQ is shared: its connections are cut
            self.amqp_proxy.cut()
            return self.amqp_proxy.restore
        if self.redis is not None:
            _stop(self.redis, signal.SIGKILL)
        return self.start_redis

    def heal(self) -> None:
        """Every proxy forwarding again at once, the broker up, no Convex deployment slowed
        or throttled (the 429s its storms got answered are counted)."""
        self.cp_proxy.restore()
        self.pg_proxy.restore()
        self.pg_proxy.slow(0)
        self.amqp_proxy.restore()
        if self.convex is not None:
            self.convex.heal()
            self.report.convex_429s_answered = self.convex.answered_429
        if self.redis is None or self.redis.poll() is not None:
            self.start_redis()

    # -- settling and checking -----------------------------------------------------------

    def settle(self, number: int, undoing: str | None) -> None:
        """Heal every fault, then finish the round's work: the rollback of ``undoing``
        again until it exits 0, else ``byod migrate --all`` until every user is at the
        top (the Convex fleet's likewise); then check. Also opens the gate now and then,
        as an operator would."""
        began = time.monotonic()
        self.heal()
        for broker, workers in self.workers.items():
            self.workers[broker] = [w for w in workers if w.poll() is None]
            self.start_workers(broker, 2 - len(self.workers[broker]))
        if not self.settle_fleet(undoing, {}, lambda: self.all_at(self.expected())):
            self.violation(f"after run {number}: the fleet did not settle")
        if self.convex is not None:
            fleet = self.convex

            def convex_at_top() -> bool:
                return _all_at(fleet.cp, CONVEX_TOP, fleet.count)

            if not self.settle_fleet(self.convex_undoing, fleet.env(), convex_at_top):
                self.violation(f"after run {number}: the Convex fleet did not settle")
        waited = time.monotonic() - began
        self.report.longest_recovery_seconds = max(self.report.longest_recovery_seconds, waited)
        self.report.settle_seconds.append(round(waited, 1))
        self.report.settles += 1
        self.check(number, at_top=undoing is None)
        if self.convex is not None:
            where = f"after run {number}"
            self.convex.check(
                where,
                self.expect,
                at_top=self.convex_undoing is None,
                lease_seconds=self.args.lease_seconds,
            )
        if undoing is None and not self.gate_open and self.rng.random() < 0.3:
            self.gate_open = self.byod("gate", "open", GATED, check=False).returncode == 0

    def settle_fleet(
        self, undoing: str | None, extra: dict[str, str], at_top: Callable[[], bool]
    ) -> bool:
        """The rollback of ``undoing`` again until it exits 0 with no user busy (a dead
        runner's leases are not failures), else ``migrate --all`` until ``at_top``."""
        lease = ["--lease-seconds", str(self.args.lease_seconds)]
        for attempt in range(1, 30):
            if undoing is not None:
                args = ["rollback", "--run", undoing, "--retries", "2", "--json", *lease]
                done = self.byod(*args, check=False, extra=extra)
                if done.returncode == 0 and _summary(done.stdout).get("busy") == 0:
                    return True
            else:
                done = self.byod(
                    "migrate", "--all", "--retries", "2", *lease, check=False, extra=extra
                )
                if done.returncode == 0 and at_top():
                    return True
            time.sleep(min(self.args.lease_seconds, 0.5 * attempt))
        return False

    def expected(self) -> int:
        """Where a settled fleet stands: the gated step waits for its gate."""
        return HEAD if self.gate_open else HEAD - 1

    def all_at(self, version: int) -> bool:
        """Every user connected at ``version``, as the control plane says."""
        return _all_at(self.cp, version, self.fleet_size())

    def fleet_size(self) -> int:
        return self.args.sqlite + self.args.postgres + self.args.mysql

    def instances(self) -> list[tuple[str, sa.Engine]]:
        engines = [
            (f"sqlite-{n:03d}", sa.create_engine(f"sqlite:///{p}", poolclass=sa.NullPool))
            for n, p in enumerate(self.sqlite_files)
        ]
        engines += [
            (
                f"pg-{n:03d}",
                sa.create_engine(
                    f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}", poolclass=sa.NullPool
                ),
            )
            for n, db in enumerate(self.pg_dbs)
        ]
        engines += [
            (
                f"my-{n:03d}",
                sa.create_engine(
                    f"mysql+pymysql://root@127.0.0.1:3306/{db}", poolclass=sa.NullPool
                ),
            )
            for n, db in enumerate(self.my_dbs)
        ]
        return engines

    def check(self, number: int, *, at_top: bool) -> None:
        """Every invariant, from the instances' own data and the control plane (and,
        ``at_top``, every user at the top)."""
        where = f"after run {number}"
        with self.cp.connect() as conn:
            configs = {
                row.clerk_id: row
                for row in conn.execute(
                    sa.text(
                        "SELECT u.clerk_id, c.schema_version, c.connection_status, "
                        "c.lease_owner, c.lease_expires_at, c.last_error FROM byod_configs c "
                        "JOIN users u ON u.id = c.user_id"
                    )
                )
            }
            running = conn.execute(
                sa.text("SELECT count(*) FROM byod_migrations WHERE status = 'running'")
            ).scalar_one()
            ledger_errors = (
                conn.execute(sa.text("SELECT error FROM byod_migrations WHERE error IS NOT NULL"))
                .scalars()
                .all()
            )
            runs = conn.execute(sa.text("SELECT * FROM byod_runs")).mappings().all()
            applied = conn.execute(
                sa.text(
                    "SELECT direction, count(*) FROM byod_migrations "
                    "WHERE status = 'completed' GROUP BY direction"
                )
            ).all()
            db_now = conn.execute(sa.text("SELECT now() AT TIME ZONE 'utc'")).scalar_one()
        moved = dict(applied)
        self.report.steps_applied = moved.get("up", 0)
        self.report.steps_undone = moved.get("down", 0)
        self.expect(running == 0, f"{where}: {running} ledger rows left running")
        for clerk_id, engine in self.instances():
            try:
                self.check_instance(where, clerk_id, engine, configs[clerk_id], db_now, at_top)
            finally:
                engine.dispose()
        for run in runs:
            if run["state"] == "running":
                continue  # a distributed run whose starter was killed: its workers go on
            # RunCounts: total is every user the run took; not_eligible ones are outside
            taken = ("succeeded", "failed", "busy", "up_to_date", "not_started", "skipped")
            counted = sum(run[name] for name in taken)
            self.expect(
                counted == run["total"],
                f"{where}: run {run['id']} counts {counted} of total {run['total']}",
            )
        for text in [*ledger_errors, *self.log_texts()]:
            convex_keys = self.convex.secrets if self.convex is not None else []
            for secret in (PG_PASSWORD, MYSQL_PASSWORD, self.key, *convex_keys):
                self.expect(secret not in text, f"{where}: a secret in a log or the ledger")

    def check_instance(
        self, where: str, clerk_id: str, engine: sa.Engine, config: Any, db_now: Any, at_top: bool
    ) -> None:
        with engine.connect() as conn:
            stamp = dict(conn.execute(sa.text(f"SELECT id, version FROM {STAMP_TABLE}")).all())
            counts = {
                r.name: (r.ups, r.downs) for r in conn.execute(sa.text("SELECT * FROM counts"))
            }
            ns = Counter(conn.execute(sa.text("SELECT n FROM items")).scalars())
        version = max(stamp.values(), default=0)
        if at_top:
            expected = self.expected()
            self.expect(
                version == expected, f"{where}: {clerk_id} at {version}, not {expected} (stamp)"
            )
        self.expect(
            config.schema_version == version,
            f"{where}: {clerk_id}: control plane says {config.schema_version}, stamp {version}",
        )
        for name in COUNTED:
            ups, downs = counts[name]
            net = ups - downs
            want = 1 if name in stamp else 0
            self.expect(net == want, f"{where}: {clerk_id}: {name} applied {net} times net")
        bumped = 1 if "003_bump" in stamp else 0
        self.expect(
            set(ns) == {bumped} and sum(ns.values()) == ROWS,
            f"{where}: {clerk_id}: rows' n {dict(ns)}, want all {bumped}",
        )
        if config.lease_expires_at is not None:
            over = (config.lease_expires_at - db_now).total_seconds()
            self.expect(
                over <= self.args.lease_seconds + 1,
                f"{where}: {clerk_id}: a lease {over:.1f} s beyond now, none is running",
            )

    def log_texts(self) -> list[str]:
        return [p.read_text(errors="replace") for p in self.logs.glob("*.log")]

    def expect(self, holds: bool, message: str) -> None:
        if holds:
            self.report.checks_passed += 1
        else:
            self.violation(message)

    def violation(self, message: str) -> None:
        self.report.violations.append(message)


def _bump(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _summary(output: str) -> dict[str, Any]:
    """The summary a ``--json`` run prints last."""
    for line in reversed(output.splitlines()):
        with contextlib.suppress(ValueError):
            found = json.loads(line)
            if isinstance(found, dict) and isinstance(found.get("summary"), dict):
                return dict(found["summary"])
    return {}


def _all_at(engine: sa.Engine, version: int, size: int) -> bool:
    """Every one of ``size`` users connected at ``version``, as the control plane says."""
    with engine.connect() as conn:
        versions = conn.execute(
            sa.text(
                "SELECT schema_version, connection_status, count(*) FROM byod_configs GROUP BY 1, 2"
            )
        ).all()
    return [tuple(v) for v in versions] == [(version, "connected", size)]


def _delete_amqp_queue(name: str) -> None:
    """The soak's queue on the machine's RabbitMQ, gone."""
    from kombu import Connection

    with (
        contextlib.suppress(Exception),
        Connection(f"amqp://guest:guest@127.0.0.1:{AMQP_PORT}//") as c,
    ):
        c.default_channel.queue_delete(name)


def _admin(url: str, statement: str) -> None:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_port(port: int) -> None:
    for _ in range(100):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def _signal_group(process: subprocess.Popen[Any], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def _stop(process: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def print_report(report: Report) -> None:
    held = "every invariant held" if not report.violations else "VIOLATIONS"
    print(f"soak seed {report.seed}: {held}")
    print(f"  instances: {report.instances}")
    print(f"  runs: {dict(report.runs)} ({sum(report.runs.values())}), settles {report.settles}")
    print(f"  faults: {dict(report.faults)} ({sum(report.faults.values())})")
    print(f"  steps applied {report.steps_applied}, undone {report.steps_undone}")
    print(f"  checks passed: {report.checks_passed}")
    print(f"  429s answered by Convex deployments: {report.convex_429s_answered}")
    print(f"  longest settle after a fault: {report.longest_recovery_seconds:.1f} s")
    print(f"  settles (s): {report.settle_seconds}")
    for message in report.violations[:20]:
        print(f"  VIOLATION: {message}")
    if report.violations:
        print(f"  replay: bench/soak.py --seed {report.seed} (fault history below)")
        for fault in report.history:
            print(f"    run {fault.run} at {fault.at} s: {fault.kind} {fault.seconds or ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--max-runs", type=int, default=10_000)
    parser.add_argument("--sqlite", type=int, default=160)
    parser.add_argument("--postgres", type=int, default=60)
    parser.add_argument("--mysql", type=int, default=40)
    parser.add_argument("--convex", type=int, default=12, help="local Convex deployments")
    parser.add_argument("--convex-documents", type=int, default=250, help="per deployment")
    parser.add_argument(
        "--brokers",
        type=lambda text: tuple(text.split(",")),
        default=BROKERS,
        help="the distributed rounds' brokers: redis,rabbitmq",
    )
    parser.add_argument("--lease-seconds", type=float, default=3.0)
    parser.add_argument("--step-seconds", type=float, default=0.05)
    parser.add_argument("--report", type=Path, default=None, help="write the report as JSON")
    parser.add_argument("--hang-seconds", type=float, default=300.0, help="a run hangs after")
    parser.add_argument(
        "--faults", type=lambda text: text.split(","), default=None, help="only these, e.g. kill9"
    )
    parser.add_argument(
        "--rounds",
        type=lambda text: tuple(text.split(",")),
        default=None,
        help="only these forward rounds, e.g. distributed",
    )
    parser.add_argument("--keep", action="store_true", help="keep the soak's folder")
    args = parser.parse_args()
    for option, given, known in (
        ("--faults", args.faults or (), FAULTS),
        ("--rounds", args.rounds or (), set(ROUNDS)),
        ("--brokers", args.brokers, BROKERS),
    ):
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"{option}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 2**31)
    soak = Soak(args)
    try:
        soak.setup()
        report = soak.run()
    finally:
        soak.teardown()
    print_report(report)
    if args.report is not None:
        data = asdict(report)
        args.report.write_text(json.dumps(data, indent=2, default=str) + "\n")
    sys.exit(1 if report.violations else 0)


if __name__ == "__main__":
    main()
