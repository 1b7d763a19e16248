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


# -- adopting a fleet Alembic stamped ---------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres", "mariadb"])
def instance_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Empty instances of one kind."""
    if request.param == "sqlite":
        counter = iter(range(1000))

        def make() -> str:
            path = tmp_path / f"i{next(counter)}.db"
            path.touch()
            return f"sqlite:///{path}"

        return make
    databases: ServerDatabases = request.getfixturevalue(
        "pg" if request.param == "postgres" else "mysql"
    )
    return databases.create


def test_a_mixed_fleet_is_adopted_and_migrated_to_head_in_one_run(
    instance_factory: Any, tmp_path: Path
) -> None:
    """Empty, part-way and at head by Alembic: adopted, then one run; every schema ends
    equal to a fresh `alembic upgrade head`, nothing Alembic ran is run again."""
    ws = make_workspace(f"sqlite:///{tmp_path / 'cp.db'}", APP)
    urls = {name: instance_factory() for name in ("empty", "part", "head", "fresh")}
    ids = {name: add_connected(ws, url, name) for name, url in urls.items()}
    command.upgrade(alembic_config(APP, _driver(urls["part"])), CHAIN[1])
    command.upgrade(alembic_config(APP, _driver(urls["head"])), "head")
    command.upgrade(alembic_config(APP, _driver(urls["fresh"])), "head")  # the reference
    refused = commands.migrate_fleet(ws)  # before adopting: refused, never re-run
    assert refused.failed == 3 and refused.succeeded == 1
    for name, revision in (("part", CHAIN[1]), ("head", CHAIN[-1])):  # why, in the ledger
        (row,) = commands.user_history(ws, name)[1]
        assert (row.status, row.migration_id) == ("failed", CHAIN[0])
        assert row.error == (
            f"DriftError: the instance is managed by Alembic (alembic_version {revision}) "
            "and has no byod stamp: adopt it before it is migrated"
        )
    ledger_hint = [e.error for e in refused.errors]
    assert all("adopt it" in error for error in ledger_hint)
    adopted = {a.clerk_id: (a.status, a.version) for a in commands.adopt(ws, None)}
    assert adopted == {
        "empty": ("nothing", None),  # no alembic_version: byod migrated it in that run
        "part": ("adopted", 2),
        "head": ("adopted", 4),
        "fresh": ("adopted", 4),
    }
    assert stamp_ids(urls["part"]) == CHAIN[:2]
    note = commands.user_history(ws, "part")[1][0]
    assert note.migration_id == CHAIN[1] and "adopted at revision" in (note.error or "")
    summary = commands.migrate_fleet(ws)
    assert (summary.succeeded, summary.failed, summary.up_to_date) == (1, 0, 3), summary.errors
    assert refused.errors and all("hint" not in e.error for e in refused.errors)
    reference = schema_of(_driver(urls["fresh"]))
    for name in ("empty", "part", "head"):
        assert schema_of(_driver(urls[name])) == reference, name
        assert stamp_ids(urls[name]) == CHAIN
    assert ws.directory.get_config(ids["part"]).schema_version == 4
    ws.engine.dispose()


def test_what_cannot_be_adopted_is_refused_for_that_user_only(tmp_path: Path) -> None:
    ws = make_workspace(f"sqlite:///{tmp_path / 'cp.db'}", APP)
    urls = {}
    for name in ("unknown", "several", "stamped", "good"):
        (tmp_path / f"{name}.db").touch()
        urls[name] = f"sqlite:///{tmp_path / name}.db"
        add_connected(ws, urls[name], name)
    for url in urls.values():
        command.upgrade(alembic_config(APP, url), CHAIN[0])
    execute(urls["unknown"], "UPDATE alembic_version SET version_num = 'abcdef123456'")
    execute(urls["several"], f"INSERT INTO alembic_version VALUES ('{CHAIN[2]}')")
    execute(  # byod's stamp says revision 2 while alembic_version says 1
        urls["stamped"],
        "CREATE TABLE byod_schema_stamp (id VARCHAR(255) PRIMARY KEY, version INTEGER "
        "NOT NULL UNIQUE, checksum VARCHAR(64) NOT NULL, applied_at TIMESTAMP NOT NULL)",
        f"INSERT INTO byod_schema_stamp VALUES ('{CHAIN[0]}', 1, 'x', '2026-01-01')",
        f"INSERT INTO byod_schema_stamp VALUES ('{CHAIN[1]}', 2, 'y', '2026-01-01')",
    )
    results = {a.clerk_id: a for a in commands.adopt(ws, None)}
    assert results["good"].status == "adopted"
    assert "abcdef123456" in (results["unknown"].error or "")
    assert "several" in (results["several"].error or "") or CHAIN[2] in (
        results["several"].error or ""
    )
    assert "already" in (results["stamped"].error or "")
    assert {n: results[n].status for n in ("unknown", "several", "stamped")} == {
        "unknown": "refused",
        "several": "refused",
        "stamped": "refused",
    }
    assert stamp_ids(urls["unknown"]) == [] and stamp_ids(urls["several"]) == []
    ws.engine.dispose()


def test_adopt_needs_an_alembic_history_and_says_so(cws: Workspace) -> None:
    with pytest.raises(Exception, match="not an Alembic history"):
        commands.adopt(cws, None)


def test_alembic_version_kept_in_step_during_a_changeover(tmp_path: Path) -> None:
    """BYOD_KEEP_ALEMBIC_VERSION=1: each step also moves alembic_version, so the app's
    own `alembic upgrade head` at start finds nothing to do; a rollback moves it back."""
    from byod.settings import Settings
    from tests.conftest import TEST_KEY

    settings = Settings.load(
        database_url=f"sqlite:///{tmp_path / 'cp.db'}",
        env={
            "BYOD_ENCRYPTION_KEY": TEST_KEY,
            "BYOD_MIGRATIONS": str(APP),
            "BYOD_KEEP_ALEMBIC_VERSION": "1",
        },
    )
    ws = Workspace(settings)
    commands.init(ws)
    (tmp_path / "one.db").touch()
    url = f"sqlite:///{tmp_path / 'one.db'}"
    uid = add_connected(ws, url, "one")
    assert ws.runner().migrate(uid, to_version=2).ok
    assert _alembic_version(url) == [CHAIN[1]]
    assert ws.runner().migrate(uid).ok
    assert _alembic_version(url) == [CHAIN[-1]]
    before = schema_of(url)
    command.upgrade(alembic_config(APP, url), "head")  # the app's start-up: nothing to do
    assert schema_of(url) == before and _alembic_version(url) == [CHAIN[-1]]
    assert ws.runner().rollback(uid, 0).ok
    assert _alembic_version(url) == []
    ws.engine.dispose()


def _alembic_version(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [
                str(r)
                for r in conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars()
            ]
    finally:
        engine.dispose()


def test_version_locations_and_prepend_sys_path_are_honoured(tmp_path: Path) -> None:
    """alembic.ini's version_locations (revisions in two folders) and prepend_sys_path
    (a revision importing the app's own module) as Alembic reads them."""
    app = copy_app(APP, tmp_path / "app")
    more = app / "more_versions"
    more.mkdir()
    for rev in CHAIN[2:]:
        path = next((app / "migrations" / "versions").glob(f"{rev}_*.py"))
        path.rename(more / path.name)
    (app / "myapp_helpers.py").write_text("TAG = 'general'\n")
    last = next(more.glob(f"{CHAIN[-1]}_*.py"))
    last.write_text(
        last.read_text().replace(
            "import sqlalchemy as sa\n", "import sqlalchemy as sa\nimport myapp_helpers\n", 1
        )
    )
    ini = app / "alembic.ini"
    ini.write_text(
        ini.read_text()
        .replace(
            "# version_locations = %(here)s/bar:%(here)s/bat:%(here)s/alembic/versions",
            "version_locations = %(here)s/migrations/versions:%(here)s/more_versions",
        )
        .replace("prepend_sys_path = .", "prepend_sys_path = %(here)s")
    )
    assert [m.id for m in load_registry(ini)] == CHAIN
