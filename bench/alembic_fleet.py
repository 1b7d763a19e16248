"""A fleet Alembic stamped, brought to head three ways, side by side in one run:

- byod: `byod adopt --all`, then `byod migrate --all` (in-process, default concurrency);
- an in-process loop of `alembic.command.upgrade(config, "head")`, one database at a time;
- a loop of the `alembic upgrade head` command, one process per database.

    .venv/bin/python bench/alembic_fleet.py                 # 100 SQLite instances, 3 runs
    .venv/bin/python bench/alembic_fleet.py --instances 300 --repeat 5

The fleet: a tenth empty, the rest part-way or at head (stamped by Alembic itself), the
history tests/alembic_app (4 revisions: tables, an index, batch_alter_table, data). Each
way starts from a fresh copy of the same fleet. Prints the median wall time of each.
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
from pathlib import Path

from alembic import command
from alembic.config import Config

from byod import commands
from byod.settings import Settings
from byod.workspace import Workspace

APP = Path(__file__).resolve().parents[1] / "tests" / "alembic_app"
CHAIN = ["9e68de2a97d5", "10a1322be8d7", "3d3bf621cd8c", "47a113008ee7"]
KEY = base64.b64encode(b"a" * 32).decode()
ALEMBIC = str(Path(sys.executable).parent / "alembic")


def config(url: str) -> Config:
    made = Config(str(APP / "alembic.ini"))
    made.set_main_option("sqlalchemy.url", url)
    assert made.file_config is not None
    made.config_file_name = None  # env.py leaves this process's logging alone
    return made


def make_fleet(folder: Path, count: int) -> list[Path]:
    """``count`` SQLite files: a tenth empty, the rest at revision 1…4 in turn."""
    paths = []
    for n in range(count):
        path = folder / f"tenant-{n:04d}.db"
        path.touch()
        if n % 10:
            command.upgrade(config(f"sqlite:///{path}"), CHAIN[n % len(CHAIN)])
        paths.append(path)
    return paths


def copy_fleet(source: list[Path], folder: Path) -> list[Path]:
    folder.mkdir()
    return [Path(shutil.copy(path, folder / path.name)) for path in source]


def with_byod(paths: list[Path], folder: Path) -> float:
    settings = Settings.load(
        database_url=f"sqlite:///{folder / 'byod.db'}",
        env={"BYOD_ENCRYPTION_KEY": KEY, "BYOD_MIGRATIONS": str(APP)},
    )
    ws = Workspace(settings)
    commands.init(ws)
    for n, path in enumerate(paths):
        user = commands.add_user(ws, f"tenant-{n:04d}")
        commands.connect(ws, user.clerk_id, f"sqlite:///{path}")
    started = time.perf_counter()
    adopted = commands.adopt(ws, None)
    summary = commands.migrate_fleet(ws)
    seconds = time.perf_counter() - started
    assert not [a for a in adopted if a.status == "refused"], adopted
    assert summary.failed == 0 and summary.total == len(paths), summary
    ws.engine.dispose()
    return seconds


def with_alembic_in_process(paths: list[Path]) -> float:
    started = time.perf_counter()
    for path in paths:
        command.upgrade(config(f"sqlite:///{path}"), "head")
    return time.perf_counter() - started


def with_alembic_command(paths: list[Path], folder: Path) -> float:
    inis = []
    template = (APP / "alembic.ini").read_text().replace("%(here)s", str(APP))
    for path in paths:
        ini = folder / f"{path.stem}.ini"
        ini.write_text(
            template.replace(
                "sqlalchemy.url = driver://user:pass@localhost/dbname",
                f"sqlalchemy.url = sqlite:///{path}",
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
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    figures: dict[str, list[float]] = {"byod": [], "alembic loop": [], "alembic command": []}
    for run in range(args.repeat):
        root = Path(tempfile.mkdtemp(prefix="byod-alembic-"))
        fleet = make_fleet(
            root / "source" if (root / "source").mkdir() is None else root, args.instances
        )
        figures["byod"].append(
            with_byod(copy_fleet(fleet, root / f"byod{run}"), root / f"byod{run}")
        )
        figures["alembic loop"].append(
            with_alembic_in_process(copy_fleet(fleet, root / f"loop{run}"))
        )
        cmd = root / f"cmd{run}"
        figures["alembic command"].append(with_alembic_command(copy_fleet(fleet, cmd), cmd))
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"{args.instances} SQLite instances Alembic stamped (a tenth empty), to head; "
        f"median of {args.repeat} runs:"
    )
    base = statistics.median(figures["byod"])
    for label, values in figures.items():
        median = statistics.median(values)
        print(f"  {label:16s} {median:8.2f} s   ({median / base:5.1f}x byod)")


if __name__ == "__main__":
    main()
