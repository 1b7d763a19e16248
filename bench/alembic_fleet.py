"""A mixed fleet Alembic stamped, brought to head three ways, side by side in one run:

- byod: `byod adopt --all`, then `byod migrate --all` (in-process, default concurrency);
- an in-process loop of `alembic.command.upgrade(config, "head")`, one database at a time;
- a loop of the `alembic upgrade head` command, one process per database.

    .venv/bin/python bench/alembic_fleet.py       # 200 SQLite, 20 PostgreSQL, 4 MariaDB; 3 runs
    .venv/bin/python bench/alembic_fleet.py --sqlite 100 --postgres 0 --mariadb 0 --repeat 5

The fleet: of each kind a tenth empty, the rest part-way or at head (stamped by Alembic
itself), the history tests/alembic_app (4 revisions: tables, an index, batch_alter_table,
data). Each way starts from a fresh fleet made the same way (not timed): SQLite files in a
temporary folder, databases on the local PostgreSQL and MariaDB servers (dropped at the
end). Prints the median wall time of each way and, for byod, its instances per second.
"""

from __future__ import annotations

import argparse
import base64
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from byod import commands
from byod.settings import Settings
from byod.workspace import Workspace

APP = Path(__file__).resolve().parents[1] / "tests" / "alembic_app"
CHAIN = ["9e68de2a97d5", "10a1322be8d7", "3d3bf621cd8c", "47a113008ee7"]
KEY = base64.b64encode(b"a" * 32).decode()
ALEMBIC = str(Path(sys.executable).parent / "alembic")
SERVERS = {
    "postgresql": ("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", '"{}"'),
    "mysql": ("mysql+pymysql://root@127.0.0.1:3306/mysql", "`{}`"),
}
FORCE = {"postgresql": " WITH (FORCE)", "mysql": ""}


@dataclass(frozen=True)
class Instance:
    """One tenant database: its URL with a driver (Alembic's) and as a user gives it (byod's)."""

    driver_url: str
    url: str


class Fleet:
    """Makes fresh fleets of one shape and drops the server databases at the end."""

    def __init__(self, root: Path, sizes: dict[str, int]) -> None:
        self.root, self.sizes = root, sizes
        self.made: dict[str, list[str]] = {"postgresql": [], "mysql": []}
        self.admins = {
            kind: sa.create_engine(SERVERS[kind][0], isolation_level="AUTOCOMMIT")
            for kind in self.made
            if sizes.get(kind)
        }

    def make(self, label: str) -> list[Instance]:
        """A fresh fleet: of each kind a tenth empty, the rest at revision 1…4 in turn."""
        folder = self.root / label
        folder.mkdir()
        fleet = []
        for kind, count in self.sizes.items():
            for n in range(count):
                instance = self._empty(kind, folder, f"{label}_{n:04d}")
                if n % 10:
                    command.upgrade(config(instance.driver_url), CHAIN[n % len(CHAIN)])
                fleet.append(instance)
        return fleet

    def _empty(self, kind: str, folder: Path, name: str) -> Instance:
        if kind == "sqlite":
            path = folder / f"{name}.db"
            path.touch()
            return Instance(f"sqlite:///{path}", f"sqlite:///{path}")
        server, quoted = SERVERS[kind]
        database = f"bench_alembic_{uuid.uuid4().hex[:8]}_{name}"
        with self.admins[kind].connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {quoted.format(database)}"))
        self.made[kind].append(database)
        driver_url = sa.make_url(server).set(database=database)
        plain = driver_url.set(drivername=kind)
        return Instance(driver_url.render_as_string(False), plain.render_as_string(False))

    def drop(self) -> None:
        for kind, engine in self.admins.items():
            _, quoted = SERVERS[kind]
            with engine.connect() as conn:
                for database in self.made[kind]:
                    drop = f"DROP DATABASE IF EXISTS {quoted.format(database)}{FORCE[kind]}"
                    conn.execute(sa.text(drop))
            engine.dispose()


@contextmanager
def fleets(sizes: dict[str, int]) -> Iterator[Fleet]:
    root = Path(tempfile.mkdtemp(prefix="byod-alembic-"))
    fleet = Fleet(root, sizes)
    try:
        yield fleet
    finally:
        fleet.drop()
        shutil.rmtree(root, ignore_errors=True)


def config(url: str) -> Config:
    made = Config(str(APP / "alembic.ini"))
    made.set_main_option("sqlalchemy.url", url)
    assert made.file_config is not None
    made.config_file_name = None  # env.py leaves this process's logging alone
    return made


def with_byod(fleet: list[Instance], folder: Path) -> float:
    settings = Settings.load(
        database_url=f"sqlite:///{folder / 'byod.db'}",
        env={
            "BYOD_ENCRYPTION_KEY": KEY,
            "BYOD_MIGRATIONS": str(APP),
            "BYOD_INSTANCE_NETWORKS": "127.0.0.0/8",  # the local servers
        },
    )
    ws = Workspace(settings)
    commands.init(ws)
    for n, instance in enumerate(fleet):
        user = commands.add_user(ws, f"tenant-{n:04d}")
        commands.connect(ws, user.clerk_id, instance.url)
    started = time.perf_counter()
    adopted = commands.adopt(ws, None)
    summary = commands.migrate_fleet(ws)
    seconds = time.perf_counter() - started
    assert not [a for a in adopted if a.status == "refused"], adopted
    assert summary.failed == 0 and summary.total == len(fleet), summary
    ws.engine.dispose()
    return seconds


def with_alembic_in_process(fleet: list[Instance]) -> float:
    started = time.perf_counter()
    for instance in fleet:
        command.upgrade(config(instance.driver_url), "head")
    return time.perf_counter() - started


def with_alembic_command(fleet: list[Instance], folder: Path) -> float:
    inis = []
    template = (APP / "alembic.ini").read_text().replace("%(here)s", str(APP))
    for n, instance in enumerate(fleet):
        ini = folder / f"tenant-{n:04d}.ini"
        ini.write_text(
            template.replace(
                "sqlalchemy.url = driver://user:pass@localhost/dbname",
                f"sqlalchemy.url = {instance.driver_url}",
            )
        )
        inis.append(ini)
    started = time.perf_counter()
    for ini in inis:
        subprocess.run(
            [ALEMBIC, "-c", str(ini), "upgrade", "head"], check=True, capture_output=True
        )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sqlite", type=int, default=200)
    parser.add_argument("--postgres", type=int, default=20)
    parser.add_argument("--mariadb", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sizes = {"sqlite": args.sqlite, "postgresql": args.postgres, "mysql": args.mariadb}
    total = sum(sizes.values())
    figures: dict[str, list[float]] = {"byod": [], "alembic loop": [], "alembic command": []}
    with fleets(sizes) as fleet:
        for run in range(args.repeat):
            byod = fleet.make(f"byod{run}")
            figures["byod"].append(with_byod(byod, fleet.root / f"byod{run}"))
            figures["alembic loop"].append(with_alembic_in_process(fleet.make(f"loop{run}")))
            made = fleet.make(f"cmd{run}")
            figures["alembic command"].append(with_alembic_command(made, fleet.root / f"cmd{run}"))
    print(
        f"{total} instances Alembic stamped ({args.sqlite} SQLite, {args.postgres} PostgreSQL,"
        f" {args.mariadb} MariaDB; a tenth of each empty), to head; median of {args.repeat} runs:"
    )
    base = statistics.median(figures["byod"])
    for label, values in figures.items():
        median = statistics.median(values)
        print(
            f"  {label:16s} {median:8.2f} s  {total / median:7.1f} instances/s"
            f"  ({median / base:5.1f}x byod)"
        )


if __name__ == "__main__":
    main()
