"""How fast `byod users import` takes a file of users: rows per second.

    .venv/bin/python bench/import_users.py               # 20,000 rows, SQLite control plane
    .venv/bin/python bench/import_users.py --postgres     # the same, PostgreSQL control plane
    .venv/bin/python bench/import_users.py --postgres postgresql://postgres@127.0.0.1/postgres

With `--postgres` (its server's admin URL, by default the local one) each run makes its
own fresh control-plane database on that server and drops it afterwards.

Prints the rate of a first import (every row added), of the same file again (every row
unchanged: each stored config unsealed and compared) and of a file that changes every
URL (every row updated). The rows' instances are never contacted (imported configs are
`pending`), so none need to exist.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from byod import commands
from byod.commands.onboarding import read_import
from byod.settings import Settings
from byod.workspace import Workspace

KEY = base64.b64encode(b"i" * 32).decode()
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextmanager
def control_plane(folder: Path, admin_url: str | None) -> Iterator[str]:
    """A fresh control plane's URL: a SQLite file in ``folder``, or a new database on
    the PostgreSQL server ``admin_url`` names (dropped afterwards)."""
    if admin_url is None:
        yield f"sqlite:///{folder / 'byod.db'}"
        return
    admin = sa.make_url(admin_url).set(drivername="postgresql+psycopg")
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    name = f"bench_import_{uuid.uuid4().hex[:10]}"
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(drivername="postgresql", database=name).render_as_string(False)
    finally:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def write_file(path: Path, rows: int, suffix: str) -> None:
    with path.open("w") as out:
        for n in range(rows):
            url = f"postgresql://app:pw-{n}@db{n % 97}.example.com/tenant_{n}{suffix}"
            out.write(json.dumps({"clerk_id": f"user_{n:07d}", "url": url}) + "\n")
    path.chmod(0o600)


def timed(ws: Workspace, path: Path) -> tuple[float, commands.ImportReport]:  # type: ignore[name-defined]
    started = time.perf_counter()
    report = commands.import_users(ws, read_import(str(path)))
    return time.perf_counter() - started, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument(
        "--postgres",
        nargs="?",
        const=LOCAL_POSTGRES,
        default=None,
        metavar="ADMIN_URL",
        help="a PostgreSQL control plane on this server (default: the local one)",
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    figures: dict[str, list[float]] = {"added": [], "unchanged": [], "updated": []}
    for _ in range(args.repeat):
        folder = Path(tempfile.mkdtemp(prefix="byod-import-"))
        with control_plane(folder, args.postgres) as url:
            ws = Workspace(Settings.load(database_url=url, env={"BYOD_ENCRYPTION_KEY": KEY}))
            commands.init(ws)
            first, second = folder / "users.jsonl", folder / "moved.jsonl"
            write_file(first, args.rows, "")
            write_file(second, args.rows, "_moved")
            for label, path in (("added", first), ("unchanged", first), ("updated", second)):
                seconds, report = timed(ws, path)
                assert getattr(report, label) == args.rows, report
                figures[label].append(args.rows / seconds)
            ws.engine.dispose()
    print(
        f"users import, {args.rows:,} rows, {url.split(':')[0]} control plane "
        f"(median of {args.repeat} runs):"
    )
    for label, rates in figures.items():
        print(f"  every row {label:9s}: {statistics.median(rates):>9,.0f} rows/s")


if __name__ == "__main__":
    main()
