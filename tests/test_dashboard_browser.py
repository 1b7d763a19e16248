"""The dashboard in a real headless Chromium (Debian's package) driven by Playwright."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from playwright.sync_api import sync_playwright

from byod.api import AuthSettings, create_app
from byod.workspace import Workspace
from tests.conftest import execute
from tests.helpers import add_connected
from tests.test_api import SECRET, token

CHROMIUM = Path("/usr/bin/chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(cws, AuthSettings(secret=SECRET)), port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
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
