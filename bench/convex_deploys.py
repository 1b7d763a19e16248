"""Deploys per minute with the local stand-in's deploy (``byod/convex_server/deploy.mjs``,
what the tests and the demo use in place of ``npx convex deploy``): the example app
deployed by byod's deploy step to ``--deployments`` local deployments, one at a time and
``--concurrency`` at a time (BYOD_CONVEX_DEPLOY_CONCURRENCY bounds it), and the app's code
of one commit made ready from git (``git archive`` into byod's cache, byod's module
written over it) once, then found in the cache.

    .venv/bin/python bench/convex_deploys.py                  # 12 deployments, 1 and 4 at once
    .venv/bin/python bench/convex_deploys.py --deployments 24 --concurrency 8

A real ``npx convex deploy`` (bundling, type-checking, pushing over the network) takes
seconds: its own figure, not byod's, bounds a real fleet's deploys.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from byod.commands import convex_local
from byod.registry import Registry
from byod.targets.convex_code import AppCode
from byod.targets.convex_deploy import Deploy


def deploys_per_minute(
    server: convex_local.LocalConvex, names: list[tuple[str, str]], concurrency: int
) -> float:
    deploy = Deploy(
        str(convex_local.EXAMPLE_APP),
        convex_local.DEPLOY_COMMAND,
        code="folder",
        concurrency=concurrency,
    )
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(
            pool.map(
                lambda item: deploy.run(
                    f"{server.url}/d/{item[0]}", item[1], lambda text: text, where=item[0]
                ),
                names,
            )
        )
    return len(names) / (time.perf_counter() - started) * 60


def code_ready_seconds(folder: Path) -> tuple[float, float]:
    """Seconds to make one commit's code ready from git: the first time, then cached."""
    app = folder / "app"
    shutil.copytree(convex_local.EXAMPLE_APP, app)
    git = ["git", "-c", "user.name=b", "-c", "user.email=b@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=app, check=True)
    subprocess.run([*git, "add", "-A"], cwd=app, check=True)
    subprocess.run([*git, "commit", "-qm", "app"], cwd=app, check=True)
    code = AppCode(app, folder / "cache")
    migration = next(iter(Registry.load(app / "migrations")))
    started = time.perf_counter()
    code.folder(code.ref_for(migration))
    first = time.perf_counter() - started
    again = AppCode(app, folder / "cache")  # a new process: the cache on disk
    started = time.perf_counter()
    again.folder(again.ref_for(migration))
    return first, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deployments", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="byod-deploys-"))
    try:
        with convex_local.start(folder / "server.log") as server:
            names = []
            for n in range(args.deployments):
                name, key = f"bench-{n}", f"local:bench-{n}|{secrets.token_hex(8)}"
                server.create(name, key)
                names.append((name, key))
            one = deploys_per_minute(server, names, 1)
            many = deploys_per_minute(server, names, args.concurrency)
        first, cached = code_ready_seconds(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"deploys of the example app with the local stand-in, {args.deployments} deployments:")
    print(f"  one at a time      : {one:7.1f} deploys/min")
    print(f"  {args.concurrency} at a time        : {many:7.1f} deploys/min")
    print(f"a commit's code made ready from git: {first * 1000:.0f} ms,", end=" ")
    print(f"then {cached * 1000:.1f} ms (cached)")


if __name__ == "__main__":
    main()
