"""The local Convex backend of byod's checkout: ``tools/convex-local/server.mjs`` in a Node
process, hosting deployments that run an app's real Convex functions on Convex's own JS
test backend (``convex-test``) behind Convex's HTTP API.

``byod demo --convex`` and the tests start it; it needs Node 20+ and the npm packages of
the checkout (``make node_modules/.installed``), so it runs only from a clone of byod's
repository, never from an installed wheel. Nothing here ever reaches a real Convex
deployment.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import select
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from byod.errors import SettingsError

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["CHECKOUT", "DEPLOY_COMMAND", "EXAMPLE_APP", "LocalConvex", "problem", "start"]

#: byod's checkout (the folder holding ``tools/`` and ``node_modules/``), when run from one
CHECKOUT = Path(__file__).resolve().parents[3]
SERVER = CHECKOUT / "tools" / "convex-local" / "server.mjs"
#: The stand-in for ``npx convex deploy`` that the local backend understands.
DEPLOY_SCRIPT = CHECKOUT / "tools" / "convex-local" / "deploy.mjs"
DEPLOY_COMMAND = f"node {DEPLOY_SCRIPT}"
#: The example Convex app (``convex/`` with byod's module, ``migrations/``).
EXAMPLE_APP = CHECKOUT / "examples" / "convex-notes"
NODE_PACKAGES = ("convex", "convex-test", "esbuild")
START_TIMEOUT = 20.0


@functools.cache
def problem() -> str | None:
    """Why the local backend cannot run here, or None when it can."""
    if not SERVER.is_file():
        return (
            "the local Convex backend (tools/convex-local) is not here: it runs from a clone "
            "of byod's repository"
        )
    node = shutil.which("node")
    if node is None:
        return "node is not installed (Node 20+ runs the local Convex backend)"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
    major = version.stdout.strip().lstrip("v").split(".")[0]
    if not major.isdigit() or int(major) < 20:
        return f"node {version.stdout.strip()} is too old: the local Convex backend needs 20+"
    for package in NODE_PACKAGES:
        if not (CHECKOUT / "node_modules" / package / "package.json").is_file():
            return f"node_modules/{package} is missing: run `make node_modules/.installed`"
    return None


class ControlError(Exception):
    """The server refused a control request (``status``, and its ``{code, message}``)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {body.get('code')}: {body.get('message')}")
        self.status = status
        self.code = str(body.get("code"))
        self.message = str(body.get("message"))


class LocalConvex:
    """A running ``server.mjs`` and its control API (the admin token stays in here)."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, admin_token: str) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._control = httpx.Client(
            base_url=f"{self.url}/_admin",
            headers={"Authorization": f"Bearer {admin_token}"},
            timeout=60,
            trust_env=False,
        )

    def __enter__(self) -> LocalConvex:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _ask(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._control.request(method, path, json=body)
        answer = response.json()
        if response.status_code >= 400:
            raise ControlError(response.status_code, answer)
        return answer

    def create(
        self, name: str, key: str, app_dir: Path = EXAMPLE_APP, *, latency_ms: float = 0
    ) -> str:
        """A new deployment running ``app_dir``'s functions, admin for ``key``; its base URL
        (``http://127.0.0.1:PORT/d/NAME``; byod connects it as ``convex+http://...``)."""
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
        """Delete the deployment and its data."""
        self._ask("DELETE", f"/deployments/{name}")

    def deployments(self) -> list[dict[str, Any]]:
        """Every deployment (name, URL, deploys so far; never a key)."""
        answer: list[dict[str, Any]] = self._ask("GET", "/deployments")["deployments"]
        return answer

    def close(self) -> None:
        """Stop the server (its deployments and their data go with it)."""
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


def start(log: Path) -> LocalConvex:
    """Start ``server.mjs`` on a free port of 127.0.0.1 (its stderr to ``log``) and wait
    for it; :class:`SettingsError` saying why when it cannot run here."""
    why = problem()
    if why is not None:
        raise SettingsError(f"the local Convex backend cannot start: {why}")
    token = secrets.token_urlsafe(24)
    env = {**os.environ, "BYOD_CONVEX_ADMIN_TOKEN": token}
    with log.open("wb") as err:
        process = subprocess.Popen(
            ["node", str(SERVER), "--port", "0", "--exit-with-stdin"],
            cwd=CHECKOUT,
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
        raise SettingsError(
            f"the local Convex backend did not start: {log.read_text(errors='replace')[-500:]}"
        )
    port = int(json.loads(line)["port"])
    return LocalConvex(process, port, token)
