"""The web console in a real browser (Debian's chromium through Playwright) against a real
platform (`budrt serve` with the tiny chat model): signing in, a key made (its secret shown once)
and revoked, a chat reply streamed in the playground, charts drawn from usage, a viewer refused
an admin action, a key named like markup shown as text, and no page breaking the CSP."""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from budrt.gateway.console.app import PAGES
from tests.console_fixtures import (
    CHAT_MODEL,
    CHROMIUM,
    REPLY_MS,
    VIEWPORT,
    WAIT_MS,
    ConsolePlatform,
    Watch,
    launch,
    running_platform,
    sign_in,
    stray_text,
)
from tests.procs import require_part

require_part(
    shutil.which("chromium") is not None or shutil.which(CHROMIUM) is not None,
    "the console's browser tests need Debian's chromium: apt-get install chromium",
)
sync_api = pytest.importorskip("playwright.sync_api")

XSS_NAME = "<img src=x onerror=alert(1)>"
PAGE_NAMES = [name for name, _ in PAGES]
ADMIN_CONTROLS = {"access": "#create-key", "models": "button[data-action]"}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsolePlatform]:
    with running_platform(tmp_path_factory.mktemp("console-platform")) as p:
        p.chat()  # the model loaded, and usage for the charts
        yield p


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def watch() -> Watch:
    return Watch()


@pytest.fixture
def page(browser: Any, watch: Watch) -> Iterator[Any]:
    """A fresh browser context (no cookies) whose page is watched; no test may leave a CSP
    violation, an uncaught exception or a dialog behind."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(WAIT_MS)
    p = context.new_page()
    watch.attach(p)
    yield p
    context.close()
    assert not watch.csp_violations, watch.csp_violations
    assert not watch.page_errors, watch.page_errors
    assert not watch.dialogs, watch.dialogs


def _csrf(page: Any) -> str:
    return page.locator('meta[name="csrf-token"]').get_attribute("content")


def _fetch(page: Any, path: str, method: str = "GET", body: Any = None) -> dict[str, Any]:
    """A request made by the page itself (its cookie, its CSRF token): what a script could do."""
    return page.evaluate(
        """async ([path, method, body, csrf]) => {
            const init = {method, headers: {"x-csrf-token": csrf, "content-type": "application/json"}};
            if (body !== null) init.body = JSON.stringify(body);
            const r = await fetch(path, init);
            return {status: r.status, body: await r.text()};
        }""",
        [path, method, body, _csrf(page)],
    )


def test_sign_in_through_the_form(page: Any, platform: ConsolePlatform) -> None:
    if platform.log_path is not None:  # `budrt serve` says where the console is, once ready
        deadline = time.monotonic() + 30
        while f"console: {platform.root_url}/console" not in platform.log_tail(400):
            assert time.monotonic() < deadline, platform.log_tail()
            time.sleep(0.2)
    page.goto(f"{platform.root_url}/console/overview")
    page.wait_for_url("**/console/login")
    page.fill("#api_key", "budrt-not-a-real-key-000000000000000000")
    page.click("button[type=submit]")
    sync_api.expect(page.locator(".error")).to_contain_text("not valid")
    sign_in(page, platform.root_url, platform.admin_key)
    sync_api.expect(page.locator("header .who .roles")).to_contain_text("admin")
    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["budrt_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # nothing a script could read
    page.click("header .who button[type=submit]")  # sign out
    page.wait_for_url("**/console/login")
    page.goto(f"{platform.root_url}/console/access")
    page.wait_for_url("**/console/login")


def test_create_a_key_shown_once_and_revoke_it(page: Any, platform: ConsolePlatform) -> None:
    name = f"browser-{uuid.uuid4().hex[:8]}"
    sign_in(page, platform.root_url, platform.admin_key)
    page.goto(f"{platform.root_url}/console/access")
    form = page.locator("#create-key")
    form.locator('input[name="name"]').fill(name)
    form.locator('[name="role"]').select_option("viewer")
    form.locator("button[type=submit]").click()
    secret = page.locator("#new-key-secret")
    sync_api.expect(secret).to_have_text(re.compile(r"^budrt-\S{20,}$"))
    key = secret.inner_text()
    with platform.client(key) as client:
        assert client.get("/v1/models").status_code == 200
    with platform.client() as admin:
        made = next(k for k in admin.get("/admin/keys").json()["data"] if k["name"] == name)
    assert made["role"] == "viewer"
    row = page.locator(f'tr[data-key-id="{made["id"]}"]')
    sync_api.expect(row).to_contain_text(name)

    page.reload()  # shown once: not on the page again, nor anywhere in it
    sync_api.expect(row).to_contain_text(name)
    assert page.locator("#new-key-secret").count() == 0
    assert key not in page.content()

    row.locator("button.revoke").click()
    row.locator("button.confirm-revoke").click()
    sync_api.expect(row).to_contain_text("revoked")
    with platform.client() as admin:
        listed = {k["id"]: k for k in admin.get("/admin/keys").json()["data"]}
    assert listed[made["id"]]["revoked_at"] is not None
    _refused_soon(platform, key)


def _refused_soon(platform: ConsolePlatform, key: str) -> None:
    """The revoked key stops working within the auth cache's lifetime (1 s by default)."""
    deadline = time.monotonic() + 10
    with platform.client(key, timeout=10) as client:
        while client.get("/v1/models").status_code != 401:
            assert time.monotonic() < deadline, "the revoked key still works"
            time.sleep(0.1)


def test_playground_streams_a_chat_reply(page: Any, platform: ConsolePlatform) -> None:
    sign_in(page, platform.root_url, platform.admin_key)
    page.goto(f"{platform.root_url}/console/playground")
    sync_api.expect(page.locator("#chat-model option").first).to_be_attached()
    page.fill("#chat-max-tokens", "8")
    page.fill("#chat-input", "Say hello in one word.")
    sync_api.expect(page.locator("#snippet-curl")).to_contain_text("/v1/chat/completions")
    sync_api.expect(page.locator("#snippet-python")).to_contain_text("openai")
    assert "BUDRT_API_KEY" in page.locator("#snippet-curl").inner_text()
    with page.expect_request(re.compile(r"/v1/chat/completions$")) as sent:
        page.click("#chat-send")
    assert sent.value.post_data_json["stream"] is True
    reply = page.locator(".msg.assistant").last
    sync_api.expect(reply).to_have_text(re.compile(r"\S"), timeout=REPLY_MS)
    sync_api.expect(page.locator(".msg.assistant.streaming")).to_have_count(0, timeout=REPLY_MS)
    assert page.locator(".msg.user").last.inner_text().strip().endswith("Say hello in one word.")
    assert stray_text(page) == []


@pytest.mark.parametrize("where", ["overview", "usage"])
def test_usage_charts_have_points(page: Any, platform: ConsolePlatform, where: str) -> None:
    sign_in(page, platform.root_url, platform.admin_key)
    page.goto(f"{platform.root_url}/console/{where}")
    drawn = page.locator('.chart[data-metric="requests"][data-points]:not([data-points="0"])')
    sync_api.expect(drawn).to_have_count(1)
    assert int(drawn.get_attribute("data-points")) > 0
    assert drawn.locator("canvas").count() >= 1  # uPlot drew it


def test_a_viewer_is_refused_admin_actions(page: Any, platform: ConsolePlatform) -> None:
    viewer = platform.create_key(f"viewer-{uuid.uuid4().hex[:6]}", "viewer")
    sign_in(page, platform.root_url, viewer["key"])
    sync_api.expect(page.locator("header .who .roles")).to_have_text("viewer")
    page.goto(f"{platform.root_url}/console/access")
    page.wait_for_load_state("networkidle", timeout=WAIT_MS)
    assert page.locator("#create-key").count() == 0
    assert page.locator("button.revoke").count() == 0
    forced = _fetch(page, "/admin/keys", "POST", {"name": "viewer-made", "role": "admin"})
    assert forced["status"] == 403, forced
    assert _fetch(page, f"/admin/keys/{viewer['id']}", "DELETE")["status"] == 403
    page.goto(f"{platform.root_url}/console/models")
    sync_api.expect(page.locator("main")).to_contain_text(CHAT_MODEL["name"])
    assert page.locator("button[data-action]").count() == 0  # no load / unload / pin
    load = f"/admin/replicas/models/{CHAT_MODEL['name']}/load"
    assert _fetch(page, load, "POST", {})["status"] == 403
    with platform.client() as admin:
        assert "viewer-made" not in {k["name"] for k in admin.get("/admin/keys").json()["data"]}


def test_a_key_named_like_markup_is_shown_as_text(page: Any, platform: ConsolePlatform, watch: Watch) -> None:
    made = platform.create_key(XSS_NAME, "developer")
    platform.chat(made["key"], max_tokens=1)  # usage under its name
    # Signed in as that key: its name is in the header.
    sign_in(page, platform.root_url, made["key"])
    sync_api.expect(page.locator("header .who .name")).to_have_text(XSS_NAME)
    # An admin's lists name it too.
    page.context.clear_cookies()
    sign_in(page, platform.root_url, platform.admin_key)
    page.goto(f"{platform.root_url}/console/access")
    row = page.locator(f'tr[data-key-id="{made["id"]}"]')
    sync_api.expect(row.get_by_text(XSS_NAME, exact=True)).to_be_visible()
    page.goto(f"{platform.root_url}/console/usage")
    page.select_option("#group-by", "key")
    page.wait_for_load_state("networkidle", timeout=WAIT_MS)
    for where in ("overview", "access", "usage"):
        if where != "usage":
            page.goto(f"{platform.root_url}/console/{where}")
            page.wait_for_load_state("networkidle", timeout=WAIT_MS)
        assert page.locator('img[src="x"]').count() == 0, where
    page.wait_for_timeout(300)  # an image error handler would have fired by now
    assert watch.dialogs == []


def test_every_page_loads_cleanly(page: Any, platform: ConsolePlatform, watch: Watch) -> None:
    page.goto(f"{platform.root_url}/console/login")
    sign_in(page, platform.root_url, platform.admin_key)
    for name in PAGE_NAMES:
        page.goto(f"{platform.root_url}/console/{name}")
        page.wait_for_load_state("networkidle", timeout=WAIT_MS)
        assert page.locator("#error").is_hidden(), (name, page.locator("#error").inner_text())
        assert stray_text(page) == [], name
        if name in ADMIN_CONTROLS:  # what a viewer must not see is there for an admin
            sync_api.expect(page.locator(ADMIN_CONTROLS[name]).first).to_be_visible()
    page.goto(f"{platform.root_url}/console/no-such-page")
    assert watch.csp_violations == []
    assert [e for e in watch.errors if "404" not in e] == [], watch.errors
