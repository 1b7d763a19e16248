"""An instance URL is untrusted: the options byod refuses, the control plane refused as an
instance, credentials scrubbed by structure, and timeouts that hold on every dialect."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from byod import commands
from byod.controlplane.schema import CONTROL_PLANE_TABLE, control_plane_id, create_tables
from byod.errors import MigrationFailedError, NotConnectedError, SettingsError, UnreachableError
from byod.instance_url import (
    InstancePolicy,
    check_instance_url,
    env_flag,
    parse_networks,
    private_address,
    resolve_instance_host,
)
from byod.registry import Registry
from byod.runner import Runner
from byod.settings import Settings, normalize_url, safe_url
from byod.targets import open_target
from byod.workspace import Workspace
from tests.conftest import (
    TEST_KEY,
    ServerDatabases,
    count_rows,
    execute,
    make_workspace,
    write_migrations,
)
from tests.test_cli import Cli

# -- helpers -------------------------------------------------------------------------------


def check(url: str, policy: InstancePolicy = InstancePolicy()) -> None:
    check_instance_url(normalize_url(url), policy)


def store_old_config(ws: Workspace, clerk_id: str, url: str) -> int:
    """A config as an older byod stored it: sealed without today's URL policy."""
    user = ws.directory.add_user(clerk_id)
    ws.directory.save_config(
        user.id,
        target_kind=sa.make_url(url).get_backend_name(),
        sealed_url=ws.sealer.seal(url, user_id=user.id, field_name="url"),
        sealed_secret=None,
        key_id=ws.sealer.key_id,
    )
    ws.directory.set_status(user.id, "connected", schema_version=0)
    return user.id


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A TCP listener on 127.0.0.1 that accepts every connection and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            accepted.append(client)

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        for client in accepted:
            client.close()


def closed_port() -> int:
    """A loopback port nobody listens on."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


# -- item: options that act on the byod machine are refused --------------------------------


@pytest.mark.parametrize(
    ("url", "option"),
    [
        ("mysql://root@db.example.com/app?local_infile=1", "local_infile"),
        ("mysql://root@db.example.com/app?client_flag=128", "client_flag"),
        ("mysql://root@db.example.com/app?read_default_file=/etc/my.cnf", "read_default_file"),
        ("mysql://root@db.example.com/app?init_command=SELECT+1", "init_command"),
        ("mysql://root@db.example.com/app?unix_socket=/run/mysqld.sock", "unix_socket"),
        ("mysql://root@db.example.com/app?ssl_ca=/etc/ssl/ca.pem", "ssl_ca"),
        ("postgresql://u@db.example.com/app?sslrootcert=/etc/ssl/ca.pem", "sslrootcert"),
        ("postgresql://u@db.example.com/app?sslkey=/home/byod/.ssh/id_rsa", "sslkey"),
        ("postgresql://u@db.example.com/app?passfile=/home/byod/.pgpass", "passfile"),
        ("postgresql://u@db.example.com/app?service=prod", "service"),
        ("postgresql://u@db.example.com/app?host=/var/run/postgresql", "host"),
        ("postgresql://u@db.example.com/app?options=-c+role%3Dx", "options"),
        ("sqlite:////tmp/x.db?mode=rwc", "mode"),
    ],
)
def test_an_option_that_acts_on_the_byod_machine_is_refused_by_name(url: str, option: str) -> None:
    with pytest.raises(SettingsError) as refused:
        check(url)
    assert f"option {option!r} is refused" in refused.value.message
    assert refused.value.exit_code == 2


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://u@/app", "must name its host"),  # no host: libpq's local socket
        ("postgresql://u@%2Fvar%2Frun%2Fpostgresql/app", "not a path or a list"),
        ("mysql://root@/app", "must name its host"),
        ("postgresql://u@db.example.com/dbname=x host=/tmp", "holds connection options"),
    ],
)
def test_a_network_instance_must_name_a_network_host(url: str, says: str) -> None:
    with pytest.raises(SettingsError, match=says):
        check(url)


def test_tls_modes_and_timeouts_are_allowed() -> None:
    allowed = [
        "postgresql://u@db.example.com/app?sslmode=verify-full&connect_timeout=5",
        "postgresql://u@db.example.com/app?channel_binding=require&target_session_attrs=any",
        "mysql://root@db.example.com/app?ssl_mode=VERIFY_IDENTITY&charset=utf8mb4",
        "mariadb://root@[2606:4700::1111]:3306/app?ssl_mode=required",
    ]
    for url in allowed:
        check(url)
    with pytest.raises(SettingsError, match="'sslmode' has a bad value"):
        check("postgresql://u@db.example.com/app?sslmode=yes-please")


def test_local_infile_in_a_url_is_refused_at_connect_and_nothing_is_stored(
    ws: Workspace, mysql: ServerDatabases
) -> None:
    url = mysql.create()
    ws.directory.add_user("rogue")
    with pytest.raises(SettingsError, match="local_infile"):
        commands.connect(ws, "rogue", url + "?local_infile=1")
    with pytest.raises(NotConnectedError):
        ws.directory.get_config(ws.directory.find_user("rogue").id)


def test_a_mysql_server_cannot_read_byod_files_even_if_a_url_asks(
    mysql: ServerDatabases, tmp_path: Path
) -> None:
    """The policy refuses ``local_infile``; below it, the driver's own switch is forced
    off: a server asking for a local file (LOAD DATA LOCAL) gets nothing."""
    secret_file = tmp_path / "environ"
    secret_file.write_text("BYOD_ENCRYPTION_KEY=do-not-read-me\n")
    folder = write_migrations(
        tmp_path / "loot",
        {
            "001_loot.py": """
                from byod import Migration

                def up(ctx):
                    pass

                migration = Migration(id="001_loot", version=1, name="Loot",
                                      description="A rogue server's wish.", up=up)
            """
        },
    )
    step = Registry.load(folder).plan_up(0).steps[0]
    plain = mysql.create()
    execute(plain, "CREATE TABLE loot (line TEXT)")
    url = sa.make_url(plain).update_query_dict({"local_infile": "1"})

    def load_local_file(conn: sa.Connection) -> None:
        conn.exec_driver_sql(f"LOAD DATA LOCAL INFILE '{secret_file}' INTO TABLE loot")

    with open_target(url, timeout=5) as target, pytest.raises(MigrationFailedError):
        target.apply(step, load_local_file)
    assert count_rows(plain, "loot") == 0


def test_an_old_config_with_a_refused_option_fails_its_run_and_touches_nothing(
    ws: Workspace, mysql: ServerDatabases
) -> None:
    url = mysql.create()
    uid = store_old_config(ws, "old", url + "?local_infile=1")
    result = ws.runner().migrate(uid)
    assert isinstance(result.error, SettingsError)
    assert "local_infile" in result.error.message
    config = ws.directory.get_config(uid)
    assert config.connection_status == "error" and "local_infile" in (config.last_error or "")
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert sa.inspect(conn).get_table_names() == []
    engine.dispose()


def test_sqlite_instances_can_be_refused_by_a_setting(ws: Workspace, tmp_path: Path) -> None:
    instance = tmp_path / "local.db"
    instance.touch()
    uid = store_old_config(ws, "old", f"sqlite:///{instance}")
    strict = Settings.load(
        database_url=ws.settings.database_url,
        env={"BYOD_ENCRYPTION_KEY": TEST_KEY, "BYOD_ALLOW_SQLITE_INSTANCES": "0"},
    )
    strict_ws = Workspace(strict)
    strict_ws.directory.add_user("new")
    with pytest.raises(SettingsError, match="BYOD_ALLOW_SQLITE_INSTANCES=0") as refused:
        commands.connect(strict_ws, "new", f"sqlite:///{instance}")
    assert refused.value.hint == "Connect a PostgreSQL or MySQL/MariaDB database over the network."
    result = strict_ws.runner().migrate(uid)
    assert isinstance(result.error, SettingsError)
    assert instance.stat().st_size == 0  # never opened
    assert ws.runner().migrate(uid).ok  # the default allows them (the embedded demo)
    with pytest.raises(SettingsError, match="BYOD_ALLOW_SQLITE_INSTANCES"):
        Settings.load(env={"BYOD_ALLOW_SQLITE_INSTANCES": "maybe"})
    strict_ws.engine.dispose()


# -- item: the control plane is never an instance ------------------------------------------


def instance_url_of(ws: Workspace) -> str:
    return ws.engine.url.render_as_string(hide_password=False)


def test_the_control_plane_is_refused_as_an_instance_at_connect(ws: Workspace) -> None:
    ws.directory.add_user("sneaky")
    with pytest.raises(SettingsError, match="control plane") as refused:
        commands.connect(ws, "sneaky", instance_url_of(ws))
    assert refused.value.exit_code == 2
    with pytest.raises(NotConnectedError):
        ws.directory.get_config(ws.directory.find_user("sneaky").id)


def test_a_run_refuses_the_control_plane_as_an_instance_before_any_step(ws: Workspace) -> None:
    uid = store_old_config(ws, "sneaky", instance_url_of(ws))
    result = ws.runner().migrate(uid)
    assert isinstance(result.error, SettingsError)
    assert "control plane" in result.error.message
    assert ws.directory.get_config(uid).connection_status == "error"
    tables = set(sa.inspect(ws.engine).get_table_names())
    assert "documents" not in tables and "byod_schema_stamp" not in tables
    summary = commands.migrate_fleet(ws)
    assert summary.failed == 1 and "control plane" in summary.errors[0].error


def test_init_keeps_the_control_plane_id_and_gives_an_older_one_its_id(ws: Workspace) -> None:
    first = control_plane_id(ws.engine)
    assert first
    commands.init(ws)
    with ws.engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT id FROM {CONTROL_PLANE_TABLE}")).scalars().all() == [
            first
        ]
    with ws.engine.begin() as conn:  # a control plane made before the id existed
        conn.execute(sa.text(f"DROP TABLE {CONTROL_PLANE_TABLE}"))
    create_tables(ws.engine)
    with ws.engine.connect() as conn:
        renewed = conn.execute(sa.text(f"SELECT id FROM {CONTROL_PLANE_TABLE}")).scalar()
    assert renewed and renewed != first


def test_another_control_plane_is_an_ordinary_instance(ws: Workspace, pg: ServerDatabases) -> None:
    """Only this control plane is refused: a database holding some other id is a user's."""
    other = make_workspace(pg.create())
    ws.directory.add_user("other")
    _, reach = commands.connect(ws, "other", instance_url_of(other))
    assert reach.status == "connected", reach.error
    other.engine.dispose()


# -- item: credentials in URLs are scrubbed by structure -----------------------------------


def test_safe_url_hides_the_password_and_query_secrets() -> None:
    shown = safe_url("postgresql://u:pw@db.example.com/app?password=qs3cret&sslmode=require")
    assert "pw" not in shown.replace("postgresql+psycopg", "") and "qs3cret" not in shown
    assert shown == "postgresql+psycopg://u:***@db.example.com/app?password=***&sslmode=require"
    assert "sslpassword=***" in safe_url("postgresql://u@h/app?sslpassword=k3y")


def test_a_one_character_password_leaves_the_host_readable(ws: Workspace) -> None:
    port = closed_port()
    ws.directory.add_user("short")
    _, reach = commands.connect(ws, "short", f"postgresql://postgres:1@127.0.0.1:{port}/x")
    assert reach.status == "error"
    assert "127.0.0.1" in (reach.error or "")
    assert ":1@" not in (reach.error or "") and "***27" not in (reach.error or "")


def test_a_password_in_the_query_is_never_printed(tmp_path: Path, pg: ServerDatabases) -> None:
    cli = Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY)
    # the control plane's own URL with ?password= (trust auth ignores it)
    control = sa.make_url(pg.create()).update_query_dict({"password": "cp-s3cret-9"})
    control_url = control.render_as_string(hide_password=False)
    init = cli("init", BYOD_DATABASE_URL=control_url)
    assert init.code == 0, init.err
    assert "cp-s3cret-9" not in init.out + init.err and "password=***" in init.out
    unreachable = str(control.set(port=closed_port()).render_as_string(hide_password=False))
    broken = cli("status", BYOD_DATABASE_URL=unreachable)
    assert broken.code == 1 and "cp-s3cret-9" not in broken.out + broken.err
    # an instance URL with ?password= is refused, without echoing it
    assert cli("users", "add", "--clerk-id", "u1", BYOD_DATABASE_URL=control_url).code == 0
    instance = pg.create() + "?password=inst-s3cret-7"
    refused = cli("connect", "u1", "--url", instance, BYOD_DATABASE_URL=control_url)
    assert refused.code == 2 and "'password' is refused" in refused.err
    assert "inst-s3cret-7" not in refused.out + refused.err


def test_an_old_config_with_a_query_password_fails_without_leaking_it(ws: Workspace) -> None:
    uid = store_old_config(ws, "old", "postgresql://postgres@127.0.0.1/x?password=old-s3cret-5")
    result = ws.runner().migrate(uid)
    assert result.error is not None and "old-s3cret-5" not in result.error.message
    assert "old-s3cret-5" not in (ws.directory.get_config(uid).last_error or "")
    summary = commands.migrate_fleet(ws)
    assert summary.failed == 1
    assert all("old-s3cret-5" not in error.error for error in summary.errors)


# -- item: timeouts hold when a server accepts and never answers ---------------------------


@pytest.mark.parametrize("kind", ["mysql", "postgresql"])
def test_connect_gives_up_on_a_server_that_never_answers(kind: str, tmp_path: Path) -> None:
    cli = Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY)
    assert cli("init").code == 0
    assert cli("users", "add", "--clerk-id", "u1").code == 0
    user = "root" if kind == "mysql" else "postgres"
    with silent_server() as port:
        started = time.monotonic()
        run = cli(
            "connect", "u1", "--url", f"{kind}://{user}@127.0.0.1:{port}/app", "--timeout", "1"
        )
        took = time.monotonic() - started
    assert run.code == 1 and "unreachable" in run.err, run.err
    assert took < 8, f"connect --timeout 1 took {took:.1f}s"
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'byod.db'}")
    with engine.connect() as conn:
        status = conn.execute(sa.text("SELECT connection_status FROM byod_configs")).scalar()
    engine.dispose()
    assert status == "error"


def test_a_run_gives_up_on_a_mysql_server_that_stops_answering(ws: Workspace) -> None:
    with silent_server() as port:
        uid = store_old_config(ws, "silent", f"mysql://root@127.0.0.1:{port}/app")
        runner = Runner(
            ws.engine,
            ws.registry,
            ws.sealer,
            policy=ws.settings.instance_policy,
            connect_timeout=1.0,
        )
        started = time.monotonic()
        result = runner.migrate(uid)
        assert time.monotonic() - started < 8
    assert isinstance(result.error, UnreachableError)


def test_a_long_mysql_migration_outlasts_the_connect_timeout(
    ws: Workspace, mysql: ServerDatabases, tmp_path: Path
) -> None:
    """The connect timeout bounds the handshake, not a step: with no --timeout, a step
    that takes longer than it still finishes."""
    folder = write_migrations(
        tmp_path / "slow",
        {
            "001_slow.py": """
                import sqlalchemy as sa
                from byod import Migration

                def up(ctx):
                    ctx.conn.execute(sa.text("SELECT SLEEP(2.5)"))

                migration = Migration(id="001_slow", version=1, name="Slow",
                                      description="Takes a while.", up=up)
            """
        },
    )
    url = mysql.create()
    uid = ws.directory.add_user("slow").id
    _, reach = commands.connect(ws, "slow", url, timeout=1.0)
    assert reach.status == "connected", reach.error
    runner = Runner(
        ws.engine,
        Registry.load(folder),
        ws.sealer,
        policy=ws.settings.instance_policy,
        connect_timeout=1.0,
    )
    result = runner.migrate(uid)
    assert result.ok, result.error


def test_mysql_tls_modes_are_byods_own(ws: Workspace, mysql: ServerDatabases) -> None:
    """``ssl_mode`` is read by byod (PyMySQL has none): ``disabled`` connects without TLS,
    ``verify_identity`` refuses a server whose certificate the CA cannot vouch for (or
    that speaks no TLS at all)."""
    url = mysql.create()
    ws.directory.add_user("plain")
    ws.directory.add_user("strict")
    _, plain = commands.connect(ws, "plain", url + "?ssl_mode=disabled")
    assert plain.status == "connected", plain.error
    _, strict = commands.connect(ws, "strict", url + "?ssl_mode=VERIFY_IDENTITY", timeout=3)
    assert strict.status == "error"


def test_every_supported_instance_kind_has_its_dialect() -> None:
    from byod.instance_url import ALLOWED_OPTIONS, SUPPORTED_KINDS
    from byod.targets.dialects import DIALECTS

    # the policy's list is the one list: each SQL kind has a dialect, and Convex its target
    assert set(DIALECTS) | {"convex"} == set(SUPPORTED_KINDS)
    assert set(ALLOWED_OPTIONS) == set(SUPPORTED_KINDS)


def test_the_control_plane_file_is_refused_under_any_other_path(
    ws: Workspace, tmp_path: Path
) -> None:
    """A SQLite instance is compared with a SQLite control plane by the file itself: a
    symlink, a `..` or a relative path to it is the control plane too."""
    ws.directory.add_user("sneaky")
    if ws.engine.dialect.name == "sqlite":
        own = Path(ws.engine.url.database or "").resolve()
        link = tmp_path / "innocent.db"
        link.symlink_to(own)
        for path in (str(link), f"{own.parent}/../{own.parent.name}/{own.name}"):
            with pytest.raises(SettingsError, match="control plane"):
                commands.connect(ws, "sneaky", f"sqlite:///{path}")
    other = tmp_path / "other.db"
    other.touch()
    _, reach = commands.connect(ws, "sneaky", f"sqlite:///{other}")
    assert reach.status == "connected"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        # libpq would expand a database name holding a URI or key=value options
        ("postgresql://a@db.example.com/postgresql://evil@10.0.0.1/x", "holds connection options"),
        ("postgresql://a@db.example.com/dbname=x host=10.0.0.1", "holds connection options"),
        ("postgresql://a@db1.example.com,db2.example.com/x", "not a path or a list"),
        (
            "postgresql://a@db.example.com/x?connect_timeout=abc",
            "'connect_timeout' has a bad value",
        ),
        ("postgresql://a@db.example.com/x?connect_timeout=5x", "'connect_timeout' has a bad value"),
        ("postgresql://a@db.example.com/x?connect_timeout=5&connect_timeout=6", "more than once"),
        ("postgresql://a@db.example.com/x?sslmode=requireX", "'sslmode' has a bad value"),
        ("postgresql://a@db.example.com/x?sslmode=require&sslmode=disable", "more than once"),
        ("mysql://a@db.example.com/x?charset=utf8mb4;DROP", "'charset' has a bad value"),
        ("mysql://a@db.example.com/x?charset=utf8mb4x%00", "'charset' has a bad value"),
        ("oracle://a@db.example.com/x", "kind 'oracle' are not supported"),
    ],
)
def test_each_malformed_or_ambiguous_url_is_refused_by_its_own_rule(url: str, says: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(says)):
        check(url)


def test_well_formed_options_pass() -> None:
    for url in (
        "postgresql://a@db.example.com/x?connect_timeout=5",
        "postgresql://a@db.example.com/x?sslmode=require",
        "mysql://a@db.example.com/x?charset=utf8mb4",
    ):
        check(url)


@pytest.mark.parametrize(
    "address",
    [
        "100.64.0.1",  # CGNAT
        "224.0.0.1",  # multicast
        "240.0.0.1",  # reserved
        "0.0.0.0",
        "::",
        "fe80::1",
        "fc00::1",
        "db.localhost",  # *.localhost is the machine itself
        "localhost.",  # a trailing dot is the same name
        "127.0.0.1.",
    ],
)
def test_addresses_that_are_not_public_are_refused(address: str) -> None:
    assert private_address(address)
    with pytest.raises(SettingsError, match=r"BYOD_INSTANCE_NETWORKS|BYOD_ALLOW_PRIVATE"):
        check(f"postgresql://a@{address if ':' not in address else f'[{address}]'}/x")


def test_a_public_address_passes() -> None:
    assert not private_address("8.8.8.8")


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("yes", True), ("true", True), ("0", False), ("no", False), ("false", False)],
)
def test_yes_no_settings_read_their_words(text: str, value: bool) -> None:
    assert env_flag({"BYOD_ALLOW_SQLITE_INSTANCES": text}, "BYOD_ALLOW_SQLITE_INSTANCES") is value


def test_a_yes_no_setting_with_another_word_is_refused() -> None:
    with pytest.raises(SettingsError, match="must be 1 or 0, not 'maybe'"):
        env_flag({"BYOD_ALLOW_PRIVATE_INSTANCES": "maybe"}, "BYOD_ALLOW_PRIVATE_INSTANCES")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("convex+https://me:pw@deploy.example.com", "holds no user or password"),
        ("convex+https://me@deploy.example.com", "holds no user or password"),
        ("convex+http://deploy.example.com", "must use https"),
        ("convex+https://10.1.2.3", "loopback or private address"),
        ("convex+https://localhost:3210", "loopback or private address"),
    ],
)
def test_a_convex_url_is_refused_by_its_own_rule(url: str, says: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(says)):
        check_instance_url(sa.make_url(url), InstancePolicy())


def test_a_convex_url_that_passes_and_what_allowing_private_instances_allows() -> None:
    check_instance_url(sa.make_url("convex+https://deploy.example.com:443"), InstancePolicy())
    local = InstancePolicy(allow_private=True)
    check_instance_url(sa.make_url("convex+http://127.0.0.1:3210"), local)
    with pytest.raises(SettingsError, match="holds no user or password"):
        check_instance_url(sa.make_url("convex+http://u:p@127.0.0.1:3210"), local)
    allowed = InstancePolicy(instance_networks=parse_networks("10.1.0.0/16"))
    check_instance_url(sa.make_url("convex+https://10.1.2.3"), allowed)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "postgresql://a@db.example.com/x?foo=1",
            "instance URL option 'foo' is refused: it is not one a postgresql instance URL may "
            "carry (sslmode, channel_binding, ssl_min_protocol_version, target_session_attrs, "
            "connect_timeout)",
        ),
        (
            "sqlite:////tmp/x.db?cache=shared",
            "instance URL option 'cache' is refused: it is not allowed: a sqlite instance URL "
            "carries no options",
        ),
        (
            "mysql://a@db.example.com/x?LOCAL_INFILE=1",  # any case: the reason is the same
            "instance URL option 'LOCAL_INFILE' is refused: it lets the database server read "
            "any file of the byod machine",
        ),
        (
            "mysql://a@db.example.com/x?ssl_mode=bad",
            "instance URL option 'ssl_mode' has a bad value (use one of disabled, preferred, "
            "required, verify_ca, verify_identity)",
        ),
        (
            "mysql://a@db.example.com/x?connect_timeout=abc",
            "instance URL option 'connect_timeout' has a bad value (use a number)",
        ),
        (
            "mysql://a@db.example.com/x?charset=utf8;x",
            "instance URL option 'charset' has a bad value (use a name)",
        ),
    ],
)
def test_a_refused_option_says_exactly_what_is_wrong_and_what_to_do(url: str, message: str) -> None:
    with pytest.raises(SettingsError) as refused:
        check(url)
    assert refused.value.message == message
    if "is refused" in message:
        assert refused.value.hint == "Remove the option from the URL (see docs/how-to/security.md)."


def test_an_internal_host_is_refused_naming_the_settings_that_allow_it() -> None:
    with pytest.raises(SettingsError) as refused:
        check("postgresql://a@10.9.8.7/x")
    assert refused.value.message == (
        "the postgresql instance URL's host 10.9.8.7 is a loopback, private or otherwise "
        "internal address: refused, so a tenant's URL never reaches the operator's own "
        "network (BYOD_INSTANCE_NETWORKS, BYOD_ALLOW_PRIVATE_INSTANCES)"
    )
    assert refused.value.hint == (
        "An operator who hosts tenants' databases in their own network can allow it with "
        "BYOD_INSTANCE_NETWORKS (e.g. 10.20.0.0/16) or BYOD_ALLOW_PRIVATE_INSTANCES=1."
    )


_PRIVATE_CONVEX_HINT = "An operator can allow local backends with BYOD_ALLOW_PRIVATE_INSTANCES=1."


@pytest.mark.parametrize(
    ("url", "message", "hint"),
    [
        (
            "postgresql://u@/app",
            "a postgresql instance URL must name its host: without one the driver uses a "
            "local socket of the byod machine",
            None,
        ),
        (
            "mysql://u@db1.example.com,db2.example.com/app",
            "the host of a mysql instance URL must be a host name or an IP address, not a "
            "path or a list",
            None,
        ),
        (
            "postgresql://db.example.com/app",
            "a postgresql instance URL must name its user (postgresql://USER[:PASSWORD]@HOST/DB): "
            "without one the driver would use the byod machine's own user name",
            None,
        ),
        (
            "postgresql://u@db.example.com/dbname=x",
            "the database name of the instance URL holds connection options",
            None,
        ),
        (
            "convex+https://me@deploy.example.com",
            "a Convex deployment URL holds no user or password: give the deploy key with --secret",
            None,
        ),
        (
            "convex+http://deploy.example.com",
            "a Convex deployment URL must use https (convex+http:// sends the deploy key "
            "unencrypted): refused here",
            _PRIVATE_CONVEX_HINT,
        ),
        (
            "convex+https://10.1.2.3",
            "the Convex deployment URL names a loopback or private address: refused here, so a "
            "deploy key never goes to an internal address",
            "An operator who hosts tenants' databases in their own network can allow it with "
            "BYOD_INSTANCE_NETWORKS (e.g. 10.20.0.0/16) or BYOD_ALLOW_PRIVATE_INSTANCES=1.",
        ),
    ],
    ids=[
        "no-host",
        "host-list",
        "no-user",
        "options-in-name",
        "convex-user",
        "convex-http",
        "convex-private",
    ],
)
def test_each_host_rule_says_exactly_what_is_wrong(
    url: str, message: str, hint: str | None
) -> None:
    with pytest.raises(SettingsError) as refused:
        check(url)
    assert refused.value.message == message
    assert refused.value.hint == (hint or SettingsError.hint)


def test_only_a_postgresql_url_must_name_its_user() -> None:
    check("mysql://db.example.com/app")  # MySQL's driver has no OS-user fallback to fear


def test_an_instance_host_resolves_once_to_an_allowed_address() -> None:
    everywhere = InstancePolicy(allow_private=True)
    assert resolve_instance_host(sa.make_url("postgresql://u@[::1]/x"), everywhere) == "::1"
    with pytest.raises(SettingsError) as literal:
        resolve_instance_host(sa.make_url("postgresql://u@10.0.0.7/x"), InstancePolicy())
    assert literal.value.message.startswith(
        "the postgresql instance URL's host 10.0.0.7 is a loopback, private"
    )
    name = socket.gethostname()  # a name (not "localhost") for an address of this machine
    resolved = [str(info[4][0]) for info in socket.getaddrinfo(name, 0)]
    if not any(private_address(address) for address in resolved):
        pytest.skip(f"{name} resolves to public addresses only here: {resolved}")
    with pytest.raises(SettingsError) as named:
        resolve_instance_host(sa.make_url(f"mysql://u@{name}/x"), InstancePolicy())
    assert re.match(
        rf"the mysql instance URL's host {re.escape(name)} \((.+)\) is a loopback",
        named.value.message,
    ), named.value.message
    with pytest.raises(UnreachableError) as nowhere:
        resolve_instance_host(sa.make_url("postgresql://u@no-such-host.invalid/x"), everywhere)
    assert nowhere.value.message == (
        "the postgresql instance's host no-such-host.invalid does not resolve (gaierror)"
    )


def test_a_bracketed_ipv6_address_is_judged_as_the_address() -> None:
    assert private_address("[::1]") and private_address("[fc00::1]")
    assert not private_address("[2001:4860:4860::8888]")
    allowed = InstancePolicy(instance_networks=parse_networks("::1/128"))
    assert allowed.allows_address("[::1]") and not allowed.allows_address("[fc00::1]")


def test_an_unsupported_kind_is_named_with_the_supported_ones() -> None:
    with pytest.raises(SettingsError) as refused:
        check("oracle://a@db.example.com/x")
    assert refused.value.message == (
        "instances of kind 'oracle' are not supported "
        "(use sqlite, postgresql, mysql, mariadb, convex)"
    )


def test_what_only_looks_like_an_address_is_a_name() -> None:
    """Names are judged by what they resolve to, never refused as if they were addresses."""
    for name in ("db.example.com", "localhostX", "999.1.1.1", "1.2.3"):
        assert not private_address(name), name


def test_the_refused_host_is_named_as_written_without_brackets() -> None:
    for url, host in (
        ("postgresql://a@[fc00::1]/x", "fc00::1"),
        ("mysql://a@XdbX.localhost/x", "XdbX.localhost"),
    ):
        with pytest.raises(SettingsError) as refused:
            check(url)
        assert refused.value.message.startswith(
            f"the {url.split(':')[0]} instance URL's host {host} is a loopback"
        ), refused.value.message


def test_sqlite_instances_refused_by_a_setting_say_why() -> None:
    with pytest.raises(SettingsError) as refused:
        check("sqlite:////tmp/x.db", InstancePolicy(allow_sqlite=False))
    assert refused.value.message == (
        "sqlite instances are refused here (BYOD_ALLOW_SQLITE_INSTANCES=0): a sqlite "
        "instance is a file on the byod machine"
    )


@pytest.mark.parametrize(
    ("text", "code"), [("", "auto"), (" Git ", "git"), ("FOLDER", "folder"), ("auto", "auto")]
)
def test_the_convex_code_setting_reads_its_words(text: str, code: str) -> None:
    assert InstancePolicy.from_env({"BYOD_CONVEX_CODE": text}).convex_code == code


def test_a_convex_code_setting_with_another_word_is_refused() -> None:
    with pytest.raises(SettingsError) as refused:
        InstancePolicy.from_env({"BYOD_CONVEX_CODE": "svn"})
    assert refused.value.message == "BYOD_CONVEX_CODE must be auto, git or folder, not 'svn'"


@pytest.mark.parametrize(("text", "value"), [(None, 4), ("", 4), ("1", 1), (" 12 ", 12)])
def test_the_deploy_concurrency_setting_reads_a_whole_number(text: str | None, value: int) -> None:
    env = {} if text is None else {"BYOD_CONVEX_DEPLOY_CONCURRENCY": text}
    assert InstancePolicy.from_env(env).convex_deploy_concurrency == value


@pytest.mark.parametrize("text", ["0", "-2", "two", "1.5"])
def test_a_deploy_concurrency_that_is_not_a_whole_number_of_1_or_more_is_refused(
    text: str,
) -> None:
    with pytest.raises(SettingsError) as refused:
        InstancePolicy.from_env({"BYOD_CONVEX_DEPLOY_CONCURRENCY": text})
    assert refused.value.message == (
        f"BYOD_CONVEX_DEPLOY_CONCURRENCY must be a whole number of 1 or more, not {text!r}"
    )


def test_every_instance_setting_is_read_from_the_environment() -> None:
    env = {
        "BYOD_ALLOW_SQLITE_INSTANCES": "0",
        "BYOD_INSTANCE_SSL_CA": "/etc/ca.pem",
        "BYOD_ALLOW_PRIVATE_INSTANCES": "1",
        "BYOD_INSTANCE_NETWORKS": "10.20.0.0/16",
        "BYOD_CONVEX_APP": "/srv/app",
        "BYOD_CONVEX_DEPLOY": "npx convex deploy",
        "BYOD_CONVEX_CODE": "git",
        "BYOD_CONVEX_DEPLOY_CONCURRENCY": "2",
        "BYOD_APP_CONVEX_URL": "https://app.convex.cloud",
        "BYOD_APP_CONVEX_KEY": "prod:key",
    }
    assert InstancePolicy.from_env(env) == InstancePolicy(
        allow_sqlite=False,
        ssl_ca="/etc/ca.pem",
        allow_private=True,
        instance_networks=parse_networks("10.20.0.0/16"),
        convex_app="/srv/app",
        convex_deploy="npx convex deploy",
        convex_code="git",
        convex_deploy_concurrency=2,
        app_convex_url="https://app.convex.cloud",
        app_convex_key="prod:key",
    )
    empty = {name: "" for name in env}  # set but empty: the defaults
    assert InstancePolicy.from_env(empty) == InstancePolicy.from_env({}) == InstancePolicy()


def test_an_unset_yes_no_setting_is_no_unless_said_otherwise() -> None:
    assert env_flag({}, "BYOD_KEEP_ALEMBIC_VERSION") is False
    assert env_flag({}, "BYOD_ALLOW_SQLITE_INSTANCES", default=True) is True


def test_instance_networks_are_read_in_cidr_form_only() -> None:
    assert parse_networks(" , 10.0.0.0/8,,fc00::/7 ,") == (
        parse_networks("10.0.0.0/8")[0],
        parse_networks("fc00::/7")[0],
    )
    for wrong in ("10.0.0.1/8", "10.0.0.0/33", "db.example.com"):  # host bits set; no mask
        with pytest.raises(SettingsError) as refused:
            parse_networks(f"192.168.0.0/16,{wrong}")
        assert refused.value.message == (
            f"BYOD_INSTANCE_NETWORKS: {wrong!r} is not a network (use CIDR forms separated "
            "by commas, e.g. 10.20.0.0/16,fd00::/8)"
        )
