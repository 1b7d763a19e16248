"""Convex fleet benchmark: byod migrating local Convex test deployments over HTTP.

Builds ``--deployments`` deployments of the example app (convex-test behind Convex's HTTP
API, ``byod/convex_server``) with ``--documents`` documents each, connected and at
version 1, then adds ``--latency-ms`` to every HTTP round trip and times ``byod``'s fleet
run to head: the deploy step, then a migration whose backfill walks every document in
pages of ``--batch-size`` (each page and its cursor in one Convex mutation). Prints one
JSON line with the HTTP calls per instance (counted by the server), instances/s, p50/p99
seconds per instance, and the bound ``concurrency / (calls x latency)``: what a client
that only waits on the network could reach. Beside it, on an identical fleet, the
**floor**: a bare ``httpx`` client making the fewest calls the same work needs (take the
lock, read the stamp, call the app's ping, start the progress, each ``runBatch``, finish
with the stamp, release the lock), at the same concurrency: what the deployments and the
test backend themselves allow. Run from the repository root:

    .venv/bin/python bench/convex.py                       # 50 x 2,000 docs, 20 ms, c=16
    .venv/bin/python bench/convex.py --concurrency 50 --latency-ms 40

The page mutation here is a cheap one (``bench:touchPage``: one patch per document): the
example app's ``documents:tagPage`` looks tags up by index, which convex-test serves by
scanning (its time grows with the table), so it would time the test backend, not byod.
The deploy command is ``true`` (a no-op): a real ``npx convex deploy`` adds its own time
(seconds) per instance, once per user with pending steps.
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from byod.commands import convex_local  # noqa: E402
from byod.commands.setup import init  # noqa: E402
from byod.controlplane.schema import configs  # noqa: E402
from byod.credentials import connect_user  # noqa: E402
from byod.fleet import UserFinished, migrate_fleet  # noqa: E402
from byod.settings import Settings  # noqa: E402
from byod.spec import FleetOptions  # noqa: E402
from byod.targets.convex_client import ConvexClient  # noqa: E402
from byod.workspace import Workspace  # noqa: E402

KEY = base64.b64encode(b"c" * 32).decode()
PAGE = """import { v } from "convex/values";
import { internalMutation } from "./_generated/server";

/** The benchmark's page: one patch per document, no index lookups. */
export const touchPage = internalMutation({
  args: { cursor: v.union(v.string(), v.null()), numItems: v.number() },
  handler: async (ctx, { cursor, numItems }) => {
    const page = await ctx.db.query("documents").paginate({ cursor, numItems });
    for (const document of page.page) {
      await ctx.db.patch(document._id, { updates: (document.updates ?? 0) + 1 });
    }
    return { continueCursor: page.continueCursor, isDone: page.isDone, rows: page.page.length };
  },
});
"""
MIGRATION = """from byod import Backfill, Migration


def up(ctx):
    ctx.convex.query("functions:ping")


migration = Migration(
    id="002_touch", version=2, name="touch", description="every document, in pages",
    up=up, backfills=[Backfill(table="documents", page="bench:touchPage", batch_size={size})],
)
"""


def build_app(folder: Path, batch_size: int) -> Path:
    app = folder / "app"
    shutil.copytree(convex_local.EXAMPLE_APP / "convex", app / "convex")
    (app / "convex" / "bench.ts").write_text(PAGE)
    migrations = app / "migrations"
    migrations.mkdir()
    shutil.copy(convex_local.EXAMPLE_APP / "migrations" / "001_initial.py", migrations)
    (migrations / "002_touch.py").write_text(MIGRATION.replace("{size}", str(batch_size)))
    return app


def build_fleet(
    server: convex_local.LocalConvex, ws: Workspace, app: Path, prefix: str, args: Any
) -> list[tuple[str, str, str, int]]:
    """``args.deployments`` deployments at version 1 with their documents, connected as
    users of ``ws``; each one's name, URL, key and user id."""
    fleet = []
    runner = ws.runner()
    for n in range(args.deployments):
        name, key = f"{prefix}-{n:03d}", f"local:{prefix}-{n:03d}|{secrets.token_hex(12)}"
        url = "convex+" + server.create(name, key, app)
        user = ws.directory.add_user(name)
        policy = ws.settings.instance_policy
        connect_user(ws.directory, ws.sealer, user.id, url, secret=key, policy=policy)
        runner.migrate(user.id, to_version=1)
        docs = [{"title": f"n{i}", "body": f"note {i} #t{i % 9}"} for i in range(args.documents)]
        with ConvexClient(url, key) as client:
            for start in range(0, len(docs), 1000):
                client.function("documents:createMany", {"documents": docs[start : start + 1000]})
        server.latency(name, args.latency_ms)
        fleet.append((name, url.removeprefix("convex+"), key, user.id))
    return fleet


def floor_one(url: str, key: str, batch_size: int) -> None:
    """The fewest calls that migrate one deployment, with a bare httpx client."""
    headers = {"Authorization": f"Convex {key}", "Convex-Client": "bench-1.0.0"}
    with httpx.Client(base_url=url, headers=headers, timeout=60, trust_env=False) as http:

        def call(path: str, args: dict[str, Any]) -> Any:
            body = {"path": path, "args": args, "format": "convex_encoded_json"}
            answer = http.post("/api/function", json=body).json()
            assert answer["status"] == "success", answer
            return answer["value"]

        owner = f"floor-{secrets.token_hex(4)}"
        assert call("byod:takeLock", {"owner": owner, "ttlMs": 60_000})
        call("byod:readStamp", {})
        call("functions:ping", {})
        call("byod:startProgress", {"migration": "002_touch", "rowsTotal": None, "owner": owner})
        cursor, done, index = None, 0, 0
        while index == 0:
            batch = call(
                "byod:runBatch",
                {
                    "migration": "002_touch", "backfill": 0, "page": "bench:touchPage",
                    "cursor": cursor, "expectedRowsDone": done, "numItems": batch_size,
                    "owner": owner,
                },
            )  # fmt: skip
            cursor, done = batch["progress"]["cursor"], batch["progress"]["rowsDone"]
            index = batch["progress"]["backfill"]
        stamp = {"version": 2, "checksum": "x"}
        call(
            "byod:finishProgress",
            {"migration": "002_touch", "backfills": 1, "stamp": stamp, "owner": owner},
        )
        call("byod:releaseLock", {"owner": owner})


def figures(
    name: str,
    server: convex_local.LocalConvex,
    fleet: list[tuple[str, str, str, int]],
    before: dict[str, int],
    seconds: list[float],
    wall: float,
    args: Any,
) -> dict[str, Any]:
    after = {d["name"]: d["requests"] for d in server.deployments()}
    calls = statistics.mean(after[n] - before[n] for n, *_ in fleet)
    rate = len(seconds) / wall
    bound = args.concurrency / (calls * args.latency_ms / 1000)
    seconds.sort()
    return {
        "config": name,
        "deployments": args.deployments,
        "documents": args.documents,
        "batch_size": args.batch_size,
        "latency_ms": args.latency_ms,
        "concurrency": args.concurrency,
        "done": len(seconds),
        "calls_per_instance": round(calls, 1),
        "instances_per_s": round(rate, 2),
        "bound_per_s": round(bound, 2),
        "of_bound": round(rate / bound, 2),
        "p50_s": round(seconds[len(seconds) // 2], 3),
        "p99_s": round(seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))], 3),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deployments", type=int, default=50)
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="byod-bench-convex-") as tmp:
        folder = Path(tmp)
        app = build_app(folder, args.batch_size)
        env = {
            "BYOD_ENCRYPTION_KEY": KEY,
            "BYOD_MIGRATIONS": str(app / "migrations"),
            "BYOD_ALLOW_PRIVATE_INSTANCES": "1",
            "BYOD_CONVEX_APP": str(app),
            "BYOD_CONVEX_DEPLOY": "true",
        }
        ws = Workspace(Settings.load(database_url=f"sqlite:///{folder / 'byod.db'}", env=env))
        init(ws)
        results = []
        with convex_local.start(folder / "server.log") as server:
            floor_fleet = build_fleet(server, ws, app, "floor", args)
            byod_fleet = build_fleet(server, ws, app, "byod", args)
            floor_ids = [user_id for *_, user_id in floor_fleet]
            with ws.engine.begin() as conn:  # the floor's users are not byod's to migrate
                conn.execute(configs.delete().where(configs.c.user_id.in_(floor_ids)))

            before = {d["name"]: d["requests"] for d in server.deployments()}
            timed: list[float] = []

            def timed_floor(url: str, key: str) -> None:
                started = time.perf_counter()
                floor_one(url, key, args.batch_size)
                timed.append(time.perf_counter() - started)

            started = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(lambda d: timed_floor(d[1], d[2]), floor_fleet))
            wall = time.perf_counter() - started
            results.append(figures("floor", server, floor_fleet, before, timed, wall, args))

            before = {d["name"]: d["requests"] for d in server.deployments()}
            seconds: list[float] = []

            def on_event(event: object) -> None:
                if isinstance(event, UserFinished) and event.result.error is None:
                    seconds.append(event.result.seconds)

            started = time.perf_counter()
            migrate_fleet(
                ws.runner(), options=FleetOptions(concurrency=args.concurrency), on_event=on_event
            )
            wall = time.perf_counter() - started
            results.append(figures("byod", server, byod_fleet, before, seconds, wall, args))
        for result in results:
            print(json.dumps(result))
        floor, byod = results
        print(
            json.dumps(
                {
                    "byod_of_floor": round(byod["instances_per_s"] / floor["instances_per_s"], 2),
                    "extra_calls": round(
                        byod["calls_per_instance"] - floor["calls_per_instance"], 1
                    ),
                }
            )
        )


if __name__ == "__main__":
    main()
