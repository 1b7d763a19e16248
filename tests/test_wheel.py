"""byod as its users install it: a wheel built from this checkout, installed into a fresh
venv with no clone on the path, runs every command of its own.

The wheel is built once and each venv made once for the session (shared by the xdist
workers, under a file lock). The core venv has no extra: it runs the demo, the Convex
demo and local deployments (their npm packages installed on first use into a cache
folder, from the lock file the wheel ships), type-checks a team's migrations, and says
which extra to install for what needs one (exit 2). A second venv adds the ``serve``
extra and serves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

import byod
from byod.commands import convex_local
from byod.npm import file_lock
from byod.targets.convex_client import ConvexClient
from tests.conftest import child_env
from tests.convex_backend import require_node

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT = 600
PIP = (sys.executable, "-m", "pip", "--disable-pip-version-check")
MYPY = (sys.executable, "-m", "mypy", "--strict", "--cache-dir", "/dev/null")


def _made_once(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder made by ``make`` once for the session, shared by its xdist workers."""
    base = factory.getbasetemp()
    # an xdist worker's base is a folder of the session's own, shared by its workers
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    place = root / name
    with file_lock(root / f"{name}.lock"):
        if not (place / ".ready").is_file():
            shutil.rmtree(place, ignore_errors=True)
            place.mkdir(parents=True)
            make(place)
            (place / ".ready").touch()
    return place


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("timeout", INSTALL_TIMEOUT)
    return subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, built once."""

    def build(place: Path) -> None:
        done = _run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(place), str(ROOT)]
        )
        assert done.returncode == 0, done.stderr

    return next(_made_once(tmp_path_factory, "wheel", build).glob("byod-*.whl"))


def _venv(wheel: Path, extras: str) -> Callable[[Path], None]:
    def make(place: Path) -> None:
        venv = place / "venv"
        done = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
        assert done.returncode == 0, done.stderr
        target = f"byod[{extras}] @ {wheel.as_uri()}" if extras else str(wheel)
        done = _run([*PIP, "--python", str(venv / "bin" / "python"), "install", "-q", target])
        assert done.returncode == 0, done.stderr

    return make


@pytest.fixture(scope="session")
def core(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A fresh venv holding the wheel and its core dependencies only: its ``bin``."""
    made = _made_once(tmp_path_factory, "venv-core", _venv(wheel, ""))
    return made / "venv" / "bin"


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A fresh venv holding the wheel with its ``serve`` extra: its ``bin``."""
    made = _made_once(tmp_path_factory, "venv-serve", _venv(wheel, "serve"))
    return made / "venv" / "bin"


def env_for(bin_dir: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user's shell: the venv first on PATH, no BYOD_ setting, no source tree on the
    Python path, byod's cache in the test's own folder unless given."""
    env = {k: v for k, v in child_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["BYOD_CACHE_DIR"] = str(tmp_path / "cache")
    return env | extra


def byod_in(
    bin_dir: Path, folder: Path, *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return _run([str(bin_dir / "byod"), *args], cwd=folder, env=env, input=stdin, timeout=300)


def test_the_wheel_carries_the_local_backend_the_example_app_and_its_types(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in (
        "byod/py.typed",
        "byod/convex_server/server.mjs",
        "byod/convex_server/deploy.mjs",
        "byod/convex_server/package.json",
        "byod/convex_server/package-lock.json",
        "byod/convex_module/byod.ts",
        "byod/example_convex_app/convex/schema.ts",
        "byod/example_convex_app/convex/_generated/server.js",
        "byod/example_convex_app/migrations/002_add_tags.py",
        "byod/example_migrations/001_initial.py",
    ):
        assert shipped in names, shipped
    assert not [n for n in names if "node_modules" in n or "__pycache__" in n]
    # the lock file installs what the manifest asks, and the versions the server knows
    manifest = json.loads((convex_local.SHIPPED / "package.json").read_text())
    lock = json.loads((convex_local.SHIPPED / "package-lock.json").read_text())
    assert lock["packages"][""]["dependencies"] == manifest["dependencies"]
    for package, version in manifest["dependencies"].items():
        assert lock["packages"][f"node_modules/{package}"]["version"] == version


def test_the_core_install_is_byod_from_the_wheel_without_any_extra(
    core: Path, tmp_path: Path
) -> None:
    env = env_for(core, tmp_path)
    shown = byod_in(core, tmp_path, "--version", env=env)
    assert (shown.returncode, shown.stdout.strip()) == (0, f"byod {byod.__version__}")
    where = _run(
        [
            str(core / "python"),
            "-c",
            "import byod, importlib.util as u; print(byod.__file__); "
            "print([m for m in ('psycopg', 'pymysql', 'fastapi', 'uvicorn', 'jwt', 'celery') "
            "if u.find_spec(m)])",
        ],
        cwd=tmp_path,
        env=env,
    )
    path, present = where.stdout.splitlines()
    assert path.startswith(str(core.parent)), "byod is the installed wheel, not the checkout"
    assert present == "[]", "the core pulls in no extra's packages"


def test_the_demo_runs_from_the_wheel(core: Path, tmp_path: Path) -> None:
    env = env_for(core, tmp_path)
    done = byod_in(core, tmp_path, "demo", env=env)
    assert done.returncode == 0, done.stderr
    assert "instances:" in done.stdout and (tmp_path / "byod-demo").is_dir()
    status = byod_in(core, tmp_path, "status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["outdated"] == 0


def test_the_convex_demo_installs_the_backends_packages_once_from_the_shipped_lock(
    core: Path, tmp_path: Path
) -> None:
    require_node()
    env = env_for(core, tmp_path)
    first = byod_in(core, tmp_path, "demo", "--convex", "--tenants", "2", env=env)
    assert first.returncode == 0, first.stderr
    assert "installing the local Convex backend's npm packages" in first.stderr
    installed = list((tmp_path / "cache" / "convex-local").glob("*/node_modules/convex-test"))
    assert len(installed) == 1, "installed into byod's cache folder"
    assert "2 local Convex test deployments" in first.stdout
    again = byod_in(core, tmp_path, "demo", "--convex", "--tenants", "2", env=env)
    assert again.returncode == 0, again.stderr
    assert "installing" not in again.stderr, "installed once"


def test_when_the_packages_cannot_be_installed_the_convex_demo_says_why(
    core: Path, tmp_path: Path
) -> None:
    require_node()
    offline = env_for(
        core,
        tmp_path,
        npm_config_cache=str(tmp_path / "npm-cache"),  # nothing cached: npm must fetch
        npm_config_registry="http://127.0.0.1:9/",  # and the registry does not answer
        npm_config_fetch_retries="0",
    )
    done = byod_in(core, tmp_path, "demo", "--convex", env=offline)
    assert done.returncode == 2, done.stderr
    assert "npm ci failed: FetchError" in done.stderr and "ECONNREFUSED" in done.stderr
    assert "registry" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "byod-convex-demo").exists(), "refused before any file is made"
    unwritable = env_for(core, tmp_path, BYOD_CACHE_DIR="/proc/byod-cache")
    done = byod_in(core, tmp_path, "demo", "--convex", env=unwritable)
    assert done.returncode == 2, done.stderr
    assert "cannot write /proc/byod-cache" in done.stderr and "BYOD_CACHE_DIR" in done.stderr


def test_without_node_the_convex_commands_say_so(core: Path, tmp_path: Path) -> None:
    (tmp_path / "app" / "convex").mkdir(parents=True)
    env = env_for(core, tmp_path, PATH=str(core))  # no node on the PATH
    for args in (("demo", "--convex"), ("convex", "local", "app")):
        done = byod_in(core, tmp_path, *args, env=env)
        assert done.returncode == 2, done.stderr
        assert "node is not installed" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "byod-convex-demo").exists(), "refused before any file is made"


TINY_SCHEMA = """\
import { defineSchema, defineTable } from "convex/server";
import { v } from "convex/values";
import { byodTables } from "./byodTables";

export default defineSchema({
  notes: defineTable({ text: v.string() }),
  ...byodTables,
});
"""
TINY_NOTES = """\
import { v } from "convex/values";
import { mutation, query } from "./_generated/server";

export const list = query({
  args: {},
  handler: async (ctx) => (await ctx.db.query("notes").collect()).map((n) => n.text),
});

export const add = mutation({
  args: { text: v.string() },
  handler: async (ctx, { text }) => {
    await ctx.db.insert("notes", { text });
  },
});
"""
TINY_GENERATED = """\
import { mutationGeneric, queryGeneric, internalMutationGeneric, internalQueryGeneric,
  actionGeneric, internalActionGeneric } from "convex/server";

export const query = queryGeneric;
export const mutation = mutationGeneric;
export const internalQuery = internalQueryGeneric;
export const internalMutation = internalMutationGeneric;
export const action = actionGeneric;
export const internalAction = internalActionGeneric;
"""
TINY_MIGRATION = """\
from byod import Migration, MigrationContext


def up(ctx: MigrationContext) -> None:
    ctx.convex.mutation("notes:add", {"text": f"welcome, {ctx.clerk_id}"})


migration = Migration(
    id="001_welcome", version=1, name="Welcome", description="A first note.", up=up
)
"""


def tiny_app(folder: Path) -> Path:
    """A small Convex app as its team keeps it: schema, functions, codegen output."""
    convex = folder / "convex"
    (convex / "_generated").mkdir(parents=True)
    (convex / "notes.ts").write_text(TINY_NOTES)
    (convex / "_generated" / "server.js").write_text(TINY_GENERATED)
    (convex / "schema.ts").write_text(TINY_SCHEMA.replace("  ...byodTables,\n", ""))
    return folder


@contextmanager
def local_deployments(
    core: Path, folder: Path, app: Path, env: dict[str, str]
) -> Iterator[tuple[list[dict[str, Any]], dict[str, Any], subprocess.Popen[str]]]:
    """``byod convex local APP --json`` in the background: its deployments and ready line."""
    local = subprocess.Popen(
        [str(core / "byod"), "convex", "local", str(app), "--deployments", "1", "--json"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert local.stdout is not None
        made, ready = [], {}
        for line in local.stdout:
            answer = json.loads(line)
            if "ready" in answer:
                ready = answer
                break
            made.append(answer)
        assert ready, local.stderr.read() if local.stderr else ""
        yield made, ready, local
    finally:
        if local.poll() is None:
            local.send_signal(signal.SIGINT)
            local.wait(timeout=30)


def test_a_tiny_apps_local_deployments_are_migrated_by_the_installed_byod(
    core: Path, tmp_path: Path
) -> None:
    require_node()
    env = env_for(core, tmp_path)
    app = tiny_app(tmp_path / "tiny")
    init = byod_in(core, tmp_path, "convex", "init", str(app), env=env)
    assert init.returncode == 0, init.stderr
    assert (app / "convex" / "byod.ts").is_file() and "byodTables" in init.stdout
    (app / "convex" / "schema.ts").write_text(TINY_SCHEMA)  # as init said to
    (app / "migrations").mkdir()
    (app / "migrations" / "001_welcome.py").write_text(TINY_MIGRATION)
    with local_deployments(core, tmp_path, app, env) as (made, ready, local):
        assert str(tmp_path / "cache") in ready["deploy"], "the cache's backend"
        run_env = env | {
            "BYOD_ALLOW_PRIVATE_INSTANCES": "1",
            "BYOD_CONVEX_DEPLOY": ready["deploy"],
            "BYOD_MIGRATIONS": str(app / "migrations"),
            "BYOD_CONVEX_CODE": "folder",
        }
        for args, stdin in (
            (("init",), None),
            (("users", "add", "--clerk-id", "ada"), None),
            (("connect", "ada", "--url", made[0]["url"], "--secret", "-"), made[0]["key"]),
            (("migrate", "--all"), None),
        ):
            done = byod_in(core, tmp_path, *args, env=run_env, stdin=stdin)
            assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
        with ConvexClient(made[0]["url"], made[0]["key"]) as client:
            assert client.query("notes:list") == ["welcome, ada"]
            assert [row["id"] for row in client.function("byod:readStamp", {})] == ["001_welcome"]
        local.send_signal(signal.SIGINT)
        assert local.wait(timeout=30) == 0, "Ctrl-C stops it cleanly"


def test_local_deployments_use_the_apps_own_convex_test_when_it_is_the_same(
    core: Path, tmp_path: Path
) -> None:
    require_node()  # the checkout's packages (make) stand in for the app's own npm ci
    app = tiny_app(tmp_path / "tiny")
    (app / "convex" / "schema.ts").write_text(TINY_SCHEMA)
    shutil.copy(convex_local.SHIPPED / "package.json", app / "package.json")
    shutil.copytree(
        convex_local.SHIPPED / "node_modules", app / "node_modules", copy_function=os.link
    )
    byod_in(core, tmp_path, "convex", "init", str(app), env=env_for(core, tmp_path))
    env = env_for(core, tmp_path)
    with local_deployments(core, tmp_path, app, env) as (made, ready, _):
        assert ready["deploy"].startswith(f"node {app / 'node_modules' / '.cache'}")
        with ConvexClient(made[0]["url"], made[0]["key"]) as client:
            assert client.query("notes:list") == []
    assert not (tmp_path / "cache").exists(), "nothing installed"


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (("serve",), "serve"),
        (("token", "--sub", "ada"), "serve"),
        (("worker",), "celery"),
        (("status", "--database-url", "postgresql://postgres@127.0.0.1/postgres"), "postgres"),
        (("migrate", "--all", "--distributed"), "celery"),
    ],
)
def test_a_command_whose_extra_is_missing_names_the_pip_install(
    core: Path, tmp_path: Path, args: tuple[str, ...], extra: str
) -> None:
    env = env_for(core, tmp_path, BYOD_BROKER_URL="redis://127.0.0.1:6379/0")
    done = byod_in(core, tmp_path, *args, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f'pip install "byod[{extra}]"' in done.stderr
    assert "Traceback" not in done.stderr and "ImportError" not in done.stderr


@pytest.mark.parametrize(
    ("url", "extra"),
    [
        ("postgresql://postgres@127.0.0.1/postgres", "postgres"),
        ("mysql://root@127.0.0.1/x", "mysql"),
    ],
)
def test_connecting_an_instance_whose_driver_is_missing_stores_nothing(
    core: Path, tmp_path: Path, url: str, extra: str
) -> None:
    env = env_for(core, tmp_path)
    assert byod_in(core, tmp_path, "init", env=env).returncode == 0
    assert byod_in(core, tmp_path, "users", "add", "--clerk-id", "ada", env=env).returncode == 0
    done = byod_in(core, tmp_path, "connect", "ada", "--url", url, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f'pip install "byod[{extra}]"' in done.stderr and "Traceback" not in done.stderr
    listed = byod_in(core, tmp_path, "status", "--json", env=env)
    assert json.loads(listed.stdout)["by_connection"] == {"not configured": 1}


def test_serve_help_without_the_extra_and_serving_with_it(
    core: Path, served: Path, tmp_path: Path
) -> None:
    for bin_dir in (core, served):
        helped = byod_in(bin_dir, tmp_path, "serve", "--help", env=env_for(bin_dir, tmp_path))
        assert helped.returncode == 0, helped.stderr
        assert "Needs the serve extra" in helped.stdout
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = env_for(served, tmp_path, BYOD_JWT_SECRET="s" * 32)
    assert byod_in(served, tmp_path, "init", env=env).returncode == 0
    server = subprocess.Popen(
        [str(served / "byod"), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        answer = None
        for _ in range(100):
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/v1/fleet/status", trust_env=False)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert answer is not None, "serving"
        assert answer.status_code == 401  # the API answers: a token is needed
        assert answer.headers["content-type"].startswith("application/problem+json")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)


MIGRATION = """
import sqlalchemy as sa

from byod import Backfill, Migration, MigrationContext


def up(ctx: MigrationContext) -> None:
    ctx.op.create_table("notes", sa.Column("id", sa.Integer, primary_key=True))
    ctx.log.info("user %s", ctx.clerk_id)


def down(ctx: MigrationContext) -> None:
    ctx.op.drop_table("notes")


migration = Migration(
    id="001_create_notes",
    version=1,
    name="Notes",
    description="A table of notes.",
    up=up,
    down=down,
)
"""

MISUSE = """
from byod import Migration, MigrationContext


def up(ctx: MigrationContext) -> None:
    total: int = ctx.clerk_id


migration = Migration(id="002_wrong", version="2", name="x", description="", up=up)
"""


def test_a_teams_migrations_type_check_strictly_against_the_installed_wheel(
    core: Path, tmp_path: Path
) -> None:
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "001_create_notes.py").write_text(textwrap.dedent(MIGRATION))
    (tmp_path / "wrong.py").write_text(textwrap.dedent(MISUSE))

    def mypy(*files: str) -> subprocess.CompletedProcess[str]:
        return _run(
            [*MYPY, "--python-executable", str(core / "python"), "--no-incremental", *files],
            cwd=tmp_path,
            timeout=300,
        )

    good = mypy("migrations/001_create_notes.py")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = mypy("wrong.py")
    assert bad.returncode == 1, bad.stdout
    assert 'incompatible type "str"; expected "int"' in bad.stdout  # Migration's version
    assert 'expression has type "str", variable has type "int"' in bad.stdout  # ctx.clerk_id
    assert "py.typed" not in bad.stdout  # the package's types were read, not skipped
