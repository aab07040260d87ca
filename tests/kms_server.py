"""A real AWS KMS API for tests: moto's `moto_server` on a free loopback port, in memory."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import httpx

from tests.mock_upstream import free_port
from tests.procs import stop, venv_binary

REGION = "us-east-1"
CREDENTIALS = ("testing", "testing")  # moto accepts any


def moto_server_binary() -> str:
    return venv_binary("moto_server", "moto[server]")


class MotoServer:
    """`moto_server` on 127.0.0.1; `url` is the endpoint to give boto3."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> MotoServer:
        cmd = [moto_server_binary(), "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/moto-api/data.json", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.05)

    def client(self) -> Any:
        """A boto3 KMS client for this server."""
        import boto3

        access, secret = CREDENTIALS
        return boto3.client(
            "kms",
            region_name=REGION,
            endpoint_url=self.url,
            aws_access_key_id=access,
            aws_secret_access_key=secret,
        )

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None
