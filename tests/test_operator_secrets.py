"""The operator's own database credentials never go to a tenant's server.

libpq fills a missing password from the byod process's environment (``PGPASSWORD``) and
from a password file (``PGPASSFILE``, ``~/.pgpass``). Those belong to the operator (for the
control plane, say); a tenant's URL without a password must not receive them, even from
a server that asks for the password in clear text.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from byod.commands import connect
from byod.workspace import Workspace

_SSL_REQUEST = 80877103
_GSS_REQUEST = 80877104


def _read_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _serve_one(conn: socket.socket, heard: list[bytes]) -> None:
    """Speak just enough of PostgreSQL's protocol to ask for a clear-text password."""
    with conn:
        while True:
            length, code = struct.unpack("!ii", _read_exact(conn, 8))
            if code in (_SSL_REQUEST, _GSS_REQUEST):
                conn.sendall(b"N")  # no TLS here: go on in the clear
                continue
            _read_exact(conn, length - 8)  # the startup packet: user, database
            break
        conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
        kind = conn.recv(1)
        if kind == b"p":
            (size,) = struct.unpack("!i", _read_exact(conn, 4))
            heard.append(_read_exact(conn, size - 4).rstrip(b"\0"))
        fields = b"SFATAL\0C28P01\0Mpassword authentication failed\0\0"
        conn.sendall(b"E" + struct.pack("!i", len(fields) + 4) + fields)


@contextlib.contextmanager
def password_catcher() -> Iterator[tuple[int, list[bytes]]]:
    """A fake PostgreSQL server on 127.0.0.1 that records every password sent to it."""
    listener = socket.create_server(("127.0.0.1", 0))
    heard: list[bytes] = []
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
                _serve_one(conn, heard)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], heard
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_a_tenant_server_never_receives_the_operators_postgres_passwords(
    ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    passfile = tmp_path / "pgpass"
    passfile.write_text("*:*:*:*:secret-from-the-password-file\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSWORD", "secret-from-the-environment")
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    ws.directory.add_user("tenant")
    with password_catcher() as (port, heard):
        _, reach = connect(ws, "tenant", f"postgresql://app@127.0.0.1:{port}/app", timeout=5)
        assert reach.status == "error"
        assert heard == []  # libpq had no password to give: it sent none
        _, given = connect(
            ws, "tenant", f"postgresql://app:tenant-pw@127.0.0.1:{port}/app", timeout=5
        )
        assert given.status == "error"
        assert heard == [b"tenant-pw"]  # the tenant's own password still goes, and only it


def test_postgres_instances_connect_without_a_libpq_warning(tmp_path: Path, pg: object) -> None:
    from tests.conftest import TEST_KEY, ServerDatabases
    from tests.test_cli import Cli

    assert isinstance(pg, ServerDatabases)
    cli = Cli(tmp_path, real_process=True, BYOD_ENCRYPTION_KEY=TEST_KEY)
    assert cli("init").code == 0
    assert cli("users", "add", "--clerk-id", "a").code == 0
    connected = cli("connect", "a", "--url", pg.create())
    assert connected.code == 0, connected.err
    assert "WARNING" not in connected.err and "password file" not in connected.err
