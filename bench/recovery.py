"""Crash recovery: how long after `kill -9` of a fleet run its users are migrated again.

Builds a fleet of SQLite instances whose one migration waits inside its instance
transaction, starts a real `byod migrate --all` process, kills it with SIGKILL once every
user is mid-migration, then runs `byod migrate --all` again and again (as an operator or
a cron job would, each run retrying busy users with its default backoff) until every user
is at head. Prints one JSON line: the lease length used and the seconds from the kill to
the last user migrated. Run from the repository root:

    .venv/bin/python bench/recovery.py                      # default lease (30 s)
    .venv/bin/python bench/recovery.py --lease-seconds 10
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIGRATION = """
import os
import time

import sqlalchemy as sa
from byod import Migration


def up(ctx):
    ctx.op.create_table("t1", sa.Column("id", sa.Integer, primary_key=True))
    time.sleep(float(os.environ.get("BENCH_HOLD_SECONDS", "0")))


migration = Migration(id="001_hold", version=1, name="Hold", description="", up=up)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--lease-seconds", type=float, default=None, help="default: byod's")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="byod-recovery-"))
    migrations = folder / "migrations"
    migrations.mkdir()
    (migrations / "001_hold.py").write_text(MIGRATION)
    control = folder / "control.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BYOD_")}
    env |= {
        "BYOD_DATABASE_URL": f"sqlite:///{control}",
        "BYOD_MIGRATIONS": str(migrations),
        "BYOD_ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),
    }
    byod = [sys.executable, "-m", "byod"]

    def run(*command: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*byod, *command], env=env | extra, capture_output=True, text=True, check=False
        )

    run("init")
    for i in range(args.instances):
        instance = folder / f"instance-{i}.db"
        instance.touch()
        run("users", "add", "--clerk-id", f"u{i}")
        run("connect", f"u{i}", "--url", f"sqlite:///{instance}")
    lease = [] if args.lease_seconds is None else ["--lease-seconds", str(args.lease_seconds)]
    first = subprocess.Popen(
        [*byod, "migrate", "--all", "--concurrency", str(args.instances), *lease],
        env=env | {"BENCH_HOLD_SECONDS": "600"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while _count(control, "status = 'running'") < args.instances:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed = time.monotonic()
    runs = 0
    while _count(control, "status = 'completed'") < args.instances:
        run("migrate", "--all")
        runs += 1
    seconds = time.monotonic() - killed
    print(
        json.dumps(
            {
                "instances": args.instances,
                "lease_seconds": args.lease_seconds or "default",
                "seconds_from_kill_to_all_migrated": round(seconds, 1),
                "runs_after_the_kill": runs,
            }
        )
    )


def _count(control: Path, where: str) -> int:
    with sqlite3.connect(control, timeout=30) as conn:
        row = conn.execute(f"SELECT count(*) FROM byod_migrations WHERE {where}").fetchone()
    return int(row[0])


if __name__ == "__main__":
    main()
