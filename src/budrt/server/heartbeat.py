"""Registration with gateways by heartbeat (the gateway side is `budrt.gateway.replicas`).

Every `heartbeat_interval_s` the server checks its own `/health/ready` over HTTP (so it only
announces itself once it really accepts requests, and stops while it is unhealthy) and then
posts its models to each gateway in `register_urls`, with a ttl of three intervals: a server
that dies is dropped by each gateway within that ttl. At shutdown it deregisters. A gateway that
is down or refuses the heartbeat is logged (once per change) and retried next interval; the
server never fails because of it.

aiohttp is imported when the heartbeat first runs: most model servers register nowhere, and its
import took ~0.1 s of every model server's start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from budrt.config import ModelServerConfig
from budrt.security import certs
from budrt.security.certs import CertPaths
from budrt.server.model_pool import RETRY_FAILED_AFTER_S, ModelPool

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("budrt.server.heartbeat")
HEARTBEAT_PATH = "/admin/replicas/heartbeat"
MISSED_BEATS = 3  # heartbeats a gateway may miss before it drops this server
LEAVE_TIMEOUT_S = 2.0  # shutdown does not wait longer for gateways to acknowledge


def _local_host(host: str) -> str:
    """Where this process can reach itself: a wildcard bind answers on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


def advertise_url(server: ModelServerConfig, scheme: str = "http") -> str:
    """The OpenAI base URL gateways should send requests to."""
    if server.advertise_url:
        return server.advertise_url.replace("{port}", str(server.port)).rstrip("/")
    return f"{scheme}://{_local_host(server.host)}:{server.port}/v1"


def heartbeat_url(gateway: str) -> str:
    """Gateways may be named by their root or their OpenAI base URL (`.../v1`)."""
    return gateway.rstrip("/").removesuffix("/v1") + HEARTBEAT_PATH


class Heartbeat:
    def __init__(
        self,
        server: ModelServerConfig,
        pool: ModelPool,
        internal_key: str | None = None,
        tls: CertPaths | None = None,
        zone: str | None = None,
    ) -> None:
        scheme = "https" if tls is not None else "http"
        self.zone = zone  # announced, so gateways of the same zone prefer this replica
        self.gateways = [heartbeat_url(g) for g in server.register_urls]
        self.url = advertise_url(server, scheme)
        self.self_check = f"{scheme}://{_local_host(server.host)}:{server.port}/health/ready"
        # Over TLS: the platform's CA (the gateways' and its own certificates), and the client
        # certificate its own port asks for.
        self.tls = certs.client_context(tls, with_client_cert=True) if tls is not None else None
        # Its own readiness answers only to the internal credential, like every caller's.
        self.self_headers = {"Authorization": f"Bearer {internal_key}"} if internal_key else {}
        self.interval_s = server.heartbeat_interval_s
        self.ttl_s = server.heartbeat_interval_s * MISSED_BEATS
        self.pool = pool
        self.headers = {"Content-Type": "application/json"}
        if server.register_key is not None:
            self.headers["Authorization"] = f"Bearer {server.register_key.get_secret_value()}"
        self.timeout_s = min(max(self.interval_s, 1.0), 5.0)
        self.enabled = bool(self.gateways)
        if self.enabled and server.port == 0 and not server.advertise_url:
            log.error("heartbeat off: port 0 (picked at start) cannot be advertised; set advertise_url")
            self.enabled = False
        self.registered: set[str] = set()  # gateways that accepted the last heartbeat
        self._failing: dict[str, str] = {}  # gateway -> last failure logged
        self._session: aiohttp.ClientSession | None = None

    def models(self) -> list[dict[str, object]]:
        """What this server can serve now: resident or loadable; not a model that can never fit
        nor one whose load just failed (it is offered again once a retry is due). A model kept
        out only by pinned models stays listed: unpinning one lets it load, and the gateway must
        still know this server hosts it to ask for that load. Each with its state and whether it
        is pinned, which the gateway's `/admin/replicas` shows."""
        now = time.time()
        out: list[dict[str, object]] = []
        for hosted in self.pool.models.values():
            failed_recently = hosted.state == "failed" and now - hosted.failed_at < RETRY_FAILED_AFTER_S
            if hosted.too_large or (failed_recently and not hosted.held_by):
                continue
            out.append(
                {
                    "id": hosted.name,
                    "aliases": list(hosted.config.aliases),
                    "state": hosted.shown_state,
                    "pinned": hosted.pinned,
                }
            )
        return out

    async def run(self) -> None:
        """Heartbeat until cancelled."""
        if not self.enabled:
            return
        import aiohttp

        connector = aiohttp.TCPConnector(ssl=self.tls if self.tls is not None else True)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        started = False
        while True:
            if await self._ready():
                started = True
                await self.beat()
            # Until the server first answers, look often: it registers as soon as it serves.
            await asyncio.sleep(self.interval_s if started else min(self.interval_s, 0.2))

    async def _ready(self) -> bool:
        import aiohttp  # loaded by `run`

        assert self._session is not None
        try:
            async with self._session.get(self.self_check, headers=self.self_headers) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def beat(self, leaving: bool = False) -> None:
        body: dict[str, object] = {"url": self.url, "ttl_s": self.ttl_s}
        if self.zone is not None:
            body["zone"] = self.zone
        if leaving:
            body["leaving"] = True
        else:
            body["models"] = self.models()
            if not body["models"]:
                return
        await asyncio.gather(*(self._post(g, body) for g in self.gateways))

    async def _post(self, gateway: str, body: dict[str, object]) -> None:
        import aiohttp  # loaded by `run`

        assert self._session is not None
        try:
            async with self._session.post(gateway, json=body, headers=self.headers) as resp:
                if resp.status == 200:
                    self._ok(gateway, leaving=bool(body.get("leaving")))
                    return
                problem = f"HTTP {resp.status}: {(await resp.text())[:300]}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            problem = f"{type(exc).__name__}: {exc}"[:300]
        self.registered.discard(gateway)
        if self._failing.get(gateway) != problem:  # log a change, not every interval
            self._failing[gateway] = problem
            fields = {"gateway": gateway, "error": problem}
            log.warning("heartbeat to gateway failed", extra={"fields": fields})

    def _ok(self, gateway: str, leaving: bool) -> None:
        if leaving:
            self.registered.discard(gateway)
            return
        if gateway not in self.registered:
            log.info("registered with gateway", extra={"fields": {"gateway": gateway, "url": self.url}})
        self.registered.add(gateway)
        self._failing.pop(gateway, None)

    async def close(self) -> None:
        """Deregister from every gateway (bounded wait), then close the client."""
        if self._session is None:
            return
        try:
            await asyncio.wait_for(self.beat(leaving=True), LEAVE_TIMEOUT_S)
        except TimeoutError:
            log.warning("deregistration timed out", extra={"fields": {"gateways": self.gateways}})
        finally:
            await self._session.close()
            self._session = None
