"""Operating byod like a service: structured logs (``--log-format json``) and Prometheus
metrics (``byod serve``'s ``/metrics``, ``byod worker --metrics-port``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import byod
from byod.workspace import Workspace
from tests.conftest import TEST_KEY, child_env, execute, make_workspace
from tests.distributed_kit import BYOD, Cluster, sqlite_fleet, wait_for
from tests.helpers import add_connected
from tests.migration_sets import counter_migrations
from tests.served import free_port, serve
from tests.test_api import SECRET, bearer, token
from tests.test_cli import Cli, counter_fleet
from tests.test_instance_url import closed_port
from tests.test_runner import Crash, crashing_runner

PASSWORD = "pw-s3cret-77"
ROOT = Path(__file__).resolve().parent.parent  # the migrations import tests.gates
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def fleet_with_failures(tmp_path: Path) -> tuple[Cli, dict[str, str]]:
    """Users a, b, c on SQLite (b's data breaks 002_bump) and d, whose instance URL holds
    a password and answers nowhere."""
    cli = Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY)
    env = counter_fleet(cli, tmp_path)
    execute(f"sqlite:///{tmp_path / 'b.db'}", "CREATE TABLE bumped (id INTEGER)")
    assert cli("users", "add", "--clerk-id", "d").code == 0
    url = f"postgresql://app:{PASSWORD}@127.0.0.1:{closed_port()}/d"
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
    assert PASSWORD not in run.err and PASSWORD not in run.out
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


# -- Prometheus metrics ----------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of a /metrics page, parsed by prometheus-client's own parser."""
    answer = httpx.get(url, headers=headers or {}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    found: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def held_fleet(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Users a, b, c, d on the counter migrations (d's data breaks 003), whose 002 waits
    two seconds inside its transaction (after touching a file in the hold folder)."""
    migrations = counter_migrations(tmp_path / "migrations")
    control = f"sqlite:///{tmp_path / 'control.db'}"
    ws = make_workspace(control, migrations)
    for name in "abcd":
        (tmp_path / f"{name}.db").touch()
        add_connected(ws, f"sqlite:///{tmp_path / f'{name}.db'}", name)
    execute(f"sqlite:///{tmp_path / 'd.db'}", "CREATE TABLE break_me (id INTEGER)")
    ws.directory.add_user("ops")
    ws.engine.dispose()
    hold = tmp_path / "hold"
    hold.mkdir()
    clean = child_env()
    here = str(Path(byod.__file__).resolve().parents[1])
    env = clean | {
        "PYTHONPATH": os.pathsep.join([here, str(ROOT), *filter(None, [clean.get("PYTHONPATH")])]),
        "BYOD_DATABASE_URL": control,
        "BYOD_MIGRATIONS": str(migrations),
        "BYOD_ENCRYPTION_KEY": TEST_KEY,
        "BYOD_JWT_SECRET": SECRET,
        "BYOD_TEST_HOLD_DIR": str(hold),
        "BYOD_TEST_HOLD_SECONDS": "2",
    }
    return env, hold


def test_serve_metrics_rise_during_a_run_and_equal_its_summary_after(tmp_path: Path) -> None:
    env, hold = held_fleet(tmp_path)
    ops = bearer(token("ops", admin=True))
    with serve(env | {"BYOD_LOG_FORMAT": "json"}, tmp_path) as served:
        metrics_url = f"{served.url}/metrics"
        assert httpx.get(metrics_url, timeout=10).status_code == 401  # operators only
        user_token = bearer(token("a"))
        assert httpx.get(metrics_url, headers=user_token, timeout=10).status_code == 403
        before = scrape(metrics_url, ops)
        assert value(before, "byod_fleet_users", version="0") == 4
        assert value(before, "byod_fleet_users_below_head") == 4
        started = httpx.post(
            f"{served.url}/v1/fleet/runs", headers=ops, json={"concurrency": 2}, timeout=30
        )
        assert started.status_code == 202, started.text
        run_id = started.json()["run_id"]
        wait_for(lambda: len(list(hold.iterdir())) >= 2, 30, "two users inside 002")
        during = scrape(metrics_url, ops)
        assert value(during, "byod_users_in_flight") == 2
        assert value(during, "byod_runs_running") == 1
        assert value(during, "byod_steps_total", migration="001_create", outcome="completed") >= 2
        assert value(during, "byod_users_total") < 4  # still rising

        def ended() -> bool:
            shown = httpx.get(f"{served.url}/v1/fleet/runs/{run_id}", headers=ops, timeout=10)
            return shown.json()["state"] != "running"

        wait_for(ended, 60, "the run to end")
        run = httpx.get(f"{served.url}/v1/fleet/runs/{run_id}", headers=ops, timeout=10).json()
        after = scrape(metrics_url, ops)
    logged = records(served.log.read_text())  # the access log too: once, as JSON
    scraped = [r for r in logged if str(r["message"]).startswith("GET /metrics 200")]
    assert len(scraped) == 3 and all("sub=ops" in str(r["message"]) for r in scraped)
    assert (run["succeeded"], run["failed"]) == (3, 1)
    assert value(after, "byod_users_total", outcome="succeeded", target_kind="sqlite") == 3
    assert value(after, "byod_users_total", outcome="failed", target_kind="sqlite") == 1
    assert value(after, "byod_users_total") == run["succeeded"] + run["failed"]
    completed = {"outcome": "completed", "direction": "up", "target_kind": "sqlite"}
    assert value(after, "byod_steps_total", migration="001_create", **completed) == 4
    assert value(after, "byod_steps_total", migration="002_bump", **completed) == 4
    assert value(after, "byod_steps_total", migration="003_fragile", **completed) == 3
    assert value(after, "byod_steps_total", migration="003_fragile", outcome="failed") == 1
    held = {"migration": "002_bump", "target_kind": "sqlite"}
    assert value(after, "byod_step_duration_seconds_count", **held) == 4
    assert value(after, "byod_step_duration_seconds_sum", **held) >= 8  # 2 s each
    assert value(after, "byod_users_in_flight") == 0
    assert value(after, "byod_runs_running") == 0
    assert value(after, "byod_runs_started_total", kind="fleet") == 1
    assert value(after, "byod_fleet_users", version="3") == 3
    assert value(after, "byod_fleet_users", version="2") == 1
    labels = {label for (_, have) in after for label, _ in have}
    assert not labels & {"user", "user_id", "clerk_id", "run_id", "run"}


def test_a_worker_serves_its_pool_processes_metrics_added_up(redis_cluster: Cluster) -> None:
    cluster = redis_cluster
    sqlite_fleet(cluster, 4)
    execute(f"sqlite:///{cluster.folder.parent / 'u3.db'}", "CREATE TABLE break_me (id INTEGER)")
    hold = cluster.folder.parent / "hold"
    hold.mkdir()
    temp = cluster.folder.parent / "tmp"  # where the worker makes its metrics folder
    temp.mkdir()
    port = free_port()
    worker = cluster.start_worker(
        concurrency=2,
        args=("--metrics-port", str(port)),
        extra_env={
            "BYOD_TEST_HOLD_DIR": str(hold),
            "BYOD_TEST_HOLD_SECONDS": "2",
            "TMPDIR": str(temp),
        },
    )
    assert len(list(temp.glob("byod-metrics-*"))) == 1
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    started = subprocess.Popen(
        [BYOD, "migrate", "--all", "--distributed", "--retries", "0", "--json"],
        env=cluster.env,
        cwd=cluster.folder.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: len(list(hold.iterdir())) >= 2, 60, "two users inside 002")
        during = scrape(metrics_url)
        # two pool processes, each holding a user: the gauge adds them up
        assert value(during, "byod_users_in_flight") == 2
        out, err = started.communicate(timeout=120)
    finally:
        if started.poll() is None:
            started.kill()
    summary = json.loads(out.splitlines()[-1])["summary"]
    assert (summary["succeeded"], summary["failed"]) == (3, 1), err
    after = scrape(metrics_url)
    assert value(after, "byod_users_total", outcome="succeeded") == summary["succeeded"]
    assert value(after, "byod_users_total", outcome="failed") == summary["failed"]
    assert value(after, "byod_steps_total", migration="002_bump", outcome="completed") == 4
    assert value(after, "byod_steps_total", migration="003_fragile", outcome="failed") == 1
    assert value(after, "byod_step_duration_seconds_count", migration="002_bump") == 4
    assert value(after, "byod_users_in_flight") == 0
    worker.send_signal(signal.SIGTERM)  # a warm shutdown takes its metrics folder along
    worker.wait(60)
    assert list(temp.glob("byod-metrics-*")) == []


def test_a_json_worker_writes_nothing_but_json_lines(redis_cluster: Cluster) -> None:
    """`byod worker` in JSON mode: Celery's own records (ready, task received, a warning
    about running as root) and byod's are one JSON object per line of stderr, with RFC
    3339 UTC times; no banner, no text lines."""
    cluster = redis_cluster
    sqlite_fleet(cluster, 2)
    execute(f"sqlite:///{cluster.folder.parent / 'u1.db'}", "CREATE TABLE break_me (id INTEGER)")
    worker = cluster.start_worker(
        concurrency=1, extra_env={"BYOD_LOG_FORMAT": "json"}, name="j", stderr_apart=True
    )
    done = cluster.byod("migrate", "--all", "--distributed", "--retries", "0", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    assert cluster.summary(done)["failed"] == 1, done.stderr
    worker.terminate()
    worker.wait(30)
    lines = (cluster.folder.parent / "worker-j.err").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert len(records) == len([line for line in lines if line.strip()])
    assert all(RFC3339_UTC.match(str(record["ts"])) for record in records), records
    loggers = {str(record["logger"]) for record in records}
    assert any(name.startswith("celery") for name in loggers), loggers
    assert any(name.startswith("byod") for name in loggers), loggers
    assert any(record.get("error") == "MigrationFailedError" for record in records), records


def counted(name: str, **labels: str) -> float:
    """This process's own value of a byod metric (0 before its first count)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_user_taken_over_from_a_lost_runner_is_counted(cws: Workspace, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lost.db'}"
    (tmp_path / "lost.db").touch()
    uid = add_connected(cws, url)
    takeovers = counted("byod_lease_takeovers_total")
    with pytest.raises(Crash):  # its runner dies after the instance committed 002
        crashing_runner(cws, "002_bump").migrate(uid)
    assert counted("byod_lease_takeovers_total") == takeovers
    assert cws.runner().migrate(uid).ok  # the next runner settles what the lost one left
    assert counted("byod_lease_takeovers_total") == takeovers + 1


def test_backfill_rows_are_counted_once_each(ws: Workspace, tmp_path: Path) -> None:
    """The example app's 003 counts words in batches: every document's row is counted."""
    path = tmp_path / "docs.db"
    path.touch()
    docs = add_connected(ws, f"sqlite:///{path}", "writer")
    assert ws.runner().migrate(docs, to_version=2).ok
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:  # one batch of 2,500 documents, one engine
        conn.execute(
            sa.text("INSERT INTO documents (title, body) VALUES (:title, 'a b c')"),
            [{"title": f"t{n}"} for n in range(2_500)],
        )
    engine.dispose()
    labels = {"migration": "003_word_counts", "target_kind": "sqlite"}
    before = counted("byod_backfill_rows_total", **labels)
    assert ws.runner().migrate(docs).ok
    assert counted("byod_backfill_rows_total", **labels) - before == 2_500
