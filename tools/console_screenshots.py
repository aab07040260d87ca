"""Screenshots of the web console for the docs: docs/console/<page>.png at 1280x800.

Starts a platform as the browser tests do (`budrt serve` in a temporary BUDRT_HOME, with the tiny
chat and embedding models), adds an hour of made-up usage plus a few real requests, teams, users
and keys, signs in as the admin through the form and photographs each page (the playground after
a streamed reply). Needs Debian's chromium (apt-get install chromium) and the test dependencies.

    .venv/bin/python tools/console_screenshots.py [--out docs/console]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.console_fixtures, run from anywhere

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from tests.console_fixtures import (  # noqa: E402
    CHAT_MODEL,
    EMBED_MODEL,
    REPLY_MS,
    VIEWPORT,
    WAIT_MS,
    ConsolePlatform,
    Watch,
    insert_usage,
    launch,
    running_platform,
    sign_in,
)

PAGES = ("overview", "models", "access", "usage", "playground")


def populate(platform: ConsolePlatform) -> None:
    """Teams, users and keys for the access page; usage for the charts."""
    if platform.home is not None:
        insert_usage(platform.home, [CHAT_MODEL["name"], CHAT_MODEL["name"], EMBED_MODEL["name"]])
    with platform.client() as admin:
        for team in ("research", "apps"):
            admin.post("/admin/teams", json={"name": team})
        admin.post("/admin/users", json={"name": "alice", "team": "research", "roles": ["developer"]})
        admin.post("/admin/users", json={"name": "bob", "team": "apps", "roles": ["viewer"]})
        for name, role in (("ci-pipeline", "developer"), ("dashboards", "viewer"), ("notebook", "developer")):
            admin.post("/admin/keys", json={"name": name, "role": role})
        texts = ["A cat sat on the mat.", "Dogs chase cats.", "Stock prices fell."]
        admin.post("/v1/embeddings", json={"model": EMBED_MODEL["name"], "input": texts})
    for content in ("Say hello.", "Name a colour.", "Count to three."):
        platform.chat(content=content, max_tokens=8)


def photograph(page, platform: ConsolePlatform, name: str, out: Path) -> None:  # noqa: ANN001
    page.goto(f"{platform.root_url}/console/{name}")
    page.wait_for_load_state("networkidle", timeout=WAIT_MS)
    if name in ("overview", "usage"):
        drawn = page.locator('.chart[data-points]:not([data-points="0"])').first
        drawn.wait_for(timeout=WAIT_MS)
    if name == "playground":
        page.fill("#chat-max-tokens", "48")
        page.fill("#chat-input", "In two sentences: what is a language model?")
        page.click("#chat-send")
        expect(page.locator(".msg.assistant.streaming")).to_have_count(0, timeout=REPLY_MS)
        expect(page.locator(".msg.assistant").last).not_to_be_empty(timeout=REPLY_MS)
    page.wait_for_timeout(300)  # the last frame of any transition
    page.screenshot(path=str(out / f"{name}.png"))
    print(f"wrote {out / f'{name}.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs/console")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="budrt-console-shots-")
    with tmp, running_platform(Path(tmp.name), [CHAT_MODEL, EMBED_MODEL]) as platform:
        platform.chat()  # the model loaded before the clock starts on any page
        populate(platform)
        watch = Watch()
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page(viewport=VIEWPORT)
            watch.attach(page)
            sign_in(page, platform.root_url, platform.admin_key)
            for name in PAGES:
                photograph(page, platform, name, args.out)
            browser.close()
        if watch.csp_violations or watch.page_errors:
            sys.exit(f"the pages reported errors: {watch.csp_violations + watch.page_errors}")


if __name__ == "__main__":
    main()
