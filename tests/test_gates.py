"""Fleet gates on a SQL fleet (expand/contract): the contract step — a column dropped —
runs on no user until every eligible user is through the expand and an operator opened
its gate; a user left behind holds it (named), or is excluded by name; once open it stays
open and a user added later goes through alone; rolling back below it has the mirror
barrier (`gate close`)."""

from __future__ import annotations

import json
from pathlib import Path

import sqlalchemy as sa
from fastapi.testclient import TestClient

from byod.api import AuthSettings, create_app
from byod.settings import Settings
from byod.workspace import Workspace
from tests.conftest import TEST_KEY, write_migrations
from tests.test_api import SECRET, bearer, token
from tests.test_cli import Cli

MIGRATIONS = {
    "001_notes.py": """
        import sqlalchemy as sa
        from byod import Migration

        def up(ctx):
            ctx.op.create_table(
                "notes",
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("legacy", sa.Text),
            )

        def down(ctx):
            ctx.op.drop_table("notes")

        migration = Migration(id="001_notes", version=1, name="notes", description="notes",
                              up=up, down=down)
    """,
    "002_add_body.py": """
        import sqlalchemy as sa
        from byod import Migration

        def up(ctx):
            ctx.op.add_column("notes", sa.Column("body", sa.Text))

        def down(ctx):
            with ctx.op.batch_alter_table("notes") as batch:
                batch.drop_column("body")

        migration = Migration(id="002_add_body", version=2, name="expand",
                              description="body, beside legacy", up=up, down=down)
    """,
    "003_drop_legacy.py": """
        import sqlalchemy as sa
        from byod import Migration

        def up(ctx):
            with ctx.op.batch_alter_table("notes") as batch:
                batch.drop_column("legacy")

        def down(ctx):
            ctx.op.add_column("notes", sa.Column("legacy", sa.Text))

        migration = Migration(id="003_drop_legacy", version=3, name="contract",
                              description="legacy goes", up=up, down=down, gated=True)
    """,
}


def columns(path: Path) -> set[str]:
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        return {c["name"] for c in sa.inspect(engine).get_columns("notes")}
    finally:
        engine.dispose()


def make_fleet(tmp_path: Path) -> tuple[Cli, dict[str, Path]]:
    folder = write_migrations(tmp_path / "migrations", MIGRATIONS)
    cli = Cli(
        tmp_path,
        BYOD_ENCRYPTION_KEY=TEST_KEY,
        BYOD_MIGRATIONS=str(folder),
        BYOD_DATABASE_URL=f"sqlite:///{tmp_path / 'byod.db'}",
    )
    assert cli("init").code == 0
    paths = {}
    for name in ("ana", "bob", "cy", "dee"):
        path = tmp_path / f"{name}.db"
        if name != "dee":  # dee's database is not there yet: unreachable
            path.touch()
        paths[name] = path
        assert cli("users", "add", "--clerk-id", name).code == 0
        cli("connect", name, "--url", f"sqlite:///{path}")
    return cli, paths


def summary(run_out: str) -> dict[str, object]:
    lines = [json.loads(line) for line in run_out.splitlines() if line.startswith("{")]
    found: dict[str, object] = next(line["summary"] for line in lines if "summary" in line)
    return found


def test_a_gate_holds_every_user_until_all_are_through_and_it_is_opened(tmp_path: Path) -> None:
    cli, paths = make_fleet(tmp_path)

    first = cli("migrate", "--all", "--json")

    run = summary(first.out)
    assert run["succeeded"] == 3 and run["failed"] == 1, run
    (held,) = run["held"]  # type: ignore[misc]
    assert held["migration"] == "003_drop_legacy" and held["users"] == 3
    assert "1 user (4 dee) not through" in held["reason"]
    for name in ("ana", "bob", "cy"):
        assert columns(paths[name]) == {"id", "legacy", "body"}, "the expand ran, not the contract"
    refused = cli("gate", "open", "003_drop_legacy")
    assert refused.code == 2 and "4 dee" in refused.err
    planned = {p["clerk_id"]: p for p in json.loads(cli("plan", "--all", "--json").out)}
    assert [s["migration"] for s in planned["dee"]["steps"]] == ["001_notes", "002_add_body"]
    assert planned["dee"]["held"]["migration"] == "003_drop_legacy"
    assert "stops before 003_drop_legacy" in cli("plan", "ana").out
    listed = json.loads(cli("gate", "list", "--json").out)
    assert [(g["migration_id"], g["state"], g["waiting"]) for g in listed] == [
        ("003_drop_legacy", "closed", 1)
    ]

    paths["dee"].touch()  # dee's database comes back
    caught_up = summary(cli("migrate", "--all", "--json").out)
    assert caught_up["succeeded"] == 1
    assert "every user is through" in caught_up["held"][0]["reason"]  # type: ignore[index]
    assert cli("gate", "open", "3").code == 0  # by version too

    through = summary(cli("migrate", "--all", "--json").out)

    assert through["succeeded"] == 4 and through["held"] == []
    for path in paths.values():
        assert columns(path) == {"id", "body"}
    later = tmp_path / "eve.db"
    later.touch()
    cli("users", "add", "--clerk-id", "eve")
    assert cli("connect", "eve", "--url", f"sqlite:///{later}").code == 0
    alone = cli("migrate", "eve")
    assert alone.code == 0 and "to 3" in alone.out, "a gate once open stays open"
    assert columns(later) == {"id", "body"}

    # the mirror: undoing the expand waits until the gate is closed again
    back = cli("rollback", "ana", "--to", "1")
    assert back.code == 0, back.err
    assert "stopped before 003_drop_legacy" in back.out and "still past it" in back.out
    assert columns(paths["ana"]) == {"id", "legacy", "body"}, "the contract undone, not the expand"
    closing = cli("gate", "close", "003_drop_legacy")
    assert closing.code == 2 and "still past it" in closing.err
    assert cli("gate", "close", "3", "--excluding", "bob,cy", "--excluding", "dee,eve").code == 0
    assert cli("rollback", "ana", "--to", "1").code == 0
    assert columns(paths["ana"]) == {"id", "legacy"}


def test_a_user_left_behind_can_be_excluded_by_name(tmp_path: Path) -> None:
    cli, paths = make_fleet(tmp_path)
    cli("migrate", "--all")
    assert cli("gate", "open", "003_drop_legacy", "--excluding", "nobody").code == 2
    opened = cli("gate", "open", "003_drop_legacy", "--excluding", "dee")
    assert opened.code == 0 and "left behind: 4" in opened.out

    run = summary(cli("migrate", "--all", "--json").out)

    assert run["succeeded"] == 3 and run["failed"] == 1 and run["held"] == []
    for name in ("ana", "bob", "cy"):
        assert columns(paths[name]) == {"id", "body"}
    status = json.loads(cli("gate", "list", "--json").out)
    assert status[0]["state"] == "open" and status[0]["excluded"] == [4]
    assert cli("gate", "open", "002_add_body").code == 2  # not a gated migration
    assert cli("gate", "open", "9").code == 2


def test_gates_show_in_status_the_api_and_the_dashboard(tmp_path: Path) -> None:
    cli, _ = make_fleet(tmp_path)
    cli("migrate", "--all")
    shown = json.loads(cli("status", "--json").out)["gates"]
    assert [(g["migration_id"], g["state"], g["waiting"], g["through"]) for g in shown] == [
        ("003_drop_legacy", "closed", 1, 0)
    ]
    assert "gates" in cli("status").out
    settings = Settings.load(database_url=cli.env["BYOD_DATABASE_URL"], env=cli.env)
    ws = Workspace(settings)
    ws.directory.add_user("ops")
    app = create_app(ws, AuthSettings(secret=SECRET))
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get("/v1/fleet/status", headers=bearer(token("ops", admin=True)))
        assert answer.status_code == 200
        (gate,) = answer.json()["gates"]
        assert (gate["migration_id"], gate["state"], gate["waiting"]) == (
            "003_drop_legacy",
            "closed",
            1,
        )
        client.post("/dashboard/login", data={"token": token("ops", admin=True)})
        page = client.get("/dashboard").text
        assert "data-gate='003_drop_legacy' data-state='closed'" in page
    ws.engine.dispose()
