"""`byod convex local DIR`: local deployments of a team's own app — here `arena`, a second
app of the tests' own (players and matches, convex-helpers from its own node_modules,
installed from its lock file by the set-up) — seeded from JSON lines, then migrated by
byod with the app's own backfill page."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from byod.commands import convex_local
from byod.targets.convex_client import ConvexClient
from tests.conftest import TEST_KEY, child_env
from tests.convex_backend import ROOT, require_node

ARENA = ROOT / "tests" / "convex_apps" / "arena"
PLAYERS = [
    {"name": "ada", "league": "gold"},
    {"name": "bob", "league": "silver"},
    {"name": "cy", "league": "bronze"},
]
MATCHES = [
    {"winner": "ada", "loser": "bob"},
    {"winner": "ada", "loser": "cy"},
    {"winner": "bob", "loser": "cy"},
]


def jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def byod(folder: Path, *args: str, env: dict[str, str], stdin: str | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "byod", *args],
        cwd=folder,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_local_deployments_of_a_second_app_with_its_own_packages_are_migrated(
    tmp_path: Path,
) -> None:
    require_node()
    if not (ARENA / "node_modules" / "convex-helpers").is_dir():
        pytest.fail("tests/convex_apps/arena/node_modules is missing: run `make test` (npm ci)")
    env = child_env()
    local = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "byod",
            "convex",
            "local",
            str(ARENA),
            "--deployments",
            "2",
            "--seed",
            f"players={jsonl(tmp_path / 'players.jsonl', PLAYERS)}",
            "--seed",
            f"matches={jsonl(tmp_path / 'matches.jsonl', MATCHES)}",
            "--json",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert local.stdout is not None
        made = []
        ready: dict[str, object] = {}
        for line in local.stdout:
            data = json.loads(line)
            if "ready" in data:
                ready = data
                break
            made.append(data)
        assert len(made) == 2, local.stderr.read() if local.stderr else ""
        assert made[0]["seeded"] == {"players": 3, "matches": 3}
        run_env = env | {
            "BYOD_ENCRYPTION_KEY": TEST_KEY,
            "BYOD_DATABASE_URL": f"sqlite:///{tmp_path / 'byod.db'}",
            "BYOD_MIGRATIONS": str(ARENA / "migrations"),
            "BYOD_ALLOW_PRIVATE_INSTANCES": "1",
            "BYOD_CONVEX_DEPLOY": str(ready["deploy"]),  # the command it printed
            "BYOD_CONVEX_CODE": "folder",
        }
        assert byod(tmp_path, "init", env=run_env).returncode == 0
        for d in made:
            assert (
                byod(tmp_path, "users", "add", "--clerk-id", d["name"], env=run_env).returncode == 0
            )
            done = byod(
                tmp_path,
                "connect",
                d["name"],
                "--url",
                d["url"],
                "--secret",
                "-",
                env=run_env,
                stdin=d["key"],
            )
            assert done.returncode == 0, done.stderr
        migrated = byod(tmp_path, "migrate", "--all", "--json", env=run_env)
        assert migrated.returncode == 0, migrated.stderr
        for d in made:
            with ConvexClient(d["url"], d["key"]) as client:
                wins = {p["name"]: p["wins"] for p in client.query("players:list")}
                stamp = [row["id"] for row in client.function("byod:readStamp", {})]
            assert wins == {"ada": 2, "bob": 1, "cy": 0}, "convex-helpers' getManyFrom ran"
            assert stamp == ["001_count_wins"]
    finally:
        local.send_signal(signal.SIGINT)
        assert local.wait(timeout=30) == 0
    assert "Traceback" not in (local.stderr.read() if local.stderr else "")


def test_local_deployments_refuse_bad_input(tmp_path: Path) -> None:
    require_node()
    env = child_env()
    assert byod(tmp_path, "convex", "local", str(tmp_path), env=env).returncode == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "ada", "league": "gold"}\n[1, 2]\n')
    refused = byod(tmp_path, "convex", "local", str(ARENA), "--seed", f"players={bad}", env=env)
    assert refused.returncode == 2 and "line 2" in refused.stderr
    wrong = jsonl(tmp_path / "wrong.jsonl", [{"name": "ada", "league": "diamond"}])
    failed = byod(tmp_path, "convex", "local", str(ARENA), "--seed", f"players={wrong}", env=env)
    assert failed.returncode == 2 and "seeding players" in failed.stderr
    assert (
        byod(tmp_path, "convex", "local", str(ARENA), "--seed", "players", env=env).returncode == 2
    )
    assert "Traceback" not in failed.stderr + refused.stderr


def test_each_commits_packages_come_from_its_own_lock_file(tmp_path: Path) -> None:
    """The arena app kept in git: a commit whose lock file is the app folder's runs on
    the folder's node_modules; one whose lock file differs gets its own install (npm ci,
    once per lock file, in byod's cache), and the app's convex-helpers loads either way."""
    from byod.registry import Registry
    from byod.targets.convex_code import AppCode

    require_node()
    app = tmp_path / "arena"
    shutil.copytree(ARENA, app, symlinks=True, ignore=shutil.ignore_patterns("node_modules"))
    (app / "node_modules").symlink_to(ARENA / "node_modules", target_is_directory=True)
    git = ["git", "-c", "user.name=Dev", "-c", "user.email=dev@example.com"]
    (app / ".gitignore").write_text("node_modules\n")
    subprocess.run([*git, "init", "-q"], cwd=app, check=True)
    subprocess.run([*git, "add", "-A"], cwd=app, check=True)
    subprocess.run([*git, "commit", "-qm", "arena"], cwd=app, check=True)
    first = subprocess.run(
        [*git, "rev-parse", "HEAD"], cwd=app, check=True, capture_output=True, text=True
    ).stdout.strip()
    lock = json.loads((app / "package-lock.json").read_text())
    lock["name"] = "arena-renamed"  # another lock file, the same packages
    (app / "package-lock.json").write_text(json.dumps(lock, indent=2) + "\n")
    subprocess.run([*git, "commit", "-qam", "another lock file"], cwd=app, check=True)
    second = subprocess.run(
        [*git, "rev-parse", "HEAD"], cwd=app, check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run([*git, "checkout", "-q", first, "--", "package-lock.json"], cwd=app, check=True)
    code = AppCode(app, tmp_path / "cache")
    migration = next(iter(Registry.load(app / "migrations")))
    assert code.ref_for(migration) == first

    own = code.folder(first)
    other = code.folder(second)

    assert (own / "node_modules").resolve() == (ARENA / "node_modules").resolve()
    installed = (other / "node_modules").resolve()
    assert installed.is_relative_to((tmp_path / "cache" / "npm").resolve())
    assert (installed / "convex-helpers" / "package.json").is_file()
    assert "DEPLOYED_CODE: string | null = '" + second in (other / "convex" / "byod.ts").read_text()
    with convex_local.start(tmp_path / "server.log") as server:
        for name, folder in (("own", own), ("other", other)):
            url = server.create(name, f"local:{name}|{'k' * 16}", folder)
            assert url.endswith(f"/d/{name}"), "the app loads with its packages"
