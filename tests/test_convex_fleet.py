"""Convex deployments migrated by byod: the example app's real functions (convex-test,
behind the local HTTP server), byod's module in each deployment, the deploy step run by
a stand-in command, and byod's runner, fleet runs and command line."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from byod.commands import connect, init, verify
from byod.controlplane import history
from byod.controlplane.schema import ledger
from byod.errors import SettingsError
from byod.fleet import UserFinished, migrate_fleet
from byod.phased import Batching
from byod.settings import Settings
from byod.spec import FleetOptions
from byod.targets.convex_client import ConvexClient
from byod.workspace import Workspace
from tests.conftest import TEST_KEY, ServerDatabases, child_env, write_migrations
from tests.convex_backend import DEPLOY, EXAMPLE_APP, ROOT, ControlError, ConvexServer
from tests.distributed_kit import BYOD, _delete_redis_queues
from tests.helpers import wait_for_leases_to_lapse, wait_until
from tests.test_cli import Cli

MIGRATIONS = EXAMPLE_APP / "migrations"
BODIES = [
    "plans for #Work and #home",
    "no tags here",
    "#work again, and #ideas",
    "an email a#b is not a tag, #x-ray is",
]


def expected_tags(bodies: list[str]) -> dict[str, int]:
    """Each tag's name and how many documents carry it, as the app's hashtag rule says."""
    import re

    rule = re.compile(r"(?<![\w#])#([A-Za-z][\w-]{0,63})")
    found: dict[str, int] = {}
    for body in bodies:
        for name in {m.lower() for m in rule.findall(body)}:
            found[name] = found.get(name, 0) + 1
    return found


@dataclass
class Deployment:
    """One test deployment: its name, base URL, deploy key, and an admin client."""

    name: str
    url: str
    key: str
    client: ConvexClient

    def byod(self, name: str, args: dict[str, Any] | None = None) -> Any:
        return self.client.function(f"byod:{name}", args or {})

    def lock_lapsed(self) -> bool:
        """Whether nobody holds the deployment's lock now (released, or its hold past)."""
        lock = self.byod("readLock")
        return lock is None or lock["expiresAt"] <= time.time() * 1000

    def stamp(self) -> list[str]:
        return [row["id"] for row in self.byod("readStamp")]

    def documents(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.client.query("documents:list")
        return result

    def tags(self) -> dict[str, int]:
        return {t["name"]: len(t["documentIds"]) for t in self.client.query("documents:listTags")}


DeploymentFactory = Callable[..., Deployment]


@pytest.fixture
def deployments(convex_server: ConvexServer, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Makes deployments of the example app seeded with documents; deletes them after."""
    made: list[Deployment] = []
    prefix = f"t{abs(hash(request.node.nodeid)) % 10**8}"

    def make(
        bodies: list[str] = BODIES, *, key: str | None = None, latency_ms: float = 0
    ) -> Deployment:
        name = f"{prefix}-{len(made)}"
        key = key or f"local:{name}|{os.urandom(12).hex()}"
        url = "convex+" + convex_server.create(name, key, EXAMPLE_APP, latency_ms=latency_ms)
        client = ConvexClient(url, key)
        deployment = Deployment(name, url, key, client)
        made.append(deployment)
        docs = [{"title": f"doc {i}", "body": body} for i, body in enumerate(bodies)]
        for start in range(0, len(docs), 1000):
            client.function("documents:createMany", {"documents": docs[start : start + 1000]})
        return deployment

    yield make
    for deployment in made:
        deployment.client.close()
        with contextlib.suppress(ControlError):  # a test may have deleted it already
            convex_server.delete(deployment.name)


def convex_env(**extra: str) -> dict[str, str]:
    return {
        "BYOD_ENCRYPTION_KEY": TEST_KEY,
        "BYOD_MIGRATIONS": str(MIGRATIONS),
        "BYOD_ALLOW_PRIVATE_INSTANCES": "1",
        "BYOD_CONVEX_DEPLOY": DEPLOY,
        "BYOD_CONVEX_CODE": "folder",  # the example app as it is (byod's git holds it)
        **extra,
    }


def convex_workspace(database_url: str, **extra: str) -> Workspace:
    """A workspace on ``database_url`` (``byod init`` done) with the Convex settings."""
    ws = Workspace(Settings.load(database_url=database_url, env=convex_env(**extra)))
    init(ws)
    return ws


@pytest.fixture
def cvx(tmp_path: Path) -> Iterator[Workspace]:
    """A SQLite control plane whose migrations are the Convex example app's."""
    ws = convex_workspace(f"sqlite:///{tmp_path / 'byod.db'}")
    yield ws
    ws.engine.dispose()


def add(ws: Workspace, deployment: Deployment, clerk_id: str | None = None) -> int:
    clerk_id = clerk_id or f"user-{deployment.name}"
    user = ws.directory.add_user(clerk_id)
    _, reach = connect(ws, clerk_id, deployment.url, secret=deployment.key)
    assert reach.status == "connected", reach.error
    return user.id


def ledger_rows(ws: Workspace, user_id: int) -> list[tuple[str, str, str | None]]:
    with ws.engine.connect() as conn:
        rows = conn.execute(
            sa.select(ledger.c.migration_id, ledger.c.status, ledger.c.error)
            .where(ledger.c.user_id == user_id)
            .order_by(ledger.c.id)
        )
        return [(r.migration_id, r.status, r.error) for r in rows]


def assert_at_head(deployment: Deployment, bodies: list[str] = BODIES) -> None:
    assert deployment.stamp() == ["001_initial", "002_add_tags"]
    assert deployment.tags() == expected_tags(bodies)
    assert [d.get("updates") for d in deployment.documents()] == [1] * len(bodies)
    assert deployment.byod("listProgress") == []
    assert deployment.byod("readLock") is None, "the lock is given back"


# -- the fleet --------------------------------------------------------------------------


def test_a_convex_fleet_migrates_to_head_with_its_ledger_exact(
    cvx: Workspace, deployments: DeploymentFactory, convex_server: ConvexServer
) -> None:
    fleet = [deployments() for _ in range(3)]
    ids = [add(cvx, d) for d in fleet]
    assert [cvx.directory.get_config(i).target_kind for i in ids] == ["convex"] * 3

    summary = migrate_fleet(cvx.runner(), options=FleetOptions(concurrency=3))

    assert summary.succeeded == 3 and summary.failed == 0
    for user_id, deployment in zip(ids, fleet, strict=True):
        assert_at_head(deployment)
        assert ledger_rows(cvx, user_id) == [
            ("001_initial", "completed", None),
            ("002_add_tags", "completed", None),
        ]
        assert cvx.directory.get_config(user_id).schema_version == 2
        described = {d["name"]: d for d in convex_server.deployments()}
        assert described[deployment.name]["deploys"] == 2, "created, then deployed once by byod"
    rows = [h for h in history(cvx.engine, ids[0]) if h.migration_id == "002_add_tags"]
    assert rows[0].rows_done == len(BODIES)

    again = migrate_fleet(cvx.runner())
    assert (again.total, again.up_to_date) == (len(fleet), len(fleet)), "a fleet at head"
    assert again.succeeded == 0, "nothing to do (no deploy either)"
    described = {d["name"]: d for d in convex_server.deployments()}
    assert all(described[d.name]["deploys"] == 2 for d in fleet)


def test_a_deploy_that_fails_is_a_deploy_error_and_no_migration_runs_there(
    cvx: Workspace, deployments: DeploymentFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, bad = deployments(), deployments()
    good_id, bad_id = add(cvx, good), add(cvx, bad)
    monkeypatch.setenv("CONVEX_LOCAL_FAIL_DEPLOY", bad.name)  # the stand-in fails there
    ws = cvx

    summary = migrate_fleet(ws.runner(), options=FleetOptions(concurrency=2))

    assert summary.succeeded == 1 and summary.failed == 1
    assert_at_head(good)
    assert bad.stamp() == [], "nothing ran on a deployment whose schema did not deploy"
    assert [d.get("updates") for d in bad.documents()] == [None] * len(BODIES)
    rows = ledger_rows(ws, bad_id)
    assert rows[0][:2] == ("001_initial", "failed")
    assert rows[0][2] is not None
    assert rows[0][2].startswith("DeployError: ")
    assert "after 3 attempts" in rows[0][2] and "schema not pushed" in rows[0][2]
    assert rows[1][:2] == ("002_add_tags", "skipped")
    assert bad.key not in json.dumps(rows)
    assert ledger_rows(ws, good_id)[-1][:2] == ("002_add_tags", "completed")


def counting_deploy(count: Path) -> str:
    """The stand-in deploy command, counting its runs in ``count``."""
    return shlex.join(["sh", "-c", f"echo run >> {shlex.quote(str(count))}; exec {DEPLOY}"])


def narrowed_app(folder: Path) -> Path:
    """The example app with ``tagCount`` required: no document before the backfill fits."""
    app = Path(shutil.copytree(EXAMPLE_APP, folder, ignore=shutil.ignore_patterns("migrations")))
    schema = app / "convex" / "schema.ts"
    narrowed = schema.read_text().replace(
        "tagCount: v.optional(v.number())", "tagCount: v.number()"
    )
    schema.write_text(narrowed)
    return app


def test_a_deploy_that_cannot_pass_is_not_tried_again_but_a_passing_failure_is(
    cvx: Workspace, deployments: DeploymentFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = deployments()
    user_id = add(cvx, deployment)
    count = tmp_path / "deploys"
    ws = Workspace(
        Settings.load(
            database_url=cvx.settings.database_url,
            env=convex_env(
                BYOD_CONVEX_APP=str(narrowed_app(tmp_path / "app")),
                BYOD_CONVEX_DEPLOY=counting_deploy(count),
            ),
        )
    )
    result = ws.runner().migrate(user_id)
    assert type(result.error).__name__ == "DeployError"
    assert "Schema validation failed" in result.error.message
    assert "attempts" not in result.error.message
    assert count.read_text().splitlines() == ["run"], "a schema the data fails is deployed once"
    assert deployment.stamp() == []

    count.unlink()
    monkeypatch.setenv("CONVEX_LOCAL_FAIL_DEPLOY", deployment.name)  # a passing failure
    again = ws.runner().migrate(user_id)
    assert again.error is not None and "after 3 attempts" in again.error.message
    assert len(count.read_text().splitlines()) == 3


def test_a_missing_deploy_command_or_app_folder_is_a_deploy_error(
    cvx: Workspace, deployments: DeploymentFactory, tmp_path: Path
) -> None:
    deployment = deployments()
    user_id = add(cvx, deployment)
    for env, expected in (
        ({"BYOD_CONVEX_DEPLOY": "no-such-deploy-command --yes"}, "is not found"),
        ({"BYOD_CONVEX_APP": str(tmp_path)}, "has no convex/ folder"),
    ):
        ws = Workspace(Settings.load(database_url=cvx.settings.database_url, env=convex_env(**env)))
        result = ws.runner().migrate(user_id)
        assert result.error is not None
        assert type(result.error).__name__ == "DeployError"
        assert expected in result.error.message
        assert deployment.stamp() == []


def test_the_deploy_command_never_sees_byods_secrets_in_its_argv_or_environment(
    tmp_path: Path,
) -> None:
    from byod.targets.convex_deploy import Deploy

    app = tmp_path / "app"
    (app / "convex").mkdir(parents=True)
    seen = tmp_path / "seen.json"
    script = (
        "import json, os, sys; "
        f"json.dump({{'argv': sys.argv, 'env': dict(os.environ)}}, open({str(seen)!r}, 'w'))"
    )
    os.environ["BYOD_ENCRYPTION_KEY_TEST_PROBE"] = "must-not-leak"
    try:
        Deploy(str(app), f"{sys.executable} -c {json.dumps(script)}").run(
            "http://127.0.0.1:1/d/x", "local:x|secret-key-123", lambda t: t, where="x"
        )
    finally:
        del os.environ["BYOD_ENCRYPTION_KEY_TEST_PROBE"]
    found = json.loads(seen.read_text())
    assert "secret-key-123" not in " ".join(found["argv"])
    assert found["env"]["CONVEX_SELF_HOSTED_ADMIN_KEY"] == "local:x|secret-key-123"
    assert found["env"]["CONVEX_SELF_HOSTED_URL"] == "http://127.0.0.1:1/d/x"
    assert not [name for name in found["env"] if name.startswith("BYOD_")]


# -- failures ---------------------------------------------------------------------------


def test_unreachable_wrong_key_throwing_function_and_429_each_fail_alone(
    cvx: Workspace,
    deployments: DeploymentFactory,
    convex_server: ConvexServer,
    tmp_path: Path,
) -> None:
    folder = write_migrations(
        tmp_path / "migrations",
        {
            "001_initial.py": (MIGRATIONS / "001_initial.py").read_text(),
            "002_poison.py": POISON,
        },
    )
    ok, throttled, poisoned, wrong_key, gone = (deployments() for _ in range(5))
    poisoned.client.mutation("documents:create", {"title": "poison", "body": "x"})
    ws = Workspace(
        Settings.load(
            database_url=cvx.settings.database_url,
            env=convex_env(BYOD_MIGRATIONS=str(folder), BYOD_CONVEX_APP=str(EXAMPLE_APP)),
        )
    )
    ids = {d.name: add(ws, d) for d in (ok, throttled, poisoned, wrong_key, gone)}
    # a key that no longer opens the deployment, and a deployment that went away
    ws.directory.add_user("user-wrong")
    wrong = deployments(key="local:other|not-the-deployments-key")
    connect(ws, "user-wrong", wrong_key.url, secret=wrong.key)
    convex_server.delete(gone.name)
    gone_id = ids[gone.name]
    convex_server.throttle(throttled.name, 2)

    events: list[Any] = []
    migrate_fleet(
        ws.runner(), options=FleetOptions(concurrency=3, retries=0), on_event=events.append
    )

    by_user = {e.result.user_id: e.result for e in events if isinstance(e, UserFinished)}
    assert by_user[ids[ok.name]].error is None
    assert by_user[ids[throttled.name]].error is None, "a 429 is answered by a retry"
    assert ok.stamp() == throttled.stamp() == ["001_initial", "002_poison"]
    poisoned_rows = ledger_rows(ws, ids[poisoned.name])
    assert poisoned_rows[-1][:2] == ("002_poison", "failed")
    assert "a document needs a title" in str(poisoned_rows[-1][2]), "errorMessage kept"
    assert poisoned.stamp() == ["001_initial"]
    wrong_user = ws.directory.find_user("user-wrong").id
    assert type(by_user[wrong_user].error).__name__ == "InstanceAuthError"
    assert type(by_user[gone_id].error).__name__ == "UnreachableError"
    assert "no deployment answers at this URL" in by_user[gone_id].error.message
    everything = json.dumps([ledger_rows(ws, i) for i in [*ids.values(), wrong_user]])
    for deployment in (ok, throttled, poisoned, wrong_key, gone, wrong):
        assert deployment.key not in everything
        assert deployment.key.split("|")[1] not in everything


POISON = """
from byod import Migration


def up(ctx):
    for document in ctx.convex.query("documents:list"):
        if document["title"] == "poison":
            ctx.convex.mutation("documents:create", {"title": "", "body": "poisoned"})


migration = Migration(
    id="002_poison", version=2, name="poison", description="fails on a poisoned deployment",
    up=up,
)
"""


def test_an_unreachable_deployment_is_marked_and_its_url_policy_holds(cvx: Workspace) -> None:
    cvx.directory.add_user("user-gone")
    _, reach = connect(cvx, "user-gone", "convex+http://127.0.0.1:9/d/nobody", secret="k" * 12)
    assert reach.status == "error" and reach.error_type == "UnreachableError"
    result = cvx.runner().migrate(cvx.directory.find_user("user-gone").id)
    assert type(result.error).__name__ == "UnreachableError"

    strict = convex_workspace(cvx.settings.database_url, BYOD_ALLOW_PRIVATE_INSTANCES="0")
    strict.directory.add_user("user-private")
    for url, says in (
        ("convex+http://deploy.example.com/d/x", "must use https"),  # the key unencrypted
        ("convex+https://127.0.0.1:3210", "loopback or private"),
        ("convex+https://10.1.2.3", "loopback or private"),
        ("convex+https://[::1]:443", "loopback or private"),  # loopback, IPv6
        ("convex+https://169.254.169.254", "loopback or private"),  # a cloud's metadata
        ("convex+https://localhost:3210", "loopback or private"),
    ):
        with pytest.raises(SettingsError, match=says):
            connect(strict, "user-private", url, secret="k" * 12)
    with pytest.raises(SettingsError, match="deploy key"):
        connect(strict, "user-private", "https://happy-animal-123.convex.cloud")
    with pytest.raises(SettingsError, match="user or password"):
        connect(strict, "user-private", "https://me:pw@happy-animal-123.convex.cloud", secret="k")


# -- locks, crashes, rollbacks -------------------------------------------------------------


def test_a_deployment_locked_by_another_runner_is_busy_until_it_is_free(
    cvx: Workspace, deployments: DeploymentFactory
) -> None:
    deployment = deployments()
    user_id = add(cvx, deployment)
    assert deployment.byod("takeLock", {"owner": "someone-else", "ttlMs": 60_000})

    result = cvx.runner().migrate(user_id)

    assert type(result.error).__name__ == "BusyError"
    assert "locked by another runner" in result.error.message
    assert [d.get("updates") for d in deployment.documents()] == [None] * len(BODIES)
    assert deployment.byod("releaseLock", {"owner": "someone-else"})
    assert cvx.runner().migrate(user_id).error is None
    assert_at_head(deployment)


def test_two_runs_at_once_on_one_deployment_apply_each_batch_once(
    tmp_path: Path, deployments: DeploymentFactory
) -> None:
    """Two control planes (two byods) connected to the same deployment, started together:
    the deployment's own lock lets one proceed at a time, the other reports busy."""
    deployment = deployments([f"doc #t{i % 7}" for i in range(600)], latency_ms=15)
    runners = []
    for n in range(2):
        ws = convex_workspace(f"sqlite:///{tmp_path / f'cp{n}.db'}")
        runners.append((ws, add(ws, deployment, "same-user")))
    results: list[Any] = [None, None]
    gate = threading.Barrier(2)

    def run(n: int) -> None:
        ws, user_id = runners[n]
        gate.wait()
        results[n] = (
            ws.runner()
            .configured(run_id=None, timeout=None, lease_seconds=30, batching=None)
            .migrate(user_id)
        )

    threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    errors = [type(r.error).__name__ if r.error else None for r in results]
    assert errors.count(None) >= 1
    assert set(errors) <= {None, "BusyError"}, errors
    assert deployment.stamp() == ["001_initial", "002_add_tags"]
    assert {d.get("updates") for d in deployment.documents()} == {1}, "each batch once"


def test_kill_9_in_the_middle_of_a_backfill_then_a_rerun_tags_each_document_once(
    cvx: Workspace, deployments: DeploymentFactory, tmp_path: Path
) -> None:
    bodies = [f"note {i} #t{i % 13} #all" for i in range(2000)]
    deployment = deployments(bodies, latency_ms=20)
    user_id = add(cvx, deployment)
    env = child_env()
    env |= convex_env(BYOD_DATABASE_URL=cvx.settings.database_url)
    args = [sys.executable, "-m", "byod", "migrate", "--all", "--lease-seconds", "4"]
    args += ["--batch-size", "50"]
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 90
    progress = None
    while time.monotonic() < deadline:
        progress = deployment.byod("readProgress", {"migration": "002_add_tags"})
        if progress is not None and progress["rowsDone"] >= 300:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert progress is not None and 0 < progress["rowsDone"] < len(bodies), progress
    with cvx.engine.connect() as conn:
        running = conn.execute(
            sa.select(sa.func.count()).where(ledger.c.status == "running")
        ).scalar()
    assert running == 1, "the killed run left its step running"

    wait_for_leases_to_lapse(cvx.engine, [user_id])  # the user's lease, then the deployment's
    wait_until(deployment.lock_lapsed, "the dead run's hold of the deployment's lock")
    rerun = subprocess.run(
        args, cwd=tmp_path, env=env, capture_output=True, timeout=240, check=False
    )

    assert rerun.returncode == 0, rerun.stderr.decode()
    assert deployment.stamp() == ["001_initial", "002_add_tags"]
    assert {d.get("updates") for d in deployment.documents()} == {1}, "tagged exactly once"
    assert deployment.tags() == expected_tags(bodies)
    statuses = [status for _, status, _ in ledger_rows(cvx, user_id)]
    assert "running" not in statuses and statuses[-1] == "completed"
    assert deployment.key not in rerun.stdout.decode() + rerun.stderr.decode()


def test_rollback_runs_down_and_migrate_brings_it_back(
    cvx: Workspace, deployments: DeploymentFactory
) -> None:
    deployment = deployments()
    user_id = add(cvx, deployment)
    assert cvx.runner().migrate(user_id).error is None

    result = cvx.runner().rollback(user_id, 1)

    assert result.error is None and result.to_version == 1
    assert deployment.stamp() == ["001_initial"]
    assert deployment.tags() == {}
    assert all("tagCount" not in d for d in deployment.documents())
    assert cvx.runner().migrate(user_id).error is None
    assert deployment.tags() == expected_tags(BODIES)
    assert {d["updates"] for d in deployment.documents()} == {2}, "a second pass, once"


def test_a_sql_migration_on_a_convex_deployment_fails_with_a_message_saying_so(
    cvx: Workspace, deployments: DeploymentFactory, tmp_path: Path
) -> None:
    folder = write_migrations(
        tmp_path / "migrations",
        {"001_sql.py": SQL_ON_CONVEX},
    )
    ws = convex_workspace(
        cvx.settings.database_url, BYOD_MIGRATIONS=str(folder), BYOD_CONVEX_APP=str(EXAMPLE_APP)
    )
    deployment = deployments()
    user_id = add(ws, deployment)
    result = ws.runner().migrate(user_id)
    assert type(result.error).__name__ == "MigrationFailedError"
    assert "ctx.conn" in result.error.message and "ctx.convex" in result.error.message
    assert deployment.stamp() == []


SQL_ON_CONVEX = """
from byod import Migration


def up(ctx):
    ctx.conn.exec_driver_sql("CREATE TABLE notes (id INTEGER)")


migration = Migration(id="001_sql", version=1, name="sql", description="SQL", up=up)
"""


# -- the command line ---------------------------------------------------------------------


def run_byod(
    folder: Path, *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    full = child_env() | env
    return subprocess.run(
        [sys.executable, "-m", "byod", *args],
        cwd=folder,
        env=full,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def cli_control_plane(folder: Path, *clerk_ids: str) -> dict[str, str]:
    """`byod init` and `byod users add` for each clerk id, on a SQLite control plane in
    ``folder``; the environment that reaches it."""
    env = convex_env(BYOD_DATABASE_URL=f"sqlite:///{folder / 'byod.db'}")
    assert run_byod(folder, "init", env=env).returncode == 0
    for clerk_id in clerk_ids:
        assert run_byod(folder, "users", "add", "--clerk-id", clerk_id, env=env).returncode == 0
    return env


def test_the_command_line_connects_migrates_and_verifies_a_convex_user(
    tmp_path: Path, deployments: DeploymentFactory
) -> None:
    deployment = deployments()
    env = cli_control_plane(tmp_path, "ana")

    no_key = run_byod(tmp_path, "connect", "ana", "--url", deployment.url, env=env)
    assert no_key.returncode == 2 and "deploy key" in no_key.stderr
    connected = run_byod(
        tmp_path, "connect", "ana", "--url", deployment.url, "--secret", "-", env=env,
        stdin=deployment.key + "\n",
    )  # fmt: skip
    assert connected.returncode == 0, connected.stderr
    assert "instance at version 0" in connected.stdout

    migrated = run_byod(tmp_path, "migrate", "ana", "--json", env=env)
    assert migrated.returncode == 0, migrated.stderr
    assert json.loads(migrated.stdout)["to_version"] == 2
    assert_at_head(deployment)
    verified = run_byod(tmp_path, "verify", "ana", env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    history_out = run_byod(tmp_path, "history", "ana", "--json", env=env)
    assert [row["status"] for row in json.loads(history_out.stdout)] == ["completed"] * 2
    everything = "".join(
        p.stdout + p.stderr for p in (no_key, connected, migrated, verified, history_out)
    )
    assert deployment.key not in everything


def test_convex_init_adds_byods_module_to_an_app(tmp_path: Path) -> None:
    app = tmp_path / "app"
    (app / "convex").mkdir(parents=True)
    done = run_byod(tmp_path, "convex", "init", str(app), env={})
    assert done.returncode == 0, done.stderr
    canonical = ROOT / "src" / "byod" / "convex_module"
    assert (app / "convex" / "byod.ts").read_text() == (canonical / "byod.ts").read_text()
    assert (app / "convex" / "byodTables.ts").read_text() == (canonical / "tables.ts").read_text()
    assert "...byodTables" in done.stdout
    (app / "convex" / "byod.ts").write_text("// the app's own file\n")
    refused = run_byod(tmp_path, "convex", "init", str(app), env={})
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert (app / "convex" / "byod.ts").read_text() == "// the app's own file\n"
    forced = run_byod(tmp_path, "convex", "init", str(app), "--force", env={})
    assert forced.returncode == 0
    assert (app / "convex" / "byod.ts").read_text() == (canonical / "byod.ts").read_text()
    missing = run_byod(tmp_path, "convex", "init", str(tmp_path / "nothing"), env={})
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


@pytest.mark.parametrize(
    ("installed", "locked", "refused"),
    [("1.16.6", None, True), (None, "1.12.0", True), ("1.17.0", None, False), (None, None, False)],
)
def test_convex_init_refuses_an_app_on_a_convex_too_old_for_the_module(
    tmp_path: Path, installed: str | None, locked: str | None, refused: bool
) -> None:
    app = tmp_path / "app"
    (app / "convex").mkdir(parents=True)
    (app / "package.json").write_text('{"dependencies": {"convex": "*"}}')
    if installed:
        (app / "node_modules" / "convex").mkdir(parents=True)
        (app / "node_modules" / "convex" / "package.json").write_text(
            json.dumps({"name": "convex", "version": installed})
        )
    if locked:
        lock = {"packages": {"node_modules/convex": {"version": locked}}}
        (app / "package-lock.json").write_text(json.dumps(lock))
    done = run_byod(tmp_path, "convex", "init", str(app), env={})
    if refused:
        assert done.returncode == 2, done.stderr
        assert "needs convex 1.17.0 or later" in done.stderr
        assert not (app / "convex" / "byod.ts").exists(), "nothing written"
    else:
        assert done.returncode == 0, done.stderr


def test_a_deploy_of_code_on_a_too_old_convex_is_refused_before_it_runs(
    cvx: Workspace, deployments: DeploymentFactory, tmp_path: Path, convex_server: ConvexServer
) -> None:
    deployment = deployments()
    user_id = add(cvx, deployment)
    app = Path(shutil.copytree(EXAMPLE_APP, tmp_path / "old-app"))
    (app / "node_modules" / "convex").mkdir(parents=True)
    (app / "node_modules" / "convex" / "package.json").write_text('{"version": "1.9.2"}')
    ws = Workspace(
        Settings.load(
            database_url=cvx.settings.database_url, env=convex_env(BYOD_CONVEX_APP=str(app))
        )
    )
    result = ws.runner().migrate(user_id)
    assert type(result.error).__name__ == "DeployError"
    assert "convex 1.9.2" in result.error.message and "1.17.0 or later" in result.error.message
    described = {d["name"]: d for d in convex_server.deployments()}
    assert described[deployment.name]["deploys"] == 1, "nothing deployed"


def test_the_convex_demo_migrates_a_local_fleet_of_deployments(tmp_path: Path) -> None:
    done = run_byod(tmp_path, "demo", "--convex", "--tenants", "2", env={})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "total 2: 2 succeeded, 0 failed" in done.stdout
    assert "002_add_tags" in done.stdout and "1,003" in done.stdout
    with sa.create_engine(f"sqlite:///{tmp_path / 'byod-convex-demo' / 'byod.db'}").connect() as c:
        rows = c.execute(sa.select(ledger.c.migration_id, ledger.c.status)).all()
    assert sorted(set(rows)) == [("001_initial", "completed"), ("002_add_tags", "completed")]
    hint = re.search(r"`(byod history [^`]+)`", " ".join(done.stdout.split()))
    assert hint is not None, done.stdout
    followed = run_byod(tmp_path, *shlex.split(hint.group(1))[1:], env={})  # the hint works
    assert followed.returncode == 0, followed.stderr
    assert "002_add_tags" in followed.stdout
    # the hint's flags name the demo's control plane and its migrations: with them
    # `status` counts the fleet against the Convex app's head (not the SQL example's 3)
    told = re.search(r"`(byod status [^`]+)`", " ".join(done.stdout.split()))
    assert told is not None, done.stdout
    status = run_byod(tmp_path, *shlex.split(told.group(1))[1:], env={})
    assert "head version 2, 2 users, 0 below head" in status.stdout, status.stdout
    again = run_byod(tmp_path, "demo", "--convex", "--tenants", "1", env={})
    assert again.returncode == 0, "a second run starts afresh"


def test_timeout_bounds_each_call_and_processes_carry_the_convex_settings(
    tmp_path: Path, deployments: DeploymentFactory, convex_server: ConvexServer
) -> None:
    slow, fast = deployments(), deployments()
    env = cli_control_plane(tmp_path, *(f"user-{d.name}" for d in (slow, fast)))
    for deployment in (slow, fast):
        clerk = f"user-{deployment.name}"
        done = run_byod(
            tmp_path, "connect", clerk, "--url", deployment.url, "--secret", deployment.key,
            env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    convex_server.latency(slow.name, 1500)

    ran = run_byod(
        tmp_path, "migrate", "--all", "--processes", "2", "--timeout", "1", "--retries", "0",
        "--json", env=env,
    )  # fmt: skip

    assert ran.returncode == 1, ran.stdout + ran.stderr
    lines = [json.loads(line) for line in ran.stdout.splitlines()]
    outcome = {line["clerk_id"]: line for line in lines if "clerk_id" in line}
    assert outcome[f"user-{fast.name}"]["outcome"] == "succeeded"
    assert outcome[f"user-{slow.name}"]["error_type"] == "InstanceTimeoutError"
    assert_at_head(fast)
    convex_server.latency(slow.name, 0)
    assert slow.stamp() == [], "the step timed out before it wrote anything"


def test_deploy_settings_that_cannot_work_stop_the_run_before_it_starts(
    tmp_path: Path, deployments: DeploymentFactory
) -> None:
    deployment = deployments()
    env = cli_control_plane(tmp_path, "ana")
    done = run_byod(
        tmp_path, "connect", "ana", "--url", deployment.url, "--secret", deployment.key, env=env
    )
    assert done.returncode == 0, done.stderr
    for bad, says in (
        ({"BYOD_CONVEX_DEPLOY": "no-such-deploy-tool --yes"}, "is not found"),
        ({"BYOD_CONVEX_APP": str(tmp_path)}, "has no convex/ folder"),
        ({"BYOD_CONVEX_DEPLOY": "npx 'unclosed"}, "does not parse"),
    ):
        for args in (("migrate", "--all"), ("migrate", "ana")):
            ran = run_byod(tmp_path, *args, env=env | bad)
            assert ran.returncode == 2, ran.stdout + ran.stderr
            assert "SettingsError" in ran.stderr and says in ran.stderr
    assert deployment.stamp() == []
    runs = run_byod(tmp_path, "runs", "--json", env=env)
    assert json.loads(runs.stdout) == [], "no run was recorded"


def test_a_convex_scheme_url_is_refused_cleanly(cvx: Workspace) -> None:
    cvx.directory.add_user("odd")
    for url in ("convex://x", "convex://x.convex.cloud", "http://x.convex.cloud"):
        for secret in ("k" * 12, None):
            with pytest.raises(SettingsError, match=r"must be https://NAME\.convex\.cloud, or"):
                connect(cvx, "odd", url, secret=secret)


def test_task_queue_workers_migrate_a_convex_fleet(
    pg: ServerDatabases, redis_broker: str, tmp_path: Path, deployments: DeploymentFactory
) -> None:
    """A distributed run: `byod worker` processes (Redis broker, PostgreSQL control plane)
    migrate Convex deployments as the in-process runner does, deploy step included."""
    control = pg.create()
    queue = f"byod-test-{os.urandom(5).hex()}"
    env = {k: v for k, v in child_env().items() if k != "CI"}
    env |= convex_env(BYOD_DATABASE_URL=control, BYOD_BROKER_URL=redis_broker, BYOD_QUEUE=queue)
    ws = convex_workspace(control, BYOD_BROKER_URL=redis_broker, BYOD_QUEUE=queue)
    fleet = [deployments() for _ in range(3)]
    for deployment in fleet:
        add(ws, deployment)
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [BYOD, "worker", "--concurrency", "2", "--queues", queue],
        env=env, cwd=tmp_path, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while b"ready." not in log.read_bytes():
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        done = subprocess.run(
            [BYOD, "migrate", "--all", "--distributed", "--json"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        summary = json.loads(done.stdout.splitlines()[-1])["summary"]
        assert summary["succeeded"] == 3 and summary["failed"] == 0
        for deployment in fleet:
            assert_at_head(deployment)
        everything = done.stdout + done.stderr + log.read_text()
        assert not any(d.key in everything for d in fleet)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
        _delete_redis_queues(redis_broker, {queue})
        ws.engine.dispose()


def test_the_http_api_runs_and_shows_a_convex_users_migrations(
    cvx: Workspace, deployments: DeploymentFactory
) -> None:
    """The original plan's settings page: a signed-in user's status, pending count, and a
    self-service run, on a Convex deployment; the operators' fleet view."""
    import jwt
    from fastapi.testclient import TestClient

    from byod.api import AuthSettings, create_app

    secret = "test-secret-that-is-long-enough-for-hs256"

    def headers(sub: str, admin: bool = False) -> dict[str, str]:
        claims = {"sub": sub, "exp": int(time.time()) + 600}
        if admin:
            claims["byod_role"] = "admin"
        return {"Authorization": f"Bearer {jwt.encode(claims, secret, algorithm='HS256')}"}

    deployment = deployments()
    user_id = add(cvx, deployment, "convex_user")
    cvx.directory.add_user("ops")
    with TestClient(create_app(cvx, AuthSettings(secret=secret))) as client:
        me = client.get("/v1/me/instance", headers=headers("convex_user")).json()
        assert (me["user_id"], me["schema_version"], me["pending"]) == (user_id, 0, 2)
        started = client.post("/v1/me/migrations/run", headers=headers("convex_user"))
        assert started.status_code == 202, started.text
        run_path = f"/v1/runs/{started.json()['run_id']}"
        deadline = time.monotonic() + 60
        while (run := client.get(run_path, headers=headers("convex_user")).json())["state"] == (
            "running"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert (run["state"], run["succeeded"], run["failed"]) == ("completed", 1, 0)
        me = client.get("/v1/me/instance", headers=headers("convex_user")).json()
        assert (me["schema_version"], me["pending"]) == (2, 0)
        history_page = client.get("/v1/me/migrations", headers=headers("convex_user")).json()
        assert [row["migration_id"] for row in history_page["items"]] == [
            "002_add_tags",
            "001_initial",
        ]
        fleet = client.get("/v1/fleet/status", headers=headers("ops", admin=True))
        assert fleet.status_code == 200 and deployment.key not in fleet.text
    assert_at_head(deployment)


FROM_APP = """
from byod import Migration


def up(ctx):
    answer = ctx.app.query("functions:ping")
    ctx.conn.exec_driver_sql("CREATE TABLE from_app (app TEXT)")
    ctx.conn.exec_driver_sql("INSERT INTO from_app VALUES ('" + answer["app"] + "')")


migration = Migration(id="001_from_app", version=1, name="a", description="ctx.app", up=up)
"""


def test_ctx_app_calls_the_apps_own_deployment_where_one_is_configured(
    tmp_path: Path, deployments: DeploymentFactory
) -> None:
    """The original plan's main deployment: a migration of a user's SQL instance reads
    from the app's own Convex deployment through ctx.app; unconfigured, a clear error."""
    app = deployments()
    folder = write_migrations(tmp_path / "migrations", {"001_from_app.py": FROM_APP})
    instance = tmp_path / "instance.db"
    for n, extra in enumerate(
        ({"BYOD_APP_CONVEX_URL": app.url, "BYOD_APP_CONVEX_KEY": app.key}, {})
    ):
        ws = convex_workspace(
            f"sqlite:///{tmp_path / f'cp{n}.db'}", BYOD_MIGRATIONS=str(folder), **extra
        )
        instance.unlink(missing_ok=True)
        instance.touch()
        user_id = ws.directory.add_user(f"u{n}").id
        connect(ws, f"u{n}", f"sqlite:///{instance}")
        result = ws.runner().migrate(user_id)
        with sqlite3.connect(instance) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            rows = conn.execute("SELECT app FROM from_app").fetchall() if extra else []
        if extra:
            assert result.error is None, result.error
            assert rows == [("convex-notes",)]
        else:
            assert type(result.error).__name__ == "MigrationFailedError"
            assert "BYOD_APP_CONVEX_URL" in result.error.message
            assert "from_app" not in tables, "the step rolled back"
        assert app.key not in json.dumps(ledger_rows(ws, user_id))
        ws.engine.dispose()


WRONG_KIND = """
from byod import Migration


def up(ctx):
    ctx.convex.query("documents:create", {"title": "written by a query", "body": "x"})


migration = Migration(
    id="002_wrong_kind", version=2, name="wrong kind", description="a mutation called as a query",
    up=up,
)
"""


def test_a_query_call_never_runs_a_mutation(
    cvx: Workspace, deployments: DeploymentFactory, tmp_path: Path
) -> None:
    folder = write_migrations(
        tmp_path / "migrations",
        {
            "001_initial.py": (MIGRATIONS / "001_initial.py").read_text(),
            "002_wrong_kind.py": WRONG_KIND,
        },
    )
    deployment = deployments()
    ws = Workspace(
        Settings.load(
            database_url=cvx.settings.database_url,
            env=convex_env(BYOD_MIGRATIONS=str(folder), BYOD_CONVEX_APP=str(EXAMPLE_APP)),
        )
    )
    result = ws.runner().migrate(add(ws, deployment))
    assert type(result.error).__name__ == "MigrationFailedError"
    assert "defined as Mutation" in result.error.message
    assert deployment.stamp() == ["001_initial"]
    assert "written by a query" not in [d["title"] for d in deployment.documents()]


def test_connect_to_a_fresh_deployment_is_connected_and_the_first_migrate_brings_the_module(
    convex_server: ConvexServer, tmp_path: Path
) -> None:
    """A deployment made before the app had byod's module (or an empty one): `connect`
    says connected, version 0, with a note (exit 0); `migrate` deploys the module."""
    bare = Path(shutil.copytree(EXAMPLE_APP, tmp_path / "bare"))
    (bare / "convex" / "byod.ts").unlink()
    name = f"fresh{os.getpid()}"
    key = f"local:{name}|{os.urandom(12).hex()}"
    url = "convex+" + convex_server.create(name, key, bare)
    try:
        cli = Cli(tmp_path, **convex_env())
        assert cli("init").code == 0
        assert cli("users", "add", "--clerk-id", "fresh").code == 0
        connected = cli("connect", "fresh", "--url", url, "--secret", key)
        assert connected.code == 0, connected.err
        assert "connected, instance at version 0" in connected.out
        assert "arrives with the first deploy" in connected.out
        assert key not in connected.out + connected.err
        migrated = cli("migrate", "fresh")
        assert migrated.code == 0, migrated.err
        with ConvexClient(url, key) as client:
            stamp = [row["id"] for row in client.function("byod:readStamp", {})]
        assert stamp == ["001_initial", "002_add_tags"]
    finally:
        convex_server.delete(name)


def test_a_deployment_held_by_another_runner_is_not_redeployed(
    cvx: Workspace, deployments: DeploymentFactory, convex_server: ConvexServer
) -> None:
    """The deploy runs under the deployment's lock: one still held by a runner that died
    is reported busy, and nothing is deployed there."""
    held, free = deployments(), deployments()
    held_id, free_id = add(cvx, held), add(cvx, free)
    assert held.byod("takeLock", {"owner": "a-dead-runner", "ttlMs": 120_000})

    summary = migrate_fleet(cvx.runner(), options=FleetOptions(concurrency=2, retries=0))

    described = {d["name"]: d for d in convex_server.deployments()}
    assert described[held.name]["deploys"] == 1, "created; never deployed by the busy run"
    assert described[free.name]["deploys"] == 2
    assert held.stamp() == [] and free.stamp() == ["001_initial", "002_add_tags"]
    assert (summary.succeeded, summary.failed, summary.busy) == (1, 0, 1)
    assert "locked by another runner" in str(ledger_rows(cvx, held_id)[0][2])
    assert cvx.directory.get_config(free_id).schema_version == 2
    assert cvx.directory.get_config(held_id).schema_version == 0


def test_deploys_at_once_are_bounded_by_the_setting(
    cvx: Workspace, deployments: DeploymentFactory, tmp_path: Path
) -> None:
    fleet = [deployments() for _ in range(3)]
    for deployment in fleet:
        add(cvx, deployment)
    busy, overlaps, runs = tmp_path / "deploying", tmp_path / "overlaps", tmp_path / "runs"
    # a deploy that notes whether another one is running meanwhile (mkdir is atomic)
    script = (
        f"echo run >> {runs}; if mkdir {busy} 2>/dev/null; then sleep 0.5; rmdir {busy};"
        f" else echo overlap >> {overlaps}; fi; exec {DEPLOY}"
    )
    ws = Workspace(
        Settings.load(
            database_url=cvx.settings.database_url,
            env=convex_env(
                BYOD_CONVEX_DEPLOY=shlex.join(["sh", "-c", script]),
                BYOD_CONVEX_DEPLOY_CONCURRENCY="1",
            ),
        )
    )
    summary = migrate_fleet(ws.runner(), options=FleetOptions(concurrency=3))
    assert summary.succeeded == 3
    assert len(runs.read_text().splitlines()) == 3
    assert not overlaps.exists(), "two deploys ran at once"
    with pytest.raises(SettingsError, match="BYOD_CONVEX_DEPLOY_CONCURRENCY"):
        Settings.load(
            database_url=cvx.settings.database_url,
            env=convex_env(BYOD_CONVEX_DEPLOY_CONCURRENCY="0"),
        )


def test_a_rollback_undoes_a_backfill_page_by_page_resumably_and_exactly_once(
    cvx: Workspace, deployments: DeploymentFactory
) -> None:
    """002's down_page (documents:untagPage) runs like a forward backfill: with a cursor,
    stopped halfway it resumes there, every document undone once; meanwhile the undo in
    progress blocks a migrate and shows in verify."""
    bodies = [f"doc {n} #t{n % 7}" for n in range(1_000)]
    deployment = deployments(bodies)
    user_id = add(cvx, deployment)
    assert cvx.runner().migrate(user_id).error is None
    assert sum(deployment.tags().values()) == 1_000
    stop = threading.Event()

    def halfway(progress: Any) -> None:
        if progress.rows_done >= 400:
            stop.set()

    stopping = cvx.runner().configured(
        run_id=None,
        timeout=None,
        lease_seconds=30,
        batching=Batching(size=100, stop=stop),
        on_rows=halfway,
    )
    first = stopping.rollback(user_id, 1)

    assert type(first.error).__name__ == "StoppedError"
    progress = deployment.byod("listProgress")
    assert [(p["migration"], p["rowsDone"]) for p in progress] == [("002_add_tags:down", 400)]
    untagged = [d for d in deployment.documents() if d.get("tagCount") is None]
    assert len(untagged) == 400, "exactly the pages done"
    assert deployment.stamp() == ["001_initial", "002_add_tags"], "the stamp goes last"
    refused = cvx.runner().migrate(user_id)
    assert refused.error is None, "at head: nothing to run, nothing touched"
    (report,) = verify(cvx, str(user_id))
    assert any("rollback of 002_add_tags" in p for p in report.problems), report.problems

    second = cvx.runner().rollback(user_id, 1)

    assert second.error is None, second.error
    assert deployment.stamp() == ["001_initial"]
    assert deployment.byod("listProgress") == []
    assert deployment.tags() == {}
    assert all(d.get("tagCount") is None for d in deployment.documents())
    assert [d["updates"] for d in deployment.documents()] == [1] * 1_000
    downs = [(h.status, h.rows_done) for h in history(cvx.engine, user_id) if h.direction == "down"]
    assert sorted(downs) == [("completed", 1_000), ("failed", 400)], "resumed, not restarted"


def test_a_page_past_the_transaction_limit_is_retried_smaller_and_grows_back(
    cvx: Workspace, deployments: DeploymentFactory
) -> None:
    """convex-test's transaction limits are on (16 MiB read a transaction): a page of 200
    documents of 100 KB cannot pass, 100 can; every document is still tagged once."""
    deployment = deployments([])
    big = [{"title": f"big {n}", "body": "x" * 100_000 + f" #t{n % 3}"} for n in range(450)]
    for start in range(0, len(big), 50):
        deployment.client.function("documents:createMany", {"documents": big[start : start + 50]})
    user_id = add(cvx, deployment)

    result = cvx.runner().migrate(user_id)

    assert result.error is None, result.error
    updates, cursor = [], None
    while True:  # the documents, without their bodies, 20 at a time
        page = deployment.client.query("documents:listPage", {"cursor": cursor, "numItems": 20})
        updates += [d["updates"] for d in page["page"]]
        if page["isDone"]:
            break
        cursor = page["continueCursor"]
    assert updates == [1] * 450, "every document tagged once"
    assert sum(deployment.tags().values()) == 450
    (row,) = [h for h in history(cvx.engine, user_id) if h.migration_id == "002_add_tags"]
    assert row.status == "completed" and row.rows_done == 450
    assert row.page_sizes is not None
    assert row.page_sizes.startswith("documents: pages of 200 hit the transaction limit")
    shrunk = re.search(r"limit (\d+) times; (\d+) the smallest, (\d+) the last", row.page_sizes)
    assert shrunk is not None, row.page_sizes
    limits, smallest, _ = map(int, shrunk.groups())
    assert smallest < 200 and limits >= 2, "shrunk, grown back after pages passed, shrunk again"
