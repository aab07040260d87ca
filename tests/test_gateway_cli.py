"""The interface contract's minimal `budrt gateway --config FILE`, as a user would run it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.mock_upstream import free_port
from tests.procs import start_upstream, stop

BUDRT = str(Path(sys.executable).parent / "budrt")
MINIMAL = """deployments:
  - model: mock
    endpoints: ["{url}"]
"""


def test_budrt_gateway_with_the_minimal_config(tmp_path: Path) -> None:
    upstream, url = start_upstream("up1")
    config = tmp_path / "gateway.yaml"
    config.write_text(MINIMAL.format(url=url))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDRT_")}
    env["BUDRT_ADMIN_KEY"] = "budrt-cli-test-admin-key-0123456789abcdef0123"
    gateway = subprocess.Popen(
        [BUDRT, "gateway", "--config", str(config), "--home", str(tmp_path / "home"), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert gateway.poll() is None and time.monotonic() < deadline, "gateway did not become ready"
            time.sleep(0.1)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=env["BUDRT_ADMIN_KEY"], max_retries=0
        )
        assert [m.id for m in client.models.list()] == ["mock"]
        reply = client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        streamed = list(
            client.chat.completions.create(
                model="mock", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )
        assert streamed
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
        admin_key = (tmp_path / "home" / "admin.key").read_text().strip()
        assert admin_key == env["BUDRT_ADMIN_KEY"]
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(15)
        except subprocess.TimeoutExpired:
            gateway.kill()
            raise
        stop(upstream)
    # uvicorn re-raises SIGTERM after its graceful shutdown, so "killed by SIGTERM" is a clean stop.
    assert gateway.returncode in (0, -signal.SIGTERM)
    assert b"Traceback" not in gateway.stdout.read()
