"""The operator's own database settings never reach a tenant's server.

libpq fills every connection parameter a connection does not give from the byod
process's environment (``PGPASSWORD``, ``PGUSER``, ``PGDATABASE``, ``PGOPTIONS``, …), from a
service file (``PGSERVICE``), a password file (``PGPASSFILE``, ``~/.pgpass``) and files
under ``~/.postgresql``. Those belong to the operator (for the control plane, say); a
tenant's URL must not receive them, whatever its form, even from a server that asks for
the password. A fake PostgreSQL server records what each connection sends.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa

from byod.commands import connect
from byod.errors import SettingsError
from byod.workspace import Workspace
from tests.conftest import MYSQL_SERVER, ServerDatabases, make_workspace

_SSL_REQUEST = 80877103
_GSS_REQUEST = 80877104
_CLEARTEXT, _MD5 = 3, 5
_SALT = b"salt"

#: Every libpq variable the operator might have set, each to a value a tenant must
#: never see (files hold secrets of their own).
OPERATOR_SECRET = "operator-pg-secret-42"


def operator_environment(folder: Path) -> dict[str, str]:
    passfile = folder / "pgpass"
    passfile.write_text(f"*:*:*:*:{OPERATOR_SECRET}-from-passfile\n")
    passfile.chmod(0o600)
    services = folder / "pg_service.conf"
    services.write_text(
        f"[ops]\nuser=service-user\npassword={OPERATOR_SECRET}-from-service\n"
        "dbname=service-db\noptions=-c search_path=ops\n"
    )
    return {
        "PGPASSWORD": OPERATOR_SECRET,
        "PGUSER": "operator-user",
        "PGDATABASE": "operator-db",
        "PGOPTIONS": "-c role=operator",
        "PGAPPNAME": "operator-app",
        "PGPASSFILE": str(passfile),
        "PGSERVICE": "ops",
        "PGSERVICEFILE": str(services),
        "PGSSLMODE": "require",  # would stop at our server's "no TLS" if it were used
        "PGSSLCERT": str(folder / "operator.crt"),
        "PGSSLKEY": str(folder / "operator.key"),
        "PGHOSTADDR": "127.0.0.9",  # would move the connection if it were used
        "PGREQUIREAUTH": "password",
        "PGCONNECT_TIMEOUT": "1",
    }


@dataclass
class Heard:
    """What a fake server was sent: each startup packet's parameters and each password
    message (clear text, or libpq's md5 answer)."""

    startups: list[dict[str, str]] = field(default_factory=list)
    passwords: list[bytes] = field(default_factory=list)


def _read_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _serve_one(conn: socket.socket, heard: Heard, method: int, echo: str = "") -> None:
    """Speak just enough of PostgreSQL's protocol to ask for a password, then fail the
    login with an error that echoes what was sent (as a careless server might)."""
    with conn:
        while True:
            length, code = struct.unpack("!ii", _read_exact(conn, 8))
            if code in (_SSL_REQUEST, _GSS_REQUEST):
                conn.sendall(b"N")  # no TLS here: go on in the clear
                continue
            parts = _read_exact(conn, length - 8).split(b"\0")
            heard.startups.append(
                {k.decode(): v.decode() for k, v in zip(parts[::2], parts[1::2], strict=False) if k}
            )
            break
        extra = _SALT if method == _MD5 else b""
        conn.sendall(b"R" + struct.pack("!ii", 8 + len(extra), method) + extra)
        sent = b""
        if conn.recv(1) == b"p":
            (size,) = struct.unpack("!i", _read_exact(conn, 4))
            sent = _read_exact(conn, size - 4).rstrip(b"\0")
            heard.passwords.append(sent)
        told = b"password authentication failed: got " + sent + echo.encode()
        fields = b"SFATAL\0C28P01\0M" + told + b"\0\0"
        conn.sendall(b"E" + struct.pack("!i", len(fields) + 4) + fields)


@contextlib.contextmanager
def fake_postgres(method: int = _MD5, echo: str = "") -> Iterator[tuple[int, Heard]]:
    """A fake PostgreSQL server on 127.0.0.1 that records what every connection sends
    (and says ``echo`` in its error, as a server that repeats what it knows might)."""
    listener = socket.create_server(("127.0.0.1", 0))
    heard = Heard()
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(ConnectionError, OSError, struct.error):
                _serve_one(conn, heard, method, echo)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], heard
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def md5_answer(password: str, user: str) -> bytes:
    """What libpq sends to an md5 request for ``password``."""
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + _SALT).hexdigest().encode()


@pytest.fixture
def operator_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = operator_environment(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.mark.parametrize(
    "form", ["postgresql://bob:@127.0.0.1:{port}/app", "postgresql://bob@127.0.0.1:{port}/app"]
)
def test_a_url_without_a_password_sends_none_of_the_operators(
    ws: Workspace, operator_env: dict[str, str], form: str
) -> None:
    ws.directory.add_user("tenant")
    with fake_postgres(_MD5) as (port, heard):
        _, reach = connect(ws, "tenant", form.format(port=port), timeout=5)
    assert reach.status == "error"
    assert heard.passwords == []  # libpq had no password to give: it sent none
    assert len(heard.startups) == 1
    startup = heard.startups[0]
    assert startup["user"] == "bob" and startup["database"] == "app"
    assert startup.get("application_name") == "byod"
    assert "options" not in startup  # PGOPTIONS stayed the operator's
    assert OPERATOR_SECRET not in str(reach.error)
    config = ws.directory.get_config(ws.directory.find_user("tenant").id)
    assert OPERATOR_SECRET not in str(config.last_error)


def test_a_url_without_a_user_is_refused_before_anything_is_sent(
    ws: Workspace, operator_env: dict[str, str]
) -> None:
    ws.directory.add_user("tenant")
    with fake_postgres(_MD5) as (port, heard):
        with pytest.raises(SettingsError, match="must name its user"):
            connect(ws, "tenant", f"postgresql://127.0.0.1:{port}/app", timeout=5)
        with pytest.raises(SettingsError, match="must name its user"):
            connect(ws, "tenant", f"postgresql://:pw@127.0.0.1:{port}/app", timeout=5)
    assert heard.startups == [] and heard.passwords == []


def test_the_tenants_own_password_goes_and_only_it(
    ws: Workspace, operator_env: dict[str, str]
) -> None:
    ws.directory.add_user("tenant")
    with fake_postgres(_MD5) as (port, heard):
        _, given = connect(ws, "tenant", f"postgresql://bob:tenant-pw@127.0.0.1:{port}/x")
    assert given.status == "error"
    assert heard.passwords == [md5_answer("tenant-pw", "bob")]
    assert heard.startups[0]["database"] == "x"


def test_no_clear_text_password_goes_over_a_connection_that_may_be_unencrypted(
    ws: Workspace, operator_env: dict[str, str]
) -> None:
    ws.directory.add_user("tenant")
    with fake_postgres(_CLEARTEXT) as (port, heard):
        _, given = connect(ws, "tenant", f"postgresql://bob:tenant-pw@127.0.0.1:{port}/x")
    assert given.status == "error"
    assert heard.passwords == []
    assert "password" in str(given.error)  # libpq says why it stopped


def test_the_control_plane_keeps_libpqs_defaults(
    pg: ServerDatabases, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGAPPNAME", "operator-app")
    ws = make_workspace(pg.create())
    with ws.engine.connect() as conn:
        name = conn.execute(sa.text("SELECT current_setting('application_name')")).scalar()
    ws.engine.dispose()
    assert name == "operator-app"


def test_a_mysql_tenant_gets_no_password_from_the_operators_environment(
    ws: Workspace, mysql: ServerDatabases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyMySQL reads no option file and no MYSQL_PWD unless asked (and the URL policy
    refuses asking): a user without a password, who would be refused any password, logs
    in with the operator's MYSQL_PWD and option files set."""
    database = sa.make_url(mysql.create()).database
    user = f"t{os.getpid()}"
    with mysql.admin.connect() as conn:
        conn.execute(sa.text(f"CREATE USER '{user}'@'%'"))
        conn.execute(sa.text(f"GRANT ALL ON `{database}`.* TO '{user}'@'%'"))
    try:
        home = Path(os.environ.get("HOME", "/root"))
        monkeypatch.setenv("MYSQL_PWD", OPERATOR_SECRET)
        monkeypatch.setenv("MYSQL_HOST", "127.0.0.9")
        monkeypatch.setenv("HOME", str(Path.cwd()))
        Path("my.cnf").write_text(f"[client]\npassword={OPERATOR_SECRET}\n")
        Path(".my.cnf").write_text(f"[client]\npassword={OPERATOR_SECRET}\n")
        ws.directory.add_user("tenant")
        _, reach = connect(ws, "tenant", f"mysql://{user}@127.0.0.1:3306/{database}")
        assert reach.status == "connected", reach.error
        monkeypatch.setenv("HOME", str(home))
    finally:
        with mysql.admin.connect() as conn:
            conn.execute(sa.text(f"DROP USER IF EXISTS '{user}'@'%'"))


def test_postgres_instances_connect_without_a_libpq_warning(tmp_path: Path, pg: object) -> None:
    from tests.conftest import TEST_KEY
    from tests.test_cli import Cli

    assert isinstance(pg, ServerDatabases)
    cli = Cli(tmp_path, real_process=True, BYOD_ENCRYPTION_KEY=TEST_KEY)
    assert cli("init").code == 0
    assert cli("users", "add", "--clerk-id", "a").code == 0
    connected = cli("connect", "a", "--url", pg.create())
    assert connected.code == 0, connected.err
    assert "WARNING" not in connected.err and "password file" not in connected.err


TENANT_PASSWORD = "tenant-password-77"
JWT_SECRET = "jwt-secret-of-the-operator-0123456789"


def test_an_instance_error_echoing_secrets_is_masked_wherever_it_is_kept_or_shown(
    tmp_path: Path, pg: ServerDatabases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's case: a server that repeats secrets in its error message. byod
    masks every secret it knows (the tenant's password, the operator's PGPASSWORD,
    encryption key, HS256 secret and control-plane password) in ``last_error``, the
    ledger, ``--json`` lines, the log, the CLI's messages and the API."""
    from fastapi.testclient import TestClient

    from byod.api import AuthSettings, create_app
    from byod.settings import Settings
    from byod.workspace import Workspace
    from tests.conftest import LOOPBACK_ALLOWED, TEST_KEY
    from tests.test_api import bearer, token
    from tests.test_cli import Cli

    role = f"byod_cp_{os.getpid()}"
    with pg.admin.connect() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN PASSWORD 'control-plane-pw-55'"))
    control = sa.make_url(pg.create()).set(username=role, password="control-plane-pw-55")
    try:
        with pg.admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{control.database}" OWNER TO {role}'))
        control_url = control.render_as_string(hide_password=False)
        secrets = [TENANT_PASSWORD, OPERATOR_SECRET, TEST_KEY, JWT_SECRET, "control-plane-pw-55"]
        env = {
            "BYOD_DATABASE_URL": control_url,
            "BYOD_ENCRYPTION_KEY": TEST_KEY,
            "BYOD_JWT_SECRET": JWT_SECRET,
            "PGPASSWORD": OPERATOR_SECRET,
        }
        cli = Cli(tmp_path, **env)
        assert cli("init").code == 0
        assert cli("users", "add", "--clerk-id", "tenant").code == 0
        echo = " | ".join(f"I know {one}" for one in secrets)
        with fake_postgres(_MD5, echo=echo) as (port, _):
            url = f"postgresql://bob:{TENANT_PASSWORD}@127.0.0.1:{port}/app"
            connected = cli("connect", "tenant", "--url", url)
            log = tmp_path / "byod.log"
            ran = cli("--log-file", str(log), "migrate", "--all", "--json", "--retries", "0")
            one = cli("--log-format", "json", "migrate", "tenant")
        assert ran.code == 1 and one.code == 1, ran.err + one.err
        assert "I know ***" in connected.out + connected.err  # the echo is there, masked
        shown = [connected.out, connected.err, ran.out, ran.err, one.out, one.err]
        shown.append(log.read_text())
        engine = sa.create_engine(control_url)
        with engine.connect() as conn:
            shown += [str(v) for v in conn.execute(sa.text("SELECT error FROM byod_migrations"))]
            shown += [str(v) for v in conn.execute(sa.text("SELECT last_error FROM byod_configs"))]
        engine.dispose()
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        ws = Workspace(Settings.load(env={**env, **LOOPBACK_ALLOWED}))
        with TestClient(create_app(ws, AuthSettings(secret=JWT_SECRET))) as client:
            answer = client.get("/v1/me/instance", headers=bearer(token("tenant", key=JWT_SECRET)))
            assert answer.status_code == 200
            shown.append(answer.text)
            ops = token("ops", key=JWT_SECRET, admin=True)
            client.post("/dashboard/login", data={"token": ops}, follow_redirects=False)
            page = client.get("/dashboard")
            assert "Latest failures" in page.text and "I know ***" in page.text, page.text
            shown.append(page.text)
        ws.engine.dispose()
        assert "I know ***" in answer.text
        for text in shown:
            for secret in secrets:
                assert secret not in text, (secret, text)
    finally:
        with pg.admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{control.database}" WITH (FORCE)'))
            conn.execute(sa.text(f"DROP ROLE IF EXISTS {role}"))


def test_a_secret_is_masked_anywhere_from_eight_characters_and_as_a_token_below() -> None:
    from byod.redact import mask

    assert mask("a12345678b and 12345678", ["12345678"]) == "a***b and ***"
    assert (
        mask("pw=hunter user hunter2 127.0.0.1", ["hunter", "1"]) == "pw=*** user hunter2 127.0.0.1"
    )
    assert mask("token: 1.", ["1"]) == "token: ***."


def test_the_operators_secrets_are_masked_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from byod.redact import mask

    monkeypatch.setenv("PGPASSWORD", "pg-pass-from-env")
    monkeypatch.setenv("MYSQL_PWD", "mysql-pwd-from-env")
    monkeypatch.setenv("BYOD_BROKER_URL", "redis://:broker%2Fpass-99@127.0.0.1:6379/0")
    monkeypatch.setenv("BYOD_DATABASE_URL", "postgresql://u:cp-password-1@db/x")
    text = "pg-pass-from-env mysql-pwd-from-env broker/pass-99 broker%2Fpass-99 cp-password-1"
    assert mask(text) == "*** *** *** *** ***"


assert MYSQL_SERVER  # the MariaDB server the mysql fixture uses
