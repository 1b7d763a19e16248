"""One identity per reference: a token's subject is a clerk id matched exactly, a USER
argument follows one documented rule, and inside the library users travel as byod ids."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from byod.api import AuthSettings, create_app
from byod.clock import utcnow
from byod.commands import verify
from byod.controlplane import RunStore
from byod.controlplane.schema import users
from byod.errors import InputError, UnknownUserError
from byod.workspace import Workspace
from tests.helpers import add_connected, stamp_ids
from tests.test_api import SECRET, bearer, token


def insert_legacy_user(ws: Workspace, clerk_id: str) -> int:
    """A user registered before byod refused such clerk ids (e.g. all digits)."""
    with ws.engine.begin() as conn:
        result = conn.execute(users.insert().values(clerk_id=clerk_id, created_at=utcnow()))
        return int(result.inserted_primary_key[0])  # type: ignore[index]


def new_db(tmp_path: Path, name: str) -> str:
    (tmp_path / name).touch()
    return f"sqlite:///{tmp_path / name}"


@dataclass
class Service:
    client: TestClient
    ws: Workspace

    def get(self, path: str, sub: str, **claims: Any) -> Any:
        return self.client.get(path, headers=bearer(token(sub, **claims)))

    def post(self, path: str, sub: str, **claims: Any) -> Any:
        return self.client.post(path, headers=bearer(token(sub, **claims)))


@pytest.fixture
def service(cws: Workspace) -> Iterator[Service]:
    app = create_app(cws, AuthSettings(secret=SECRET))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Service(client, cws)


def wait_done(service: Service, run_id: str, sub: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body: dict[str, Any] = service.get(f"/v1/runs/{run_id}", sub).json()
        if body.get("state") not in (None, "running"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} never finished: {body}")


@pytest.mark.parametrize(
    "sub",
    [
        "1",
        "3",
        "01",
        " demo-tenant-001 ",
        "demo-tenant-001 ",
        "\u0661",
        "\u00b2",
        "9" * 20,
        "DEMO-TENANT-001",
        "demo-tenant-001\x00",
        "x" * 5000,
    ],
)
def test_a_token_subject_is_a_clerk_id_matched_exactly(service: Service, sub: str) -> None:
    for clerk_id in ("demo-tenant-001", "demo-tenant-002", "demo-tenant-003"):
        service.ws.directory.add_user(clerk_id)
    answer = service.get("/v1/me/instance", sub)
    assert answer.status_code == 404, answer.text
    assert answer.json()["type"] == "urn:byod:problem:unknown-user"
    assert service.get("/v1/me/instance", "demo-tenant-001").status_code == 404  # no database
    assert service.get("/v1/me/migrations", "demo-tenant-001").status_code == 200


def test_a_self_service_run_migrates_the_callers_own_database(
    service: Service, tmp_path: Path
) -> None:
    ws = service.ws
    first = add_connected(ws, new_db(tmp_path, "first.db"), "first")  # byod id 1
    url_second = new_db(tmp_path, "second.db")
    second = add_connected(ws, url_second, "second")  # byod id 2
    legacy = insert_legacy_user(ws, str(second))  # clerk id "2", an older byod allowed it
    url_legacy = new_db(tmp_path, "legacy.db")
    ws.directory.save_config(
        legacy,
        target_kind="sqlite",
        sealed_url=ws.sealer.seal(url_legacy, user_id=legacy, field_name="url"),
        sealed_secret=None,
        key_id=ws.sealer.key_id,
    )
    ws.directory.set_status(legacy, "connected", schema_version=0)

    run_id = service.post("/v1/me/migrations/run", "second").json()["run_id"]
    assert wait_done(service, run_id, "second")["succeeded"] == 1
    assert stamp_ids(url_second) == ["001_create", "002_bump", "003_fragile"]
    assert stamp_ids(url_legacy) == []  # the user whose clerk id is "2" was not touched
    assert ws.directory.get_config(first).schema_version == 0
    assert service.get(f"/v1/runs/{run_id}", str(second)).status_code == 404  # legacy's view

    legacy_run = service.post("/v1/me/migrations/run", str(second)).json()["run_id"]
    assert wait_done(service, legacy_run, str(second))["succeeded"] == 1
    assert stamp_ids(url_legacy) == ["001_create", "002_bump", "003_fragile"]
    assert ws.directory.get_config(first).schema_version == 0


def test_runs_started_over_http_record_the_token_subject(service: Service, tmp_path: Path) -> None:
    add_connected(service.ws, new_db(tmp_path, "a.db"), "user_a")
    run_id = service.post("/v1/me/migrations/run", "user_a").json()["run_id"]
    wait_done(service, run_id, "user_a")
    fleet = service.client.post(
        "/v1/fleet/runs", json={}, headers=bearer(token("ops-alice", admin=True))
    ).json()["run_id"]
    records = {r.id: r.started_by for r in RunStore(service.ws.engine).recent(10, noop=True)}
    assert records[run_id] == "user_a (token)"
    assert records[fleet] == "ops-alice (token)"


def test_verify_all_checks_each_user_by_id(ws: Workspace, tmp_path: Path) -> None:
    add_connected(ws, new_db(tmp_path, "one.db"), "one")
    two = add_connected(ws, new_db(tmp_path, "two.db"), "two")
    legacy = insert_legacy_user(ws, "1")  # clerk id "1" names a different user than id 1
    assert legacy == 3
    reports = verify(ws, None)
    assert [(r.user_id, r.clerk_id) for r in reports] == [(1, "one"), (two, "two")]


def test_a_user_argument_of_ascii_digits_is_a_byod_id(ws: Workspace) -> None:
    ws.directory.add_user("alpha")
    legacy = insert_legacy_user(ws, "1")
    assert ws.directory.find_user("1").clerk_id == "alpha"
    assert ws.directory.find_user("alpha").id == 1
    assert ws.directory.get_user_by_clerk_id("1").id == legacy
    for ref in ("01x", " alpha", "alpha ", "ALPHA", "\u00b2", "\u0661", "9" * 20, "9" * 5000, "0"):
        with pytest.raises(UnknownUserError):
            ws.directory.find_user(ref)


@pytest.mark.parametrize(
    "clerk_id",
    [
        "123",
        "0",
        " padded",
        "padded ",
        "tab\tbed",
        "new\nline",
        "esc\x1b[31m",
        "bidi\u202e",
        "",
        "x" * 256,
    ],
)
def test_users_add_refuses_clerk_ids_that_cannot_be_matched_exactly(
    ws: Workspace, clerk_id: str
) -> None:
    with pytest.raises(InputError, match="was not added"):
        ws.directory.add_user(clerk_id)
    with ws.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one() == 0


def test_unicode_clerk_ids_are_stored_exactly(ws: Workspace) -> None:
    for clerk_id in ("\u0661", "user_2abc", "Zoë", "x" * 255):
        user = ws.directory.add_user(clerk_id)
        assert ws.directory.get_user_by_clerk_id(clerk_id).id == user.id
