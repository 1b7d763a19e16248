"""A seeded fleet for the API's outside checkers (schemathesis, the TypeScript client's
tests): users at head, one whose run failed, one with everything pending, and a recorded
fleet run with a failure, on a SQLite control plane in one folder.

``python -m tests.contract.seed DIR`` builds it in DIR and prints the environment for
``byod serve`` and tokens (HS256, one hour) to call it with.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
import sqlalchemy as sa

from byod.commands import migrate_fleet
from byod.spec import FleetOptions
from tests.conftest import TEST_KEY, make_workspace
from tests.helpers import add_connected
from tests.migration_sets import counter_migrations

#: the HS256 secret ``byod serve`` verifies the seeded fleet's tokens with
SECRET = "contract-secret-that-is-long-enough-for-hs256"
#: at head (3), with a history of three completed steps
AT_HEAD = "user_at_head"
#: its 003 failed in the seeded run (it stays at 2, a recent failure)
FAILED = "user_failed"
#: connected after the run: every migration pending (version 0)
PENDING = "user_pending"
#: registered, no database connected yet
UNCONNECTED = "user_unconnected"
#: the subject of the operators' token: a user too, connected, at head after the run
OPERATOR = "ops"


@dataclass(frozen=True)
class SeededFleet:
    """Where the seeded fleet lives and what ``byod serve`` needs to serve it."""

    folder: Path
    env: dict[str, str]
    run_id: str


def seed(folder: Path) -> SeededFleet:
    """Build the fleet in ``folder`` (which must be empty or absent)."""
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"{folder} is not empty: seed a new folder (or remove this one)")
    folder.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{folder / 'control.db'}"
    migrations = counter_migrations(folder / "migrations")
    ws = make_workspace(url, migrations)
    try:
        for clerk_id in (AT_HEAD, FAILED, OPERATOR):
            (folder / f"{clerk_id}.db").touch()
            add_connected(ws, f"sqlite:///{folder / clerk_id}.db", clerk_id)
        _break_003(f"sqlite:///{folder / FAILED}.db")
        summary = migrate_fleet(ws, options=FleetOptions(retries=0), started_by="seed")
        assert (summary.succeeded, summary.failed) == (2, 1), summary
        (folder / f"{PENDING}.db").touch()
        add_connected(ws, f"sqlite:///{folder / PENDING}.db", PENDING)
        ws.directory.add_user(UNCONNECTED)
    finally:
        ws.engine.dispose()
    env = {
        "BYOD_DATABASE_URL": url,
        "BYOD_MIGRATIONS": str(migrations),
        "BYOD_ENCRYPTION_KEY": TEST_KEY,
        "BYOD_JWT_SECRET": SECRET,
    }
    assert summary.run_id is not None
    return SeededFleet(folder, env, summary.run_id)


def token(subject: str, *, admin: bool = False, seconds: int = 3600) -> str:
    """A token ``byod serve`` accepts for ``subject`` (an operator's when ``admin``)."""
    claims: dict[str, object] = {"sub": subject, "exp": int(time.time()) + seconds}
    if admin:
        claims["byod_role"] = "admin"
    return jwt.encode(claims, SECRET, algorithm="HS256")


def _break_003(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE break_me (id INTEGER)"))
    finally:
        engine.dispose()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.contract.seed DIR", file=sys.stderr)
        return 2
    fleet = seed(Path(argv[0]).resolve())
    for name, value in fleet.env.items():
        print(f"export {name}='{value}'")
    print(f"export OPERATOR_TOKEN='{token(OPERATOR, admin=True)}'")
    print(f"export USER_TOKEN='{token(PENDING)}'")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
