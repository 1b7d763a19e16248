"""A Convex app kept in git, rolled out the way its team works: widen (a new field and
its backfill), then narrow (the field made required) in one `byod migrate --all`, each
step on the code of the commit that added it; rollback walks back; a kill between the
backfill and the narrow step; uncommitted migrations; a deploy made outside byod.

The app's repository is made here with git, as a team makes it: the example app and its
two migrations in a first commit, the narrow step and its schema in a second, an
unrelated change in a third (HEAD)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from byod.commands import connect, init
from byod.errors import PlanError
from byod.fleet import migrate_fleet, rollback_run
from byod.gates import open_gate
from byod.settings import Settings
from byod.spec import FleetOptions
from byod.workspace import Workspace
from tests.conftest import TEST_KEY, child_env
from tests.convex_backend import EXAMPLE_APP, ConvexServer
from tests.test_cli import Cli
from tests.test_convex_fleet import (
    BODIES,
    DEPLOY,
    Deployment,
    DeploymentFactory,
    deployments,
    expected_tags,
    ledger_rows,
)

__all__ = ["deployments"]  # the fixture, shared with the fleet tests

NARROW = '''"""tagCount is required: every document has it once 002's backfill ran."""

from byod import Migration, MigrationContext


def up(ctx: MigrationContext) -> None:
    ctx.log.info("the schema that requires tagCount came with this step's code")


def down(ctx: MigrationContext) -> None:
    ctx.log.info("the schema that allows a missing tagCount comes with 002's code")


migration = Migration(
    id="003_require_tag_count",
    version=3,
    name="Require tagCount",
    description="Narrow: documents.tagCount becomes required.",
    up=up,
    down=down,
)
'''


@dataclass
class AppRepo:
    """The app's repository and its three commits."""

    root: Path
    widen: str
    narrow: str
    head: str

    def git(self, *args: str) -> str:
        return git(self.root, *args)


def git(folder: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=Dev", "-c", "user.email=dev@example.com", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def app_repo(tmp_path: Path) -> AppRepo:
    return make_repo(tmp_path)


def make_repo(tmp_path: Path, *, gated: bool = False) -> AppRepo:
    """The app's repository: widen (001, 002), narrow (003, gated or not), a later change."""
    root = tmp_path / "notes-app"
    shutil.copytree(EXAMPLE_APP / "convex", root / "convex")
    (root / "migrations").mkdir()
    for name in ("001_initial.py", "002_add_tags.py"):
        shutil.copy(EXAMPLE_APP / "migrations" / name, root / "migrations" / name)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "notes with tags (widen: tagCount optional, backfilled)")
    widen = git(root, "rev-parse", "HEAD")
    schema = root / "convex" / "schema.ts"
    schema.write_text(
        schema.read_text().replace("tagCount: v.optional(v.number())", "tagCount: v.number()")
    )
    narrow_file = NARROW.replace("    down=down,\n)", "    down=down,\n    gated=True,\n)")
    (root / "migrations" / "003_require_tag_count.py").write_text(narrow_file if gated else NARROW)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "narrow: tagCount required")
    narrow = git(root, "rev-parse", "HEAD")
    documents = root / "convex" / "documents.ts"
    documents.write_text(documents.read_text() + "\n// a later change of the app\n")
    git(root, "commit", "-q", "-am", "a later change")
    return AppRepo(root, widen, narrow, git(root, "rev-parse", "HEAD"))


def rollout_env(repo: AppRepo, cache: Path, **extra: str) -> dict[str, str]:
    return {
        "BYOD_ENCRYPTION_KEY": TEST_KEY,
        "BYOD_MIGRATIONS": str(repo.root / "migrations"),
        "BYOD_ALLOW_PRIVATE_INSTANCES": "1",
        "BYOD_CONVEX_DEPLOY": DEPLOY,
        "BYOD_CONVEX_CODE": "git",
        "BYOD_CACHE_DIR": str(cache),
        **extra,
    }


@pytest.fixture
def rollout(app_repo: AppRepo, tmp_path: Path) -> Iterator[Workspace]:
    env = rollout_env(app_repo, tmp_path / "cache")
    ws = Workspace(Settings.load(database_url=f"sqlite:///{tmp_path / 'byod.db'}", env=env))
    init(ws)
    yield ws
    ws.engine.dispose()


def code_ref(deployment: Deployment) -> Any:
    return deployment.byod("codeRef")["ref"]


def deploys(server: ConvexServer) -> dict[str, int]:
    return {d["name"]: d["deploys"] for d in server.deployments()}


def test_widen_backfill_narrow_is_one_rollout_and_rollback_walks_it_back(
    rollout: Workspace,
    app_repo: AppRepo,
    deployments: DeploymentFactory,
    convex_server: ConvexServer,
) -> None:
    fleet = [deployments() for _ in range(3)]
    ids = []
    for deployment in fleet:
        rollout.directory.add_user(deployment.name)
        _, reach = connect(rollout, deployment.name, deployment.url, secret=deployment.key)
        assert reach.status == "connected", reach.error
        ids.append(rollout.directory.find_user(deployment.name).id)
    first = migrate_fleet(rollout.runner(), options=FleetOptions(concurrency=3), to_version=1)
    assert first.succeeded == 3
    assert {code_ref(d) for d in fleet} == {app_repo.widen}, "version 1 runs its commit's code"
    # someone deploys the app by hand to one deployment: byod notices the unknown code
    convex_server.deploy(fleet[0].name, EXAMPLE_APP)
    assert code_ref(fleet[0]) is None
    before = deploys(convex_server)

    summary = migrate_fleet(rollout.runner(), options=FleetOptions(concurrency=3))

    assert (summary.succeeded, summary.failed) == (3, 0), [ledger_rows(rollout, i) for i in ids]
    after = deploys(convex_server)
    for user_id, deployment in zip(ids, fleet, strict=True):
        assert deployment.stamp() == ["001_initial", "002_add_tags", "003_require_tag_count"]
        assert deployment.tags() == expected_tags(BODIES)
        assert [d["updates"] for d in deployment.documents()] == [1] * len(BODIES)
        assert code_ref(deployment) == app_repo.head, "HEAD's code once at the head"
        assert [row[:2] for row in ledger_rows(rollout, user_id)][-2:] == [
            ("002_add_tags", "completed"),
            ("003_require_tag_count", "completed"),
        ]
        # 002 on the widen commit (already there, but for the hand-deployed one), 003 on
        # the narrow commit, then HEAD
        extra = 1 if deployment is fleet[0] else 0
        assert after[deployment.name] - before[deployment.name] == 2 + extra
    # the narrowed schema is live: a document without tagCount is refused now
    with pytest.raises(Exception, match="tagCount"):
        fleet[1].client.mutation("documents:create", {"title": "new", "body": "#x"})

    assert summary.run_id is not None
    back = rollback_run(rollout.runner(), summary.run_id, options=FleetOptions(concurrency=3))

    assert (back.succeeded, back.failed) == (3, 0)
    for deployment in fleet:
        assert deployment.stamp() == ["001_initial"]
        assert deployment.tags() == {}
        assert code_ref(deployment) == app_repo.widen, "version 1's code again"
        assert all(d.get("tagCount") is None for d in deployment.documents())


def test_a_runner_killed_between_the_backfill_and_the_narrow_step_is_finished_by_the_next(
    app_repo: AppRepo, deployments: DeploymentFactory, tmp_path: Path
) -> None:
    deployment = deployments()
    marker = tmp_path / "narrow-deploy-started"
    # the deploy of the narrow commit's code waits, so the runner is killed right there
    touch = shlex.quote(str(marker))
    slow = (
        f'if grep -q "tagCount: v.number()" convex/schema.ts; then touch {touch}; sleep 60; fi;'
        f" exec {DEPLOY}"
    )
    env = child_env() | rollout_env(
        app_repo,
        tmp_path / "cache",
        BYOD_DATABASE_URL=f"sqlite:///{tmp_path / 'byod.db'}",
        BYOD_CONVEX_DEPLOY=shlex.join(["sh", "-c", slow]),
    )

    def byod(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "byod", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    assert byod("init").returncode == 0
    assert byod("users", "add", "--clerk-id", "ana").returncode == 0
    connected = subprocess.run(
        [sys.executable, "-m", "byod", "connect", "ana", "--url", deployment.url, "--secret", "-"],
        cwd=tmp_path,
        env=env,
        input=deployment.key,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert connected.returncode == 0, connected.stderr
    runner = subprocess.Popen(
        [sys.executable, "-m", "byod", "migrate", "ana", "--lease-seconds", "3"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert runner.poll() is None, "the runner ended before the narrow step"
            assert time.monotonic() < deadline, "the narrow step's deploy never started"
            time.sleep(0.05)
        os.killpg(runner.pid, signal.SIGKILL)
    finally:
        runner.wait()
    assert deployment.stamp() == ["001_initial", "002_add_tags"], "killed after the backfill"
    assert code_ref(deployment) == app_repo.widen

    marker.unlink()
    env["BYOD_CONVEX_DEPLOY"] = DEPLOY
    deadline = time.monotonic() + 30
    while True:  # the dead runner's lease and hold of the deployment lapse in 3 s
        again = byod("migrate", "ana")
        if again.returncode == 0 or time.monotonic() > deadline:
            break
        assert "BusyError" in again.stderr, again.stderr  # its lease, then its lock
        time.sleep(0.5)
    assert again.returncode == 0, again.stderr
    assert deployment.stamp() == ["001_initial", "002_add_tags", "003_require_tag_count"]
    assert [d["updates"] for d in deployment.documents()] == [1] * len(BODIES)
    assert code_ref(deployment) == app_repo.head


def test_an_uncommitted_migration_is_refused_up_front_unless_allow_dirty_on_local_ones(
    app_repo: AppRepo, deployments: DeploymentFactory, tmp_path: Path
) -> None:
    deployment = deployments()
    env = rollout_env(
        app_repo, tmp_path / "cache", BYOD_DATABASE_URL=f"sqlite:///{tmp_path / 'byod.db'}"
    )
    cli = Cli(tmp_path, **env)
    assert cli("init").code == 0
    assert cli("users", "add", "--clerk-id", "ana").code == 0
    assert cli("connect", "ana", "--url", deployment.url, "--secret", deployment.key).code == 0
    draft = app_repo.root / "migrations" / "004_draft.py"
    draft.write_text(
        NARROW.replace("003_require_tag_count", "004_draft").replace("version=3", "version=4")
    )
    for args in (("ana",), ("--all",)):
        refused = cli("migrate", *args)
        assert refused.code == 2, refused.err
        assert "004_draft.py is not committed" in refused.err and "--allow-dirty" in refused.err
    assert deployment.stamp() == [], "refused before any step"
    assert cli("migrate", "--all", "--allow-dirty", "--distributed").code == 2

    dirty = cli("migrate", "ana", "--allow-dirty")

    assert dirty.code == 0, dirty.err
    assert deployment.stamp()[-1] == "004_draft"
    assert code_ref(deployment) is None, "the folder as it is: not a commit byod names"


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("http://127.0.0.1:3210/d/x", True),
        ("http://[::1]:3210", True),
        ("http://localhost:3210", True),
        ("http://app.localhost", True),
        ("https://happy-animal-123.convex.cloud", False),
        ("https://10.0.0.5", False),
    ],
)
def test_uncommitted_code_goes_to_local_deployments_only(url: str, local: bool) -> None:
    from byod.targets._convex_app_code import _local

    assert _local(url) is local


def test_a_gated_narrow_step_waits_for_the_whole_convex_fleet(
    deployments: DeploymentFactory, convex_server: ConvexServer, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path, gated=True)
    env = rollout_env(repo, tmp_path / "cache")
    ws = Workspace(Settings.load(database_url=f"sqlite:///{tmp_path / 'byod.db'}", env=env))
    init(ws)
    fleet = [deployments() for _ in range(3)]
    away = fleet[2]
    ids = {}
    for deployment in fleet:
        ws.directory.add_user(deployment.name)
        # the third user's URL is wrong for now: unreachable (status error, still eligible)
        url = deployment.url if deployment is not away else "convex+http://127.0.0.1:9/d/x"
        connect(ws, deployment.name, url, secret=deployment.key)
        ids[deployment.name] = ws.directory.find_user(deployment.name).id

    first = migrate_fleet(ws.runner(), options=FleetOptions(concurrency=3, retries=0))

    assert (first.succeeded, first.failed) == (2, 1)
    (held,) = first.held
    assert held.migration == "003_require_tag_count" and held.users == 2
    assert f"{ids[away.name]} {away.name}" in held.reason, held.reason
    for deployment in fleet[:2]:
        assert deployment.stamp() == ["001_initial", "002_add_tags"]
        assert code_ref(deployment) == repo.widen, "left on the code of the version reached"
    with pytest.raises(PlanError, match=away.name):
        open_gate(ws.engine, ws.registry, "003_require_tag_count", "ops")

    connect(ws, away.name, away.url, secret=away.key)  # the user fixes its URL
    caught_up = migrate_fleet(ws.runner(), options=FleetOptions(concurrency=3))
    assert (caught_up.succeeded, caught_up.up_to_date) == (1, 2)
    assert caught_up.held[0].users == 3, "every user stops before the closed gate"
    assert "every user is through" in caught_up.held[0].reason
    open_gate(ws.engine, ws.registry, "003_require_tag_count", "ops")
    through = migrate_fleet(ws.runner(), options=FleetOptions(concurrency=3))

    assert through.succeeded == 3 and through.held == []
    for deployment in fleet:
        assert deployment.stamp()[-1] == "003_require_tag_count"
        assert code_ref(deployment) == repo.head
    ws.engine.dispose()
