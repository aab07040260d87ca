"""Gateway pieces that need no upstream processes: usage extraction, the health checks' pace and
verdicts (a loopback aiohttp server; limiter tests: tests/test_ratelimit.py)."""

from __future__ import annotations

import asyncio

import aiohttp
import aiohttp.web

from budrt.config import DeploymentConfig
from budrt.gateway.health import NOT_READY_INTERVAL_S, HealthChecker
from budrt.gateway.routing import Router
from budrt.gateway.usage import find_usage


def test_find_usage() -> None:
    assert find_usage(b'{"data":[0.1],"usage":{"prompt_tokens":3,"total_tokens":3}}') == {
        "prompt_tokens": 3,
        "total_tokens": 3,
    }
    nested = (
        b'data: {"usage": {"prompt_tokens": 1, "completion_tokens_details": {"x": 1}}}\n\ndata: [DONE]\n\n'
    )
    assert find_usage(nested) == {"prompt_tokens": 1, "completion_tokens_details": {"x": 1}}
    assert find_usage(b'{"usage": null}') is None
    assert find_usage(b'{"usage": {"prompt_tok') is None
    assert find_usage(b"{}") is None


def test_health_checks_come_sooner_while_a_replica_is_not_ready() -> None:
    """A managed replica starts not ready: it is checked every quarter second until it is, so a
    model that finishes loading takes traffic at once; then the configured interval."""
    router = Router([DeploymentConfig(model="m", endpoints=["http://a/v1", "http://b/v1"], managed=True)])
    checker = HealthChecker(router, interval_s=2.0)
    a, b = router.deployments[0].endpoints
    assert checker.next_check_in() == NOT_READY_INTERVAL_S
    a.ready = True
    assert checker.next_check_in() == NOT_READY_INTERVAL_S  # b still loading
    b.ready = True
    assert checker.next_check_in() == 2.0
    assert HealthChecker(router, interval_s=0.1).next_check_in() == 0.1  # never slower than configured
    b.ready = False
    assert HealthChecker(router, interval_s=0.1).next_check_in() == 0.1


async def _serve_health(slow: dict[str, float]) -> tuple[aiohttp.web.AppRunner, str]:
    """A loopback server whose /health/ready answers after `slow["s"]` seconds."""

    async def ready(request: aiohttp.web.Request) -> aiohttp.web.Response:
        await asyncio.sleep(slow["s"])
        return aiohttp.web.Response(text="ok")

    app = aiohttp.web.Application()
    app.router.add_get("/health/ready", ready)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/v1"


def test_one_slow_health_answer_keeps_a_busy_replica_in_rotation() -> None:
    """A model server busy with a batch may answer one check late: it stays ready (a single
    replica would otherwise refuse every request with 503 until the next check). Two late answers
    in a row mean hung: out of rotation, its waiting requests cancelled."""

    async def scenario() -> list[bool]:
        slow = {"s": 0.0}
        runner, url = await _serve_health(slow)
        router = Router([DeploymentConfig(model="m", endpoints=[url], managed=True)])
        checker = HealthChecker(router, interval_s=0.5, timeout_s=0.2)
        [endpoint] = router.deployments[0].endpoints
        seen = []
        try:
            async with aiohttp.ClientSession() as session:
                for delay in (0.0, 0.4, 0.0, 0.4, 0.4):
                    slow["s"] = delay
                    await checker.check_all(session)
                    seen.append(endpoint.ready)
        finally:
            await runner.cleanup()
        return seen

    assert asyncio.run(scenario()) == [True, True, True, True, False]
