"""Backfill benchmark: one data change over a large table, three ways, side by side.

* ``single``: one ``UPDATE`` of every row in one transaction (what a plain migration does);
* ``bare``: the same batches byod runs (by key, ``--batch`` rows, each with a cursor row
  written in its transaction), with the bare driver;
* ``byod``: a migration with a ``Backfill``, run by byod's runner.

Prints one JSON line per way (the median seconds of ``--repeat`` interleaved rounds, rows/s,
the longest transaction, which is the longest the table is held) and the ratios. Not part
of the test suite::

    .venv/bin/python bench/backfill.py                       # SQLite, 1,000,000 rows
    .venv/bin/python bench/backfill.py --backend postgres    # PostgreSQL, 1,000,000 rows
"""

from __future__ import annotations

import argparse
import base64
import json
import sqlite3
import statistics
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

PG_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
KEY = base64.b64encode(b"b" * 32).decode()

MIGRATIONS = {
    "001_items.py": """
        import sqlalchemy as sa
        from byod import Migration

        def up(ctx):
            pass  # the bench fills the table itself, fast

        migration = Migration(id="001_items", version=1, name="Items", description="", up=up)
    """,
    "002_bump.py": """
        import sqlalchemy as sa
        from byod import Backfill, Migration

        def up(ctx):
            pass

        def bump(ctx, rows):
            ctx.conn.execute(
                sa.text("UPDATE items SET n = n + 1 WHERE id >= :first AND id <= :last"),
                {"first": rows[0][0], "last": rows[-1][0]},
            )

        migration = Migration(
            id="002_bump", version=2, name="Bump", description="", up=up,
            backfills=[Backfill(table="items", key="id", apply=bump, batch_size=1000)],
        )
    """,
}


class Instance:
    """A fresh instance with ``rows`` rows in ``items(id, n)``."""

    def __init__(self, backend: str, rows: int, workdir: Path) -> None:
        self.backend, self.rows = backend, rows
        if backend == "sqlite":
            self.path = workdir / f"{uuid.uuid4().hex[:8]}.db"
            self.url = f"sqlite:///{self.path}"
            conn = sqlite3.connect(self.path)
            conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
            conn.execute(
                "INSERT INTO items (id, n) WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL "
                "SELECT i + 1 FROM s WHERE i < ?) SELECT i, 0 FROM s",
                (rows,),
            )
            conn.commit()
            conn.close()
        else:
            self.name = f"byod_bench_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(PG_SERVER, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{self.name}"')
            self.dsn = f"postgresql://postgres@127.0.0.1:5432/{self.name}"
            self.url = self.dsn
            with psycopg.connect(self.dsn) as conn:
                conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
                conn.execute("INSERT INTO items SELECT i, 0 FROM generate_series(1, %s) i", (rows,))
            # every way starts alike: the table vacuumed (all-visible, hint bits set) and no
            # checkpoint of the load pending, which would otherwise land inside a timing
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE items")
                conn.execute("CHECKPOINT")

    def connect(self) -> Any:
        if self.backend == "sqlite":
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=30000")
            return conn
        return psycopg.connect(self.dsn, autocommit=True)

    def drop(self) -> None:
        if self.backend == "sqlite":
            self.path.unlink(missing_ok=True)
            return
        with psycopg.connect(PG_SERVER, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def single(instance: Instance) -> dict[str, float]:
    conn = instance.connect()
    started = time.perf_counter()
    conn.execute("BEGIN")
    conn.execute("UPDATE items SET n = n + 1")
    conn.execute("COMMIT")
    seconds = time.perf_counter() - started
    conn.close()
    return {"seconds": seconds, "longest_tx_ms": seconds * 1000}


def bare(instance: Instance, batch: int) -> dict[str, float]:
    """The batches byod runs, with the bare driver: select a page by key, update it, move a
    cursor row, commit."""
    conn = instance.connect()
    mark = "?" if instance.backend == "sqlite" else "%s"
    conn.execute("CREATE TABLE cursor_row (id INTEGER PRIMARY KEY, last_key INTEGER)")
    conn.execute("INSERT INTO cursor_row VALUES (1, 0)")
    longest, last = 0.0, 0
    started = time.perf_counter()
    while True:
        tx = time.perf_counter()
        conn.execute("BEGIN")
        keys = [
            r[0]
            for r in conn.execute(
                f"SELECT id FROM items WHERE id > {mark} ORDER BY id LIMIT {mark}", (last, batch)
            ).fetchall()
        ]
        if keys:
            conn.execute(
                f"UPDATE items SET n = n + 1 WHERE id >= {mark} AND id <= {mark}",
                (keys[0], keys[-1]),
            )
            last = keys[-1]
        conn.execute(f"UPDATE cursor_row SET last_key = {mark} WHERE id = 1", (last,))
        conn.execute("COMMIT")
        longest = max(longest, time.perf_counter() - tx)
        if len(keys) < batch:
            break
    seconds = time.perf_counter() - started
    conn.close()
    return {"seconds": seconds, "longest_tx_ms": longest * 1000}


def byod(instance: Instance, batch: int, workdir: Path) -> dict[str, float]:
    from byod import commands
    from byod.credentials import Credentials, open_instance
    from byod.runner import Runner
    from byod.settings import Settings
    from byod.targets import Target
    from byod.workspace import Workspace

    folder = workdir / f"m-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    for name, source in MIGRATIONS.items():
        (folder / name).write_text(textwrap.dedent(source))
    control = workdir / f"control-{uuid.uuid4().hex[:6]}.db"
    env = {
        "BYOD_ENCRYPTION_KEY": KEY,
        "BYOD_MIGRATIONS": str(folder),
        "BYOD_INSTANCE_NETWORKS": "127.0.0.0/8",  # the benchmark's server is on loopback
    }
    ws = Workspace(Settings.load(database_url=f"sqlite:///{control}", env=env))
    commands.init(ws)
    user = commands.add_user(ws, "bench")
    commands.connect(ws, "bench", instance.url)
    assert commands.migrate_user(ws, "bench", to_version=1).ok
    longest = [0.0]

    class Timed:
        """The real target, timing each batch's transaction."""

        def __init__(self, target: Target) -> None:
            self.target = target

        def apply_batch(self, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return self.target.apply_batch(*args, **kwargs)
            finally:
                longest[0] = max(longest[0], time.perf_counter() - started)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.target, name)

    def opener(credentials: Credentials, timeout: float) -> Any:
        return Timed(open_instance(credentials, timeout=timeout))

    runner = Runner(ws.engine, ws.registry, ws.sealer, opener=opener)
    started = time.perf_counter()
    result = runner.migrate(user.id)
    seconds = time.perf_counter() - started
    assert result.ok, result.error
    ws.engine.dispose()
    return {"seconds": seconds, "longest_tx_ms": longest[0] * 1000}


def check(instance: Instance, expected: int) -> None:
    conn = instance.connect()
    found = conn.execute(f"SELECT count(*) FROM items WHERE n = {int(expected)}").fetchone()[0]
    conn.close()
    assert found == instance.rows, (found, instance.rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds of the three ways, interleaved (median)"
    )
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"single": [], "bare": [], "byod": []}
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        ways: dict[str, Callable[[Instance], dict[str, float]]] = {
            "single": single,
            "bare": lambda inst: bare(inst, args.batch),
            "byod": lambda inst: byod(inst, args.batch, workdir),
        }
        for _round in range(args.repeat):
            for name, run in ways.items():
                instance = Instance(args.backend, args.rows, workdir)
                try:
                    runs[name].append(run(instance))
                    check(instance, 1)
                finally:
                    instance.drop()
    lines: dict[str, dict[str, float]] = {}
    for name, figures in runs.items():
        seconds = statistics.median(f["seconds"] for f in figures)
        longest = max(f["longest_tx_ms"] for f in figures)
        lines[name] = {"seconds": seconds, "longest_tx_ms": longest}
        line = {
            "way": name,
            "backend": args.backend,
            "rows": args.rows,
            "batch": args.batch,
            "seconds": round(seconds, 3),
            "all_seconds": [round(f["seconds"], 3) for f in figures],
            "rows_per_s": round(args.rows / seconds),
            "longest_tx_ms": round(longest, 1),
            "longest_tx_ms_each": [round(f["longest_tx_ms"], 1) for f in figures],
        }
        print(json.dumps(line), flush=True)
    ratios = {
        "byod_vs_single": round(lines["byod"]["seconds"] / lines["single"]["seconds"], 2),
        "byod_vs_bare": round(lines["byod"]["seconds"] / lines["bare"]["seconds"], 2),
    }
    print(json.dumps({"ratios": ratios}))


if __name__ == "__main__":
    main()
