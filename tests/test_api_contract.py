"""The API's contract as outside checkers hold it: schemathesis's own command line
(``st run --checks all --phases fuzzing,stateful``, the committed configuration) against a
real ``byod serve`` of a seeded fleet, with an operator's token and with a user's; and the
OpenAPI document's promises (formats, enums, links, every field required) checked as a
generated client relies on them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from byod.api import AuthSettings, create_app
from byod.api.problems import PROBLEM_TYPES
from byod.controlplane.schema import CONNECTION_STATUSES, LEDGER_STATUSES, RUN_KINDS, RUN_STATES
from tests.conftest import make_workspace
from tests.contract.seed import OPERATOR, PENDING, SECRET, seed, token
from tests.served import serve, server_env

ST = Path(sys.executable).with_name("st")
CONFIG = Path(__file__).resolve().parent / "contract" / "schemathesis.toml"


@pytest.mark.parametrize("who", ["operator", "user"])
def test_schemathesis_finds_nothing_fuzzing_and_stateful(who: str, tmp_path: Path) -> None:
    fleet = seed(tmp_path / "fleet")
    bearer = token(OPERATOR, admin=True) if who == "operator" else token(PENDING)
    with serve(server_env(**fleet.env), tmp_path) as server:
        done = subprocess.run(
            [
                str(ST),
                "--no-color",
                "--config-file",
                str(CONFIG),
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "all",
                "--phases",
                "fuzzing,stateful",
            ],
            env=os.environ | {"BYOD_TOKEN": bearer},
            cwd=tmp_path,  # its cache of failures to replay (.schemathesis/) stays there
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert re.search(r"Tested: 9\b", report), report  # every operation was reached
    assert "✅ Fuzzing" in report and "✅ Stateful" in report, report
    links = re.search(r"API Links:\s+(\d+) covered", report)
    assert links and int(links.group(1)) >= 4, report  # the stateful phase walked the links
    assert not re.search(r"\b[1-9]\d* (failed|errors?)\b", report), report


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    ws = make_workspace(f"sqlite:///{tmp_path / 'control.db'}")
    with TestClient(create_app(ws, AuthSettings(secret=SECRET))) as client:
        yield client
    ws.engine.dispose()


@pytest.fixture
def document(client: TestClient) -> dict[str, Any]:
    schema: dict[str, Any] = client.get("/openapi.json").json()
    return schema


def test_the_document_enumerates_states_and_formats_timestamps(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    run = schemas["RunOut"]["properties"]
    assert run["kind"]["enum"] == list(RUN_KINDS)
    assert run["state"]["enum"] == list(RUN_STATES)
    assert run["started_at"] == {"type": "string", "format": "date-time", "title": "Started At"}
    assert run["ended_at"]["anyOf"] == [{"type": "string", "format": "date-time"}, {"type": "null"}]
    entry = schemas["HistoryEntry"]["properties"]
    assert entry["status"]["enum"] == list(LEDGER_STATUSES)
    assert entry["direction"]["enum"] == ["up", "down"]
    assert entry["created_at"]["format"] == "date-time"
    assert schemas["RecentFailure"]["properties"]["at"]["anyOf"][0]["format"] == "date-time"
    assert schemas["InstanceOut"]["properties"]["connection_status"]["enum"] == list(
        CONNECTION_STATUSES
    )
    assert schemas["Problem"]["properties"]["type"]["enum"] == list(PROBLEM_TYPES)
    # every field of an answer is always there (null where it says so): all required
    for name in ("RunOut", "HistoryEntry", "RecentFailure", "InstanceOut", "FleetStatusOut"):
        assert set(schemas[name]["required"]) == set(schemas[name]["properties"]), name


def test_the_document_links_what_names_a_run_or_a_user(document: dict[str, Any]) -> None:
    paths = document["paths"]
    operation_ids = {op["operationId"] for path in paths.values() for op in path.values()}
    assert {"my_instance", "my_history", "my_pending", "run_mine", "my_run"} <= operation_ids
    assert {"fleet", "start_fleet_run", "fleet_run", "user_history"} <= operation_ids

    def links(path: str, method: str, status: str) -> dict[str, Any]:
        found: dict[str, Any] = paths[path][method]["responses"][status]["links"]
        for link in found.values():
            assert link["operationId"] in operation_ids
        return found

    assert links("/v1/fleet/runs", "post", "202")["FleetRun"] == {
        "operationId": "fleet_run",
        "parameters": {"run_id": "$response.body#/run_id"},
        "description": "the fleet run just started, as an operator follows it",
    }
    assert links("/v1/me/migrations/run", "post", "202")["MyRun"]["parameters"] == {
        "run_id": "$response.body#/run_id"
    }
    assert links("/v1/me/instance", "get", "200")["UserHistory"]["parameters"] == {
        "user": "$response.body#/clerk_id"
    }
    assert "FailedUserHistory" in links("/v1/fleet/status", "get", "200")


def test_each_operation_documents_the_errors_it_can_answer(document: dict[str, Any]) -> None:
    def errors(path: str, method: str) -> set[int]:
        responses = document["paths"][path][method]["responses"]
        for status, response in responses.items():
            if status[0] in "45":
                content = response["content"]
                assert list(content) == ["application/problem+json"], (path, status)
        return {int(s) for s in responses if s[0] in "45"}

    assert errors("/v1/me/instance", "get") == {400, 401, 404, 413, 503}
    assert errors("/v1/me/migrations/run", "post") == {400, 401, 404, 409, 413, 503}
    assert errors("/v1/fleet/status", "get") == {400, 401, 403, 413, 503}
    assert errors("/v1/fleet/runs", "post") == {400, 401, 403, 409, 413, 422, 503}


def test_a_405_is_a_problem_document_with_an_allow_header(client: TestClient) -> None:
    answer = client.delete(
        "/v1/fleet/status", headers={"Authorization": f"Bearer {token(OPERATOR, admin=True)}"}
    )
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET"
    assert answer.json()["type"] == "urn:byod:problem:method-not-allowed"
