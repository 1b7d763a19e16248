"""``byod demo --convex``: a local fleet of Convex test deployments, migrated like the
SQLite demo.

Each tenant is a deployment of the example app (``byod/example_convex_app``) on the local
Convex backend (convex-test behind Convex's HTTP API, in a Node process: see
:mod:`byod.commands.convex_local`), with its own deploy key. The demo connects each at
version 1, gives the first one ``LARGE_TENANT_DOCUMENTS`` documents (so
``002_add_tags``'s backfill walks it in many batches), then migrates the fleet to head:
the deploy step (the stand-in for ``npx convex deploy``), then the migrations. The
deployments live in memory and end with the demo; its control plane
(``byod-convex-demo/byod.db`` unless ``--database-url``) keeps the ledger, and is started
afresh on each run.
"""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from byod.commands import convex_local
from byod.commands.demo import DemoResult, demo_result, demo_user
from byod.commands.setup import init
from byod.credentials import connect_user
from byod.errors import InputError, SettingsError
from byod.fleet import FleetEvent, migrate_fleet
from byod.spec import FleetOptions
from byod.targets.convex_client import ConvexClient
from byod.workspace import Workspace

if TYPE_CHECKING:
    from collections.abc import Callable

    from byod.settings import Settings

__all__ = ["LARGE_TENANT_DOCUMENTS", "run_convex_demo"]

LARGE_TENANT_DOCUMENTS = 1_000
_DOCUMENTS = (
    ("Welcome", "Notes can carry #ideas and #todo tags."),
    ("Groceries", "Milk, bread, coffee. #todo #home"),
    ("Plan", "Ship the #byod demo; review #ideas with the team."),
)


def convex_demo_settings(
    settings: Settings, folder: Path, deploy_command: str, *, own_database: bool
) -> Settings:
    """The demo's settings: the example app's migrations and the local backend's
    ``deploy_command``, local deployments allowed, and (``own_database``) its own control
    plane in ``folder``."""
    app = convex_local.EXAMPLE_APP
    policy = dataclasses.replace(
        settings.instance_policy,
        allow_private=True,  # the local backend listens on 127.0.0.1, over http
        convex_app=str(app),
        convex_deploy=deploy_command,
        convex_code="folder",  # the example app as it is (in a clone, byod's git holds it)
    )
    database_url = f"sqlite:///{folder / 'byod.db'}" if own_database else settings.database_url
    return dataclasses.replace(
        settings,
        database_url=database_url,
        migrations_dir=app / "migrations",
        migrations_configured=True,
        instance_policy=policy,
    )


def run_convex_demo(
    settings: Settings,
    *,
    tenants: int = 5,
    own_database: bool = True,
    folder: Path | None = None,
    create_key: bool = True,
    on_event: Callable[[FleetEvent], None] = lambda event: None,
    on_install: Callable[[str], None] = lambda message: None,
) -> DemoResult:
    """Start the local Convex backend, build ``tenants`` deployments at version 1, and
    migrate them all to head; the backend stops before this returns."""
    if tenants < 1:
        raise InputError("--tenants must be at least 1")
    if tenants > 50:
        raise InputError("--tenants: at most 50 Convex test deployments (each is a Node worker)")
    try:  # before any file is made
        where = convex_local.backend(on_install=on_install)
    except SettingsError as exc:
        raise SettingsError(f"byod demo --convex cannot run here: {exc}", hint=exc.hint) from None
    folder = folder or Path.cwd() / "byod-convex-demo"
    folder.mkdir(parents=True, exist_ok=True)
    if own_database:  # its deployments did not outlive it: neither does its ledger
        for name in ("byod.db", "byod.db-wal", "byod.db-shm"):
            (folder / name).unlink(missing_ok=True)
    ws = Workspace(
        convex_demo_settings(settings, folder, where.deploy_command, own_database=own_database),
        create_key=create_key,
    )
    setup = init(ws)
    with convex_local.start(folder / "convex-local.log", where) as server:
        runner = ws.runner()
        for number in range(1, tenants + 1):
            clerk_id = f"demo-convex-{number:03d}"
            user = demo_user(ws, clerk_id)
            key = f"local:demo-{number:03d}|{secrets.token_hex(16)}"
            url = "convex+" + server.create(f"demo-{number:03d}", key)
            policy = ws.settings.instance_policy
            connect_user(ws.directory, ws.sealer, user.id, url, secret=key, policy=policy)
            runner.migrate(user.id, to_version=min(1, ws.registry.head))
            _seed(url, key, LARGE_TENANT_DOCUMENTS if number == 1 else 0)
        summary = migrate_fleet(runner, options=FleetOptions(concurrency=4), on_event=on_event)
    return demo_result(
        ws, setup, folder, tenants, summary, "demo-convex-001", ws.settings.database_url
    )


def _seed(url: str, key: str, more: int) -> None:
    """The sample documents, and ``more`` generated ones, through the app's own import."""
    documents = [{"title": title, "body": body} for title, body in _DOCUMENTS]
    documents += [
        {"title": f"Note {i}", "body": f"Note number {i} of a busy user #notes #n{i % 10}"}
        for i in range(1, more + 1)
    ]
    with ConvexClient(url, key) as client:
        for start in range(0, len(documents), 1000):
            client.function("documents:createMany", {"documents": documents[start : start + 1000]})
