"""The local Convex backend (``byod/convex_server/server.mjs``) answers as a Convex deployment
does, running the example app's real functions (``byod/example_convex_app``, byod's module
copied in), spoken to with plain httpx: public and internal functions with and without the
deploy key, a function that throws (HTTP 560), the 429 switch and the latency, byod's
backfill wrapper (one transaction per batch, a compare-and-set on the progress), its lock,
and a deploy that loads new code while keeping the data, ids included. No mocks.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.convex_backend import EXAMPLE_APP, ROOT, ControlError, ConvexServer

HASHTAG = re.compile(r"(?<![\w#])#([A-Za-z][\w-]{0,63})", re.ASCII)
NOT_FOUND = "Could not find public function for '{}'. Did you forget to run `npx convex dev`"
PAGE = "documents:tagPage"
BAD_KEY = {"code": "BadAdminKey", "message": "The provided admin key was invalid for this instance"}


@dataclass
class Deployment:
    """A deployment of the local backend, and its deploy key."""

    name: str
    url: str
    key: str
    http: httpx.Client

    def post(
        self,
        endpoint: str,
        path: str,
        args: dict[str, Any] | None = None,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """POST ``<base>/api/<endpoint>`` as ConvexHttpClient does (``key``: as admin)."""
        sent: Any = args or {}
        body = {"path": path, "format": "convex_encoded_json", "args": sent}
        if endpoint != "function":
            body["args"] = [sent]
        all_headers = dict(headers or {})
        if key is not None:
            all_headers["Authorization"] = f"Convex {key}"
        return self.http.post(f"{self.url}/api/{endpoint}", json=body, headers=all_headers)

    def call(
        self, endpoint: str, path: str, args: dict[str, Any] | None = None, *, admin: bool = False
    ) -> Any:
        """The value of a call that must succeed."""
        response = self.post(endpoint, path, args, key=self.key if admin else None)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "success", body
        return body["value"]

    def byod(self, function: str, args: dict[str, Any] | None = None) -> Any:
        """One of byod's internal functions, with the deploy key."""
        return self.call("function", f"byod:{function}", args, admin=True)

    def refused(self, function: str, args: dict[str, Any]) -> dict[str, Any]:
        """The 560 answer of one of byod's functions that must refuse."""
        response = self.post("function", f"byod:{function}", args, key=self.key)
        assert response.status_code == 560, response.text
        body: dict[str, Any] = response.json()
        assert body["status"] == "error"
        return body


Make = Callable[..., Deployment]


@pytest.fixture
def deployments(convex_server: ConvexServer) -> Iterator[Make]:
    """Makes deployments (of the example app, or of ``app_dir``); deleted afterwards."""
    made: list[Deployment] = []

    def make(app_dir: Path = EXAMPLE_APP) -> Deployment:
        name = f"t-{uuid.uuid4().hex[:12]}"
        key = f"dev:{name}|{secrets.token_urlsafe(24)}"
        url = convex_server.create(name, key, app_dir)
        deployment = Deployment(name, url, key, httpx.Client(timeout=30))
        made.append(deployment)
        return deployment

    yield make
    for deployment in made:
        deployment.http.close()
        with contextlib.suppress(ControlError):
            convex_server.delete(deployment.name)


@pytest.fixture
def app(deployments: Make) -> Deployment:
    """A fresh deployment of the example app."""
    return deployments()


def app_copy(folder: Path) -> Path:
    """A copy of the example app to change (its ``convex/`` folder)."""
    target = folder / "convex-notes"
    shutil.copytree(EXAMPLE_APP, target)
    return target


def edit(file: Path, old: str, new: str) -> None:
    text = file.read_text()
    assert old in text, f"{old!r} is not in {file}"
    file.write_text(text.replace(old, new))


def create_notes(app: Deployment, bodies: list[str]) -> list[str]:
    return [
        app.call("mutation", "documents:create", {"title": f"Note {i}", "body": body})
        for i, body in enumerate(bodies)
    ]


def tags_of(text: str) -> list[str]:
    return list(dict.fromkeys(name.lower() for name in HASHTAG.findall(text)))


def batch_args(migration: str, progress: dict[str, Any], page: str, n: int) -> dict[str, Any]:
    """``byod:runBatch``'s arguments for the next batch after ``progress``."""
    return {
        "migration": migration,
        "backfill": progress["backfill"],
        "page": page,
        "cursor": progress["cursor"],
        "expectedRowsDone": progress["rowsDone"],
        "numItems": n,
    }


# -- the HTTP API ---------------------------------------------------------------------------


def test_public_functions_answer_without_a_key_and_with_the_deploy_key(app: Deployment) -> None:
    created = app.post("mutation", "documents:create", {"title": "Hello", "body": "#first"})
    assert created.status_code == 200
    body = created.json()
    assert set(body) == {"status", "value", "logLines"}
    assert body["status"] == "success"
    doc_id = body["value"]
    assert isinstance(doc_id, str)

    doc = app.call("query", "documents:get", {"id": doc_id})
    assert doc["_id"] == doc_id
    assert (doc["title"], doc["body"]) == ("Hello", "#first")
    assert isinstance(doc["_creationTime"], int | float)

    # the deploy key (admin) may call public functions too
    admin_id = app.call("mutation", "documents:create", {"title": "Admin", "body": ""}, admin=True)
    listed = app.call("query", "documents:list", admin=True)
    assert [d["_id"] for d in listed] == [doc_id, admin_id]
    assert app.call("query", "documents:list") == listed


def test_internal_functions_need_the_deploy_key(app: Deployment) -> None:
    assert app.call("function", "byod:readStamp", admin=True) == []
    assert app.call("query", "byod:readStamp", admin=True) == []  # admin: on every endpoint

    wrong = app.post("function", "byod:readStamp", key=f"dev:{app.name}|not-the-key")
    assert wrong.status_code == 401
    assert wrong.json() == BAD_KEY
    # a wrong key is refused even for a public function
    assert app.post("query", "documents:list", key="dev:x|wrong").json() == BAD_KEY

    for endpoint in ("function", "query"):
        hidden = app.post(endpoint, "byod:readStamp")
        assert hidden.status_code == 560
        body = hidden.json()
        assert body["status"] == "error"
        assert NOT_FOUND.format("byod:readStamp") in body["errorMessage"]
        assert "value" not in body
    # a function that is not there reads the same (no caller learns which internal ones exist)
    missing = app.post("query", "documents:nope")
    assert missing.status_code == 560
    assert NOT_FOUND.format("documents:nope") in missing.json()["errorMessage"]

    # the endpoint must match the function's kind
    kind = app.post("query", "documents:create", {"title": "x", "body": ""})
    assert kind.status_code == 560
    assert "as Query, but it is defined as Mutation" in kind.json()["errorMessage"]

    # a user's token: this backend has no auth provider
    user = app.post("query", "documents:list", headers={"Authorization": "Bearer e30.e30."})
    assert user.status_code == 401
    assert user.json()["code"] == "NoAuthProvider"
    assert app.call("query", "documents:list") == []  # nothing was written by any of these


def test_a_function_that_throws_answers_560(app: Deployment) -> None:
    thrown = app.post("mutation", "documents:update", {"id": "nope", "body": "x"})
    assert thrown.status_code == 560
    body = thrown.json()
    assert body["status"] == "error"
    assert "Uncaught Error: no document nope" in body["errorMessage"]
    assert "errorData" not in body
    assert body["logLines"] == []

    convex_error = app.post("mutation", "documents:create", {"title": "  ", "body": "x"})
    assert convex_error.status_code == 560
    assert convex_error.json()["errorData"] == {
        "code": "EMPTY_TITLE",
        "message": "a document needs a title",
    }

    invalid = app.post("mutation", "documents:create", {"title": 5, "body": ""})
    assert invalid.status_code == 560
    assert invalid.json()["status"] == "error"
    assert app.call("query", "documents:list") == []


def test_unknown_deployment_and_bad_requests(convex_server: ConvexServer, app: Deployment) -> None:
    unknown = httpx.post(f"{convex_server.url}/d/no-such/api/query", json={"path": "a:b"})
    assert unknown.status_code == 404
    assert unknown.json()["code"] == "DeploymentNotFound"

    bad_json = app.http.post(f"{app.url}/api/query", content=b"{not json")
    assert bad_json.status_code == 400
    assert bad_json.json()["code"] == "BadJsonBody"

    bad_path = app.post("query", "no colons: allowed:here")
    assert bad_path.status_code == 400
    assert set(bad_path.json()) == {"code", "message"}


def test_throttle_answers_429_then_recovers(convex_server: ConvexServer, app: Deployment) -> None:
    convex_server.throttle(app.name, 2)
    first = app.post("mutation", "documents:create", {"title": "a", "body": ""})
    second = app.post("query", "documents:list")
    for refused in (first, second):
        assert refused.status_code == 429
        assert refused.json()["code"] == "RateLimited"
        assert "Retry-After" not in refused.headers
    assert app.call("query", "documents:list") == []  # the refused mutation never ran

    convex_server.throttle(app.name, 1, retry_after_seconds=2)
    assert app.post("query", "documents:list").headers["Retry-After"] == "2"
    assert app.post("query", "documents:list").status_code == 200


def test_latency_delays_each_request_without_serializing_them(
    convex_server: ConvexServer, app: Deployment
) -> None:
    convex_server.latency(app.name, 1000)
    body = {"path": "documents:list", "format": "convex_encoded_json", "args": [{}]}

    def timed(_: int) -> float:
        started = time.monotonic()
        response = httpx.post(f"{app.url}/api/query", json=body, timeout=30)
        assert response.status_code == 200
        return time.monotonic() - started

    with ThreadPoolExecutor(4) as pool:
        durations = list(pool.map(timed, range(4)))
    assert min(durations) >= 1.0
    # one after another, the last would wait 4 s: 3 s of margin for a loaded machine
    assert max(durations) < 3.0, durations
    convex_server.latency(app.name, 0)


def test_deployments_are_separate_and_the_control_api_is_the_admins(
    convex_server: ConvexServer, deployments: Make
) -> None:
    a, b = deployments(), deployments()
    create_notes(a, ["only in a"])
    assert len(a.call("query", "documents:list")) == 1
    assert b.call("query", "documents:list") == []
    assert b.post("query", "documents:list", key=a.key).json() == BAD_KEY

    listing = convex_server.deployments()
    assert {a.name, b.name} <= {d["name"] for d in listing}
    assert a.key not in str(listing)
    assert b.key not in str(listing)

    for header in ({}, {"Authorization": f"Bearer {a.key}"}, {"Authorization": f"Convex {a.key}"}):
        control = httpx.get(f"{convex_server.url}/_admin/deployments", headers=header)
        assert control.status_code == 401
        assert control.json()["code"] == "Unauthorized"

    convex_server.delete(b.name)
    gone = b.post("query", "documents:list")
    assert gone.status_code == 404
    assert gone.json()["code"] == "DeploymentNotFound"
    assert len(a.call("query", "documents:list")) == 1


# -- byod's module ---------------------------------------------------------------------------


def test_the_example_app_runs_byods_canonical_module() -> None:
    canonical = ROOT / "src" / "byod" / "convex_module"
    copies = EXAMPLE_APP / "convex"
    assert (copies / "byod.ts").read_text() == (canonical / "byod.ts").read_text()
    assert (copies / "byodTables.ts").read_text() == (canonical / "tables.ts").read_text()


def test_tag_page_backfill_goes_through_every_document_once(app: Deployment) -> None:
    bodies = [
        f"Note {i}: #Topic{i % 5} and #all, mail a#b.c, ##double, #{i}bad, #x{i} #ALL"
        for i in range(50)
    ]
    ids = create_notes(app, bodies)
    assert tags_of(bodies[0]) == ["topic0", "all", "x0"]

    started = app.byod("startProgress", {"migration": "003_tags", "rowsTotal": 50})
    assert started == {
        "migration": "003_tags",
        "backfill": 0,
        "cursor": None,
        "rowsDone": 0,
        "rowsTotal": 50,
    }
    # the page's console output comes back in the batch's log lines
    first = app.post(
        "function", "byod:runBatch", batch_args("003_tags", started, PAGE, 10), key=app.key
    )
    new_tags = len({name for body in bodies[:10] for name in tags_of(body)})  # 16
    assert first.json()["logLines"] == [f"[LOG] tagPage: 10 documents, {new_tags} new tags"]
    progress, batches = first.json()["value"]["progress"], [10]
    while progress["backfill"] == 0:
        out = app.byod("runBatch", batch_args("003_tags", progress, PAGE, 10))
        batches.append(out["rows"])
        progress = out["progress"]
        assert progress["rowsDone"] == sum(batches)
        assert len(batches) <= 6
    assert batches[:5] == [10] * 5
    assert sum(batches) == 50
    assert progress == {
        "migration": "003_tags",
        "backfill": 1,
        "cursor": None,
        "rowsDone": 50,
        "rowsTotal": 50,
    }

    documents = {d["_id"]: d for d in app.call("query", "documents:list")}
    assert set(documents) == set(ids)
    expected: dict[str, set[str]] = {}
    for doc_id, body in zip(ids, bodies, strict=True):
        names = tags_of(body)
        assert documents[doc_id]["updates"] == 1
        assert documents[doc_id]["tagCount"] == len(names)
        for name in names:
            expected.setdefault(name, set()).add(doc_id)
    tags = app.call("query", "documents:listTags")
    assert [t["name"] for t in tags] == sorted(expected)
    assert {t["name"]: set(t["documentIds"]) for t in tags} == expected
    assert all(len(t["documentIds"]) == len(set(t["documentIds"])) for t in tags)

    stamp = {"version": 3, "checksum": "sha256:abc", "appliedAt": 1_700_000_000_000}
    app.byod("finishProgress", {"migration": "003_tags", "backfills": 1, "stamp": stamp})
    assert app.byod("readProgress", {"migration": "003_tags"}) is None
    assert app.byod("readStamp") == [{"id": "003_tags", **stamp}]


def test_run_batch_refuses_a_stale_expected_rows_done(app: Deployment) -> None:
    create_notes(app, [f"#n{i}" for i in range(25)])
    start = app.byod("startProgress", {"migration": "m", "rowsTotal": None})
    first = app.byod("runBatch", batch_args("m", start, PAGE, 10))
    assert first["progress"]["rowsDone"] == 10

    # the same batch again (a runner that did not see its answer): refused, nothing done
    stale = app.refused("runBatch", batch_args("m", start, PAGE, 10))
    assert stale["errorData"]["code"] == "BYOD_DRIFT"
    assert stale["errorData"]["progress"]["rowsDone"] == 10
    assert "changed under this run" in stale["errorMessage"]
    updates = [d.get("updates") for d in app.call("query", "documents:list")]
    assert updates == [1] * 10 + [None] * 15

    # a right rows count with a wrong cursor is stale too
    wrong_cursor = {**batch_args("m", first["progress"], PAGE, 10), "cursor": None}
    assert app.refused("runBatch", wrong_cursor)["errorData"]["code"] == "BYOD_DRIFT"

    second = app.byod("runBatch", batch_args("m", first["progress"], PAGE, 10))
    assert second["progress"]["rowsDone"] == 20
    assert app.byod("readProgress", {"migration": "m"}) == second["progress"]
    # a step whose progress was not started has no batch; one not done cannot finish
    not_started = app.refused("runBatch", batch_args("other", start, PAGE, 10))
    assert not_started["errorData"]["code"] == "BYOD_DRIFT"
    not_done = app.refused("finishProgress", {"migration": "m", "backfills": 1})
    assert not_done["errorData"]["code"] == "BYOD_DRIFT"
    assert app.byod("readProgress", {"migration": "m"}) == second["progress"]


def test_a_batch_whose_page_fails_changes_nothing(deployments: Make, tmp_path: Path) -> None:
    folder = app_copy(tmp_path)
    failing = """
export const failingPage = internalMutation({
  args: { cursor: v.union(v.string(), v.null()), numItems: v.number() },
  handler: async (ctx, { cursor, numItems }) => {
    const page = await ctx.db.query("documents").paginate({ cursor, numItems });
    for (const d of page.page) await ctx.db.patch(d._id, { updates: (d.updates ?? 0) + 1 });
    await ctx.db.insert("tags", { name: "half-done" });
    throw new Error("the page broke halfway");
  },
});

export const shapelessPage = internalMutation({
  args: { cursor: v.union(v.string(), v.null()), numItems: v.number() },
  handler: async () => ({ done: true }),
});
"""
    with (folder / "convex" / "documents.ts").open("a") as file:
        file.write(failing)
    app = deployments(folder)
    create_notes(app, ["#a", "#b", "#c"])
    start = app.byod("startProgress", {"migration": "m", "rowsTotal": 3})

    failed = app.refused("runBatch", batch_args("m", start, "documents:failingPage", 2))
    assert failed["errorData"]["code"] == "BYOD_PAGE_FAILED"
    assert "the page broke halfway" in failed["errorMessage"]
    assert "the cursor stays before it" in failed["errorMessage"]
    assert [d.get("updates") for d in app.call("query", "documents:list")] == [None] * 3
    assert app.call("query", "documents:listTags") == []
    assert app.byod("readProgress", {"migration": "m"}) == start

    shapeless = app.refused("runBatch", batch_args("m", start, "documents:shapelessPage", 2))
    assert shapeless["errorData"]["code"] == "BYOD_BAD_PAGE"
    own = app.refused("runBatch", batch_args("m", start, "byod:takeLock", 2))
    assert own["errorData"]["code"] == "BYOD_BAD_ARGUMENT"
    assert app.byod("readProgress", {"migration": "m"}) == start


def test_the_lock(app: Deployment) -> None:
    assert app.byod("readLock") is None
    assert app.byod("takeLock", {"owner": "a", "ttlMs": 60_000}) is True
    assert app.byod("takeLock", {"owner": "b", "ttlMs": 60_000}) is False
    assert app.byod("releaseLock", {"owner": "b"}) is False  # only its owner releases it
    assert app.byod("takeLock", {"owner": "a", "ttlMs": 60_000}) is True  # renewed
    assert app.byod("releaseLock", {"owner": "a"}) is True
    assert app.byod("readLock") is None

    # a hold that expires is taken over; the old owner can no longer write under it
    assert app.byod("takeLock", {"owner": "b", "ttlMs": 1_000}) is True
    assert app.byod("takeLock", {"owner": "c", "ttlMs": 60_000}) is False
    held = app.byod("readLock")
    assert held["owner"] == "b"
    deadline = time.monotonic() + 30
    while not app.byod("takeLock", {"owner": "c", "ttlMs": 60_000}):  # until b's hold lapses
        assert time.monotonic() < deadline, "the hold never lapsed"
        time.sleep(0.02)
    assert time.time() * 1000 >= held["expiresAt"], "taken only once b's hold had expired"
    assert app.byod("readLock")["owner"] == "c"
    step = {"id": "001", "version": 1, "checksum": "x"}
    lost = app.refused("recordStep", {**step, "owner": "b"})
    assert lost["errorData"]["code"] == "BYOD_LOCK_LOST"
    assert app.byod("readStamp") == []
    assert app.byod("recordStep", {**step, "owner": "c"}) is True
    assert app.byod("recordStep", {**step, "owner": "c"}) is False  # already recorded
    assert app.byod("removeStamp", {"id": "001", "owner": "c"}) is True
    assert app.byod("readStamp") == []
    assert app.byod("releaseLock", {"owner": "c"}) is True

    # racing owners: exactly one gets it
    def take(owner: int) -> bool:
        body = {
            "path": "byod:takeLock",
            "format": "convex_encoded_json",
            "args": {"owner": f"racer-{owner}", "ttlMs": 60_000},
        }
        response = httpx.post(
            f"{app.url}/api/function",
            json=body,
            headers={"Authorization": f"Convex {app.key}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return bool(response.json()["value"])

    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(take, range(8)))
    assert won.count(True) == 1


# -- deploy ----------------------------------------------------------------------------------


def test_deploy_keeps_the_data(
    convex_server: ConvexServer, deployments: Make, tmp_path: Path
) -> None:
    folder = app_copy(tmp_path)
    app = deployments(folder)
    ids = create_notes(app, ["#one", "#two", "#three"])
    app.byod("recordStep", {"id": "001_init", "version": 1, "checksum": "c1", "appliedAt": 5})
    start = app.byod("startProgress", {"migration": "002", "rowsTotal": 3})
    first = app.byod("runBatch", batch_args("002", start, PAGE, 2))
    before = app.call("query", "documents:list")
    assert NOT_FOUND.format("stats:count") in app.post("query", "stats:count").text

    # new code: a new module, and a changed function
    (folder / "convex" / "stats.ts").write_text(
        'import { query } from "./_generated/server";\n\n'
        "export const count = query({\n"
        "  args: {},\n"
        '  handler: async (ctx) => (await ctx.db.query("documents").collect()).length,\n'
        "});\n"
    )
    edit(
        folder / "convex" / "documents.ts",
        'ctx.db.insert("documents", { title, body })',
        'ctx.db.insert("documents", { title: title.toUpperCase(), body })',
    )
    answer = convex_server.deploy(app.name)
    assert answer["deploys"] == 2
    assert "stats:count" in {f["path"] for f in answer["functions"]}

    assert app.call("query", "documents:list") == before  # same ids, creation times, fields
    assert app.call("query", "stats:count") == 3
    assert app.byod("readStamp") == [
        {"id": "001_init", "version": 1, "checksum": "c1", "appliedAt": 5}
    ]
    new_id = app.call("mutation", "documents:create", {"title": "after", "body": "#four"})
    assert new_id not in ids
    assert app.call("query", "documents:get", {"id": new_id})["title"] == "AFTER"

    # the backfill's cursor from before the deploy still leads on, each document once
    progress = first["progress"]
    while progress["backfill"] == 0:
        progress = app.byod("runBatch", batch_args("002", progress, PAGE, 2))["progress"]
    assert progress["rowsDone"] == 4
    assert [d["updates"] for d in app.call("query", "documents:list")] == [1, 1, 1, 1]

    # a schema the data does not match is refused, and nothing changes
    schema = folder / "convex" / "schema.ts"
    edit(schema, "body: v.string(),", "body: v.string(),\n    author: v.string(),")
    (folder / "convex" / "stats.ts").unlink()
    with pytest.raises(ControlError) as refused:
        convex_server.deploy(app.name)
    assert refused.value.status == 400
    assert refused.value.code == "SchemaValidationFailed"
    assert "does not match the schema" in refused.value.message
    assert app.call("query", "stats:count") == 4  # the old code still answers

    # code that does not build is refused too
    edit(schema, "author: v.string(),", "author: v.optional(v.string()),")
    (folder / "convex" / "broken.ts").write_text("export const x = (;\n")
    with pytest.raises(ControlError) as broken:
        convex_server.deploy(app.name)
    assert broken.value.code == "DeployFailed"
    assert "broken.ts" in broken.value.message

    # widening the schema is fine
    (folder / "convex" / "broken.ts").unlink()
    assert convex_server.deploy(app.name)["deploys"] == 3
    assert NOT_FOUND.format("stats:count") in app.post("query", "stats:count").text
    assert len(app.call("query", "documents:list")) == 4
