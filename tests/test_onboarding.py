"""Users in bulk: `byod users import FILE` upserts users and their sealed configs
(status pending, no instance contacted), `byod connect --check --all` then checks them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import sqlalchemy as sa

from byod import commands
from byod.commands.onboarding import ImportRow
from byod.workspace import Workspace
from tests.conftest import TEST_KEY, child_env
from tests.test_cli import BYOD, Cli

SECRET = "s3cret-password-of-row-2"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def sqlite_url(folder: Path, name: str, *, make: bool = True) -> str:
    if make:
        (folder / f"{name}.db").touch()
    return f"sqlite:///{folder / name}.db"


def configs(folder: Path) -> dict[str, tuple[str, int]]:
    engine = sa.create_engine(f"sqlite:///{folder / 'byod.db'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT u.clerk_id, c.connection_status, c.schema_version FROM users u "
                    "JOIN byod_configs c ON c.user_id = u.id"
                )
            )
            return {str(r[0]): (str(r[1]), int(r[2])) for r in rows}
    finally:
        engine.dispose()


def test_an_import_adds_updates_and_is_idempotent_then_check_connects(tmp_path: Path) -> None:
    cli = Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY)
    assert cli("init").code == 0
    rows = [
        {"clerk_id": "ada", "url": sqlite_url(tmp_path, "ada"), "email": "ada@example.com"},
        {"clerk_id": "bob", "url": sqlite_url(tmp_path, "bob"), "secret": SECRET},
        {"clerk_id": "cy", "url": sqlite_url(tmp_path, "gone", make=False)},
        {"clerk_id": "42", "url": sqlite_url(tmp_path, "x")},  # all digits: refused
        {"clerk_id": "dee", "url": f"postgresql://app:{SECRET}@10.1.2.3/db"},  # internal
        {"clerk_id": "ada", "url": sqlite_url(tmp_path, "other")},  # twice in one file
    ]
    file = write(tmp_path / "users.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    dry = cli("users", "import", str(file), "--dry-run", "--json")
    assert dry.code == 1
    assert (dry.json()["added"], dry.json()["dry_run"]) == (3, True)  # type: ignore[index]
    assert configs(tmp_path) == {}  # a dry run changes nothing
    first = cli("users", "import", str(file), "--json")
    report = first.json()
    assert first.code == 1  # some rows were refused
    assert (report["added"], report["updated"], report["unchanged"]) == (3, 0, 0)  # type: ignore[index]
    refused = {line: (clerk, reason) for line, clerk, reason in report["refused"]}  # type: ignore[index]
    assert set(refused) == {4, 5, 6}
    assert "digits" in refused[4][1] and "BYOD_INSTANCE_NETWORKS" in refused[5][1]
    assert "twice" in refused[6][1]
    assert SECRET not in first.out + first.err
    assert configs(tmp_path) == {"ada": ("pending", 0), "bob": ("pending", 0), "cy": ("pending", 0)}
    again = cli("users", "import", str(file), "--json").json()
    assert (again["added"], again["updated"], again["unchanged"]) == (0, 0, 3)  # type: ignore[index]
    moved = write(
        tmp_path / "moved.csv",
        f"clerk_id,url,secret\nbob,{sqlite_url(tmp_path, 'bob2')},\nada,{rows[0]['url']},\n",
    )
    csv_report = cli("users", "import", str(moved), "--json").json()
    assert (csv_report["updated"], csv_report["unchanged"]) == (1, 1)  # type: ignore[index]
    checked = cli("connect", "--check", "--all", "--json")
    assert checked.code == 1  # cy's database does not exist
    outcome = {c["clerk_id"]: c["status"] for c in checked.json()}  # type: ignore[union-attr]
    assert outcome == {"ada": "connected", "bob": "connected", "cy": "error"}
    assert configs(tmp_path)["bob"] == ("connected", 0)
    one = cli("connect", "--check", "ada")
    assert one.code == 0 and "connected" in one.out
    assert cli("connect", "--check").code == 2  # USER or --all


def test_an_import_file_other_users_can_read_is_refused(tmp_path: Path) -> None:
    cli = Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY)
    assert cli("init").code == 0
    file = tmp_path / "users.csv"
    file.write_text(f"clerk_id,url\nada,{sqlite_url(tmp_path, 'ada')}\n")
    file.chmod(0o644)
    refused = cli("users", "import", str(file))
    assert refused.code == 2 and "chmod 600" in refused.err
    assert configs(tmp_path) == {}


def test_an_import_reads_standard_input(tmp_path: Path) -> None:
    env = child_env() | {"BYOD_ENCRYPTION_KEY": TEST_KEY}
    assert subprocess.run([*BYOD, "init"], cwd=tmp_path, env=env, check=False).returncode == 0
    line = json.dumps({"clerk_id": "ada", "url": sqlite_url(tmp_path, "ada")}) + "\n"
    done = subprocess.run(
        [*BYOD, "users", "import", "-"],
        cwd=tmp_path,
        env=env,
        input=line,
        text=True,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "1 added" in done.stdout
    assert configs(tmp_path) == {"ada": ("pending", 0)}


def test_an_import_over_pages_stores_each_users_own_config_on_both_control_planes(
    ws: Workspace, tmp_path: Path
) -> None:
    """More than a page (1,000 rows), users already there with and without a config: each
    config is sealed for its own user (a config filed under another user's id would not
    open), a replaced one keeps its recorded version, a second import changes nothing."""
    old = ws.directory.add_user("old", email="old@example.com")
    moved = ws.directory.add_user("moved")
    first_db = sqlite_url(tmp_path, "moved-first")
    commands.connect(ws, "moved", first_db)
    ws.directory.set_status(moved.id, "connected", schema_version=2)
    rows = [
        ImportRow(n + 1, f"user_{n:05d}", f"postgresql://app@db{n}.example.com/t{n}")
        for n in range(1_205)
    ]
    rows[7] = ImportRow(8, "user_00007", rows[7].url, secret=SECRET, email="seven@example.com")
    rows.append(ImportRow(1_206, "old", sqlite_url(tmp_path, "old")))
    rows.append(ImportRow(1_207, "moved", sqlite_url(tmp_path, "moved-second")))
    report = commands.import_users(ws, rows)
    assert (report.added, report.updated, report.unchanged, report.refused) == (1_205, 2, 0, [])
    by_clerk = {u.clerk_id: u for u in ws.directory.list_users()}
    assert len(by_clerk) == 1_207 and by_clerk["old"].id == old.id
    assert by_clerk["user_00007"].email == "seven@example.com"
    assert by_clerk["user_00008"].email is None
    for row in rows:
        user = by_clerk[row.clerk_id]
        config = ws.directory.get_config(user.id)
        url = ws.sealer.unseal(
            config.sealed_url, user_id=user.id, field_name="url", key_id=config.key_id
        )
        secret = config.sealed_secret and ws.sealer.unseal(
            config.sealed_secret, user_id=user.id, field_name="secret", key_id=config.key_id
        )
        assert (url, secret, config.connection_status) == (row.url, row.secret, "pending")
    assert ws.directory.get_config(moved.id).schema_version == 2
    again = commands.import_users(ws, rows)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 1_207)
