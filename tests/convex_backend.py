"""The local Convex backend for tests: ``tools/convex-local/server.mjs`` in a Node process,
hosting deployments that run an app's real Convex functions on convex-test behind Convex's
HTTP API.

``convex_server`` (session-scoped; registered in ``tests/conftest.py``) starts one server
for the session and stops it at the end; each test makes its own deployments with
:meth:`ConvexServer.create` and gets their base URLs (clients POST to ``<base>/api/...``).
In CI (``CI=true``) a missing ``node`` or ``node_modules`` fails the test that asks for the
server; elsewhere it is skipped with the reason (as ``tests.conftest.require_server`` does
for database servers).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import select
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "tools" / "convex-local" / "server.mjs"
#: The example Convex app (its functions in ``convex/``), byod's module copied in.
EXAMPLE_APP = ROOT / "examples" / "convex-notes"
NODE_PACKAGES = ("convex", "convex-test", "esbuild")
START_TIMEOUT = 20.0


@functools.cache
def _node_problem() -> str | None:
    """Why the local backend cannot run here, or None when it can."""
    node = shutil.which("node")
    if node is None:
        return "node is not installed (Node 20+ runs the local Convex backend)"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
    major = version.stdout.strip().lstrip("v").split(".")[0]
    if not major.isdigit() or int(major) < 20:
        return f"node {version.stdout.strip()} is too old: the local Convex backend needs 20+"
    for package in NODE_PACKAGES:
        if not (ROOT / "node_modules" / package / "package.json").is_file():
            return f"node_modules/{package} is missing: run `make node_modules/.installed`"
    return None


def require_node() -> None:
    """Fail in CI, skip elsewhere, when Node or the npm packages are missing."""
    problem = _node_problem()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(problem)
    pytest.skip(problem)


class ControlError(Exception):
    """The server refused a control request (``status``, and its ``{code, message}``)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {body.get('code')}: {body.get('message')}")
        self.status = status
        self.code = str(body.get("code"))
        self.message = str(body.get("message"))


class ConvexServer:
    """A running ``server.mjs``, and its control API (the admin token stays in here)."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, admin_token: str) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._control = httpx.Client(
            base_url=f"{self.url}/_admin",
            headers={"Authorization": f"Bearer {admin_token}"},
            timeout=60,
        )

    def _ask(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._control.request(method, path, json=body)
        answer = response.json()
        if response.status_code >= 400:
            raise ControlError(response.status_code, answer)
        return answer

    def create(
        self, name: str, key: str, app_dir: Path = EXAMPLE_APP, *, latency_ms: float = 0
    ) -> str:
        """A new deployment running ``app_dir``'s functions, admin for ``key``; its base URL."""
        body = {"name": name, "deployKey": key, "appDir": str(app_dir), "latencyMs": latency_ms}
        return str(self._ask("POST", "/deployments", body)["url"])

    def deploy(self, name: str, app_dir: Path | None = None) -> dict[str, Any]:
        """Load the app folder's current schema and functions, keeping the data (the
        deployment's own folder, or ``app_dir`` from now on); what the server says of it."""
        body = {} if app_dir is None else {"appDir": str(app_dir)}
        answer: dict[str, Any] = self._ask("POST", f"/deployments/{name}/deploy", body)
        return answer

    def throttle(self, name: str, n: int, retry_after_seconds: int | None = None) -> None:
        """Answer the deployment's next ``n`` API requests with HTTP 429."""
        body: dict[str, Any] = {"requests": n}
        if retry_after_seconds is not None:
            body["retryAfterSeconds"] = retry_after_seconds
        self._ask("POST", f"/deployments/{name}/throttle", body)

    def latency(self, name: str, ms: float) -> None:
        """Wait ``ms`` before answering each of the deployment's API requests."""
        self._ask("POST", f"/deployments/{name}/latency", {"ms": ms})

    def delete(self, name: str) -> None:
        self._ask("DELETE", f"/deployments/{name}")

    def deployments(self) -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = self._ask("GET", "/deployments")["deployments"]
        return answer

    def close(self) -> None:
        self._control.close()
        if self.process.stdin is not None:
            self.process.stdin.close()  # --exit-with-stdin: the server stops
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(log: Path) -> ConvexServer:
    """Start ``server.mjs`` on a free port (its stderr to ``log``) and wait for its port."""
    token = secrets.token_urlsafe(24)
    env = {**os.environ, "BYOD_CONVEX_ADMIN_TOKEN": token}
    with log.open("wb") as err:
        process = subprocess.Popen(
            ["node", str(SERVER), "--port", "0", "--exit-with-stdin"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
    line = process.stdout.readline() if ready else b""
    if not line:
        process.kill()
        process.wait()
        raise AssertionError(f"server.mjs did not start: {log.read_text(errors='replace')}")
    port = int(json.loads(line)["port"])
    return ConvexServer(process, port, token)


@pytest.fixture(scope="session")
def convex_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConvexServer]:
    """One local Convex backend for the session, stopped at the end."""
    require_node()
    server = start_server(tmp_path_factory.mktemp("convex-local") / "server.log")
    try:
        yield server
    finally:
        server.close()
