"""A real platform and a real browser for the web console's browser tests
(tests/test_console_browser.py) and its screenshots (tools/console_screenshots.py): `budrt serve`
with the tiny chat model, and Debian's chromium driven by Playwright."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.e2e.conftest import ADMIN_KEY, BUDRT, PLATFORM_CONFIG, free_port

CHROMIUM = "/usr/bin/chromium"
CHAT_MODEL = next(m for m in PLATFORM_CONFIG["models"] if m["task"] == "chat")
EMBED_MODEL = next(m for m in PLATFORM_CONFIG["models"] if m["task"] == "embedding")
VIEWPORT = {"width": 1280, "height": 800}
WAIT_MS = 15_000  # any one wait for the page; a streamed reply gets REPLY_MS
REPLY_MS = 90_000  # a busy 2-core machine shares its cores with the model server


@dataclass
class ConsolePlatform:
    root_url: str
    home: Path | None  # None: a platform this process did not start
    admin_key: str
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def client(self, key: str | None = None, timeout: float = 120) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        return httpx.Client(base_url=self.root_url, headers=headers, timeout=timeout)

    def create_key(self, name: str, role: str) -> dict[str, Any]:
        """A new key through the admin API: its record, with the secret under "key"."""
        with self.client() as admin:
            r = admin.post("/admin/keys", json={"name": name, "role": role})
            r.raise_for_status()
            return r.json()

    def chat(self, key: str | None = None, content: str = "Say hello.", max_tokens: int = 4) -> None:
        body = {
            "model": CHAT_MODEL["name"],
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}],
        }
        with self.client(key) as c:
            c.post("/v1/chat/completions", json=body).raise_for_status()

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None:
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def running_platform(
    home: Path, models: list[dict[str, Any]] | None = None, ready_timeout_s: float = 300
) -> Iterator[ConsolePlatform]:
    """`budrt serve` with `models` (default: the tiny chat model) on a free port; stopped on exit.

    BUDRT_TEST_CONSOLE_URL (with BUDRT_TEST_CONSOLE_ADMIN_KEY) points at a platform already
    running instead, e.g. to rerun the browser tests without waiting for the model server."""
    given = os.environ.get("BUDRT_TEST_CONSOLE_URL")
    if given:
        yield ConsolePlatform(
            given.rstrip("/"), None, os.environ.get("BUDRT_TEST_CONSOLE_ADMIN_KEY", ADMIN_KEY)
        )
        return
    config = home / "config.yaml"
    config.write_text(yaml.safe_dump({"models": models or [CHAT_MODEL]}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDRT_")}
    env.update({"BUDRT_ADMIN_KEY": ADMIN_KEY, "HF_HUB_OFFLINE": "1"})
    log_path = home / "serve.log"
    with log_path.open("wb") as log:  # the child keeps its own copy
        proc = subprocess.Popen(
            [BUDRT, "serve", "--home", str(home), "--port", str(port), "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    platform = ConsolePlatform(f"http://127.0.0.1:{port}", home, ADMIN_KEY, proc, log_path)
    try:
        _wait_ready(platform, ready_timeout_s)
        yield platform
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(platform: ConsolePlatform, timeout_s: float) -> None:
    assert platform.proc is not None
    deadline = time.monotonic() + timeout_s
    while True:
        if platform.proc.poll() is not None:
            raise RuntimeError(f"budrt serve exited ({platform.proc.returncode}):\n{platform.log_tail()}")
        try:
            if httpx.get(f"{platform.root_url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"budrt serve not ready in {timeout_s:.0f} s:\n{platform.log_tail()}")
        time.sleep(0.5)


def insert_usage(home: Path, models: list[str], minutes: int = 60, per_minute: int = 6) -> int:
    """Made-up usage records over the last `minutes` for `models` and the admin key (id 1),
    written straight into the platform's database (for charts with a shape); returns how many."""
    from budrt.config import Settings
    from budrt.store.database import Database
    from budrt.store.usage import Usage, UsageStore

    db = Database.from_settings(Settings(home=home))
    rng, now = random.Random(20), datetime.now(UTC)
    records = []
    for minute in range(minutes, 0, -1):
        for _ in range(rng.randint(per_minute // 2, per_minute * 2)):
            latency = rng.lognormvariate(5.5, 0.4)
            records.append(
                Usage(
                    at=now - timedelta(minutes=minute, seconds=rng.uniform(0, 59)),
                    key_id=1,
                    user=rng.choice(["alice", "bob", None]),
                    team=rng.choice(["research", "apps"]),
                    model=(model := rng.choice(models)),
                    endpoint="/v1/embeddings" if "minilm" in model else "/v1/chat/completions",
                    prompt_tokens=rng.randint(20, 400),
                    completion_tokens=rng.randint(10, 200),
                    latency_ms=latency,
                    status=429 if rng.random() < 0.03 else 200,
                    cache_hit=False,
                    request_id=f"demo-{uuid.uuid4().hex}",
                    ttft_ms=latency * rng.uniform(0.1, 0.3),
                )
            )
    try:
        UsageStore(db).insert(records)
    finally:
        db.dispose()
    return len(records)


# -- the browser --


@dataclass
class Watch:
    """What a page reported that a test must not see: CSP violations and other console errors,
    uncaught exceptions, and dialogs (an injected `alert` would open one)."""

    errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on("dialog", self._dialog)

    def _console(self, message: Any) -> None:
        if message.type == "error" or "Content Security Policy" in message.text:
            self.errors.append(message.text)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    @property
    def csp_violations(self) -> list[str]:
        return [e for e in self.errors if "Content Security Policy" in e or "Refused to" in e]


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])


def sign_in(page: Any, root_url: str, key: str) -> None:
    """Through the sign-in form, as a person would; ends on the overview page."""
    page.goto(f"{root_url}/console/login", timeout=WAIT_MS)
    page.fill("#api_key", key, timeout=WAIT_MS)
    page.click("button[type=submit]", timeout=WAIT_MS)
    page.wait_for_url("**/console/overview", timeout=WAIT_MS)


# Text nodes that mean a script wrote a missing value into the page.
_STRAY_TEXT = """() => {
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    const found = [];
    for (let n = walker.nextNode(); n; n = walker.nextNode()) {
        const text = n.textContent.trim();
        if (/^(null|undefined|NaN|\\[object Object\\])$/.test(text)) {
            const where = n.parentElement;
            found.push(`${where.tagName.toLowerCase()}${where.id ? "#" + where.id : ""}: ${text}`);
        }
    }
    return found;
}"""


def stray_text(page: Any) -> list[str]:
    """Where the page shows "null", "undefined", "NaN" or "[object Object]" as a whole text."""
    return page.evaluate(_STRAY_TEXT)
