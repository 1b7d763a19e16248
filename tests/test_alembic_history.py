"""An Alembic history runs as it is (tests/alembic_app: made with `alembic init` and
`alembic revision`, then filled in as a team would: tables, an index, batch_alter_table,
data changes through op.execute and op.get_bind(), downgrades), and ``alembic.op`` never
crosses tenants (tests/alembic_shapes: each tenant's revisions shape its own schema)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from byod import commands
from byod.alembic_history import operations_in_use
from byod.errors import DriftError, MigrationFailedError, RegistryError
from byod.registry import MigrationContext
from byod.sources import load_registry
from byod.spec import FleetOptions
from byod.workspace import Workspace
from tests.conftest import ServerDatabases, execute, make_workspace
from tests.helpers import add_connected, stamp_ids

APP = Path(__file__).parent / "alembic_app"
SHAPES = Path(__file__).parent / "alembic_shapes"
CHAIN = ["9e68de2a97d5", "10a1322be8d7", "3d3bf621cd8c", "47a113008ee7"]
_SKIP_TABLES = {"alembic_version", "byod_schema_stamp", "byod_schema_dirty", "byod_progress"}


def copy_app(source: Path, folder: Path) -> Path:
    """A copy of an Alembic app a test may change (revisions added, edited)."""
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def alembic_config(app: Path, url: str) -> Config:
    """The app's Alembic config, pointed at ``url``; its env.py then leaves this
    process's logging alone (``fileConfig`` would disable byod's loggers)."""
    config = Config(str(app / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    assert config.file_config is not None  # parsed now, with its %(here)s
    config.config_file_name = None
    return config


def schema_of(url: str) -> dict[str, Any]:
    """The reflected schema: tables, their columns (name, type, nullable), indexes."""
    engine = sa.create_engine(url)
    try:
        inspector = sa.inspect(engine)
        found: dict[str, Any] = {}
        for table in sorted(set(inspector.get_table_names()) - _SKIP_TABLES):
            columns = [
                (c["name"], str(c["type"]).split("(")[0].upper(), c["nullable"])
                for c in inspector.get_columns(table)
            ]
            indexes = sorted(
                (i["name"], tuple(i["column_names"])) for i in inspector.get_indexes(table)
            )
            found[table] = (columns, indexes)
        return found
    finally:
        engine.dispose()


def rows_of(url: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            user = sa.table("user", sa.column("id"), sa.column("email"), sa.column("display_name"))
            post = sa.table("post", sa.column("id"), sa.column("title"), sa.column("tag_id"))
            tag = sa.table("tag", sa.column("id"), sa.column("name"))
            return {
                "user": [tuple(r) for r in conn.execute(sa.select(user).order_by(user.c.id))],
                "post": [tuple(r) for r in conn.execute(sa.select(post).order_by(post.c.id))],
                "tag": [tuple(r) for r in conn.execute(sa.select(tag).order_by(tag.c.id))],
            }
    finally:
        engine.dispose()


def seed(url: str) -> None:
    execute(
        url,
        "INSERT INTO user (id, email) VALUES (1, 'ada@example.com')"
        if url.startswith("sqlite")
        else "INSERT INTO \"user\" (id, email) VALUES (1, 'ada@example.com')"
        if "postgresql" in url
        else "INSERT INTO `user` (id, email) VALUES (1, 'ada@example.com')",
        "INSERT INTO post (id, user_id, title) VALUES (1, 1, 'hello')",
    )


def test_the_forms_of_a_location_load_the_same_chain(tmp_path: Path) -> None:
    app = copy_app(APP, tmp_path / "app")
    forms = [app, app / "alembic.ini", app / "migrations", app / "migrations" / "versions"]
    for where in forms:
        registry = load_registry(where)
        assert [m.id for m in registry] == CHAIN, where
        assert [m.version for m in registry] == [1, 2, 3, 4]
        assert [m.name for m in registry] == [
            "create user and post",
            "add post tags",
            "user display name",
            "post tag data",
        ]
        assert all(m.reversible for m in registry)


@pytest.fixture(params=["sqlite", "postgres", "mariadb"])
def two_instances(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """Two empty instances of one kind: one for byod, one for `alembic upgrade`."""
    if request.param == "sqlite":
        urls = []
        for name in ("byod", "alembic"):
            (tmp_path / f"{name}.db").touch()
            urls.append(f"sqlite:///{tmp_path / name}.db")
        return urls[0], urls[1]
    fixture = "pg" if request.param == "postgres" else "mysql"
    databases: ServerDatabases = request.getfixturevalue(fixture)
    return databases.create(), databases.create()


def _driver(url: str) -> str:
    """``url`` with byod's drivers named (psycopg 3, PyMySQL)."""
    from byod.settings import normalize_url

    return normalize_url(url).render_as_string(hide_password=False)


def test_byod_ends_where_alembic_upgrade_head_does_schema_and_rows(
    two_instances: tuple[str, str], control_plane_url: str, tmp_path: Path
) -> None:
    mine, theirs = (_driver(u) for u in two_instances)
    ws = make_workspace(control_plane_url, APP)
    uid = add_connected(ws, two_instances[0], "tenant")
    config = alembic_config(APP, theirs)
    command.upgrade(config, CHAIN[0])  # Alembic itself, in this very process
    assert ws.runner().migrate(uid, to_version=1).ok
    seed(mine)
    seed(theirs)
    command.upgrade(config, "head")
    result = ws.runner().migrate(uid)
    assert result.ok, result.error
    assert stamp_ids(two_instances[0]) == CHAIN  # the stamp records revision ids
    assert schema_of(mine) == schema_of(theirs)
    assert rows_of(mine) == rows_of(theirs)
    assert rows_of(mine)["user"] == [(1, "ada@example.com", "ada@example.com")]
    down = ws.runner().rollback(uid, 1)
    assert down.ok, down.error
    command.downgrade(config, CHAIN[0])
    assert schema_of(mine) == schema_of(theirs)
    assert ws.runner().migrate(uid).ok  # and up again
    command.upgrade(config, "head")
    assert schema_of(mine) == schema_of(theirs)
    ws.engine.dispose()


def _revision(app: Path, message: str, **kwargs: Any) -> str:
    script = command.revision(alembic_config(app, "sqlite://"), message, **kwargs)
    assert script is not None and not isinstance(script, list)
    return str(script.revision)


def test_a_branch_a_merge_and_depends_on_are_refused_naming_the_revisions(
    tmp_path: Path,
) -> None:
    branched = copy_app(APP, tmp_path / "branched")
    side = _revision(branched, "side branch", head=CHAIN[1], splice=True)
    with pytest.raises(RegistryError, match="branches") as refused:
        load_registry(branched)
    assert side in str(refused.value) and CHAIN[-1] in str(refused.value)
    merged = copy_app(branched, tmp_path / "merged")
    command.merge(alembic_config(merged, "sqlite://"), "heads", message="merge")
    with pytest.raises(RegistryError, match="merges or depends on"):
        load_registry(merged)
    depending = copy_app(APP, tmp_path / "depending")
    _revision(depending, "needs tags", depends_on=CHAIN[1])
    with pytest.raises(RegistryError, match=f"merges or depends on {CHAIN[1]}"):
        load_registry(depending)


def test_a_revision_using_alembic_context_is_refused_at_load(tmp_path: Path) -> None:
    app = copy_app(APP, tmp_path / "app")
    rev = _revision(app, "offline aware")
    path = next((app / "migrations" / "versions").glob(f"{rev}_*.py"))
    text = path.read_text().replace("from alembic import op", "from alembic import context, op")
    path.write_text(text)
    with pytest.raises(RegistryError, match=r"alembic\.context"):
        load_registry(app)


def test_a_rebased_chain_is_drift_never_a_silent_rerun(
    control_plane_url: str, tmp_path: Path
) -> None:
    app = copy_app(APP, tmp_path / "app")
    ws = make_workspace(control_plane_url, app)
    (tmp_path / "one.db").touch()
    url = f"sqlite:///{tmp_path / 'one.db'}"
    uid = add_connected(ws, url, "one")
    assert commands.migrate_user(ws, "one").ok
    # a teammate's revision lands between the first two: the chain renumbers
    inserted = _revision(app, "rebased in", head=CHAIN[0], splice=True)
    second = next((app / "migrations" / "versions").glob(f"{CHAIN[1]}_*.py"))
    second.write_text(
        second.read_text().replace(
            f"down_revision: Union[str, Sequence[str], None] = '{CHAIN[0]}'",
            f"down_revision: Union[str, Sequence[str], None] = '{inserted}'",
        )
    )
    ws.engine.dispose()
    rebased = make_workspace(control_plane_url, app)
    assert [m.id for m in rebased.registry][:2] == [CHAIN[0], inserted]
    result = rebased.runner().migrate(uid)
    assert isinstance(result.error, DriftError), result.error
    assert stamp_ids(url) == CHAIN  # nothing ran again
    assert not commands.verify(rebased, "one")[0].ok
    rebased.engine.dispose()


# -- alembic.op under concurrency -------------------------------------------------------


def shaped_fleet(ws: Workspace, urls: list[str]) -> list[int]:
    """Users at revision 1 (the marker), each instance holding its own number."""
    ids = [add_connected(ws, url, f"t{n:03d}") for n, url in enumerate(urls)]
    for n, (uid, url) in enumerate(zip(ids, urls, strict=True)):
        assert ws.runner().migrate(uid, to_version=1).ok
        execute(url, f"INSERT INTO tenant (n) VALUES ({n})")
    return ids


def assert_each_shaped_as_its_own(urls: list[str]) -> None:
    """Every instance has exactly its own tables and column, and a stamp at head."""
    for n, url in enumerate(urls):
        schema = schema_of(_driver(url))
        assert set(schema) == {"tenant", f"shape_{n}"}, (n, sorted(schema))
        columns = [c[0] for c in schema["tenant"][0]]
        assert columns == ["n", f"c_{n}"], (n, columns)
        assert len(stamp_ids(url)) == 3


def test_alembic_op_never_crosses_tenants_under_threads(
    control_plane_url: str, tmp_path: Path, pg: ServerDatabases
) -> None:
    ws = make_workspace(control_plane_url, SHAPES)
    urls = []
    for n in range(64):
        (tmp_path / f"t{n}.db").touch()
        urls.append(f"sqlite:///{tmp_path / f't{n}.db'}")
    urls += [pg.create() for _ in range(4)]
    shaped_fleet(ws, urls)
    # an Alembic command in this same process first: it installs its proxy and removes it
    scratch = tmp_path / "scratch.db"
    command.upgrade(alembic_config(APP, f"sqlite:///{scratch}"), "head")
    summary = commands.migrate_fleet(ws, options=FleetOptions(concurrency=8))
    assert (summary.succeeded, summary.failed) == (len(urls), 0), summary.errors
    assert_each_shaped_as_its_own(urls)
    ws.engine.dispose()


def test_alembic_op_never_crosses_tenants_in_processes(tmp_path: Path) -> None:
    from tests.conftest import TEST_KEY
    from tests.test_cli import Cli

    cli = Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY, BYOD_MIGRATIONS=str(SHAPES))
    assert cli("init").code == 0
    ws = make_workspace(f"sqlite:///{tmp_path / 'byod.db'}", SHAPES)
    urls = []
    for n in range(16):
        (tmp_path / f"t{n}.db").touch()
        urls.append(f"sqlite:///{tmp_path / f't{n}.db'}")
    shaped_fleet(ws, urls)
    ran = cli("migrate", "--all", "--processes", "2", "--concurrency", "4", "--json")
    assert ran.code == 0, ran.err
    assert_each_shaped_as_its_own(urls)
    ws.engine.dispose()


def test_an_alembic_command_during_a_step_fails_the_step(tmp_path: Path) -> None:
    """An in-process `alembic.command.upgrade` replaces (then removes) alembic.op's
    proxy: the step that was running meanwhile cannot trust where its op calls went."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'one.db'}")
    scratch = f"sqlite:///{tmp_path / 'scratch.db'}"
    with engine.connect() as conn:
        ctx = MigrationContext(
            kind="sqlite", main=engine, user_id=1, clerk_id="one", log=_log(), conn=conn
        )
        replaced = pytest.raises(MigrationFailedError, match=r"alembic\.op was replaced")
        with replaced, operations_in_use(ctx.op, "r1"):
            command.upgrade(alembic_config(APP, scratch), "head")
        with operations_in_use(ctx.op, "r2"):  # put back: the next step works
            from alembic import op

            op.create_table("after", sa.Column("id", sa.Integer))
    engine.dispose()


def test_op_outside_a_step_says_so_from_any_thread() -> None:
    from alembic import op

    errors: list[BaseException] = []

    def call() -> None:
        try:
            op.create_table("x")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    assert errors and isinstance(errors[0], (NameError, AttributeError))


def _log() -> Any:
    import logging

    return logging.LoggerAdapter(logging.getLogger("test"), {})


def test_alembic_op_never_crosses_tenants_on_celery_workers(redis_cluster: Any) -> None:
    cluster = redis_cluster
    cluster.env["BYOD_MIGRATIONS"] = str(SHAPES)
    ws = make_workspace(cluster.ws.settings.database_url, SHAPES)
    urls = []
    for n in range(12):
        path = cluster.folder.parent / f"t{n}.db"
        path.touch()
        urls.append(f"sqlite:///{path}")
    shaped_fleet(ws, urls)
    cluster.start_worker(concurrency=4)
    done = cluster.byod("migrate", "--all", "--distributed", "--json")
    summary = cluster.summary(done)
    assert (summary["succeeded"], summary["failed"]) == (12, 0), done.stdout + done.stderr
    assert_each_shaped_as_its_own(urls)
    ws.engine.dispose()
