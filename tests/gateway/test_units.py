"""Gateway pieces that need no servers: usage extraction, the health checks' pace (limiter tests:
tests/test_ratelimit.py)."""

from __future__ import annotations

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
