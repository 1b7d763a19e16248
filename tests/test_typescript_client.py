"""The TypeScript client (clients/typescript): its committed OpenAPI document and generated
types are current, and its own tests pass under Node against a real ``byod serve`` of a
seeded fleet, with real tokens."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from byod.api.document import document_text
from tests.contract.seed import AT_HEAD, FAILED, OPERATOR, PENDING, SECRET, seed
from tests.served import serve, server_env

CLIENT = Path(__file__).resolve().parent.parent / "clients" / "typescript"
REGENERATE = "regenerate with `make client` and commit the result"


def _npm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    npm = shutil.which("npm")
    if npm is None or not (CLIENT / "node_modules" / ".installed").exists():
        pytest.fail("Node 20 and the client's packages are needed: run `make test`")
    return subprocess.run(
        [npm, *args],
        cwd=CLIENT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_the_committed_document_is_the_api_s() -> None:
    committed = (CLIENT / "openapi.json").read_text()
    assert committed == document_text(), f"clients/typescript/openapi.json is stale: {REGENERATE}"


def test_the_generated_types_are_current() -> None:
    done = _npm("run", "--silent", "check-generated")
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\nsrc/schema.ts: {REGENERATE}"


def test_the_client_against_a_real_server(tmp_path: Path) -> None:
    fleet = seed(tmp_path / "fleet")
    hold = tmp_path / "hold"
    hold.mkdir()
    # a user's run waits 3 s inside 002, so a second start meets the first (409)
    settings = fleet.env | {"BYOD_TEST_HOLD_DIR": str(hold), "BYOD_TEST_HOLD_SECONDS": "3"}
    with serve(server_env(**settings), tmp_path) as server:
        seeded = {
            "atHead": AT_HEAD,
            "failed": FAILED,
            "pending": PENDING,
            "operator": OPERATOR,
            "runId": fleet.run_id,
        }
        env = os.environ | {
            "BYOD_URL": server.url,
            "BYOD_JWT_SECRET": SECRET,
            "BYOD_TEST_FLEET": json.dumps(seeded),
        }
        done = _npm("test", env=env)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert re.search(r"^# fail 0$", report, re.M), report
    passed = re.search(r"^# pass (\d+)$", report, re.M)
    assert passed and int(passed.group(1)) == 8, report
    assert list(hold.glob("entered-*")), "no run was held: the 409 was not met mid-run"
