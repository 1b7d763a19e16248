"""Operating byod like a service: structured logs (``--log-format json``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.conftest import TEST_KEY, execute
from tests.test_cli import Cli, counter_fleet
from tests.test_instance_url import closed_port

SECRET = "pw-s3cret-77"
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def fleet_with_failures(tmp_path: Path) -> tuple[Cli, dict[str, str]]:
    """Users a, b, c on SQLite (b's data breaks 002_bump) and d, whose instance URL holds
    a password and answers nowhere."""
    cli = Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY)
    env = counter_fleet(cli, tmp_path)
    execute(f"sqlite:///{tmp_path / 'b.db'}", "CREATE TABLE bumped (id INTEGER)")
    assert cli("users", "add", "--clerk-id", "d").code == 0
    url = f"postgresql://app:{SECRET}@127.0.0.1:{closed_port()}/d"
    assert cli("connect", "d", "--url", url, "--timeout", "2").code == 1  # stored, status error
    return Cli(tmp_path, real_process=True, BYOD_ENCRYPTION_KEY=TEST_KEY), env


def records(stderr: str) -> list[dict[str, object]]:
    """Every line of stderr, each of which must be one JSON object."""
    lines = stderr.splitlines()
    assert lines, "no log records"
    parsed = [json.loads(line) for line in lines]
    assert all(isinstance(record, dict) for record in parsed)
    return parsed


def test_json_logs_of_a_run_with_failures_are_one_object_per_line_with_its_fields(
    tmp_path: Path,
) -> None:
    cli, env = fleet_with_failures(tmp_path)
    run = cli("--log-format", "json", "migrate", "--all", "--json", "--retries", "0", **env)
    assert run.code == 1
    summary = json.loads(run.out.splitlines()[-1])["summary"]  # stdout stays --json's
    assert (summary["succeeded"], summary["failed"]) == (2, 2)
    logged = records(run.err)
    assert SECRET not in run.err and SECRET not in run.out
    for record in logged:
        assert RFC3339_UTC.match(str(record["ts"])), record
        assert record["level"] in ("debug", "info", "warning", "error", "critical")
        assert isinstance(record["message"], str) and record["message"]
    run_id = summary["run_id"]
    steps = [r for r in logged if r["logger"] == "byod.runner" and "migration" in r]
    done = [r for r in steps if r["outcome"] == "completed"]
    # a and c: 001, 002 and 003 each, b only 001; each with its attempt and duration
    assert sorted((r["clerk_id"], r["migration"]) for r in done) == sorted(
        [
            *((user, m) for user in ("a", "c") for m in ("001_create", "002_bump", "003_fragile")),
            ("b", "001_create"),
        ]
    )
    assert all(r["run_id"] == run_id and r["attempt"] == 1 for r in done)
    assert all(isinstance(r["duration_ms"], float) for r in done)
    failed = [r for r in steps if r["outcome"] == "failed"]
    assert [(r["clerk_id"], r["migration"], r["error"]) for r in failed] == [
        ("b", "002_bump", "MigrationFailedError")
    ]
    assert failed[0]["level"] == "error" and failed[0]["user_id"] == 2
    refused = [r for r in logged if r.get("outcome") == "refused"]
    assert [(r["clerk_id"], r["error"], r["migration"]) for r in refused] == [
        ("d", "UnreachableError", "001_create")
    ]
    per_user = {r["clerk_id"]: r["outcome"] for r in logged if r["logger"] == "byod.fleet"}
    assert per_user == {"a": "succeeded", "b": "failed", "c": "succeeded", "d": "failed"}
    end = logged[-1]
    assert (end["run_id"], end["outcome"], end["level"]) == (run_id, "completed", "warning")


def test_the_log_format_comes_from_the_environment_and_a_bad_one_is_refused(
    tmp_path: Path,
) -> None:
    cli, env = fleet_with_failures(tmp_path)
    run = cli("migrate", "a", **env, BYOD_LOG_FORMAT="json")
    assert run.code == 0
    assert any(r.get("outcome") == "completed" for r in records(run.err))
    failed = cli("migrate", "zed", **env, BYOD_LOG_FORMAT="json")  # bad input: a record too
    assert failed.code == 2
    (error,) = records(failed.err)
    assert (error["level"], error["error"]) == ("error", "UnknownUserError")
    bad = cli("--log-format", "yaml", "status")
    assert bad.code == 2 and "unknown log format 'yaml'" in bad.err
    assert "Traceback" not in bad.err
    text = cli("migrate", "c", **env)  # text stays the default: nothing logged on stderr
    assert text.code == 0 and text.err == ""
