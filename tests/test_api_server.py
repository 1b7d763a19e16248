"""`byod serve` as an operator runs it: a real server process on a free port, spoken to over
real sockets (bodies it must not read, forwarded headers it must not trust, its access log,
and settings it must refuse at start with exit 2)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_KEY, make_workspace
from tests.helpers import add_connected
from tests.migration_sets import counter_migrations
from tests.served import Served, free_port, serve, server_env
from tests.test_api import SECRET, bearer, token
from tests.test_cli import BYOD

MIB = 1024 * 1024


def _rss(pid: int) -> int:
    """Resident memory of a process, in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A SQLite control plane with one connected user and an operator; serve's environment."""
    url = f"sqlite:///{tmp_path / 'control.db'}"
    ws = make_workspace(url, counter_migrations(tmp_path / "migrations"))
    (tmp_path / "a.db").touch()
    add_connected(ws, f"sqlite:///{tmp_path / 'a.db'}", "user_a")
    ws.directory.add_user("ops")
    ws.engine.dispose()
    return server_env(
        BYOD_DATABASE_URL=url,
        BYOD_MIGRATIONS=str(tmp_path / "migrations"),
        BYOD_ENCRYPTION_KEY=TEST_KEY,
        BYOD_JWT_SECRET=SECRET,
    )


@pytest.fixture
def served(env: dict[str, str], tmp_path: Path) -> Iterator[Served]:
    with serve(env, tmp_path) as server:
        yield server


def _response(sock: socket.socket) -> bytes:
    """The response on ``sock``, up to the server's hang-up (it times out if none comes)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    assert data.startswith(b"HTTP/1.1 "), data
    return data


def _status(sock: socket.socket) -> int:
    return int(_response(sock).split()[1])


def test_a_huge_body_without_a_token_is_401_before_it_is_read(served: Served) -> None:
    before = _rss(served.process.pid)
    sock = served.raw(
        "POST /v1/fleet/runs HTTP/1.1\nHost: x\nContent-Type: application/json\n"
        f"Content-Length: {400 * MIB}\n",
        b"{" + b" " * 1024,
    )
    with sock:
        assert _status(sock) == 401  # answered with 400 MB still to come
        sent = 0
        with contextlib.suppress(OSError):  # the server hangs up: nobody reads the rest
            while sent < 64 * MIB:
                sock.sendall(b" " * MIB)
                sent += MIB
    assert sent < 64 * MIB
    assert _rss(served.process.pid) - before < 16 * MIB


def test_a_body_over_the_limit_is_413_from_its_length_or_while_it_streams(
    served: Served,
) -> None:
    auth = f"Authorization: Bearer {token('ops', admin=True)}\n"
    declared = served.raw(
        f"POST /v1/fleet/runs HTTP/1.1\nHost: x\n{auth}Content-Type: application/json\n"
        f"Content-Length: {400 * MIB}\n",
        b"{",
    )
    with declared:
        refused = _response(declared)
    assert refused.startswith(b"HTTP/1.1 413"), refused
    assert b"application/problem+json" in refused and b"65536 bytes" in refused

    chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"  # 16 KiB chunks, never a last one
    chunked = served.raw(
        f"POST /v1/fleet/runs HTTP/1.1\nHost: x\n{auth}Content-Type: application/json\n"
        "Transfer-Encoding: chunked\n",
        chunk * 5,  # 80 KiB: past 64 KiB
    )
    with chunked:
        assert _status(chunked) == 413

    small = httpx.post(
        f"{served.url}/v1/fleet/runs",
        content=b'{"concurrency": 1' + b" " * 60_000 + b"}",
        headers=bearer(token("ops", admin=True)) | {"content-type": "application/json"},
        timeout=30,
    )
    assert small.status_code == 202  # within the limit: read and handled


def test_login_form_is_capped(served: Served) -> None:
    sock = served.raw(
        "POST /dashboard/login HTTP/1.1\nHost: x\n"
        f"Content-Type: application/x-www-form-urlencoded\nContent-Length: {100 * MIB}\n",
        b"token=",
    )
    with sock:
        assert _status(sock) == 413
    huge_token = httpx.post(
        f"{served.url}/dashboard/login", data={"token": "x" * 20_000}, timeout=10
    )
    assert huge_token.status_code == 413


def _login(url: str, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{url}/dashboard/login",
        data={"token": token("ops", admin=True)},
        headers=headers,
        timeout=10,
    )


def test_forwarded_proto_is_trusted_only_from_configured_proxies(
    served: Served, env: dict[str, str], tmp_path: Path
) -> None:
    # uvicorn's own default would believe any X-Forwarded-Proto from 127.0.0.1
    plain = _login(served.url, **{"X-Forwarded-Proto": "https"})
    assert plain.status_code == 303
    assert "secure" not in plain.headers["set-cookie"].lower()
    with serve(env, tmp_path, BYOD_FORWARDED_ALLOW_IPS="127.0.0.1") as behind_proxy:
        forwarded = _login(behind_proxy.url, **{"X-Forwarded-Proto": "https"})
        cookie = forwarded.headers["set-cookie"].lower()
        assert "; secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
        assert "secure" not in _login(behind_proxy.url).headers["set-cookie"].lower()


def test_access_log_names_the_caller_and_never_the_token(served: Served) -> None:
    secret_token = token("user_a")
    response = httpx.get(
        f"{served.url}/v1/me/migrations",
        params={"limit": 2, "api_key": "hunter2"},
        headers=bearer(secret_token),
        timeout=10,
    )
    assert response.status_code == 200
    cookie = token("ops", admin=True)
    page = httpx.get(f"{served.url}/dashboard", cookies={"byod_token": cookie}, timeout=10)
    assert page.status_code == 200
    assert httpx.get(f"{served.url}/v1/me/instance", timeout=10).status_code == 401
    deadline = time.monotonic() + 10
    while "GET /v1/me/instance 401" not in served.log.read_text():
        assert time.monotonic() < deadline, served.log.read_text()
        time.sleep(0.1)
    log = served.log.read_text()
    assert "byod.api.access GET /v1/me/migrations 200 " in log
    assert "sub=user_a" in log and "client=127.0.0.1" in log
    assert "GET /dashboard 200 " in log and "sub=ops" in log
    assert "GET /v1/me/instance 401 " in log
    for secret in (secret_token, cookie, "hunter2", "api_key", "limit=2"):
        assert secret not in log


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("BYOD_JWT_SECRET", "x", "at least 32"),
        ("BYOD_JWT_PUBLIC_KEY", "-----BEGIN PUBLIC KEY-----\nnope\n", "not a PEM public key"),
        ("BYOD_JWT_JWKS", "{missing}", "cannot read the JWKS file"),
        ("BYOD_JWT_JWKS", "{garbage}", "is not JSON"),
        ("BYOD_JWT_JWKS", "http://127.0.0.1:1/jwks.json", "https:// URL"),
        ("BYOD_API_MAX_BODY", "lots", "BYOD_API_MAX_BODY"),
        ("BYOD_CORS_ORIGINS", "app.example.com", "BYOD_CORS_ORIGINS"),
    ],
)
def test_a_bad_setting_stops_serve_with_exit_2_and_no_traceback(
    env: dict[str, str], tmp_path: Path, setting: str, value: str, message: str
) -> None:
    (tmp_path / "garbage.json").write_text("{not json")
    value = value.format(missing=tmp_path / "nope.json", garbage=tmp_path / "garbage.json")
    done = subprocess.run(
        [*BYOD, "serve", "--port", str(free_port())],
        cwd=tmp_path,
        env=env | {setting: value},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert message in " ".join(done.stderr.split()), done.stderr
    assert "Traceback" not in done.stderr


def test_a_port_in_use_is_a_clear_error_before_any_banner(
    env: dict[str, str], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*BYOD, "--log-format", "json", "serve", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(r["level"], r["error"]) for r in records] == [("error", "InputError")], records
    assert f"cannot listen on 127.0.0.1:{port}" in records[0]["message"]


def test_in_json_mode_uvicorn_s_own_lines_are_json_too(env: dict[str, str], tmp_path: Path) -> None:
    with serve(env, tmp_path, BYOD_LOG_FORMAT="json") as server:
        sock = server.raw("GARBAGE\n")  # not HTTP: uvicorn warns of it
        assert _response(sock).startswith(b"HTTP/1.1 400")
        assert httpx.get(f"{server.url}/v1/me/instance", timeout=10).status_code == 401
        deadline = time.monotonic() + 10
        while "Invalid HTTP request" not in server.log.read_text():
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.1)
    records = [json.loads(line) for line in server.log.read_text().splitlines()]
    assert {r["logger"] for r in records} >= {"byod.cli", "uvicorn.error", "byod.api.access"}
    assert all(str(r["ts"]).endswith("Z") for r in records)


def test_access_log_escapes_what_comes_from_outside(served: Served) -> None:
    forged = httpx.get(f"{served.url}/v1/%1b%5b31mX%0aFAKE%20LINE", timeout=10)
    assert forged.status_code == 401
    evil = token("\x1b[31mEVIL\nforged line\u202e", admin=True)
    assert httpx.get(f"{served.url}/v1/fleet/status", headers=bearer(evil), timeout=10)
    deadline = time.monotonic() + 10
    while "EVIL" not in served.log.read_text():
        assert time.monotonic() < deadline, served.log.read_text()
        time.sleep(0.1)
    log = served.log.read_text()
    assert "\x1b" not in log and "\u202e" not in log
    assert not any(line.startswith(("FAKE", "forged")) for line in log.splitlines())
    assert "/v1/\\x1b[31mX\\nFAKE LINE 401" in log
    assert "sub=\\x1b[31mEVIL\\nforged line\\u202e" in log
