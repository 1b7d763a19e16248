"""The soak's Convex fleet: local Convex deployments of byod's example app (its real
functions on convex-test, behind the local backend's HTTP API), migrated by byod from a
control plane of their own on the soak's PostgreSQL (through the same cuttable proxy).

The app's chain is ``001_initial`` and ``002_add_tags``, a backfill that tags every
document from its #hashtags and adds 1 to the document's ``updates``, each page and
byod's cursor in one Convex mutation; its rollback untags page by page. So on every
deployment, after each settle: the stamp and the control plane agree; at version 2 the
tags are exactly the bodies' hashtags and each document's ``updates`` equals the number of
times the control plane's ledger says ``002_add_tags`` completed there (each application
passed each document once); at version 1 no document is tagged; no backfill progress or
lock is left behind. Faults of its own: a 429 storm (the next requests of some
deployments answered 429 Too Many Requests) and slowed deployments.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from byod.commands import convex_local
from byod.commands.convex_local import EXAMPLE_APP, LocalConvex
from byod.targets.convex_client import ConvexClient

HASHTAG = re.compile(r"(?<![\w#])#([A-Za-z][\w-]{0,63})")
WORDS = ("work", "home", "ideas", "x-ray", "Later", "todo", "q3")
TOP = 2
BACKFILL = "002_add_tags"

Expect = Callable[[bool, str], None]


def hashtags(body: str) -> list[str]:
    """The distinct hashtags of a body, lower-cased (the app's own rule)."""
    return sorted({m.lower() for m in HASHTAG.findall(body)})


class ConvexFleet:
    """Local Convex deployments and their control plane; the soak drives it."""

    def __init__(
        self, folder: Path, tag: str, cp_port: int, count: int, documents: int, rng: random.Random
    ) -> None:
        self.folder = folder
        self.count = count
        self.documents = documents
        self.rng = rng
        self.cp_db = f"{tag}_convex"
        self.cp_url = f"postgresql+psycopg://postgres@127.0.0.1:{cp_port}/{self.cp_db}"
        self.cp = sa.create_engine(
            f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.cp_db}", poolclass=sa.NullPool
        )
        self.server: LocalConvex | None = None
        self.names: list[str] = []
        self.keys: dict[str, str] = {}
        self.bodies: dict[str, list[str]] = {}
        self.clients: dict[str, ConvexClient] = {}
        self.throttled = 0  # 429s asked for by storms
        #: 429s the deployments answered (those asked for and not left over at a heal)
        self.answered_429 = 0

    @property
    def secrets(self) -> list[str]:
        """The deploy keys: none may show in a log, a message or the ledger."""
        return list(self.keys.values())

    def env(self) -> dict[str, str]:
        """What a byod process of this fleet adds to the soak's environment."""
        assert self.server is not None
        return {
            "BYOD_DATABASE_URL": self.cp_url,
            "BYOD_MIGRATIONS": str(EXAMPLE_APP / "migrations"),
            "BYOD_CONVEX_DEPLOY": self.server.deploy_command,
            "BYOD_CONVEX_CODE": "folder",
        }

    def start(self) -> Path:
        """The local backend and the deployments, seeded; the users file to import."""
        self.server = convex_local.start(self.folder / "logs" / "convex-server.log")
        rows = []
        for n in range(self.count):
            name = f"cvx{n:03d}"
            key = f"local:{name}|{secrets.token_hex(16)}"
            url = "convex+" + self.server.create(name, key, EXAMPLE_APP)
            bodies = [self.body() for _ in range(self.documents)]
            documents = [{"title": f"note {i}", "body": b} for i, b in enumerate(bodies)]
            self.server.import_documents(name, "documents", documents)
            self.names.append(name)
            self.keys[name] = key
            self.bodies[name] = bodies
            self.clients[name] = ConvexClient(url, key)
            rows.append({"clerk_id": f"convex-{n:03d}", "url": url, "secret": key})
        users = self.folder / "convex-users.jsonl"
        users.write_text("".join(json.dumps(r) + "\n" for r in rows))
        users.chmod(0o600)
        return users

    def body(self) -> str:
        tags = self.rng.sample(WORDS, self.rng.randint(0, 3))
        return " ".join(["a note", *(f"#{t}" for t in tags), "and a#b that is no tag"])

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        if self.server is not None:
            self.server.close()
        self.cp.dispose()

    # -- faults ---------------------------------------------------------------------------

    def storm(self) -> str:
        """429 Too Many Requests for the next requests of a third of the deployments."""
        assert self.server is not None
        hit = self.rng.sample(self.names, max(1, self.count // 3))
        requests = self.rng.randint(3, 40)
        for name in hit:
            self.server.throttle(name, requests, retry_after_seconds=self.rng.choice([None, 1]))
        self.throttled += len(hit) * requests
        return f"{len(hit)} deployments, {requests} requests each"

    def slow(self, ms: float) -> None:
        """Every deployment answers ``ms`` later (0: at once again)."""
        assert self.server is not None
        for name in self.names:
            self.server.latency(name, ms)

    def heal(self) -> None:
        """No storm, no latency."""
        assert self.server is not None
        left = sum(int(d.get("throttled", 0)) for d in self.server.deployments())
        self.answered_429 += self.throttled - left
        self.throttled = 0
        for name in self.names:
            self.server.throttle(name, 0)
        self.slow(0)

    # -- the checker ----------------------------------------------------------------------

    def check(self, where: str, expect: Expect, *, at_top: bool, lease_seconds: float) -> None:
        """Every deployment's own data against the control plane (see the module); no
        ledger row left running, no lease (a user's, a deployment's lock) reaching more
        than one lease past now."""
        with self.cp.connect() as conn:
            running = conn.execute(
                sa.text("SELECT count(*) FROM byod_migrations WHERE status = 'running'")
            ).scalar_one()
            furthest = conn.execute(
                sa.text(
                    "SELECT max(extract(epoch FROM lease_expires_at - now() AT TIME ZONE 'utc'))"
                    " FROM byod_configs"
                )
            ).scalar()
            versions: dict[str, int] = dict(
                conn.execute(
                    sa.text(
                        "SELECT u.clerk_id, c.schema_version FROM byod_configs c "
                        "JOIN users u ON u.id = c.user_id"
                    )
                ).all()
            )
            applied: dict[str, int] = dict(
                conn.execute(
                    sa.text(
                        "SELECT u.clerk_id, count(*) FROM byod_migrations m "
                        "JOIN users u ON u.id = m.user_id WHERE m.migration_id = :id "
                        "AND m.direction = 'up' AND m.status = 'completed' GROUP BY 1"
                    ),
                    {"id": BACKFILL},
                ).all()
            )
        expect(running == 0, f"{where}: {running} Convex ledger rows left running")
        expect(
            furthest is None or float(furthest) <= lease_seconds + 1,
            f"{where}: a Convex user's lease {furthest} s beyond now, none is running",
        )
        for n, name in enumerate(self.names):
            clerk_id = f"convex-{n:03d}"
            self.check_one(where, expect, name, versions[clerk_id], applied.get(clerk_id, 0))
            lock = self.clients[name].function("byod:readLock", {})
            over = None if lock is None else lock["expiresAt"] / 1000 - time.time()
            expect(
                over is None or over <= lease_seconds + 1,
                f"{where}: {name}: its lock held {over} s beyond now, none is running",
            )
            if at_top:
                expect(versions[clerk_id] == TOP, f"{where}: {clerk_id} not at {TOP}")

    def check_one(
        self, where: str, expect: Expect, name: str, version: int, applications: int
    ) -> None:
        client = self.clients[name]
        stamp = [row["id"] for row in client.function("byod:readStamp", {})]
        expect(len(stamp) == version, f"{where}: {name}: stamp {stamp}, control plane {version}")
        documents: list[dict[str, Any]] = client.query("documents:list")
        tags = {t["name"]: len(t["documentIds"]) for t in client.query("documents:listTags")}
        updates = {d.get("updates", 0) for d in documents}
        expect(
            updates == {applications},
            f"{where}: {name}: documents passed {updates} times by {BACKFILL}, "
            f"the ledger says {applications} applications",
        )
        if BACKFILL in stamp:
            want: dict[str, int] = {}
            for body in self.bodies[name]:
                for tag in hashtags(body):
                    want[tag] = want.get(tag, 0) + 1
            expect(tags == want, f"{where}: {name}: tags {tags}, want {want}")
        else:
            expect(tags == {}, f"{where}: {name}: tags left at version {version}: {tags}")
        expect(
            client.function("byod:listProgress", {}) == [],
            f"{where}: {name}: backfill progress left behind",
        )
