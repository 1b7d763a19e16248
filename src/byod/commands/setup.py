"""Setting up: the control plane, users and their databases, migration files, a worker."""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from byod.controlplane import (
    User,
    create_tables,
)
from byod.credentials import ReachResult, connect_user
from byod.distributed import (
    require_server_control_plane,
)
from byod.errors import InputError
from byod.registry import Registry
from byod.settings import LOCAL_MIGRATIONS, bundled_migrations_dir, normalize_url, safe_url
from byod.sources import is_alembic_history
from byod.text import has_control

if TYPE_CHECKING:
    from byod.crypto import KeySource
    from byod.workspace import Workspace


@dataclass(frozen=True)
class InitResult:
    """What ``init`` set up."""

    database: str
    key: KeySource
    head: int


def init(ws: Workspace) -> InitResult:
    """Create the control-plane tables (idempotent) and make sure a key is available."""
    url = normalize_url(ws.settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    create_tables(ws.engine)
    ws.sealer  # noqa: B018 - loads or creates the key
    assert ws.key_source is not None
    return InitResult(safe_url(url), ws.key_source, ws.registry.head)


def add_user(ws: Workspace, clerk_id: str, email: str | None = None) -> User:
    """Register an app user."""
    return ws.directory.add_user(clerk_id, email)


def connect(
    ws: Workspace,
    user_ref: str,
    url: str,
    *,
    secret: str | None = None,
    timeout: float = 10.0,
    queue: str | None = None,
    replace: bool = False,
) -> tuple[User, ReachResult]:
    """Seal and store a user's instance credentials and check the instance answers;
    ``queue`` routes the user's distributed tasks to workers consuming that queue. A
    working config is kept when the new one fails, unless ``replace``."""
    user = ws.directory.find_user(user_ref)
    return user, connect_user(
        ws.directory,
        ws.sealer,
        user.id,
        url,
        secret=secret,
        timeout=timeout,
        queue=queue,
        policy=ws.settings.instance_policy,
        replace=replace,
    )


def disconnect(ws: Workspace, user_ref: str) -> tuple[User, bool]:
    """Drop a user's config and its sealed credentials (the user and its ledger stay);
    whether there was one."""
    user = ws.directory.find_user(user_ref)
    return user, ws.directory.disconnect(user.id)


def remove_user(ws: Workspace, user_ref: str) -> User:
    """Remove a user: credentials and personal fields gone, ledger kept under its byod
    id, its clerk id free to be registered again (see :meth:`Directory.remove_user`)."""
    return ws.directory.remove_user(ws.directory.find_user(user_ref).id)


def check_service(ws: Workspace) -> None:
    """What the HTTP service needs before it answers: a control plane made by
    ``byod init`` (:class:`ControlPlaneError` otherwise)."""
    ws.require_tables()


def check_worker(ws: Workspace) -> None:
    """What a task-queue worker needs, checked before it takes a task: a shared
    (PostgreSQL) control plane made by ``byod init``, the migrations, the key."""
    require_server_control_plane(ws.engine)
    ws.require_tables()
    ws.registry  # noqa: B018 - a broken migrations folder fails here, not in every task
    ws.sealer  # noqa: B018 - so does a missing key
    ws.engine.dispose()  # worker processes are forked: each opens its own connections


_TEMPLATE = '''"""{title}"""

import sqlalchemy as sa

from byod import Migration, MigrationContext


def up(ctx: MigrationContext) -> None:
    # DDL through ctx.op (Alembic Operations), data through ctx.conn; both in one
    # transaction with the stamp, so a failure leaves no trace.
    raise NotImplementedError("write the change")


def down(ctx: MigrationContext) -> None:
    # Undo up(); delete this function (and pass down=None) if it cannot be undone.
    raise NotImplementedError("write the undo")


migration = Migration(
    id="{id}",
    version={version},
    name={name},
    description={description},
    up=up,
    down=down,
)
'''
_CONVEX_TEMPLATE = '''"""{title}"""

from byod import Backfill, Migration, MigrationContext


def up(ctx: MigrationContext) -> None:
    # Runs on the app code of the commit that adds this file (or of code_ref below):
    # byod deploys that code (schema and functions) to the deployment first. Call the
    # app's functions: ctx.convex.query/mutation/action("module:function", {{...}}).
    raise NotImplementedError("write the change")


def down(ctx: MigrationContext) -> None:
    # Undo up(), on the same commit's code; delete this function (and pass down=None)
    # if it cannot be undone.
    raise NotImplementedError("write the undo")


migration = Migration(
    id="{id}",
    version={version},
    name={name},
    description={description},
    up=up,
    down=down,
    # a data change over a whole table, page by page, each page exactly once:
    # backfills=[Backfill(table="documents", page="documents:fillPage", batch_size=200)],
    # the app code this step runs on: None is the commit that adds this file
    code_ref=None,
)
'''
#: Longest name ``byod new`` takes (it becomes the migration's name and description).
MAX_NAME = 200
_MAX_SLUG = 60


def new_migration(ws: Workspace, name: str) -> Path:
    """Write the next migration file, ``NNN_slug.py``, from a template.

    With no migrations folder configured, the app's folder becomes ``./migrations``,
    started from a copy of the bundled example app so versions go on from its head.
    In a Convex app (a ``convex/`` folder beside the migrations folder, or
    ``BYOD_CONVEX_APP``; unconfigured: in the current folder) the file is a Convex
    migration and an unconfigured folder starts empty, at version 1.
    The name is written into the file as Python string literals (whatever it holds);
    the file is compiled before it is written, and an existing file is never replaced.
    """
    title = " ".join(name.split())
    if has_control(title):
        raise InputError(f"{name!r}: a migration name must not hold control characters")
    if len(title) > MAX_NAME:
        raise InputError(f"a migration name is at most {MAX_NAME} characters (not {len(title)})")
    slug = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")[:_MAX_SLUG].strip("_")
    if not slug:
        raise InputError(f"{name!r} makes no file name: use letters and digits")
    folder = ws.settings.migrations_dir
    convex = ws.settings.instance_policy.convex_app is not None
    if not ws.settings.migrations_configured:
        folder = Path.cwd() / LOCAL_MIGRATIONS
        convex = (Path.cwd() / "convex").is_dir()
        _make_folder(folder)
        for example in [] if convex else sorted(bundled_migrations_dir().glob("[0-9]*.py")):
            shutil.copyfile(example, folder / example.name)
    if is_alembic_history(folder):
        raise InputError(
            f"{folder} is an Alembic history: add a revision with `alembic revision -m "
            f"{shlex.quote(name)}` (byod runs it as it is)"
        )
    _make_folder(folder)
    version = Registry.load(folder).head + 1
    migration_id = f"{version:03d}_{slug}"
    path = folder / f"{migration_id}.py"
    source = (_CONVEX_TEMPLATE if convex else _TEMPLATE).format(
        title=title.replace("\\", "/").replace('"', "'"),
        id=migration_id,
        version=version,
        name=repr(title),
        description=repr(title + "."),
    )
    compile(source, str(path), "exec")  # a name can never make a file that does not load
    try:
        with path.open("x") as handle:
            handle.write(source)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from exc
    return path


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the migrations folder {folder}: {exc.strerror}") from exc
