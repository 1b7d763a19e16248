"""The command line as a user runs it: a real `byod` process in a fresh folder."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from byod.cli import main
from byod.registry import Registry
from tests.conftest import LOOPBACK_ALLOWED, OTHER_KEY, TEST_KEY, execute, write_migrations
from tests.migration_sets import counter_migrations
from tests.test_api import RFC3339_UTC, timestamps

BYOD = [sys.executable, "-m", "byod"]


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)

    def json_lines(self) -> list[Any]:
        """Each line of stdout as JSON (a fleet command's ``--json`` output)."""
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


class Cli:
    """Runs byod in ``folder`` with a clean BYOD_* environment.

    In-process through the real entry point (``byod.cli.main``) by default, which is
    fast; ``real_process=True`` starts a real ``python -m byod`` process.
    """

    def __init__(self, folder: Path, *, real_process: bool = False, **env: str) -> None:
        self.folder = folder
        self.real_process = real_process
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BYOD_")}
        self.env.update(LOOPBACK_ALLOWED)
        self.env.update(env)
        self.env["COLUMNS"] = "200"

    def __call__(self, *args: str, **env: str) -> Run:
        run = self._process(args, env) if self.real_process else self._in_process(args, env)
        assert "Traceback" not in run.err, run.err
        return run

    def _process(self, args: tuple[str, ...], env: dict[str, str]) -> Run:
        done = subprocess.run(
            [*BYOD, *args],
            cwd=self.folder,
            env=self.env | env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return Run(done.returncode, done.stdout, done.stderr)

    def _in_process(self, args: tuple[str, ...], env: dict[str, str]) -> Run:
        saved_env, saved_cwd, saved_argv = dict(os.environ), Path.cwd(), sys.argv
        saved_streams = sys.stdout, sys.stderr
        out, err = io.StringIO(), io.StringIO()
        os.environ.clear()
        os.environ.update(self.env | env)
        os.chdir(self.folder)
        sys.argv = ["byod", *args]
        sys.stdout, sys.stderr = out, err
        code = 0
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except Exception:
            err.write("Traceback (unhandled exception)\n" + traceback.format_exc())
            code = 99
        finally:
            sys.stdout, sys.stderr = saved_streams
            sys.argv = saved_argv
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
        return Run(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY)


def sqlite_instance(folder: Path, name: str) -> str:
    path = folder / f"{name}.db"
    path.touch()
    return f"sqlite:///{path}"


def test_init_is_idempotent_and_creates_a_private_key_when_none_is_set(tmp_path: Path) -> None:
    cli = Cli(tmp_path, real_process=True)
    first = cli("init")
    assert first.code == 0, first.err
    assert "created a new encryption key" in first.out
    assert (tmp_path / "byod.key").stat().st_mode & 0o777 == 0o600
    second = cli("init")
    assert second.code == 0 and "created" not in second.out


def test_the_main_flow_from_a_fresh_folder(cli: Cli, tmp_path: Path) -> None:
    assert cli("init").code == 0
    added = cli("users", "add", "--clerk-id", "clerk_1", "--email", "a@example.com")
    assert added.code == 0 and added.out.strip() == "1"
    url = sqlite_instance(tmp_path, "one")
    connected = cli("connect", "clerk_1", "--url", url)
    assert connected.code == 0 and "connected" in connected.out, connected.err
    assert cli("pending", "clerk_1").out.strip() == "3"
    plan = cli("plan", "1", "--json").json()
    assert plan[0]["steps"] == [  # type: ignore[index]
        {"migration": "001_initial", "version": 1, "direction": "up"},
        {"migration": "002_add_tags", "version": 2, "direction": "up"},
        {"migration": "003_word_counts", "version": 3, "direction": "up"},
    ]
    migrated = cli("migrate", "clerk_1")
    assert migrated.code == 0 and "from version 0 to 3" in migrated.out
    assert cli("pending", "1", "--json").json() == {"pending": 0}
    history = cli("history", "clerk_1", "--json").json()
    assert [(h["migration_id"], h["status"]) for h in history] == [  # type: ignore[index, union-attr]
        ("003_word_counts", "completed"),
        ("002_add_tags", "completed"),
        ("001_initial", "completed"),
    ]
    status = cli("status", "--json").json()
    assert status["by_version"] == {"3": 1} and status["by_connection"] == {"connected": 1}  # type: ignore[index]
    assert cli("verify", "--all").code == 0
    again = cli("migrate", "clerk_1")
    assert again.code == 0 and "nothing to do" in again.out
    rolled = cli("rollback", "clerk_1", "--to", "1")
    assert rolled.code == 0 and "003_word_counts down" in rolled.out
    assert "002_add_tags down" in rolled.out
    refused = cli("rollback", "clerk_1", "--to", "0")
    assert refused.code == 2 and "001_initial has no down" in refused.err


def counter_fleet(cli: Cli, tmp_path: Path, *args: str) -> dict[str, str]:
    """Users a, b, c with SQLite instances, on the counter migrations; ``args`` are
    passed to a `byod migrate` of each. Returns the environment to use them."""
    env = {"BYOD_MIGRATIONS": str(counter_migrations(tmp_path / "migrations"))}
    assert cli("init", **env).code == 0
    for name in ("a", "b", "c"):
        assert cli("users", "add", "--clerk-id", name).code == 0
        assert cli("connect", name, "--url", sqlite_instance(tmp_path, name)).code == 0
        if args:
            assert cli("migrate", name, *args, **env).code == 0
    return env


def test_migrate_all_prints_json_lines_and_a_summary(cli: Cli, tmp_path: Path) -> None:
    env = counter_fleet(cli, tmp_path)
    execute(f"sqlite:///{tmp_path / 'b.db'}", "CREATE TABLE bumped (id INTEGER)")
    run = cli("migrate", "--all", "--json", "--concurrency", "2", **env)
    assert run.code == 1
    lines = [json.loads(line) for line in run.out.splitlines()]
    summary = lines[-1]["summary"]
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (3, 2, 1)
    assert summary["errors"][0]["user"] == "b"
    assert summary["errors"][0]["migration"] == "002_bump"
    per_user = {line["clerk_id"]: line["outcome"] for line in lines[:-1]}
    assert per_user == {"a": "succeeded", "b": "failed", "c": "succeeded"}


@pytest.mark.parametrize(
    "args",
    [
        ["migrate"],
        ["migrate", "1", "--all"],
        ["migrate", "--all", "--concurrency", "0"],
        ["migrate", "--bogus"],
        ["rollback", "1"],
        ["rollback", "1", "--to", "x"],
        ["plan"],
        ["nosuchcommand"],
    ],
)
def test_bad_usage_exits_2_without_a_traceback(cli: Cli, args: list[str]) -> None:
    assert cli("init").code == 0
    run = cli(*args)
    assert run.code == 2, (run.out, run.err)


def test_unknown_user_exits_2_with_a_hint(cli: Cli) -> None:
    assert cli("init").code == 0
    run = cli("migrate", "nobody")
    assert run.code == 2
    assert "no user with clerk id 'nobody'" in run.err
    assert "hint:" in run.err


def test_commands_before_init_say_to_run_init(cli: Cli, tmp_path: Path) -> None:
    run = cli("status")
    assert run.code == 1 and "byod init" in run.err
    assert not (tmp_path / "byod.db").exists()


@pytest.mark.parametrize(
    ("key", "code", "words"),
    [
        (OTHER_KEY, 1, "wrong encryption key"),
        ("not-base64!!", 2, "BYOD_ENCRYPTION_KEY is not valid base64"),
    ],
)
def test_bad_key_is_a_clear_error(
    cli: Cli, tmp_path: Path, key: str, code: int, words: str
) -> None:
    assert cli("init").code == 0
    assert cli("users", "add", "--clerk-id", "u").code == 0
    assert cli("connect", "u", "--url", sqlite_instance(tmp_path, "u")).code == 0
    run = cli("migrate", "u", BYOD_ENCRYPTION_KEY=key)
    assert run.code == code
    assert words in run.err


def test_corrupt_ciphertext_is_a_clear_error(cli: Cli, tmp_path: Path) -> None:
    assert cli("init").code == 0
    assert cli("users", "add", "--clerk-id", "u").code == 0
    assert cli("connect", "u", "--url", sqlite_instance(tmp_path, "u")).code == 0
    execute(f"sqlite:///{tmp_path / 'byod.db'}", "UPDATE byod_configs SET sealed_url = 'v1.AAAA'")
    run = cli("migrate", "u")
    assert run.code == 1
    assert "corrupt" in run.err


def test_unreachable_instance_on_connect_and_migrate(cli: Cli, tmp_path: Path) -> None:
    assert cli("init").code == 0
    assert cli("users", "add", "--clerk-id", "u").code == 0
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    connected = cli("connect", "u", "--url", missing)
    assert connected.code == 1 and "error: UnreachableError: " in connected.err
    assert "The config is stored" in connected.err
    assert not (tmp_path / "missing.db").exists()  # never created by accident
    run = cli("migrate", "u")
    assert run.code == 1 and "unreachable" in run.err and "hint:" in run.err


def test_broken_registry_exits_2_naming_the_file(cli: Cli, tmp_path: Path) -> None:
    folder = write_migrations(tmp_path / "broken", {"001_a.py": "def oops(:\n"})
    assert cli("init").code == 0
    run = cli("status", "--migrations", str(folder))
    assert run.code == 2
    assert "001_a.py: syntax error" in run.err


def test_drift_is_reported_by_verify(cli: Cli, tmp_path: Path) -> None:
    migrations = counter_migrations(tmp_path / "migrations")
    env = {"BYOD_MIGRATIONS": str(migrations)}
    assert cli("init", **env).code == 0
    assert cli("users", "add", "--clerk-id", "u").code == 0
    assert cli("connect", "u", "--url", sqlite_instance(tmp_path, "u")).code == 0
    assert cli("migrate", "u", "--to", "2", **env).code == 0
    (migrations / "001_create.py").write_text(
        (migrations / "001_create.py").read_text() + "\nEDITED = True\n"
    )
    verify = cli("verify", "u", "--json", **env)
    assert verify.code == 1
    report = verify.json()[0]  # type: ignore[index]
    assert not report["ok"]
    assert "001_create changed after it was applied" in report["problems"][0]
    refused = cli("migrate", "u", **env)
    assert refused.code == 1 and "drift" in refused.err


def test_new_scaffolds_the_next_migration(cli: Cli, tmp_path: Path) -> None:
    folder = counter_migrations(tmp_path / "migrations")
    run = cli("new", "Add archived flag", "--migrations", str(folder))
    assert run.code == 0
    created = folder / "004_add_archived_flag.py"
    assert created.exists()
    assert 'id="004_add_archived_flag"' in created.read_text()
    assert "version=4" in created.read_text()
    assert cli("new", "y").code == 0  # ./migrations exists in this folder: it is the app's
    assert (folder / "005_y.py").exists()


def test_new_in_a_fresh_folder_starts_the_apps_own_migrations(tmp_path: Path) -> None:
    cli = Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY)
    run = cli("new", "add archived")
    assert run.code == 0, run.err
    folder = tmp_path / "migrations"
    assert sorted(p.name for p in folder.glob("*.py")) == [
        "001_initial.py",
        "002_add_tags.py",
        "003_word_counts.py",
        "004_add_archived.py",
    ]
    assert cli("init").out.splitlines()[-1] == "migrations head version: 4"


def test_new_in_a_convex_app_writes_a_convex_migration(tmp_path: Path) -> None:
    (tmp_path / "convex").mkdir()
    cli = Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY)
    first = cli("new", "add likes")
    assert first.code == 0, first.err
    folder = tmp_path / "migrations"
    assert sorted(p.name for p in folder.glob("*.py")) == ["001_add_likes.py"]
    assert cli("new", "require likes").code == 0  # ./migrations beside convex/: the app's
    source = (folder / "002_require_likes.py").read_text()
    assert "ctx.convex" in source and "code_ref=None" in source and "ctx.op" not in source
    registry = Registry.load(folder)
    assert [m.id for m in registry] == ["001_add_likes", "002_require_likes"]
    assert all(m.code_ref is None and m.source_path for m in registry)


def test_demo_builds_a_fleet_and_is_safe_to_run_twice(tmp_path: Path) -> None:
    cli = Cli(tmp_path, real_process=True)
    first = cli("demo", "--tenants", "3")
    assert first.code == 0, first.err
    assert "3 succeeded" in first.out
    assert "history of demo-tenant-001" in first.out
    second = cli("demo", "--tenants", "3")
    assert second.code == 0 and "0 succeeded" in second.out
    assert "50,003/50,003" in first.out  # the large tenant's backfill, in its history
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'byod-demo' / 'tenant-002.db'}")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM tags")).scalar_one() == 4
    engine.dispose()
    large = sa.create_engine(f"sqlite:///{tmp_path / 'byod-demo' / 'tenant-001.db'}")
    with large.connect() as conn:
        counted = conn.execute(
            sa.text("SELECT count(*), sum(words) FROM documents WHERE words IS NOT NULL")
        ).one()
        # every document counted: 3 samples (7 + 5 + 9 words) and 50,000 of 7 words each
        assert tuple(counted) == (50_003, 21 + 50_000 * 7)
        column = next(c for c in sa.inspect(conn).get_columns("documents") if c["name"] == "words")
        assert column["nullable"] is False  # finalized
    large.dispose()


def test_a_real_process_reports_bad_usage_and_unknown_users_with_exit_2(tmp_path: Path) -> None:
    cli = Cli(tmp_path, real_process=True, BYOD_ENCRYPTION_KEY=TEST_KEY)
    assert cli("init").code == 0
    assert cli("migrate").code == 2
    unknown = cli("history", "ghost")
    assert unknown.code == 2 and "ghost" in unknown.err


def test_fleet_runs_are_listed_shown_and_undone(cli: Cli, tmp_path: Path) -> None:
    env = counter_fleet(cli, tmp_path, "--to", "2")
    execute(f"sqlite:///{tmp_path / 'b.db'}", "CREATE TABLE break_me (id INTEGER)")
    (tmp_path / "users.txt").write_text("a\nb\n")
    run = cli("migrate", "--users", str(tmp_path / "users.txt"), "--json", **env)
    assert run.code == 1
    summary = json.loads(run.out.splitlines()[-1])["summary"]
    assert (summary["succeeded"], summary["failed"], summary["total"]) == (1, 1, 2)
    runs = cli("runs", "--json").json()
    assert [r["id"] for r in runs] == [summary["run_id"]]  # type: ignore[index]
    shown = cli("runs", "show", summary["run_id"], "--json").json()
    assert shown["state"] == "completed"  # type: ignore[index]
    assert [(f["clerk_id"], f["migration"]) for f in shown["failures"]] == [("b", "003_fragile")]  # type: ignore[index]
    followed = cli("runs", "show", summary["run_id"], "--follow", "--json")  # an ended run
    assert followed.code == 1  # as the run itself: one user failed
    again = json.loads(followed.out.splitlines()[-1])["summary"]
    assert {k: v for k, v in again.items() if k != "errors"} == {
        k: v for k, v in summary.items() if k != "errors"
    }
    assert [(e["user"], e["migration"]) for e in again["errors"]] == [("b", "003_fragile")]
    stop = cli("runs", "stop", summary["run_id"], **env)  # not a distributed run
    assert stop.code == 2 and "Ctrl-C" in stop.err
    undo = cli("rollback", "--run", summary["run_id"], "--json", **env)
    assert undo.code == 0, undo.err
    assert json.loads(undo.out.splitlines()[-1])["summary"]["succeeded"] == 1
    assert cli("pending", "a", **env).out.strip() == "1"  # back at 2: 003 pending again
    assert cli("pending", "c", **env).out.strip() == "1"  # never in the run
    assert cli("runs", "show", "nope").code == 2
    assert cli("rollback", "--run", summary["run_id"], "--to", "1").code == 2


def test_failures_before_the_chain_are_in_runs_show_status_and_history(
    cli: Cli, tmp_path: Path
) -> None:
    """Regression: an unreachable, undecryptable or drifted user was counted failed, but
    `runs show`, `status` and `history` had nothing on it."""
    env = counter_fleet(cli, tmp_path, "--to", "2")
    (tmp_path / "a.db").unlink()  # unreachable
    control = f"sqlite:///{tmp_path / 'byod.db'}"
    execute(control, "UPDATE byod_configs SET sealed_url = 'v1.AAAA' WHERE user_id = 2")
    (tmp_path / "migrations" / "001_create.py").write_text(
        (tmp_path / "migrations" / "001_create.py").read_text() + "\nEDITED = True\n"
    )  # c drifts (a and b fail before reading their stamp)
    # as on a control plane from before it kept applied checksums (no up-front refusal):
    # each user's own stamp is the safety net
    execute(control, "DELETE FROM byod_checksums")
    run = cli("migrate", "--all", "--json", "--retries", "0", **env)
    assert run.code == 1
    lines = [json.loads(line) for line in run.out.splitlines()]
    summary = lines[-1]["summary"]
    assert (summary["total"], summary["failed"]) == (3, 3)
    assert {line["clerk_id"]: line["error_type"] for line in lines[:-1]} == {
        "a": "UnreachableError",
        "b": "CredentialsError",
        "c": "DriftError",
    }
    shown = cli("runs", "show", summary["run_id"], "--json").json()
    failures = {f["clerk_id"]: (f["migration"], f["error"]) for f in shown["failures"]}  # type: ignore[index]
    assert {user: migration for user, (migration, _) in failures.items()} == {
        "a": "003_fragile",
        "b": "003_fragile",
        "c": "003_fragile",
    }
    assert failures["a"][1].startswith("UnreachableError: ")
    assert failures["b"][1].startswith("CredentialsError: ")
    assert failures["c"][1].startswith("DriftError: ")
    recent = cli("status", "--json", **env).json()["recent_failures"]  # type: ignore[index]
    assert {f["clerk_id"] for f in recent} == {"a", "b", "c"}
    history = cli("history", "a", "--json").json()
    assert next((h["migration_id"], h["status"], h["attempts"]) for h in history) == (  # type: ignore[index]
        "003_fragile",
        "failed",
        0,
    )
    # a single user, and a rollback, leave the same trail (no run id)
    assert cli("migrate", "a", **env).code == 1
    assert cli("rollback", "a", "--to", "1", **env).code == 1
    rows = cli("history", "a", "--json").json()
    assert [(h["migration_id"], h["direction"], h["run_id"]) for h in rows][:2] == [  # type: ignore[index]
        ("002_bump", "down", None),
        ("003_fragile", "up", None),
    ]
    assert all(h["error"].startswith("UnreachableError: ") for h in rows[:3])  # type: ignore[index, union-attr]


def test_every_json_timestamp_is_rfc3339_utc(control_plane_url: str, tmp_path: Path) -> None:
    """`--json` output writes every moment as RFC 3339 in UTC with its offset, on each
    control-plane kind, and the moment is the real one."""
    cli = Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY, BYOD_DATABASE_URL=control_plane_url)
    env = counter_fleet(cli, tmp_path)
    execute(f"sqlite:///{tmp_path / 'b.db'}", "CREATE TABLE break_me (id INTEGER)")
    before = datetime.now(UTC) - timedelta(seconds=5)
    run = cli("migrate", "--all", "--json", "--retries", "0", **env)
    run_id = json.loads(run.out.splitlines()[-1])["summary"]["run_id"]
    after = datetime.now(UTC) + timedelta(seconds=5)
    outputs = {
        "runs": cli("runs", "--json").json(),
        "runs show": cli("runs", "show", run_id, "--json").json(),
        "status": cli("status", "--json", **env).json(),
        "history": cli("history", "b", "--json").json(),
    }
    found = [(name + at, value) for name, out in outputs.items() for at, value in timestamps(out)]
    assert {name.split(".")[0].split("[")[0] for name, _ in found} == set(outputs), found
    for where, value in found:
        assert RFC3339_UTC.match(value), (where, value)
        assert before <= datetime.fromisoformat(value) <= after, (where, value)


def test_a_target_on_the_wrong_side_is_a_usage_error_exit_2(cli: Cli, tmp_path: Path) -> None:
    """`--to` below the user's version for migrate (above it for rollback) is PlanError:
    exit 2 as the error table says, nothing touched, with or without --json."""
    env = counter_fleet(cli, tmp_path, "--to", "2")
    down = cli("migrate", "a", "--to", "1", **env)
    assert down.code == 2, down.err
    assert "PlanError" in down.err and "use rollback" in down.err
    as_json = cli("migrate", "a", "--to", "1", "--json", **env)
    assert (as_json.code, as_json.json()["error_type"]) == (2, "PlanError")  # type: ignore[index]
    up = cli("rollback", "a", "--to", "3", **env)
    assert up.code == 2 and "use migrate" in up.err
    assert cli("pending", "a", "--json", **env).json() == {"pending": 1}  # still at 2


def test_a_failed_reconnect_keeps_the_working_config_unless_replace(
    cli: Cli, tmp_path: Path
) -> None:
    """Regression: a typo in a re-connect left a working user in ``error``."""
    assert cli("init").code == 0
    assert cli("users", "add", "--clerk-id", "a").code == 0
    good = sqlite_instance(tmp_path, "good")
    typo = f"sqlite:///{tmp_path / 'no-such-file.db'}"
    assert cli("connect", "a", "--url", good).code == 0
    failed = cli("connect", "a", "--url", typo)
    assert failed.code == 1
    assert "keeps the working one" in failed.err
    status = cli("status", "--json").json()
    assert status["by_connection"] == {"connected": 1}  # type: ignore[index]
    migrated = cli("migrate", "a")
    assert migrated.code == 0 and "to 3" in migrated.out  # the kept config, the good file
    replaced = cli("connect", "a", "--url", typo, "--replace")
    assert replaced.code == 1 and "The config is stored (status error)" in replaced.err
    assert cli("status", "--json").json()["by_connection"] == {"error": 1}  # type: ignore[index]
    assert cli("users", "add", "--clerk-id", "b").code == 0
    first = cli("connect", "b", "--url", typo)  # a first connect that fails is stored
    assert first.code == 1 and "stored (status error)" in first.err


def test_removing_a_user_deletes_credentials_and_email_and_keeps_the_history(
    cli: Cli, tmp_path: Path
) -> None:
    assert cli("init").code == 0
    assert cli("users", "add", "--clerk-id", "gone", "--email", "g@example.com").code == 0
    assert cli("connect", "gone", "--url", sqlite_instance(tmp_path, "g")).code == 0
    assert cli("migrate", "gone").code == 0
    removed = cli("users", "remove", "gone")
    assert removed.code == 0 and "user 1 removed" in removed.out
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'byod.db'}")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM byod_configs")).scalar() == 0
        email, clerk = conn.execute(sa.text("SELECT email, clerk_id FROM users")).one()
        assert email is None and clerk != "gone"
    engine.dispose()
    history = cli("history", "1", "--json").json()
    assert [row["migration_id"] for row in history] == [  # type: ignore[index]
        "003_word_counts",
        "002_add_tags",
        "001_initial",
    ]
    assert cli("users", "list", "--json").json() == []
    assert cli("history", "gone").code == 2  # the clerk id names nobody now
    again = cli("users", "add", "--clerk-id", "gone")
    assert again.code == 0 and again.out.strip() == "2"  # a new user
    assert cli("pending", "gone").code == 2  # not connected: the old database is not its


def test_disconnect_drops_the_credentials_only(cli: Cli, tmp_path: Path) -> None:
    assert cli("init").code == 0
    assert cli("users", "add", "--clerk-id", "a", "--email", "a@example.com").code == 0
    assert cli("connect", "a", "--url", sqlite_instance(tmp_path, "a")).code == 0
    dropped = cli("disconnect", "a")
    assert dropped.code == 0 and "disconnected" in dropped.out
    assert "had no database" in cli("disconnect", "a").out
    users = cli("users", "list", "--json").json()
    assert users[0]["email"] == "a@example.com"  # type: ignore[index]
    assert cli("status", "--json").json()["by_connection"] == {"not configured": 1}  # type: ignore[index]


def test_a_run_with_nothing_to_do_counts_everyone_up_to_date_and_is_listed_only_on_request(
    cli: Cli, tmp_path: Path
) -> None:
    """Regression: every re-run at head added a ``0/0/0/0/0 of 0`` run and said ``0 up
    to date`` while every user was at head."""
    assert cli("init").code == 0
    for name in ("a", "b", "c"):
        assert cli("users", "add", "--clerk-id", name).code == 0
        assert cli("connect", name, "--url", sqlite_instance(tmp_path, name)).code == 0
    assert cli("migrate", "--all").code == 0
    idle = cli("migrate", "--all", "--json")
    assert idle.code == 0
    summary = idle.json_lines()[-1]["summary"]
    assert (summary["total"], summary["up_to_date"], summary["succeeded"]) == (3, 3, 0)
    listed = cli("runs", "--json").json()
    assert len(listed) == 1 and listed[0]["counts"]["succeeded"] == 3  # type: ignore[index]
    every = cli("runs", "--json", "--noop").json()
    assert every[0]["id"] == summary["run_id"] and len(every) == 2  # type: ignore[index,arg-type]
    assert "(no-op)" in cli("runs", "--noop").out
    assert cli("runs", "show", summary["run_id"]).code == 0  # still there by its id


def test_status_starts_without_what_it_does_not_use(tmp_path: Path) -> None:
    """`byod status` on the embedded default imports neither pydantic (Typer builds an
    adapter per parameter with it), the runner, the metrics, the fleet nor a PostgreSQL
    dialect: what it does not use never costs a start (bench/overhead.py measures the
    start itself). A flag given still goes through Typer's own checks."""
    cli = Cli(tmp_path, real_process=True)
    assert cli("init").code == 0
    probe = (
        "import sys\n"
        "sys.argv = ['byod', 'status', '--database-url', 'sqlite:///byod.db']\n"
        "from byod.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "unused = ('pydantic', 'byod.runner', 'byod.metrics', 'prometheus_client',"
        " 'byod.fleet', 'sqlalchemy.dialects.postgresql', 'httpx', 'alembic')\n"
        "print('imported:', [name for name in unused if name in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=cli.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "users per schema version" in done.stdout
    assert done.stdout.splitlines()[-1] == "imported: []"
    bad = cli("history", "1", "--limit", "x")
    assert bad.code == 2 and "Invalid value for '--limit'" in bad.err
    assert "unable to parse string as an integer" in bad.err


def test_a_command_line_builds_only_the_command_it_names() -> None:
    """Typer builds every registered command's options before it runs one: the command
    line's first word picks the one command (or group) to build, with the global
    options; help, a global option first, or a name that is no command get the whole
    app (so its messages list every command and suggest the near one)."""
    import typer.main

    from byod.cli import _app_for, app

    status = _app_for(["status", "--json"])
    assert status is not app
    assert [c.callback.__name__ for c in status.registered_commands] == ["status"]  # type: ignore[union-attr]
    assert status.registered_callback is app.registered_callback
    runs = _app_for(["runs", "show", "x"])
    assert [g.name for g in runs.registered_groups] == ["runs"] and not runs.registered_commands
    for whole in ([], ["--help"], ["--log-format", "json", "status"], ["stat"], ["user"]):
        assert _app_for(whole) is app, whole
    group = typer.main.get_command(status)
    assert list(group.commands) == ["status"]  # type: ignore[attr-defined]


def test_version_is_printed_from_its_one_place(cli: Cli) -> None:
    """`byod --version` prints the version the package and its metadata carry (one
    place: ``byod.__version__``, which pyproject.toml reads), before any command."""
    import byod

    for args in (("--version",), ("--version", "status")):
        run = cli(*args)
        assert run.code == 0 and run.out.strip() == f"byod {byod.__version__}", run
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and '\nversion = "' not in pyproject
    assert (Path(byod.__file__).parent / "py.typed").is_file()  # types reach users' mypy
