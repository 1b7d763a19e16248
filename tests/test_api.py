"""The HTTP service through the real ASGI app, on real control planes and instances."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient

from byod.api import AuthSettings, create_app
from byod.commands import migrate_fleet
from byod.controlplane import RunStore
from byod.spec import Selection
from byod.workspace import Workspace
from tests import gates
from tests.conftest import execute
from tests.helpers import add_connected

SECRET = "test-secret-that-is-long-enough-for-hs256"
#: RFC 3339 in UTC with its offset, as every timestamp byod answers is
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def token(
    sub: str, *, admin: bool = False, key: Any = SECRET, alg: str = "HS256", **claims: Any
) -> str:
    payload = {"sub": sub, "exp": int(time.time()) + 600, **claims}
    if admin:
        payload["byod_role"] = "admin"
    return jwt.encode(payload, key, algorithm=alg)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@dataclass
class Api:
    client: TestClient
    ws: Workspace
    a: int
    b: int
    url_a: str
    url_b: str

    def get(self, path: str, who: str, **kw: Any) -> Any:
        return self.client.get(path, headers=bearer(token(who, admin=who == "ops")), **kw)

    def post(self, path: str, who: str, **kw: Any) -> Any:
        return self.client.post(path, headers=bearer(token(who, admin=who == "ops")), **kw)


@pytest.fixture
def api(cws: Workspace, tmp_path: Path) -> Iterator[Api]:
    url_a = f"sqlite:///{tmp_path / 'a.db'}"
    url_b = f"sqlite:///{tmp_path / 'b.db'}"
    (tmp_path / "a.db").touch()
    (tmp_path / "b.db").touch()
    a = add_connected(cws, url_a, "user_a")
    b = add_connected(cws, url_b, "user_b")
    cws.directory.add_user("ops")
    app = create_app(cws, AuthSettings(secret=SECRET))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client, cws, a, b, url_a, url_b)


def wait_for_run(api: Api, path: str, who: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body: dict[str, Any] = api.get(path, who).json()
        if body["state"] != "running":
            return body
        time.sleep(0.1)
    raise AssertionError(f"{path} never finished")


def test_user_endpoints_happy_path(api: Api) -> None:
    instance = api.get("/v1/me/instance", "user_a")
    assert instance.status_code == 200
    assert instance.json() | {"last_error": None} == {
        "user_id": api.a,
        "clerk_id": "user_a",
        "connection_status": "connected",
        "schema_version": 0,
        "head_version": 3,
        "pending": 3,
        "last_error": None,
    }
    pending = api.get("/v1/me/migrations/pending", "user_a").json()
    assert pending["count"] == 3
    assert [m["id"] for m in pending["migrations"]] == ["001_create", "002_bump", "003_fragile"]
    started = api.post("/v1/me/migrations/run", "user_a")
    assert started.status_code == 202
    run_id = started.json()["run_id"]
    run = wait_for_run(api, f"/v1/runs/{run_id}", "user_a")
    assert (run["state"], run["succeeded"], run["failed"], run["remaining"]) == (
        "completed",
        1,
        0,
        0,
    )
    page = api.get("/v1/me/migrations", "user_a", params={"limit": 2}).json()
    assert [row["migration_id"] for row in page["items"]] == ["003_fragile", "002_bump"]
    assert page["limit"] == 2
    second = api.get("/v1/me/migrations", "user_a", params={"limit": 2, "offset": 2}).json()
    assert [row["migration_id"] for row in second["items"]] == ["001_create"]
    assert api.get("/v1/me/instance", "user_a").json()["schema_version"] == 3
    assert api.get("/v1/me/instance", "user_b").json()["schema_version"] == 0  # untouched


def test_a_self_service_run_with_a_base_exception_reports_the_failed_step(api: Api) -> None:
    execute(api.url_a, "CREATE TABLE melt_me (id INTEGER)")
    started = api.post("/v1/me/migrations/run", "user_a")
    assert started.status_code == 202
    run = wait_for_run(api, f"/v1/runs/{started.json()['run_id']}", "user_a")
    assert (run["state"], run["succeeded"], run["failed"]) == ("completed", 0, 1)
    newest = api.get("/v1/me/migrations", "user_a").json()["items"][0]
    assert (newest["migration_id"], newest["status"]) == ("003_fragile", "failed")
    assert "Meltdown" in newest["error"]
    assert api.get("/v1/me/instance", "user_a").json()["schema_version"] == 2


def test_a_second_run_while_one_runs_is_409(api: Api) -> None:
    execute(api.url_a, "CREATE TABLE hold_me (id INTEGER)")
    assert api.ws.runner().migrate(api.a, to_version=1).ok
    gates.reset()
    first = api.post("/v1/me/migrations/run", "user_a")
    assert first.status_code == 202
    try:
        assert gates.entered.wait(20)
        again = api.post("/v1/me/migrations/run", "user_a")
        assert again.status_code == 409
        assert again.headers["content-type"].startswith("application/problem+json")
    finally:
        gates.release.set()
    run = wait_for_run(api, f"/v1/runs/{first.json()['run_id']}", "user_a")
    assert run["succeeded"] == 1


def test_user_a_can_never_reach_user_b(api: Api) -> None:
    b_run = api.post("/v1/me/migrations/run", "user_b").json()["run_id"]
    wait_for_run(api, f"/v1/runs/{b_run}", "user_b")
    assert api.get(f"/v1/runs/{b_run}", "user_a").status_code == 404
    assert api.get(f"/v1/fleet/runs/{b_run}", "user_a").status_code == 403
    for ref in (str(api.b), "user_b", str(api.a)):
        assert api.get(f"/v1/users/{ref}/migrations", "user_a").status_code == 403
    mine = api.get("/v1/me/migrations", "user_a").json()
    assert mine["items"] == []  # b's history is not a's
    assert api.get("/v1/me/instance", "user_a").json()["schema_version"] == 0


def test_a_user_reads_only_the_runs_they_started_themselves(api: Api) -> None:
    """A run of only user_a's database started by an operator is not theirs to read (it
    names the operator's account): 404, worded as for a run that does not exist."""
    by_operator = migrate_fleet(
        api.ws, selection=Selection(users=(api.a,)), started_by="root@ops-host"
    ).run_id
    assert by_operator is not None
    theirs = api.get(f"/v1/runs/{by_operator}", "user_a")
    nothing = api.get("/v1/runs/20261129-000000-000000", "user_a")
    assert (theirs.status_code, nothing.status_code) == (404, 404)
    assert "root@ops-host" not in theirs.text
    assert theirs.json()["detail"].replace(by_operator, "ID") == nothing.json()["detail"].replace(
        "20261129-000000-000000", "ID"
    )
    own = api.post("/v1/me/migrations/run", "user_a").json()["run_id"]
    assert wait_for_run(api, f"/v1/runs/{own}", "user_a")["started_by"] == "user_a (token)"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/v1/fleet/status"),
        ("post", "/v1/fleet/runs"),
        ("get", "/v1/fleet/runs/anything"),
        ("get", "/v1/users/user_b/migrations"),
    ],
)
def test_non_admins_get_403_on_operator_endpoints(api: Api, method: str, path: str) -> None:
    response = getattr(api, method)(path, "user_a", **({"json": {}} if method == "post" else {}))
    assert response.status_code == 403
    body = response.json()
    assert body["status"] == 403 and body["type"].endswith("forbidden") and body["detail"]


def test_operator_endpoints(api: Api) -> None:
    execute(api.url_b, "CREATE TABLE break_me (id INTEGER)")
    started = api.post("/v1/fleet/runs", "ops", json={"concurrency": 2})
    assert started.status_code == 202
    run = wait_for_run(api, f"/v1/fleet/runs/{started.json()['run_id']}", "ops")
    assert (run["planned"], run["succeeded"], run["failed"], run["done"], run["remaining"]) == (
        2,
        1,
        1,
        2,
        0,
    )
    status = api.get("/v1/fleet/status", "ops").json()
    assert status["by_version"] == {"2": 1, "3": 1}
    assert status["recent_failures"][0]["clerk_id"] == "user_b"
    history = api.get("/v1/users/user_b/migrations", "ops").json()
    assert history["items"][0]["status"] == "failed"
    assert api.get("/v1/users/nobody/migrations", "ops").status_code == 404
    assert api.get("/v1/fleet/runs/nope", "ops").status_code == 404
    assert api.post("/v1/fleet/runs", "ops", json={"concurrency": 0}).status_code == 422


def timestamps(body: object, where: str = "") -> Iterator[tuple[str, str]]:
    """Every ``(where, value)`` of a timestamp field (``…_at``, ``at``) in a JSON body."""
    if isinstance(body, dict):
        for key, value in body.items():
            if (key == "at" or key.endswith("_at")) and value is not None:
                yield f"{where}.{key}", value
            else:
                yield from timestamps(value, f"{where}.{key}")
    elif isinstance(body, list):
        for n, value in enumerate(body):
            yield from timestamps(value, f"{where}[{n}]")


def test_every_timestamp_is_rfc3339_utc_with_its_offset(api: Api) -> None:
    """On this control-plane kind, every timestamp the API answers ends in ``Z`` and is
    the real moment in UTC (not the server's local time written without an offset)."""
    execute(api.url_b, "CREATE TABLE break_me (id INTEGER)")
    before = datetime.now(UTC) - timedelta(seconds=5)
    fleet_run = api.post("/v1/fleet/runs", "ops", json={"retries": 0}).json()["run_id"]
    wait_for_run(api, f"/v1/fleet/runs/{fleet_run}", "ops")
    own_run = api.post("/v1/me/migrations/run", "user_a").json()["run_id"]
    wait_for_run(api, f"/v1/runs/{own_run}", "user_a")
    after = datetime.now(UTC) + timedelta(seconds=5)
    bodies = {
        "fleet run": api.get(f"/v1/fleet/runs/{fleet_run}", "ops").json(),
        "own run": api.get(f"/v1/runs/{own_run}", "user_a").json(),
        "status": api.get("/v1/fleet/status", "ops").json(),
        "my history": api.get("/v1/me/migrations", "user_a").json(),
        "b's history": api.get("/v1/users/user_b/migrations", "ops").json(),
    }
    found = [
        (name + where, value) for name, body in bodies.items() for where, value in timestamps(body)
    ]
    assert len(found) >= 12, found
    for where, value in found:
        assert RFC3339_UTC.match(value), (where, value)
        assert before <= datetime.fromisoformat(value) <= after, (where, value)
    assert bodies["fleet run"]["ended_at"] is not None
    assert bodies["status"]["recent_failures"][0]["at"].endswith("Z")


def test_a_self_service_run_at_head_counts_the_user_up_to_date(api: Api) -> None:
    assert api.ws.runner().migrate(api.a).ok
    started = api.post("/v1/me/migrations/run", "user_a")
    assert started.status_code == 202
    run = wait_for_run(api, f"/v1/runs/{started.json()['run_id']}", "user_a")
    assert (run["state"], run["planned"], run["up_to_date"], run["succeeded"]) == (
        "completed",
        1,
        1,
        0,
    )
    assert (run["failed"], run["not_started"], run["remaining"]) == (0, 0, 0)


@pytest.mark.parametrize(
    "body",
    [
        {"max_failure_rate": 0.01},  # a misspelt safety limit is never dropped silently
        {"users": [1]},
        {"bogus": 1},
        {"canary": True},
        {"per_host": 1},  # goes with distributed
        {"limit": 2**40},
        {"concurrency": "2"},  # a number is a JSON number, as the document says
        {"timeout": "5"},
        {"max_failure_ratio": "0.5"},
        {"rehearse": "true"},
    ],
)
def test_a_fleet_run_request_with_an_unknown_or_wrong_field_is_422(
    api: Api, body: dict[str, Any]
) -> None:
    answer = api.post("/v1/fleet/runs", "ops", json=body)
    assert answer.status_code == 422, answer.text
    assert RunStore(api.ws.engine).recent(noop=True) == []  # no run was started


def test_an_operator_reads_a_clerk_id_holding_a_slash(api: Api) -> None:
    slashed = api.ws.directory.add_user("org/alice")
    history = api.get("/v1/users/org%2Falice/migrations", "ops")
    assert history.status_code == 200 and history.json()["items"] == []
    by_id = api.get(f"/v1/users/{slashed.id}/migrations", "ops")
    assert by_id.status_code == 200


def _rsa() -> tuple[Any, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, pem.decode()


def _hmac_signed(claims: dict[str, Any], key: bytes) -> str:
    """An HS256 token signed with the server's *public* key (the key-confusion attack)."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = part(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = part(json.dumps(claims).encode())
    signature = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{part(signature)}"


def test_every_bad_token_is_401(api: Api) -> None:
    other_key = "another-secret-that-is-long-enough-for-hs256"
    unsigned = jwt.encode({"sub": "user_a", "exp": int(time.time()) + 600}, None, algorithm="none")
    cases = {
        "missing": {},
        "not bearer": {"Authorization": "Basic abc"},
        "garbage": bearer("not.a.jwt"),
        "alg none": bearer(unsigned),
        "wrong key": bearer(token("user_a", key=other_key)),
        "expired": bearer(token("user_a", exp=int(time.time()) - 10)),
        "not yet valid": bearer(token("user_a", nbf=int(time.time()) + 600)),
        "no exp": bearer(jwt.encode({"sub": "user_a"}, SECRET, algorithm="HS256")),
        "rs256 to an hs256 server": bearer(token("user_a", key=_rsa()[0], alg="RS256")),
    }
    for name, headers in cases.items():
        response = api.client.get("/v1/me/instance", headers=headers)
        assert response.status_code == 401, name
        assert response.headers["content-type"].startswith("application/problem+json"), name
        assert "Traceback" not in response.text


def test_audience_and_issuer_are_checked_when_configured(cws: Workspace) -> None:
    cws.directory.add_user("someone")
    settings = AuthSettings(secret=SECRET, audience="byod-api", issuer="https://auth.example")
    with TestClient(create_app(cws, settings)) as client:
        good = token("someone", aud="byod-api", iss="https://auth.example")
        assert client.get("/v1/me/migrations", headers=bearer(good)).status_code == 200
        for bad in (
            token("someone", aud="other", iss="https://auth.example"),
            token("someone", aud="byod-api", iss="https://evil.example"),
            token("someone"),
        ):
            assert client.get("/v1/me/migrations", headers=bearer(bad)).status_code == 401


def test_rs256_public_key_and_es256_jwks(cws: Workspace, tmp_path: Path) -> None:
    cws.directory.add_user("someone")
    private, pem = _rsa()
    with TestClient(create_app(cws, AuthSettings(public_key_pem=pem))) as client:
        good = token("someone", key=private, alg="RS256")
        assert client.get("/v1/me/migrations", headers=bearer(good)).status_code == 200
        hs = _hmac_signed({"sub": "someone", "exp": int(time.time()) + 60}, pem.encode())
        assert client.get("/v1/me/migrations", headers=bearer(hs)).status_code == 401
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk | {"kid": "k1", "alg": "ES256", "use": "sig"}]}))
    with TestClient(create_app(cws, AuthSettings(jwks_path=jwks))) as client:
        good = jwt.encode(
            {"sub": "someone", "exp": int(time.time()) + 60},
            ec_key,
            algorithm="ES256",
            headers={"kid": "k1"},
        )
        assert client.get("/v1/me/migrations", headers=bearer(good)).status_code == 200
        wrong_kid = jwt.encode(
            {"sub": "someone", "exp": int(time.time()) + 60},
            ec_key,
            algorithm="ES256",
            headers={"kid": "k2"},
        )
        assert client.get("/v1/me/migrations", headers=bearer(wrong_kid)).status_code == 401


def test_errors_are_problem_documents_without_internals(api: Api) -> None:
    response = api.get("/v1/me/instance", "ops")  # ops has no database
    assert response.status_code == 404
    body = response.json()
    assert set(body) == {"type", "title", "status", "detail"}
    assert "no database connected" in body["detail"]
    assert (body["type"], body["title"]) == (
        "urn:byod:problem:not-connected",
        "no database connected",
    )
    unavailable = api.post("/v1/fleet/runs", "ops", json={"distributed": True}).json()
    assert unavailable["title"] == "this server is not set up for that"  # one short line
    unknown = api.get("/v1/me/instance", "stranger")
    assert unknown.status_code == 404 and "stranger" in unknown.json()["detail"]
    assert api.client.get("/openapi.json").json()["paths"]["/v1/me/instance"]


def test_a_distributed_run_needs_a_broker(api: Api) -> None:
    refused = api.post("/v1/fleet/runs", "ops", json={"distributed": True})
    assert refused.status_code == 503  # the server's set-up, not the request
    assert "BYOD_BROKER_URL" in refused.json()["detail"]
    assert refused.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("bad", ["abc%00", "%01x", "a%0Ab", "x" * 300, "20261207-002955-8f4eac%00"])
def test_a_malformed_run_id_is_404_not_a_server_error(api: Api, bad: str) -> None:
    """Regression: a NUL byte in the id answered 503 control-plane-unavailable."""
    for path, who in ((f"/v1/runs/{bad}", "user_a"), (f"/v1/fleet/runs/{bad}", "ops")):
        answer = api.get(path, who)
        assert answer.status_code == 404, (path, answer.text)
        assert answer.json()["type"].endswith("not-found")


def test_pending_without_a_database_is_zero_not_a_404(api: Api) -> None:
    """As the original plan's getPendingMigrations: 0 while nothing is connected."""
    answer = api.get("/v1/me/migrations/pending", "ops")  # a user with no database
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"count": 0, "migrations": [], "connected": False}
    mine = api.get("/v1/me/migrations/pending", "user_a").json()
    assert (mine["count"], mine["connected"]) == (3, True)
    assert api.get("/v1/me/migrations/pending", "nobody").status_code == 404  # unknown user


def test_byod_token_mints_tokens_the_server_accepts(api: Api, tmp_path: Path) -> None:
    from tests.test_cli import Cli

    cli = Cli(tmp_path, BYOD_JWT_SECRET=SECRET)
    user = cli("token", "--sub", "user_a")
    ops = cli("token", "--sub", "ops", "--role", "admin", "--expires-in", "60")
    assert user.code == 0 and ops.code == 0, user.err + ops.err
    mine = api.client.get("/v1/me/instance", headers=bearer(user.out.strip()))
    assert mine.status_code == 200 and mine.json()["clerk_id"] == "user_a"
    assert api.client.get("/v1/fleet/status", headers=bearer(user.out.strip())).status_code == 403
    assert api.client.get("/v1/fleet/status", headers=bearer(ops.out.strip())).status_code == 200
    nested = Cli(tmp_path, BYOD_JWT_SECRET=SECRET, BYOD_JWT_ROLE_CLAIM="app.role")
    claims = jwt.decode(
        nested("token", "--sub", "ops", "--role", "admin").out.strip(), SECRET, ["HS256"]
    )
    assert claims["app"] == {"role": "admin"} and claims["sub"] == "ops"
    jwks = Cli(tmp_path, BYOD_JWT_JWKS=str(tmp_path / "keys.json"))("token", "--sub", "x")
    assert jwks.code == 2 and "identity provider" in jwks.err
    assert Cli(tmp_path)("token", "--sub", "x").code == 2  # no secret: a clear refusal
    assert cli("token", "--sub", "x", "--role", "root").code == 2


def test_a_no_op_run_over_http_gets_its_id_and_stays_off_the_dashboard_by_default(
    api: Api,
) -> None:
    for who in ("user_a", "user_b"):
        assert api.ws.runner().migrate(api.a if who == "user_a" else api.b).ok
    started = api.post("/v1/fleet/runs", "ops", json={})
    assert started.status_code == 202
    run_id = started.json()["run_id"]
    run = wait_for_run(api, f"/v1/fleet/runs/{run_id}", "ops")
    assert (run["state"], run["succeeded"], run["up_to_date"]) == ("completed", 0, 2)
    signed_in = api.client.post(
        "/dashboard/login", data={"token": token("ops", admin=True)}, follow_redirects=False
    )
    assert signed_in.status_code == 303
    page = api.client.get("/dashboard").text
    assert "Fleet runs" in page and run_id not in page
    assert run_id in api.client.get("/dashboard", params={"noop": "1"}).text
