"""The local Convex backend: ``server.mjs`` (shipped in :mod:`byod`, folder
``convex_server``) in a Node process, hosting deployments that run an app's real Convex
functions on Convex's own JS test backend (``convex-test``) behind Convex's HTTP API.

``byod demo --convex``, ``byod convex local`` (deployments of a team's own app) and the
tests start it. It needs Node 20+ and its npm packages, found (:func:`backend`) where
the scripts are (a clone of byod after ``make``), else in the app's own ``node_modules``
when it holds the same ``convex-test``, else installed once from the lock file shipped
beside the scripts into byod's cache folder (``npm ci``; the scripts are copied beside
the packages, since Node resolves a module's imports from where the module is). Nothing
here ever reaches a real Convex deployment.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import secrets
import select
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from byod import npm
from byod.errors import InputError, SettingsError

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "EXAMPLE_APP",
    "Backend",
    "LocalConvex",
    "LocalDeployment",
    "backend",
    "problem",
    "read_seed",
    "runs_in_place",
    "start",
    "start_local_deployments",
]

_PACKAGE = Path(__file__).resolve().parents[1]
#: The server, the deploy stand-in and the lock file of their npm packages, as shipped.
SHIPPED = _PACKAGE / "convex_server"
_SHIPPED_FILES = ("package.json", "package-lock.json", "server.mjs", "deploy.mjs")
#: The example Convex app (``convex/`` with byod's module, ``migrations/``).
EXAMPLE_APP = _PACKAGE / "example_convex_app"
NODE_PACKAGES = ("convex", "convex-test", "esbuild")
START_TIMEOUT = 20.0
#: most local deployments one command starts, and documents seeded per request
MAX_LOCAL = 50
_SEED_PAGE = 500
_log = logging.getLogger(__name__)


@functools.cache
def problem() -> str | None:
    """Why Node cannot run the local backend here (missing, or older than 20), or None."""
    node = shutil.which("node")
    if node is None:
        return "node is not installed (Node 20+ runs the local Convex backend: nodejs.org)"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
    major = version.stdout.strip().lstrip("v").split(".")[0]
    if not major.isdigit() or int(major) < 20:
        return f"node {version.stdout.strip()} is too old: the local Convex backend needs 20+"
    return None


@dataclass(frozen=True)
class Backend:
    """A folder holding ``server.mjs`` and ``deploy.mjs`` whose npm packages resolve."""

    folder: Path

    @property
    def server(self) -> Path:
        """The server script."""
        return self.folder / "server.mjs"

    @property
    def deploy_command(self) -> str:
        """The stand-in for ``npx convex deploy`` that the local backend understands (a
        ``BYOD_CONVEX_DEPLOY`` command)."""
        return f"node {self.folder / 'deploy.mjs'}"


def backend(app_dir: Path | None = None, on_install: Callable[[str], None] = _log.info) -> Backend:
    """Where the local backend runs from, its npm packages installed (``on_install`` is
    told first, once, when they must be); :class:`SettingsError` saying why when Node or
    the packages cannot be had."""
    why = problem()
    if why is not None:
        raise SettingsError(f"the local Convex backend cannot start: {why}")
    if runs_in_place():
        return Backend(SHIPPED)
    if app_dir is not None and _same_convex_test(app_dir):
        try:  # npm's convention for tools' files: node_modules/.cache
            return _copy_scripts(
                app_dir.resolve() / "node_modules" / ".cache" / "byod-convex-local"
            )
        except OSError:
            pass  # a read-only app folder: the cache's own packages then
    place = npm.installed(
        npm.default_cache() / "convex-local" / _digest(),
        {name: SHIPPED / name for name in _SHIPPED_FILES},
        fail=lambda message: SettingsError(
            f"the local Convex backend's npm packages cannot be installed: {message}",
            hint="They come from the npm registry (npm's own proxy and registry settings "
            "apply) into byod's cache folder (BYOD_CACHE_DIR): check the registry is "
            "reachable and the folder writable, then run the command again.",
        ),
        on_install=lambda: on_install(
            "installing the local Convex backend's npm packages (first use, from the lock "
            "file byod ships)"
        ),
    )
    return Backend(place)


def runs_in_place() -> bool:
    """The shipped scripts' npm packages are installed beside them (a clone of byod, by
    ``make``): the server runs from there. Only there: a ``node_modules`` further up
    (a home folder's) may hold other versions."""
    return _has_packages(SHIPPED / "node_modules")


def _has_packages(modules: Path) -> bool:
    return all((modules / name / "package.json").is_file() for name in NODE_PACKAGES)


def _version(manifest: Path) -> str | None:
    try:
        return str(json.loads(manifest.read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _same_convex_test(app_dir: Path) -> bool:
    """The app's ``node_modules`` holds convex, esbuild and the very ``convex-test`` the
    server was written against (it opens that module's internals: another version may
    not have them)."""
    modules = app_dir.resolve() / "node_modules"
    if not _has_packages(modules):
        return False
    lock = json.loads((SHIPPED / "package-lock.json").read_text())
    locked = str(lock["packages"]["node_modules/convex-test"]["version"])
    return _version(modules / "convex-test" / "package.json") == locked


def _copy_scripts(folder: Path) -> Backend:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("server.mjs", "deploy.mjs"):
        if (
            not (folder / name).is_file()
            or (folder / name).read_bytes() != (SHIPPED / name).read_bytes()
        ):
            shutil.copyfile(SHIPPED / name, folder / name)
    return Backend(folder)


def _digest() -> str:
    """Names the cache folder after what is installed in it: a byod with other scripts
    or packages installs anew, beside the old one."""
    digest = hashlib.sha256()
    for name in _SHIPPED_FILES:
        digest.update((SHIPPED / name).read_bytes())
    return digest.hexdigest()[:12]


class ControlError(Exception):
    """The server refused a control request (``status``, and its ``{code, message}``)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {body.get('code')}: {body.get('message')}")
        self.status = status
        self.code = str(body.get("code"))
        self.message = str(body.get("message"))


class LocalConvex:
    """A running ``server.mjs`` and its control API (the admin token stays in here)."""

    def __init__(
        self, process: subprocess.Popen[bytes], port: int, admin_token: str, where: Backend
    ) -> None:
        self.process = process
        #: the ``BYOD_CONVEX_DEPLOY`` command that deploys to this server's deployments
        self.deploy_command = where.deploy_command
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

    def import_documents(self, name: str, table: str, documents: list[dict[str, Any]]) -> int:
        """Insert ``documents`` into ``table`` of deployment ``name`` (one transaction,
        checked against its schema); how many."""
        body = {"table": table, "documents": documents}
        return int(self._ask("POST", f"/deployments/{name}/import", body)["imported"])

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


def start(log: Path, where: Backend | None = None) -> LocalConvex:
    """Start ``server.mjs`` (of ``where``, else of :func:`backend`) on a free port of
    127.0.0.1 (its stderr to ``log``) and wait for it; :class:`SettingsError` saying why
    when it cannot run here."""
    where = where or backend()
    token = secrets.token_urlsafe(24)
    env = {**os.environ, "BYOD_CONVEX_ADMIN_TOKEN": token}
    with log.open("wb") as err:
        process = subprocess.Popen(
            ["node", str(where.server), "--port", "0", "--exit-with-stdin"],
            cwd=where.folder,
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
    return LocalConvex(process, port, token, where)


@dataclass(frozen=True)
class LocalDeployment:
    """A local deployment of an app: its name, URL (as ``byod connect`` takes it) and
    deploy key, and the documents seeded into each table."""

    name: str
    url: str
    key: str = field(repr=False)
    seeded: dict[str, int] = field(default_factory=dict)


def read_seed(spec: str) -> tuple[str, list[dict[str, Any]]]:
    """``TABLE=FILE`` (JSON lines, one document each): the table and its documents;
    :class:`InputError` naming the line that is not a JSON object."""
    table, sep, path = spec.partition("=")
    if not sep or not table or not path:
        raise InputError(f"--seed takes TABLE=FILE (JSON lines), not {spec!r}")
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise InputError(f"cannot read the seed file {path}: {exc.strerror}") from None
    documents = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            document = json.loads(line)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise InputError(f"{path}, line {number}: a document must be a JSON object")
        documents.append(document)
    return table, documents


def start_local_deployments(
    app_dir: Path,
    count: int,
    seeds: tuple[str, ...],
    log: Path,
    on_install: Callable[[str], None] = _log.info,
) -> tuple[LocalConvex, list[LocalDeployment]]:
    """Start the local backend with ``count`` deployments of the app in ``app_dir`` (its
    own npm packages from its ``node_modules``), each seeded from ``seeds``
    (``TABLE=FILE``); the server (stop it with :meth:`LocalConvex.close`) and them."""
    if not (app_dir / "convex").is_dir():
        raise InputError(f"{app_dir} has no convex/ folder: give the Convex app's folder")
    if not 1 <= count <= MAX_LOCAL:
        raise InputError(f"--deployments must be 1 to {MAX_LOCAL}, not {count}")
    tables = [read_seed(spec) for spec in seeds]  # a bad file is refused before starting
    server = start(log, backend(app_dir, on_install))
    made = []
    try:
        for n in range(1, count + 1):
            name = f"local-{n}"
            key = f"local:{name}|{secrets.token_hex(16)}"
            try:
                url = "convex+" + server.create(name, key, app_dir.resolve())
            except ControlError as exc:
                raise InputError(f"the app does not load: {exc.message}") from None
            seeded = {}
            for table, documents in tables:
                done = 0
                for start_at in range(0, len(documents), _SEED_PAGE):
                    page = documents[start_at : start_at + _SEED_PAGE]
                    try:
                        done += server.import_documents(name, table, page)
                    except ControlError as exc:
                        raise InputError(f"seeding {table}: {exc.message}") from None
                seeded[table] = done
            made.append(LocalDeployment(name, url, key, seeded))
    except BaseException:
        server.close()
        raise
    return server, made
