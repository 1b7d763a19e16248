"""The dashboard in a real headless Chromium (Debian's package) driven by Playwright."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright.sync_api import Page, sync_playwright

from byod.api import AuthSettings, HttpSettings, create_app
from byod.controlplane import RunStore
from byod.workspace import Workspace
from tests import gates
from tests.conftest import execute
from tests.helpers import add_connected
from tests.served import free_port
from tests.test_api import SECRET, token

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def served_fleet(cws: Workspace, tmp_path: Path) -> Iterator[str]:
    """Five users: three at head, one at 1, one failed at 003 (so at 2)."""
    for n in range(5):
        path = tmp_path / f"t{n}.db"
        path.touch()
        uid = add_connected(cws, f"sqlite:///{path}", f"tenant_{n}")
        if n == 3:
            assert cws.runner().migrate(uid, to_version=1).ok
            continue
        if n == 4:
            execute(f"sqlite:///{path}", "CREATE TABLE break_me (id INTEGER)")
        cws.runner().migrate(uid)
    cws.directory.add_user("ops")
    with _served(cws) as url:
        yield url


@contextlib.contextmanager
def _served(ws: Workspace, http: HttpSettings | None = None) -> Iterator[str]:
    """The app on ``ws``, served by uvicorn in a thread of this process."""
    port = free_port()
    app = create_app(ws, AuthSettings(secret=SECRET), http)
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_dashboard_shows_the_seeded_fleet(served_fleet: str, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is not installed: run `make test` (it installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page()
        refused: list[str] = []  # what the Content-Security-Policy blocked, if anything
        page.on("console", lambda message: refused.append(message.text))
        page.goto(f"{served_fleet}/dashboard")
        page.fill("#token", token("tenant_0"))  # not an operator
        page.click("#sign-in")
        assert "operators only" in page.inner_text("#sign-in-error")
        page.fill("#token", token("ops", admin=True))
        page.click("#sign-in")
        page.wait_for_selector("#versions-chart")
        bars = {
            bar.get_attribute("data-version"): bar.get_attribute("data-users")
            for bar in page.query_selector_all("#versions-chart rect.bar")
        }
        assert bars == {"1": "1", "2": "1", "3": "3"}
        assert page.inner_text("#users") == "6"  # five tenants and the operator
        assert "connected: 5" in page.inner_text("#connection")
        failures = page.inner_text("#failures")
        assert "tenant_4" in failures and "003_fragile" in failures
        assert "data breaks 003" in failures
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        # the inline style is allowed by its hash: the page is styled, nothing was refused
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(247, 248, 250)"
        page.click("#failures a")
        page.wait_for_selector("#history")
        assert "failed" in page.inner_text("#history")
        page.goto(f"{served_fleet}/dashboard")
        page.click("#sign-out")  # a POST form
        page.wait_for_selector("#sign-in")
        page.goto(f"{served_fleet}/dashboard")
        assert page.query_selector("#versions-chart") is None  # signed out for good
        assert not [text for text in refused if "Content Security Policy" in text], refused
        browser.close()
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


@pytest.fixture
def held_run_fleet(cws: Workspace, tmp_path: Path) -> Iterator[tuple[str, Workspace]]:
    """Four users whose 002 waits on the test's gate (tenant_3's data breaks 003), and an
    operator; the dashboard served in this process."""
    gates.reset()
    for n in range(4):
        path = tmp_path / f"r{n}.db"
        path.touch()
        add_connected(cws, f"sqlite:///{path}", f"tenant_{n}")
        execute(f"sqlite:///{path}", "CREATE TABLE hold_me (id INTEGER)")
        if n == 3:
            execute(f"sqlite:///{path}", "CREATE TABLE break_me (id INTEGER)")
    cws.directory.add_user("ops")
    with _served(cws) as url:
        try:
            yield url, cws
        finally:
            gates.release.set()  # before the server stops: no run left waiting


def test_a_runs_page_during_and_after_the_run_on_a_phone_sized_screen(
    held_run_fleet: tuple[str, Workspace], tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is not installed: run `make test` (it installs it)")
    url, ws = held_run_fleet
    ops = token("ops", admin=True)
    started = httpx.post(
        f"{url}/v1/fleet/runs",
        headers={"Authorization": f"Bearer {ops}"},
        json={"concurrency": 2},
        timeout=30,
    )
    assert started.status_code == 202, started.text
    run_id = started.json()["run_id"]
    assert gates.entered.wait(30)  # two users are inside 002, held
    shots = [tmp_path / "run-running.png", tmp_path / "run-ended.png"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 390, "height": 844})
        page.goto(f"{url}/dashboard")
        page.fill("#token", ops)
        page.click("#sign-in")
        page.wait_for_selector("#runs")
        page.click(f"#runs tr[data-run='{run_id}'] a")  # the fleet page links the run
        page.wait_for_selector("#progress-chart")
        assert page.inner_text("#state") == "running"
        assert page.query_selector("meta[http-equiv='refresh']") is not None
        assert page.inner_text("#started-by") == "ops (token)"
        assert "concurrency" in page.inner_text("#options")
        assert _no_sideways_scroll(page)
        page.screenshot(path=str(shots[0]), full_page=True)
        gates.release.set()
        store = RunStore(ws.engine)
        deadline = time.monotonic() + 60
        while store.get(run_id).ended_at is None:
            assert time.monotonic() < deadline, "the run did not end"
            time.sleep(0.2)
        page.goto(f"{url}/dashboard/runs/{run_id}")
        assert page.inner_text("#state") == "completed"
        assert (page.inner_text("#succeeded"), page.inner_text("#failed")) == ("3", "1")
        assert page.inner_text("#eta") == "ended"
        assert page.query_selector("meta[http-equiv='refresh']") is None
        chart = page.query_selector("#progress-chart")
        assert chart is not None and chart.get_attribute("data-users") == "4"
        steps = {
            row.get_attribute("data-migration"): row.inner_text()
            for row in page.query_selector_all("#steps tr.migration")
        }
        assert set(steps) == {"001_create", "002_bump", "003_fragile"}
        assert _no_sideways_scroll(page)
        page.screenshot(path=str(shots[1]), full_page=True)
        failure = page.query_selector("#failures a")
        assert failure is not None and "tenant_3" in failure.inner_text()
        failure.click()
        page.wait_for_selector("#history")
        assert "data breaks 003" in page.inner_text("#history")
        page.goto(f"{url}/dashboard")  # the rollout's shape: after the run, three at head
        segments = {
            (s.get_attribute("data-version"), s.get_attribute("data-users"))
            for s in page.query_selector_all(f"#versions-over-time rect[data-run='{run_id}']")
        }
        assert segments == {("3", "3"), ("2", "1")}
        assert _no_sideways_scroll(page)
        browser.close()
    assert all(shot.stat().st_size > 10_000 for shot in shots)
    keep = os.environ.get("BYOD_TEST_SCREENSHOTS")  # where the README's picture comes from
    if keep:
        shutil.copy(shots[1], Path(keep) / "dashboard-run.png")


def _no_sideways_scroll(page: Page) -> bool:
    width = page.evaluate("document.documentElement.scrollWidth")
    return bool(width <= 390)


@contextlib.contextmanager
def _static_page(folder: Path, html: str) -> Iterator[str]:
    """``html`` served as ``/`` by a plain HTTP server of its own (its own origin)."""
    folder.mkdir()
    (folder / "index.html").write_text(html)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(10)


def test_an_app_page_of_a_listed_origin_reads_the_api_from_the_browser(
    cws: Workspace, tmp_path: Path
) -> None:
    """What the README's React example does, in a real browser: a page of the app's origin
    (in BYOD_CORS_ORIGINS) calls /v1/me/instance with the user's token and reads the
    answer; a page of another origin is blocked by the browser."""
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is not installed: run `make test` (it installs it)")
    (tmp_path / "t.db").touch()
    add_connected(cws, f"sqlite:///{tmp_path / 't.db'}", "tenant_cors")
    page_html = (
        "<!doctype html><body><script>"
        "fetch(API + '/v1/me/instance', {headers: {Authorization: 'Bearer ' + TOKEN}})"
        ".then(r => r.json()).then(j => { document.body.dataset.result = j.clerk_id; })"
        ".catch(() => { document.body.dataset.result = 'blocked'; });"
        "</script></body>"
    )
    with (
        _static_page(tmp_path / "app", page_html) as app_origin,
        _static_page(tmp_path / "other", page_html) as other_origin,
        _served(cws, HttpSettings(cors_origins=(app_origin,))) as api,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        results = {}
        for origin in (app_origin, other_origin):
            page = browser.new_page()
            page.add_init_script(f"window.API = {api!r}; window.TOKEN = {token('tenant_cors')!r};")
            page.goto(origin)
            page.wait_for_function("document.body && document.body.dataset.result", timeout=15000)
            results[origin] = page.evaluate("document.body.dataset.result")
        browser.close()
    assert results == {app_origin: "tenant_cors", other_origin: "blocked"}
