"""Bad and hostile input at the command line: a clear error and the right exit status,
never a traceback, never a flag silently ignored, never a terminal code echoed raw."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from byod.clock import utcnow
from byod.controlplane.schema import configs, users
from tests.conftest import TEST_KEY, ServerDatabases, child_env, write_migrations
from tests.migration_sets import counter_migrations
from tests.test_cli import BYOD, Cli, counter_fleet


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY)


def control_plane(tmp_path: Path) -> sa.Engine:
    return sa.create_engine(f"sqlite:///{tmp_path / 'byod.db'}")


@pytest.mark.parametrize(
    "args",
    [
        ["pending", "\u00b2"],
        ["pending", "9" * 20],
        ["pending", "9" * 5000],
        ["history", "\u0661"],
        ["migrate", "--all", "--limit", "99999999999999999999"],
        ["migrate", "--all", "--only-version", "99999999999999999999"],
        ["migrate", "--all", "--lease-seconds", "1e300"],
        ["runs", "--limit", "99999999999999999999"],
        ["new", "x" * 5000],
        ["--log-file", "/nonexistent-folder/byod.log", "status"],
        ["--log-file", "/tmp", "status"],
        ["users", "add", "--clerk-id", "42"],
        ["users", "add", "--clerk-id", " spaced "],
        ["users", "add", "--clerk-id", "evil\x1b[2J"],
        ["users", "add", "--clerk-id", "two\nlines"],
    ],
)
def test_bad_input_exits_2_with_a_clear_error(cli: Cli, args: list[str]) -> None:
    assert cli("init").code == 0
    run = cli(*args)  # the harness fails on any traceback
    assert run.code == 2, (run.out, run.err)
    assert "error" in run.err.lower()
    assert "\x1b" not in run.err


def test_an_error_names_its_class_as_the_error_table_does(cli: Cli) -> None:
    assert cli("init").code == 0
    run = cli("migrate", "nobody")
    assert run.code == 2
    assert "error: UnknownUserError: no user with clerk id 'nobody'" in run.err


def test_a_control_plane_url_of_an_unknown_kind_is_bad_input(cli: Cli) -> None:
    run = cli("status", BYOD_DATABASE_URL="foo://")
    assert run.code == 2 and "SettingsError" in run.err


def test_new_writes_a_loadable_file_whatever_the_name(cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    for name in ("bad \\N{nope}", 'quote " and """ and \\', "a" * 200):
        made = cli("new", name, "--migrations", str(folder))
        assert made.code == 0, made.err
    assert cli("init", "--migrations", str(folder)).code == 0  # loads every file
    names = sorted(p.name for p in folder.glob("*.py"))
    assert names[0].startswith("001_bad_n_nope") and len(names) == 3
    assert all(len(n) <= 70 for n in names)
    too_long = cli("new", "x" * 201, "--migrations", str(folder))
    assert too_long.code == 2 and "at most 200 characters" in too_long.err
    control = cli("new", "a\x1b[31mb", "--migrations", str(folder))
    assert control.code == 2 and "control characters" in control.err


def test_a_folder_named_like_a_migration_is_a_registry_error(cli: Cli, tmp_path: Path) -> None:
    folder = counter_migrations(tmp_path / "migrations")
    (folder / "004_x.py").mkdir()
    run = cli("init", "--migrations", str(folder))
    assert run.code == 2 and "RegistryError" in run.err and "004_x.py" in run.err


def test_a_migration_file_that_exits_is_a_registry_error(cli: Cli, tmp_path: Path) -> None:
    env = counter_fleet(cli, tmp_path)
    (Path(env["BYOD_MIGRATIONS"]) / "004_exit.py").write_text("import sys\nsys.exit(0)\n")
    for args in (["migrate", "--all"], ["verify", "--all"], ["plan", "--all"]):
        run = cli(*args, **env)
        assert run.code == 2, (args, run.out, run.err)
        assert "004_exit.py" in run.err and "exits while loading" in run.err


def test_plan_and_migrate_agree_on_a_folder_older_than_the_fleet(cli: Cli, tmp_path: Path) -> None:
    env = counter_fleet(cli, tmp_path, "--to", "2")
    empty = tmp_path / "empty"
    empty.mkdir()
    older = {"BYOD_MIGRATIONS": str(empty)}
    for args in (
        ["plan", "--all"],
        ["plan", "a"],
        ["migrate", "--all"],
        ["migrate", "a"],
        ["pending", "a"],
    ):
        run = cli(*args, **older)
        assert run.code == 1, (args, run.out, run.err)
        assert "DriftError" in run.err, (args, run.err)
    assert cli("pending", "a", **env).out.strip() == "1"  # nothing was run


def test_clerk_ids_from_before_are_shown_escaped(cli: Cli, tmp_path: Path) -> None:
    assert cli("init").code == 0
    with control_plane(tmp_path).begin() as conn:  # stored by an older byod
        conn.execute(users.insert().values(clerk_id="evil\x1b[2J\x07[red]x", created_at=utcnow()))
    listed = cli("users", "list")
    assert listed.code == 0
    assert "\x1b" not in listed.out and "\x07" not in listed.out
    assert "evil\\x1b[2J\\x07[red]x" in listed.out
    history = cli("history", "1")
    assert "\x1b" not in history.out and "evil\\x1b" in history.out


def test_status_counts_users_in_error_that_are_behind(cli: Cli, tmp_path: Path) -> None:
    env = counter_fleet(cli, tmp_path)
    (tmp_path / "b.db").unlink()  # b becomes unreachable
    assert cli("migrate", "--all", **env).code == 1
    status = cli("status", **env)
    assert "1 below head that a run would take (1 of them in error)" in status.out, status.out


def test_help_names_its_placeholders(cli: Cli) -> None:
    for command in ("connect", "migrate", "rollback", "history", "pending", "new", "runs"):
        shown = cli(command, "--help")
        assert shown.code == 0
        assert "<str>" not in shown.out and "{" not in shown.out, shown.out
    connect = cli("connect", "--help").out
    assert "USER" in connect and "--url URL" in connect and "--timeout SECONDS" in connect


def test_one_user_refuses_fleet_only_flags(cli: Cli, tmp_path: Path) -> None:
    env = counter_fleet(cli, tmp_path)
    for flag in (
        ["--concurrency", "2"],
        ["--canary", "1"],
        ["--processes", "2"],
        ["--max-failure-ratio", "0.5"],
        ["--limit", "1"],
        ["--only-version", "0"],
    ):
        run = cli("migrate", "a", *flag, **env)
        assert run.code == 2 and flag[0] in run.err, (flag, run.err)
    assert cli("rollback", "a", "--to", "0", "--canary", "1", **env).code == 2
    assert cli("pending", "a", **env).out.strip() == "3"  # nothing was run


def test_one_user_honours_timeout_and_lease_seconds(tmp_path: Path) -> None:
    cli = Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY)
    env = counter_fleet(cli, tmp_path)
    assert cli("migrate", "a", "--to", "1", **env).code == 0
    hold = tmp_path / "hold"
    hold.mkdir()
    environ = cli.env | env | {"BYOD_TEST_HOLD_DIR": str(hold), "BYOD_TEST_HOLD_SECONDS": "5"}
    started = time.monotonic()
    proc = subprocess.Popen(
        [*BYOD, "migrate", "a", "--timeout", "2", "--lease-seconds", "3"],
        cwd=tmp_path,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not any(hold.iterdir()):
            assert proc.poll() is None and time.monotonic() - started < 60
            time.sleep(0.05)
        with control_plane(tmp_path).connect() as conn:
            expires = conn.execute(sa.select(configs.c.lease_expires_at)).scalars().first()
        assert expires is not None and (expires - utcnow()).total_seconds() <= 3.5
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "InstanceTimeoutError" in err, err
    assert cli("pending", "a", **env).out.strip() == "2"  # 002 rolled back


def test_one_user_retries_a_transient_failure(cli: Cli, tmp_path: Path) -> None:
    env = counter_fleet(cli, tmp_path)
    with control_plane(tmp_path).begin() as conn:  # another runner holds a's lease
        conn.execute(
            configs.update().values(
                lease_owner="someone-else", lease_expires_at=utcnow().replace(year=2100)
            )
        )
    started = time.monotonic()
    once = cli("migrate", "a", "--retries", "0", **env)
    quick = time.monotonic() - started
    assert once.code == 1 and "BusyError" in once.err
    started = time.monotonic()
    retried = cli("migrate", "a", "--retries", "3", **env)
    # three backoffs of at least 0.25, 0.5 and 1 s (half-jittered 0.5 s doubling) beside
    # what one attempt costs (however slow the machine is, that part cancels out)
    assert retried.code == 1 and time.monotonic() - started - quick >= 1.75


def test_connect_reads_the_url_and_secret_from_standard_input(
    tmp_path: Path, pg: ServerDatabases
) -> None:
    env = child_env()
    env["BYOD_ENCRYPTION_KEY"] = TEST_KEY
    subprocess.run([*BYOD, "init"], cwd=tmp_path, env=env, check=True, capture_output=True)
    subprocess.run([*BYOD, "users", "add", "--clerk-id", "a"], cwd=tmp_path, env=env, check=True)
    url = pg.create()  # trust authentication: any password is accepted
    done = subprocess.run(
        [*BYOD, "connect", "a", "--url", "-", "--secret", "-"],
        cwd=tmp_path,
        env=env,
        input=f"{url}\nhunter2\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "connected" in done.stdout and "hunter2" not in done.stdout + done.stderr
    empty = subprocess.run(
        [*BYOD, "connect", "a", "--url", "-"],
        cwd=tmp_path,
        env=env,
        input="",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert empty.returncode == 2 and "no database URL on standard input" in empty.stderr


def test_a_migration_file_raising_system_exit_names_its_code(cli: Cli, tmp_path: Path) -> None:
    folder = write_migrations(tmp_path / "m", {"001_a.py": "raise SystemExit(3)\n"})
    run = cli("init", "--migrations", str(folder))
    assert run.code == 2 and "SystemExit 3" in run.err


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["migrate"], "give a USER or --all"),
        (["migrate", "a", "--all"], "give a USER or --all, not both"),
        (["plan"], "give a USER or --all"),
        (["verify", "a", "--all"], "not both"),
    ],
)
def test_a_missing_or_doubled_target_says_which(cli: Cli, args: list[str], said: str) -> None:
    """Regression: ``byod migrate`` with no argument said "give either a USER or --all
    (not both)", as if both had been given."""
    assert cli("init").code == 0
    refused = cli(*args)
    assert refused.code == 2 and said in refused.err
    if "not both" not in said:
        assert "not both" not in refused.err
