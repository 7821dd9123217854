"""The dashboard at `/`: its page and files (token-free, strict CSP, no inline script), the two
routes it reads besides queues and portals (`/api/failures`, `/api/throughput`), and the page
itself in a real headless Chromium (Debian's chromium and chromedriver; skipped without them):
the login prompt, a queue the test created, an update when more actions arrive, pause through
its button. A realistic state is rendered and photographed too: with
THROTTLED_DASHBOARD_SCREENSHOT=docs/dashboard.png the picture in README.md is remade."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import Daemon, action_payload, wait_for
from throttled.hubspot.fake import FakeHubSpot
from throttled.web import dashboard

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # (in the dev extras)
    webdriver = None

TOKEN = "dashboard-admin-token-0123456789abcdef"
ADMIN = {"admin": {"tokens": [{"id": "ops", "token": TOKEN}]}}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UNCONNECTED = 777  # a portal never connected: its actions wait
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SHOT = os.environ.get("THROTTLED_DASHBOARD_SCREENSHOT")


async def call(daemon: Daemon, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    headers = kw.pop("headers", AUTH)
    async with daemon.session.request(method, daemon.url + path, headers=headers, **kw) as resp:
        return resp.status, await resp.json()


async def enqueue(daemon: Daemon, n: int, portal: int, fields: dict[str, str]) -> list[str]:
    ids = []
    for _ in range(n):
        payload = action_payload(portal_id=portal, input_fields=fields)
        status, body = await daemon.post_action(payload)
        assert status == 200, body
        ids.append(payload["callbackId"])
    return ids


async def only_queue(daemon: Daemon, portal: int) -> dict[str, Any]:
    status, page = await call(daemon, "GET", f"/api/queues?portal_id={portal}")
    assert status == 200, page
    (queue,) = page["queues"]
    return queue


# -- the page and its files, over HTTP -------------------------------------------------------


async def test_the_page_is_token_free_with_a_strict_csp_and_no_inline_script(daemon_factory):
    async with daemon_factory(**ADMIN) as daemon, daemon.session.get(daemon.url + "/") as resp:
        html = await resp.text()
        assert (resp.status, resp.content_type, resp.charset) == (200, "text/html", "utf-8")
        csp = resp.headers["Content-Security-Policy"]
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["form-action"] == "'none'"
    assert "unsafe" not in csp
    # every script from a file of its own, no inline handler or style, nothing from elsewhere
    assert re.findall(r"<script\b[^>]*>", html) == [
        '<script src="/static/vendor/uPlot.iife.min.js" defer>',
        '<script src="/static/dashboard.js" defer>',
    ]
    assert not re.search(r"\son[a-z]+=|\sstyle=|<style", html)
    assert not re.search(r"(src|href)=\"(?!/static/)", html)


@pytest.mark.parametrize(
    ("path", "content_type", "cache"),
    [
        ("/static/dashboard.js", "text/javascript", dashboard.NO_CACHE),
        ("/static/dashboard.css", "text/css", dashboard.NO_CACHE),
        ("/static/favicon.svg", "image/svg+xml", dashboard.NO_CACHE),
        ("/static/vendor/uPlot.iife.min.js", "text/javascript", dashboard.VENDOR_CACHE),
        ("/static/vendor/uPlot.min.css", "text/css", dashboard.VENDOR_CACHE),
    ],
)
async def test_each_file_is_served_with_its_type_and_cache_policy(
    daemon_factory, path, content_type, cache
):
    async with daemon_factory() as daemon:
        for method in ("GET", "HEAD"):
            async with daemon.session.request(method, daemon.url + path) as resp:
                body = await resp.read()
                assert (resp.status, resp.content_type) == (200, content_type), method
                assert resp.headers["Cache-Control"] == cache
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
                assert (len(body) > 100) == (method == "GET")


@pytest.mark.parametrize(
    "path",
    [
        "/static/index.html",  # (only at /, with its CSP)
        "/static/nope.js",
        "/static/vendor/uPlot.LICENSE",  # (kept beside the library, not served)
        "/static/vendor",
        "/static/..%2Fdashboard.py",
        "/static/vendor/..%2F..%2Fapp.py",
    ],
)
async def test_anything_else_under_static_is_a_json_404(daemon_factory, path):
    async with daemon_factory() as daemon, daemon.session.get(daemon.url + path) as resp:
        assert (resp.status, resp.content_type) == (404, "application/json")
        assert (await resp.json())["error"] == "not_found"


def test_the_vendored_chart_library_keeps_its_licence_beside_it():
    vendor = Path(dashboard.__file__).parent / "static" / "vendor"
    assert "MIT License" in (vendor / "uPlot.LICENSE").read_text()
    assert (vendor / "uPlot.iife.min.js").read_text().startswith("/*! https://github.com/leeoniya")


# -- the data routes -------------------------------------------------------------------------


def add_finished(
    db_url: str, queue_id: int, portal: int, rows: list[tuple[str, str | None, float]]
) -> None:
    """Finished rows: (state, last_error, minutes ago) each."""
    with psycopg.connect(db_url) as conn:
        for n, (state, last_error, ago) in enumerate(rows):
            conn.execute(
                "INSERT INTO actions (callback_id, queue_id, portal_id, deadline, state,"
                " last_error, completed_at) VALUES (%s, %s, %s, now() + interval '1 day', %s,"
                " %s, now() - %s * interval '1 minute')",
                (
                    f"ap-{portal}-{queue_id}{n}{ago:03.0f}-0",
                    queue_id,
                    portal,
                    state,
                    last_error,
                    ago,
                ),
            )


async def test_failures_are_the_latest_failed_or_expired_actions_newest_first(
    daemon_factory, db_url
):
    async with daemon_factory(**ADMIN) as daemon:
        await enqueue(daemon, 1, UNCONNECTED, {})
        queue = await only_queue(daemon, UNCONNECTED)
        rows = [
            ("failed", "HubSpot answered 400", 30),
            ("done", None, 1),
            ("expired", "the block expired", 5),
            ("failed", "<script>alert(1)</script>", 10),
        ]
        add_finished(db_url, queue["id"], UNCONNECTED, rows)
        status, body = await call(daemon, "GET", "/api/failures?limit=2")
        assert status == 200, body
        assert [(f["state"], f["last_error"]) for f in body["failures"]] == [
            ("expired", "the block expired"),
            ("failed", "<script>alert(1)</script>"),
        ]
        first = body["failures"][0]
        assert (first["queue_id"], first["queue_key"]) == (queue["id"], queue["key"])
        assert first["portal_id"] == UNCONNECTED
        status, body = await call(daemon, "GET", "/api/failures")
        assert len(body["failures"]) == 3
        for bad in ("0", "201", "x", "-1", "1.5", ""):
            status, body = await call(daemon, "GET", f"/api/failures?limit={bad}")
            assert (status, body["error"], body["field"]) == (400, "invalid_limit", "limit"), bad
        status, _ = await call(daemon, "GET", "/api/failures", headers={})
        assert status == 401


async def test_throughput_counts_completions_per_minute_and_done_per_queue(daemon_factory, db_url):
    async with daemon_factory(**ADMIN) as daemon:
        await enqueue(daemon, 1, UNCONNECTED, {})
        queue = await only_queue(daemon, UNCONNECTED)
        rows = [("done", None, 0), ("done", None, 0), ("failed", "x", 0), ("done", None, 3)]
        rows += [("expired", "x", 3), ("done", None, 90)]  # (the last one is out of the hour)
        add_finished(db_url, queue["id"], UNCONNECTED, rows)
        status, body = await call(daemon, "GET", "/api/throughput")
        assert status == 200, body
        points = body["points"]
        assert (body["minutes"], len(points)) == (60, 60)
        assert all(b["t"] - a["t"] == 60 for a, b in itertools.pairwise(points))
        assert points[-1]["t"] % 60 == 0
        # (a row made "0 minutes ago" may fall in the minute before, at a minute's turn)
        totals = {k: sum(p[k] for p in points) for k in ("done", "failed", "expired")}
        assert totals == {"done": 3, "failed": 1, "expired": 1}
        assert sum(p["done"] for p in points[-5:]) == 3
        assert body["done_by_queue"] == [{"queue_id": queue["id"], "done": 3}]
        status, body = await call(daemon, "GET", "/api/throughput?minutes=120")
        assert sum(p["done"] for p in body["points"]) == 4
        status, body = await call(daemon, "GET", "/api/throughput?minutes=1441")
        assert (status, body["error"]) == (400, "invalid_minutes")


# -- the page in a browser -------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Debian's headless Chromium through its chromedriver (selenium downloads nothing)."""
    if webdriver is None:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "chromium and chromedriver are needed: apt-get install chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    options.add_argument("--force-device-scale-factor=1")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")  # (selenium-manager: no download, ever)
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The dashboard in the browser. Selenium blocks: each step runs in a thread, so that the
    daemon (in this event loop) answers the page meanwhile."""

    def __init__(self, driver: WebDriver, url: str) -> None:
        self.driver = driver
        self.url = url

    async def run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def open(self) -> None:
        await self.run(self.driver.get_log, "browser")  # (what earlier tests left there)
        await self.run(self.driver.get, self.url + "/")

    async def until(self, condition: Any, timeout: float = 15.0) -> Any:
        """Wait for condition(driver) to be truthy (the page refreshes every 5 s)."""

        def wait() -> Any:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(condition)

        return await self.run(wait)

    async def shown(self, element_id: str) -> bool:
        return bool(
            await self.run(lambda: self.driver.find_element(By.ID, element_id).is_displayed())
        )

    async def text(self, css: str) -> str | None:
        """An element's text, read at once (the page replaces its rows on each refresh)."""
        return await self.script(_TEXT, css)

    async def click(self, css: str) -> None:
        """Click an element, found again if a refresh replaced it meanwhile."""

        def click() -> None:
            for _ in range(5):
                try:
                    self.driver.find_element(By.CSS_SELECTOR, css).click()
                    return
                except StaleElementReferenceException:
                    continue
            raise AssertionError(f"{css} kept being replaced")

        await self.run(click)

    async def sign_in(self, token: str) -> None:
        await self.until(lambda d: d.find_element(By.ID, "token").is_displayed())

        def type_it() -> None:
            self.driver.find_element(By.ID, "token").send_keys(token)
            self.driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()

        await self.run(type_it)

    async def script(self, source: str, *args: Any) -> Any:
        return await self.run(self.driver.execute_script, source, *args)

    async def errors(self) -> list[str]:
        """What the page logged at SEVERE since last asked (CSP violations, script errors)."""
        logs = await self.run(self.driver.get_log, "browser")
        return [entry["message"] for entry in logs if entry["level"] == "SEVERE"]


_TEXT = "const e = document.querySelector(arguments[0]); return e && e.innerText;"
_CELL = """const row = document.querySelector(arguments[0]);
return row && row.querySelectorAll("th, td")[arguments[1] - 1].innerText;"""
_STATE = "const row = document.querySelector(arguments[0]); return row && row.dataset.state;"


def cell(row_css: str, column: int) -> Any:
    """The text of a row's cell (1-based), or None while the row is not there."""
    return lambda driver: driver.execute_script(_CELL, row_css, column)


def state(row_css: str) -> Any:
    """A queue row's state, or None while the row is not there."""
    return lambda driver: driver.execute_script(_STATE, row_css)


async def test_without_a_token_the_page_shows_the_login_prompt(daemon_factory, browser):
    async with daemon_factory(**ADMIN) as daemon:
        page = Page(browser, daemon.url)
        await page.open()
        await page.until(lambda d: d.find_element(By.ID, "login").is_displayed())
        assert not await page.shown("dashboard")
        assert await page.text("label[for=token]") == "Admin token"
        assert await page.text("#status") == "Not signed in"
        assert await page.errors() == []
        # a wrong token: back to the prompt, saying why, the token forgotten
        await page.sign_in("not-the-admin-token-0000")
        await page.until(lambda d: "not valid" in d.find_element(By.ID, "login-error").text)
        assert not await page.shown("dashboard")
        assert await page.script("return sessionStorage.getItem('throttled.adminToken')") is None


async def test_the_page_shows_a_queue_updates_and_pauses_it(daemon_factory, browser):
    async with daemon_factory(**ADMIN) as daemon:
        fields = {"maxThroughput": "10", "timeUnit": "minutes"}
        await enqueue(daemon, 3, UNCONNECTED, fields)
        queue = await only_queue(daemon, UNCONNECTED)
        row = f'#queues tr[data-queue-id="{queue["id"]}"]'
        page = Page(browser, daemon.url)
        await page.open()
        await page.sign_in(TOKEN)
        assert await page.until(lambda d: cell(row, 3)(d) == "3")
        assert (await page.text(row + " th code")) == queue["key"]
        assert "10 per 1 minute" in await page.text(row + " td:nth-of-type(3)")
        assert "input fields" in await page.text(row + " td:nth-of-type(3)")
        assert "waits for the portal's connection" in await page.text(row + " td:nth-of-type(5)")
        assert await page.shown("dashboard")
        assert not await page.shown("login")
        # the token: in this tab's sessionStorage, never in the URL
        assert await page.run(lambda: browser.current_url) == daemon.url + "/"
        assert await page.script("return sessionStorage.getItem('throttled.adminToken')") == TOKEN
        assert await page.text("#portals tbody") != ""
        await page.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chart .uplot canvas"))

        await enqueue(daemon, 2, UNCONNECTED, fields)  # the page refreshes itself
        assert await page.until(lambda d: cell(row, 3)(d) == "5")

        button = row + " button"
        assert await page.text(button) == "Pause"
        await page.click(button)
        await page.until(lambda d: state(row)(d) == "paused")
        assert await page.text(button) == "Resume"
        status, shown = await call(daemon, "GET", f"/api/queues/{queue['id']}")
        assert (status, shown["paused"], shown["state"]) == (200, True, "paused")

        await page.run(browser.refresh)  # (still signed in: the tab keeps its token)
        await page.until(lambda d: (cell(row, 2)(d) or "").startswith("paused"))  # (at risk)
        await page.click(button)
        await page.until(lambda d: state(row)(d) == "draining")
        assert await page.text(button) == "Pause"
        status, shown = await call(daemon, "GET", f"/api/queues/{queue['id']}")
        assert shown["paused"] is False
        assert await page.errors() == []  # no CSP violation, no script error

        await page.click("#logout")
        await page.until(lambda d: d.find_element(By.ID, "login").is_displayed())
        assert await page.script("return sessionStorage.getItem('throttled.adminToken')") is None


async def test_values_from_the_api_are_shown_as_text(daemon_factory, db_url, browser):
    name = '<img src=x onerror="document.title=1">'
    async with daemon_factory(**ADMIN) as daemon:
        await enqueue(daemon, 1, UNCONNECTED, {"queueName": name})
        queue = await only_queue(daemon, UNCONNECTED)
        add_finished(
            db_url,
            queue["id"],
            UNCONNECTED,
            [("failed", "<b>bold</b>", 1)],
        )
        page = Page(browser, daemon.url)
        await page.open()
        await page.sign_in(TOKEN)
        row = f'#queues tr[data-queue-id="{queue["id"]}"]'
        await page.until(lambda d: cell(row, 1)(d))
        assert name in await page.text(row + " th code")
        await page.until(lambda d: "<b>bold</b>" in d.find_element(By.ID, "failures").text)
        assert await page.script("return document.querySelectorAll('main img, main b').length") == 0
        assert await page.script("return document.title") == "throttled"


# -- a realistic state, photographed ---------------------------------------------------------


def whole_page(driver: WebDriver) -> bytes:
    """A PNG of the whole page, below the window's height too (Chromium's DevTools)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    return base64.b64decode(shot["data"])


def add_history(db_url: str, queues: list[int], portal: int) -> None:
    """An hour of completions behind these queues (a gentle wave), and a few failures."""
    with psycopg.connect(db_url) as conn:
        for minute in range(1, 60):
            for k, queue_id in enumerate(queues):
                n = int(18 + 10 * math.sin(minute / 7 + k) + (minute * 7 + k * 3) % 5)
                conn.execute(
                    "INSERT INTO actions (callback_id, queue_id, portal_id, deadline, state,"
                    " completed_at) SELECT 'hist-' || %s || '-' || %s || '-' || g, %s, %s,"
                    " now() + interval '1 day', 'done', now() - %s * interval '1 minute'"
                    " + g * interval '1 second' FROM generate_series(1, %s) g",
                    (queue_id, minute, queue_id, portal, minute, n),
                )
    failures = [
        ("failed", "HubSpot answered 400: callback 'ap-62515-81' was already completed", 4),
        ("expired", "the block expired (P7D) before the queue reached it", 12),
        ("failed", "HubSpot answered 403: the app is not installed in portal 62515", 38),
    ]
    add_finished(db_url, queues[0], portal, failures)


@pytest.mark.slow
async def test_a_realistic_state_renders_and_is_photographed(
    daemon_factory, db_url, browser, fake_hubspot: FakeHubSpot, tmp_path
):
    async with daemon_factory(**ADMIN) as daemon:
        for portal in (62515, 62516):
            await daemon.connect_portal(fake_hubspot, portal)
        plans = [
            (
                62515,
                40,
                {"queueName": "contacts-sync", "maxThroughput": "15", "timeUnit": "minutes"},
            ),
            (
                62516,
                60,
                {"queueName": "deal-enrichment", "maxThroughput": "25", "timeUnit": "hours"},
            ),
            (
                62515,
                25,
                {"queueName": "nightly-import", "maxThroughput": "5", "timeUnit": "minutes"},
            ),
            (UNCONNECTED, 8, {"queueName": "legacy-webhooks"}),
        ]
        for portal, n, fields in plans:
            await enqueue(daemon, n, portal, fields)
        status, page_body = await call(daemon, "GET", "/api/queues?sort=id")
        ids = {q["key"].rpartition(":")[2]: q["id"] for q in page_body["queues"]}
        status, _ = await call(daemon, "POST", f"/api/queues/{ids['nightly-import']}/pause")
        assert status == 200
        add_history(db_url, [ids["contacts-sync"], ids["deal-enrichment"]], 62515)
        await wait_for(lambda: len(fake_hubspot.completed) >= 3)

        page = Page(browser, daemon.url)
        await page.open()
        await page.sign_in(TOKEN)
        await page.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#queues tbody tr")) == 4)
        await page.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chart .uplot canvas"))
        await page.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#failures tbody tr")) == 3)
        states = await page.script(
            "return [...document.querySelectorAll('#queues tbody tr')].map(r => r.dataset.state)"
        )
        assert sorted(states) == ["draining", "draining", "draining", "paused"]
        assert await page.errors() == []
        target = Path(SHOT) if SHOT else tmp_path / "dashboard.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(await page.run(whole_page, browser))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with contextlib.suppress(ValueError):
        print("screenshot:", target.relative_to(Path.cwd()))
