"""Fixtures: real databases only. SQLite files in a temporary folder, and uniquely named
PostgreSQL databases on the local server, dropped afterwards.

In CI (``CI=true``) a test that needs PostgreSQL and cannot reach it fails; elsewhere it
is skipped with the reason.
"""

from __future__ import annotations

import base64
import functools
import os
import signal
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from byod.commands import init
from byod.distributed import Broker
from byod.settings import Settings, bundled_migrations_dir
from byod.workspace import Workspace

pytest_plugins = ["tests.distributed_kit", "tests.convex_backend"]

# Started in the background by a shell (`make mutate &`), the suite and every byod it
# starts would ignore SIGINT, and the Ctrl-C tests would test nothing: take it back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

PG_SERVER = os.environ.get("BYOD_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
TEST_KEY = base64.b64encode(b"k" * 32).decode()
OTHER_KEY = base64.b64encode(b"o" * 32).decode()


MYSQL_SERVER = os.environ.get("BYOD_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/mysql")

#: The test servers listen on loopback, which the instance policy refuses by default:
#: every test that connects instances allows it explicitly, as an operator would.
LOOPBACK_ALLOWED = {"BYOD_INSTANCE_NETWORKS": "127.0.0.0/8,::1/128"}


def child_env() -> dict[str, str]:
    """The environment for a byod child process: this one's without any ``BYOD_``
    setting, loopback instances allowed."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BYOD_")}
    return clean | LOOPBACK_ALLOWED


@pytest.fixture(autouse=True)
def hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the caller's working folder (its ``./migrations``, ``byod.db``) or
    its ``BYOD_*`` settings: each starts in its own empty folder, with none set."""
    for name in list(os.environ):
        if name.startswith("BYOD_") and name not in (
            "BYOD_TEST_PG",
            "BYOD_TEST_MYSQL",
            "BYOD_TEST_REDIS",
            "BYOD_TEST_AMQP",
        ):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@functools.cache
def _unreachable(server: str) -> str | None:
    """Why the server cannot be used, or None when it can (checked once per server)."""
    engine = sa.create_engine(server, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:
        return f"{sa.make_url(server).get_backend_name()} at {server} is not reachable: " + (
            type(exc).__name__
        )
    finally:
        engine.dispose()
    return None


def require_server(server: str) -> None:
    """Fail in CI, skip elsewhere, when a database server is not reachable."""
    problem = _unreachable(server)
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(problem)
    pytest.skip(problem)


class ServerDatabases:
    """Creates uniquely named databases on a server and drops them all at the end."""

    def __init__(self, server: str, create: str, drop: str) -> None:
        self.server = server
        self.create_sql, self.drop_sql = create, drop
        self.names: list[str] = []
        self.admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")

    def create(self) -> str:
        name = f"byod_t_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.execute(sa.text(self.create_sql.format(name=name)))
        self.names.append(name)
        return sa.make_url(self.server).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self.admin.connect() as conn:
            for name in self.names:
                conn.execute(sa.text(self.drop_sql.format(name=name)))
        self.admin.dispose()


@pytest.fixture
def pg() -> Iterator[ServerDatabases]:
    """Uniquely named PostgreSQL databases, dropped afterwards."""
    require_server(PG_SERVER)
    databases = ServerDatabases(
        PG_SERVER, 'CREATE DATABASE "{name}"', 'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
    )
    try:
        yield databases
    finally:
        databases.drop_all()


@pytest.fixture
def mysql() -> Iterator[ServerDatabases]:
    """Uniquely named MariaDB databases, dropped afterwards."""
    require_server(MYSQL_SERVER)
    databases = ServerDatabases(
        MYSQL_SERVER, "CREATE DATABASE `{name}`", "DROP DATABASE IF EXISTS `{name}`"
    )
    try:
        yield databases
    finally:
        databases.drop_all()


InstanceFactory = Callable[[], str]


@pytest.fixture(params=["sqlite", "postgres"], ids=["inst_sqlite", "inst_pg"])
def instance_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def new_instance(
    instance_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> InstanceFactory:
    """Makes empty instances of the parametrized kind; returns their URLs."""
    if instance_kind == "postgres":
        databases: ServerDatabases = request.getfixturevalue("pg")
        return databases.create
    counter = iter(range(1, 100_000))

    def make_sqlite() -> str:
        path = tmp_path / f"instance-{next(counter)}.db"
        path.touch()
        return f"sqlite:///{path}"

    return make_sqlite


@pytest.fixture(params=["sqlite", "postgres"], ids=["cp_sqlite", "cp_pg"])
def control_plane_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def control_plane_url(
    control_plane_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> str:
    if control_plane_kind == "postgres":
        databases: ServerDatabases = request.getfixturevalue("pg")
        return databases.create()
    return f"sqlite:///{tmp_path / 'control.db'}"


def write_migrations(folder: Path, files: dict[str, str]) -> Path:
    """Write migration files (name -> source) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        (folder / name).write_text(textwrap.dedent(source))
    return folder


def celery_broker(settings: Settings) -> Broker:
    """The Celery adapter, as the command line hands it to its workspaces."""
    from byod.taskqueue import CeleryBroker

    return CeleryBroker(settings)


def make_workspace(
    control_plane_url: str, migrations: Path | None = None, key: str = TEST_KEY
) -> Workspace:
    env = {"BYOD_ENCRYPTION_KEY": key, **LOOPBACK_ALLOWED}
    env["BYOD_MIGRATIONS"] = str(migrations or bundled_migrations_dir())
    settings = Settings.load(database_url=control_plane_url, env=env)
    ws = Workspace(settings, broker=celery_broker)
    init(ws)
    return ws


@pytest.fixture
def ws(control_plane_url: str) -> Iterator[Workspace]:
    """A workspace on a fresh control plane with the bundled example migrations."""
    workspace = make_workspace(control_plane_url)
    yield workspace
    workspace.engine.dispose()


def count_rows(url: str, table: str) -> int:
    """Rows in ``table`` of an instance (0 when the table does not exist)."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(table):
                return -1
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()


def has_table(url: str, table: str) -> bool:
    """Whether an instance has ``table``."""
    return count_rows(url, table) >= 0


def execute(url: str, *statements: str) -> None:
    """Run SQL on an instance (for seeding data or breaking things on purpose)."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


@pytest.fixture
def cws(control_plane_url: str, tmp_path: Path) -> Iterator[Workspace]:
    """A workspace whose migrations are the counter set (001, 002 bump, 003 fragile)."""
    from tests.migration_sets import counter_migrations

    workspace = make_workspace(control_plane_url, counter_migrations(tmp_path / "migrations"))
    yield workspace
    workspace.engine.dispose()
