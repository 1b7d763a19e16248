"""The fault soak's short variant (``bench/soak.py``), with a fixed seed: a mixed fleet
(SQLite, PostgreSQL, MariaDB) rolled forward and back on threads, processes and Celery
workers on Redis and RabbitMQ, and a fleet of local Convex deployments beside it, while
the runner is killed, interrupted, its control plane and an instance server cut or
slowed, a worker killed, the broker restarted, SQLite writes fail and Convex answers 429;
after each round every invariant is checked from the instances' own data and the control
plane."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MYSQL_SERVER, PG_SERVER, require_server
from tests.convex_backend import require_node
from tests.distributed_kit import BROKERS, require_broker

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"
SEED = 7
SHORT = ("--seed", str(SEED), "--minutes", "1.5", "--hang-seconds", "120")
SHORT += ("--sqlite", "16", "--postgres", "4", "--mysql", "4", "--convex", "4")


def test_the_short_soak_holds_every_invariant(tmp_path: Path) -> None:
    require_server(PG_SERVER)
    require_server(MYSQL_SERVER)
    require_broker(BROKERS["rabbitmq"])
    require_node()
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: the soak runs a broker of its own")
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(SOAK), *SHORT, "--report", str(report)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = json.loads(report.read_text())
    assert found["violations"] == []
    assert sum(found["faults"].values()) >= 5, found["faults"]  # faults were injected
    assert found["runs"].get("rollback", 0) >= 1 and found["steps_undone"] > 0
    assert found["steps_applied"] > 24 * 3  # the fleet moved, more than once
    assert found["checks_passed"] > 1000
    runs = found["runs"]
    assert runs.get("convex-migrate", 0) >= 1 and runs.get("convex-rollback", 0) >= 1
