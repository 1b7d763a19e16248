"""byod's own cost per instance, one SQLite instance at a time, against the bare floor.

Builds ``--instances`` SQLite instances with the example app at version 2 (a few
documents each), then times one raw-SQL migration ``003`` (one ``CREATE TABLE`` and one
``INSERT … SELECT``) applied to each, one after another:

- **floor**: ``sqlite3`` itself: ``BEGIN IMMEDIATE``, the two statements, a stamp row,
  ``COMMIT``, per instance (its connect included);
- **byod**: the library's ``Runner.migrate_user`` in a loop (lease, unseal, connect,
  stamp, lock, the step, the ledger), on a SQLite control plane.

Prints one JSON line per way (ms per instance: the median of ``--runs`` rounds, 5 by
default, each on fresh fleets, the order alternating) and the ratio. ``--profile`` prints
the top lines of a cProfile of byod's loop (cumulative time).

``--command`` times the whole ``byod migrate --all`` command instead (default options, or
``--byod-args``), minus the same command run again once every user is at head (its
start-up and its selection), against the floor in 2 processes (their start included),
or in one with ``--byod-args "--concurrency 1"``; medians of ``--runs`` rounds.

``--startup`` times ``byod status`` (a control plane with ``--instances`` users) against
``python -c "import sqlalchemy"``, alternating, ``--runs`` times each (median), and with
``--profile N`` prints the N slowest imports of ``byod status`` (``-X importtime``).
Run from the repository root:

    .venv/bin/python bench/overhead.py                 # 300 instances, one at a time
    .venv/bin/python bench/overhead.py --profile 25
    .venv/bin/python bench/overhead.py --command --instances 2000
    .venv/bin/python bench/overhead.py --command --byod-args "--concurrency 1"
    .venv/bin/python bench/overhead.py --startup --instances 100 --runs 9
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import io
import json
import multiprocessing
import os
import pstats
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from byod.commands.setup import init  # noqa: E402
from byod.credentials import connect_user  # noqa: E402
from byod.settings import Settings, bundled_migrations_dir  # noqa: E402
from byod.workspace import Workspace  # noqa: E402

KEY = base64.b64encode(b"o" * 32).decode()
CREATE = "CREATE TABLE body_lengths (document_id INTEGER PRIMARY KEY, length INTEGER NOT NULL)"
FILL = "INSERT INTO body_lengths (document_id, length) SELECT id, length(body) FROM documents"
MIGRATION = f'''"""Body lengths: one table, filled by one INSERT … SELECT (raw SQL)."""

from byod import Migration


def up(ctx):
    ctx.conn.exec_driver_sql("{CREATE}")
    ctx.conn.exec_driver_sql("{FILL}")


migration = Migration(
    id="003_body_lengths", version=3, name="body lengths", description="raw SQL", up=up
)
'''


def build(folder: Path, count: int) -> tuple[Workspace, list[Path]]:
    migrations = folder / "migrations"
    migrations.mkdir()
    for name in ("001_initial.py", "002_add_tags.py"):
        shutil.copy(bundled_migrations_dir() / name, migrations)
    (migrations / "003_body_lengths.py").write_text(MIGRATION)
    env = {"BYOD_ENCRYPTION_KEY": KEY, "BYOD_MIGRATIONS": str(migrations)}
    ws = Workspace(Settings.load(database_url=f"sqlite:///{folder / 'byod.db'}", env=env))
    init(ws)
    runner = ws.runner()
    paths = []
    for n in range(count):
        path = folder / f"i{n:04d}.db"
        path.touch()
        user = ws.directory.add_user(f"u{n:04d}")
        connect_user(ws.directory, ws.sealer, user.id, f"sqlite:///{path}")
        runner.migrate(user.id, to_version=1)
        with sqlite3.connect(path) as conn:
            conn.executemany(
                "INSERT INTO documents (title, body) VALUES (?, ?)",
                [(f"t{i}", f"body {i} #tag{i % 3}") for i in range(20)],
            )
        runner.migrate(user.id, to_version=2)
        paths.append(path)
    return ws, paths


def twin_fleets(folder: Path, count: int) -> tuple[Workspace, list[Path]]:
    """Two identical fleets: byod's (its workspace) and the floor's (its files)."""
    (folder / "floor").mkdir()
    (folder / "byod").mkdir()
    _, floor_paths = build(folder / "floor", count)
    ws, _ = build(folder / "byod", count)
    return ws, floor_paths


def floor(paths: list[Path]) -> float:
    started = time.perf_counter()
    for path in paths:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(CREATE)
        conn.execute(FILL)
        conn.execute(
            "INSERT INTO byod_schema_stamp (id, version, checksum, applied_at) "
            "VALUES ('003_body_lengths', 3, 'x', '2026-01-01 00:00:00')"
        )
        conn.execute("COMMIT")
        conn.close()
    return time.perf_counter() - started


def floor_processes(paths: list[Path], processes: int = 2) -> float:
    """The floor in ``processes`` worker processes, their start included."""
    started = time.perf_counter()
    chunks = [paths[n::processes] for n in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(floor, chunks)
    return time.perf_counter() - started


def command(folder: Path, ws: Workspace, extra: list[str]) -> float:
    """``byod migrate --all`` as a user runs it, default options, start-up included."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BYOD_")}
    env |= {
        "BYOD_ENCRYPTION_KEY": KEY,
        "BYOD_MIGRATIONS": str(ws.settings.migrations_dir),
        "BYOD_DATABASE_URL": ws.settings.database_url,
    }
    byod = str(Path(sys.executable).with_name("byod"))
    started = time.perf_counter()
    done = subprocess.run(
        [byod, "migrate", "--all", *extra], cwd=folder, env=env, capture_output=True, check=False
    )
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr.decode()
    return seconds


def _timed(argv: list[str], folder: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, check=False)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr.decode()
    return seconds


def startup(count: int, runs: int, profile: int) -> None:
    """``byod status`` against ``import sqlalchemy``, each a fresh process, alternating."""
    # byod's modules byte-compiled, as an installed wheel has them (pip compiles at
    # install; this machine sets PYTHONDONTWRITEBYTECODE, so a checkout's never are)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "src")], check=True)
    with tempfile.TemporaryDirectory(prefix="byod-bench-startup-") as tmp:
        ws, _ = build(Path(tmp), count)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BYOD_")}
        env |= {
            "BYOD_ENCRYPTION_KEY": KEY,
            "BYOD_MIGRATIONS": str(ws.settings.migrations_dir),
            "BYOD_DATABASE_URL": ws.settings.database_url,
        }
        byod = str(Path(sys.executable).with_name("byod"))
        ways = {
            "import sqlalchemy": [sys.executable, "-c", "import sqlalchemy"],
            "byod status": [byod, "status"],
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(runs + 1):  # the first round warms the disk cache, not counted
            for name, argv in ways.items():
                times[name].append(_timed(argv, Path(tmp), env))
        medians = {name: statistics.median(found[1:]) for name, found in times.items()}
        for name, median in medians.items():
            print(json.dumps({"way": name, "runs": runs, "median_s": round(median, 3)}))
        over = medians["byod status"] - medians["import sqlalchemy"]
        print(json.dumps({"status_over_import_s": round(over, 3)}))
        if profile:
            argv = [sys.executable, "-X", "importtime", "-m", "byod", "status"]
            done = subprocess.run(
                argv, cwd=tmp, env=env, capture_output=True, text=True, check=True
            )
            rows = [line.split("|") for line in done.stderr.splitlines()[1:] if "|" in line]
            slowest = sorted(rows, key=lambda row: -int(row[1]))[:profile]
            for row in slowest:
                print(f"{int(row[1]) / 1000:8.1f} ms cumulative  {row[2].rstrip()}")


def _median_line(name: str, values: list[float], unit: str, **extra: object) -> None:
    runs = [round(v, 3) for v in values]
    line = {"way": name, unit: round(statistics.median(values), 3), "runs": runs, **extra}
    print(json.dumps(line), flush=True)


def commands(args: argparse.Namespace) -> None:
    """``byod migrate --all`` (minus the same command once all are at head: its start
    and its selection) against the floor, ``--runs`` rounds on fresh fleets, the order
    alternating; medians. The floor in 2 processes by default, in one with
    ``--concurrency 1`` among ``--byod-args``."""
    extra = args.byod_args.split()
    one_at_a_time = "--concurrency" in extra and extra[extra.index("--concurrency") + 1] == "1"
    floor_name = "floor-1-process" if one_at_a_time else "floor-2-processes"
    floor_ms: list[float] = []
    byod_ms: list[float] = []
    whole_ms: list[float] = []
    for round_ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="byod-bench-overhead-") as tmp:
            ws, floor_paths = twin_fleets(Path(tmp), args.instances)
            ways = ["floor", "byod"] if round_ % 2 == 0 else ["byod", "floor"]
            for way in ways:
                if way == "floor":
                    seconds = floor(floor_paths) if one_at_a_time else floor_processes(floor_paths)
                    floor_ms.append(seconds / args.instances * 1000)
                else:
                    seconds = command(Path(tmp, "byod"), ws, extra)
                    noop = command(Path(tmp, "byod"), ws, extra)  # all at head now
                    whole_ms.append(seconds / args.instances * 1000)
                    byod_ms.append((seconds - noop) / args.instances * 1000)
    _median_line(floor_name, floor_ms, "ms_per_instance", instances=args.instances)
    _median_line(
        f"byod migrate --all {args.byod_args}".strip() + " (minus a no-op run)",
        byod_ms,
        "ms_per_instance",
        instances=args.instances,
    )
    _median_line("byod migrate --all, whole command", whole_ms, "ms_per_instance")
    per_s = {
        floor_name: round(1000 / statistics.median(floor_ms), 1),
        "byod": round(1000 / statistics.median(whole_ms), 1),
    }
    print(json.dumps({"per_s_whole_command": per_s}))
    print(
        json.dumps(
            {
                "byod_over_floor": round(
                    statistics.median(byod_ms) / statistics.median(floor_ms), 2
                ),
                "byod_whole_of_floor": round(
                    statistics.median(floor_ms) / statistics.median(whole_ms), 2
                ),
            }
        )
    )


def one_at_a_time_library(args: argparse.Namespace) -> None:
    """The library's ``Runner.migrate_user`` in a loop (lone users) against the floor."""
    floor_ms: list[float] = []
    byod_ms: list[float] = []
    profiler = cProfile.Profile() if args.profile else None
    for round_ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="byod-bench-overhead-") as tmp:
            ws, floor_paths = twin_fleets(Path(tmp), args.instances)
            runner = ws.runner()
            users = [ws.directory.find_user(f"u{n:04d}") for n in range(args.instances)]
            for way in ["floor", "byod"] if round_ % 2 == 0 else ["byod", "floor"]:
                if way == "floor":
                    floor_ms.append(floor(floor_paths) / args.instances * 1000)
                    continue
                started = time.perf_counter()
                if profiler and round_ == 0:
                    profiler.enable()
                for user in users:
                    result = runner.migrate_user(user)
                    assert result.error is None, result.error
                if profiler and round_ == 0:
                    profiler.disable()
                byod_ms.append((time.perf_counter() - started) / args.instances * 1000)
    _median_line("floor", floor_ms, "ms_per_instance", instances=args.instances)
    _median_line("byod (library, lone users)", byod_ms, "ms_per_instance")
    ratio = statistics.median(byod_ms) / statistics.median(floor_ms)
    print(json.dumps({"byod_over_floor": round(ratio, 2)}))
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.profile)
        print(text.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--profile", type=int, default=0, metavar="LINES")
    parser.add_argument("--command", action="store_true")
    parser.add_argument("--byod-args", default="", help="extra flags for the command")
    parser.add_argument("--startup", action="store_true")
    parser.add_argument("--runs", type=int, default=5, help="rounds, alternating; medians")
    args = parser.parse_args()
    if args.startup:
        startup(args.instances, max(args.runs, 9), args.profile)
    elif args.command:
        commands(args)
    else:
        one_at_a_time_library(args)


if __name__ == "__main__":
    main()
