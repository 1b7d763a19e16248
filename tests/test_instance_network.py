"""A tenant's server instance is reached over the tenant's network, never the operator's.

Loopback, private, link-local, CGNAT and unspecified addresses (literal, or what a name
resolves to) are refused unless the operator allows them (``BYOD_INSTANCE_NETWORKS`` or
``BYOD_ALLOW_PRIVATE_INSTANCES``). The host is resolved once and the connection goes to
the address that was checked. Loopback aliases stand in for two networks: 127.0.0.2 is
"the tenant's" (a forwarder to the real server), 127.0.0.1 "the operator's".
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from byod import commands
from byod.errors import SettingsError
from byod.instance_url import InstancePolicy, check_instance_url, parse_networks
from byod.settings import Settings, normalize_url
from byod.workspace import Workspace
from tests.conftest import TEST_KEY, ServerDatabases, execute
from tests.migration_sets import counter_migrations
from tests.tcp_proxy import CuttableProxy
from tests.test_cli import Cli

TENANT_NET = {"BYOD_INSTANCE_NETWORKS": "127.0.0.2/32"}


def policy_of(**env: str) -> InstancePolicy:
    return InstancePolicy.from_env(env)


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "db.localhost",
        "10.1.2.3",
        "172.16.0.9",
        "192.168.1.1",
        "169.254.169.254",  # link-local: a cloud's metadata service
        "100.64.0.1",  # CGNAT
        "0.0.0.0",  # unspecified
        "[::1]",
        "[fd00::1]",
        "[fe80::1]",
        "[::ffff:127.0.0.1]",
    ],
)
def test_a_server_url_naming_an_internal_address_is_refused_by_default(host: str) -> None:
    for kind in ("postgresql", "mysql"):
        url = normalize_url(f"{kind}://u:pw@{host}:5432/app")
        with pytest.raises(SettingsError, match="BYOD_INSTANCE_NETWORKS") as refused:
            check_instance_url(url, InstancePolicy())
        assert "pw" not in str(refused.value)
        check_instance_url(url, policy_of(BYOD_ALLOW_PRIVATE_INSTANCES="1"))


def test_allowed_networks_let_in_exactly_their_addresses() -> None:
    policy = policy_of(BYOD_INSTANCE_NETWORKS="127.0.0.2/32, fd00::/8")
    check_instance_url(normalize_url("postgresql://u@127.0.0.2/app"), policy)
    check_instance_url(normalize_url("postgresql://u@[fd00::7]/app"), policy)
    for refused in ("127.0.0.1", "127.0.0.3", "10.0.0.1", "[fe80::1]"):
        with pytest.raises(SettingsError, match="BYOD_INSTANCE_NETWORKS"):
            check_instance_url(normalize_url(f"postgresql://u@{refused}/app"), policy)
    check_instance_url(normalize_url("postgresql://u@8.8.8.8/app"), policy)  # public


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "10.0.0.1/8", "not-a-net", "10.0.0.0/8;rm"])
def test_a_bad_network_setting_is_a_clear_error(bad: str) -> None:
    with pytest.raises(SettingsError, match="BYOD_INSTANCE_NETWORKS"):
        policy_of(BYOD_INSTANCE_NETWORKS=bad)


@pytest.fixture
def tenant_pg() -> Iterator[CuttableProxy]:
    """The real PostgreSQL server, seen at 127.0.0.2 (the tenant's network)."""
    proxy = CuttableProxy(5432, host="127.0.0.2")
    yield proxy
    proxy.close()


def at(url: str, host: str, port: int) -> str:
    return sa.make_url(url).set(host=host, port=port).render_as_string(hide_password=False)


def test_an_allowed_alias_connects_and_the_operators_loopback_is_refused(
    pg: ServerDatabases, tmp_path: Path, tenant_pg: CuttableProxy
) -> None:
    ws = Workspace(ws_settings(pg.create(), tmp_path, **TENANT_NET))
    commands.init(ws)
    database = pg.create()
    ws.directory.add_user("tenant")
    with pytest.raises(SettingsError, match="BYOD_INSTANCE_NETWORKS"):
        commands.connect(ws, "tenant", database)  # 127.0.0.1: the operator's
    assert ws.directory.find_user("tenant").id not in ws.directory.configured_user_ids()
    _, reach = commands.connect(ws, "tenant", at(database, "127.0.0.2", tenant_pg.port))
    assert reach.status == "connected", reach.error


class _Resolver:
    """``socket.getaddrinfo`` that answers ``name`` with each of ``answers`` in turn
    (the last one from then on), and counts the questions; other names as usual."""

    def __init__(self, name: str, answers: list[str], real: Callable[..., Any]) -> None:
        self.name, self.answers, self.real, self.asked = name, answers, real, 0

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != self.name:
            return self.real(host, port, *args, **kwargs)
        answer = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer, port or 0))]


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
def test_the_connection_goes_to_the_address_that_was_checked(
    kind: str,
    pg: ServerDatabases,
    mysql: ServerDatabases,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name that resolves to the tenant's address when checked and to the operator's
    just after (DNS rebinding): byod connects to the checked address, once resolved."""
    servers = {"postgresql": (pg, 5432), "mysql": (mysql, 3306)}
    databases, port = servers[kind]
    proxy = CuttableProxy(port, host="127.0.0.2")
    try:
        ws = Workspace(ws_settings(pg.create(), tmp_path, BYOD_INSTANCE_NETWORKS="127.0.0.2/32"))
        commands.init(ws)
        resolver = _Resolver("tenant-db.test", ["127.0.0.2", "127.0.0.1"], socket.getaddrinfo)
        monkeypatch.setattr(socket, "getaddrinfo", resolver)
        url = at(databases.create(), "tenant-db.test", proxy.port)
        ws.directory.add_user("tenant")
        _, reach = commands.connect(ws, "tenant", url)
        assert reach.status == "connected", reach.error
        assert resolver.asked == 1  # resolved once; the driver never asked again
        # the name now answers the operator's address: the run checks it afresh and refuses
        refused = commands.migrate_fleet(ws)
        assert (refused.succeeded, refused.failed) == (0, 1)
        assert "BYOD_INSTANCE_NETWORKS" in refused.errors[0].error
        assert resolver.asked == 2
        resolver.answers = ["127.0.0.2"]
        summary = commands.migrate_fleet(ws)
        assert (summary.succeeded, summary.failed) == (1, 0), summary.errors
        assert resolver.asked == 3  # once for the run's one connection
    finally:
        proxy.close()


def ws_settings(control_plane: str, folder: Path, **env: str) -> Settings:
    migrations = counter_migrations(folder / "migrations")
    return Settings.load(
        database_url=control_plane,
        env={"BYOD_ENCRYPTION_KEY": TEST_KEY, "BYOD_MIGRATIONS": str(migrations), **env},
    )


def test_a_stored_config_the_policy_now_refuses_fails_its_run_and_is_listed(
    pg: ServerDatabases, tmp_path: Path
) -> None:
    """An existing fleet after an upgrade: configs stored under a looser policy fail
    their run with an error naming the setting, and ``verify --policy`` lists them."""
    control = pg.create()
    cli = Cli(tmp_path, BYOD_DATABASE_URL=control, BYOD_ENCRYPTION_KEY=TEST_KEY)
    assert cli("init").code == 0
    for name in ("inside", "local"):
        assert cli("users", "add", "--clerk-id", name).code == 0
    local = sqlite_file(tmp_path)
    assert cli("connect", "inside", "--url", pg.create()).code == 0
    assert cli("connect", "local", "--url", local).code == 0
    strict = {"BYOD_INSTANCE_NETWORKS": ""}
    listed = cli("verify", "--policy", "--json", **strict)
    assert listed.code == 1, listed.err
    reports = {r["clerk_id"]: r for r in listed.json()}  # type: ignore[union-attr]
    assert reports["local"]["ok"] is True
    assert not reports["inside"]["ok"]
    assert "BYOD_INSTANCE_NETWORKS" in reports["inside"]["problems"][0]
    assert cli("verify", "--policy", **strict).code == 1
    assert cli("verify", "--policy").code == 0  # loopback allowed again: nothing refused
    run = cli("migrate", "--all", "--json", **strict)
    assert run.code == 1
    assert "BYOD_INSTANCE_NETWORKS" in run.out
    failed = [line for line in run.out.splitlines() if '"inside"' in line]
    assert failed and "SettingsError" in failed[0]


def sqlite_file(folder: Path) -> str:
    path = folder / "local.db"
    path.touch()
    return f"sqlite:///{path}"


def test_sqlite_instances_keep_their_own_setting(tmp_path: Path) -> None:
    """A SQLite instance is a file, not an address: the network policy leaves it to
    BYOD_ALLOW_SQLITE_INSTANCES."""
    path = sqlite_file(tmp_path)
    check_instance_url(normalize_url(path), InstancePolicy())
    with pytest.raises(SettingsError, match="BYOD_ALLOW_SQLITE_INSTANCES"):
        check_instance_url(normalize_url(path), policy_of(BYOD_ALLOW_SQLITE_INSTANCES="0"))
    execute(path, "CREATE TABLE t (x INTEGER)")


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A certificate for ``name`` (its own CA) and its key, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_a_convex_deployment_is_called_at_the_address_that_was_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding against a Convex deployment: its name resolves to the tenant's
    address when checked and to the operator's after; every call still goes to the checked
    address, with the name as Host and as the TLS name its certificate is checked for."""
    import http.server
    import json as json_module
    import ssl
    import threading

    from byod.targets.convex import open_convex

    cert, key = _self_signed(tmp_path, "tenant.test")
    seen: list[tuple[str, str | None]] = []

    class Deployment(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.headers["Host"], None))
            body = json_module.dumps({"status": "success", "value": [], "logLines": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Deployment)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)  # type: ignore[assignment,misc,return-value]
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        resolver = _Resolver("tenant.test", ["127.0.0.2", "127.0.0.1"], socket.getaddrinfo)
        monkeypatch.setattr(socket, "getaddrinfo", resolver)
        policy = InstancePolicy(instance_networks=parse_networks("127.0.0.2/32"))
        target = open_convex(
            f"convex+https://tenant.test:{port}",
            "k" * 16,
            timeout=5,
            policy=policy,
            ssl_ca=str(cert),
        )
        with target:
            assert target.read_stamp() == []
            assert target.read_stamp() == []
        assert resolver.asked == 1, "resolved once, when checked"
        assert [host for host, _ in seen] == [f"tenant.test:{port}"] * 2
        assert names and set(names) == {"tenant.test"}, "the certificate is checked for the name"
    finally:
        server.shutdown()
        server.server_close()
