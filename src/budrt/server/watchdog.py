"""The model server's own health: engine progress while work is pending, and a one-token self-test.

A stuck engine thread (deadlock, a kernel that never returns) leaves the HTTP server answering
while every request hangs. The watchdog notices and flips `/health/live` to 503, so the
supervisor replaces the process.

Tests only: `BUDRT_TEST_FAULT=self_test_fail` in the model server's environment at start makes
every self-test of a resident model fail, so the "unhealthy -> supervisor restarts" path can be
driven end to end with real processes. It is read once at start; nothing can turn it on later.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

from budrt.engine.interface import EngineOverloaded, SamplingParams
from budrt.server.model_pool import HostedModel, ModelPool

log = logging.getLogger(__name__)
# Counters that move whenever the engine completes a step. Read defensively: any engine may
# expose some, all or none of them.
_PROGRESS_KEYS = ("last_step_at", "generation_tokens_total", "prompt_tokens_total", "requests_finished_total")
TEST_FAULT_ENV = "BUDRT_TEST_FAULT"  # tests only; see the module docstring


class Watchdog:
    def __init__(
        self,
        pool: ModelPool,
        *,
        interval_s: float = 2.0,
        step_timeout_s: float = 30.0,
        self_test_interval_s: float = 60.0,
    ) -> None:
        self.pool = pool
        self.interval_s = interval_s
        self.step_timeout_s = step_timeout_s
        self.self_test_interval_s = self_test_interval_s
        self.stall_error: str | None = None
        self.self_test_error: str | None = None
        self.last_error: str | None = None  # kept after recovery, for `budrt status`
        self._progress: dict[str, tuple[tuple[object, ...], float]] = {}
        self._last_self_test = time.monotonic()
        self.fault_self_test = os.environ.get(TEST_FAULT_ENV) == "self_test_fail"
        if self.fault_self_test:
            log.warning("%s=self_test_fail: every self-test will fail (a test fault)", TEST_FAULT_ENV)

    @property
    def healthy(self) -> bool:
        return self.error is None

    @property
    def error(self) -> str | None:
        return self.stall_error or self.self_test_error

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.check_progress(time.monotonic())
                if (
                    self.self_test_interval_s
                    and time.monotonic() - self._last_self_test >= self.self_test_interval_s
                ):
                    self._last_self_test = time.monotonic()
                    await self.self_test()
            except Exception:  # the watchdog itself must never die
                log.exception("watchdog check failed")
            if self.error:
                self.last_error = self.error

    def check_progress(self, now: float) -> None:
        stalled: list[str] = []
        for hosted in list(self.pool.models.values()):
            engine = hosted.stepping_engine
            if hosted.state != "ready" or engine is None:
                self._progress.pop(hosted.name, None)
                continue
            if not engine.is_healthy():
                stalled.append(f"model {hosted.name}: engine step loop is not running")
                continue
            stats = engine.stats()
            marker = tuple(stats.get(k) for k in _PROGRESS_KEYS)
            pending = float(stats.get("running", 0)) + float(stats.get("waiting", 0)) > 0
            previous = self._progress.get(hosted.name)
            if not pending or previous is None or previous[0] != marker or all(v is None for v in marker):
                self._progress[hosted.name] = (marker, now)
                continue
            if now - previous[1] > self.step_timeout_s:
                stalled.append(
                    f"model {hosted.name}: no engine step completed in {now - previous[1]:.0f}s "
                    f"with {int(stats.get('running', 0) + stats.get('waiting', 0))} requests pending"
                )
        if stalled and not self.stall_error:
            log.error("watchdog: %s", "; ".join(stalled))
        self.stall_error = "; ".join(stalled) or None

    async def self_test(self) -> None:
        """Generate one token (or embed one input) with every resident model."""
        errors = []
        for hosted in list(self.pool.models.values()):
            if hosted.state != "ready" or _busy(hosted):
                continue  # a busy model shows its health through progress; a test would only queue
            hosted.in_flight += 1  # not evicted while we test it
            try:
                if self.fault_self_test:
                    raise RuntimeError(f"fault injected by {TEST_FAULT_ENV} (tests only)")
                await asyncio.wait_for(_one_token(hosted), self.step_timeout_s)
            except EngineOverloaded:
                pass  # busy is not broken; the progress check covers a busy engine
            except Exception as exc:
                errors.append(f"model {hosted.name}: self-test failed: {type(exc).__name__}: {exc}")
            finally:
                self.pool.release(hosted)
        if errors:
            log.error("watchdog: %s", "; ".join(errors))
        self.self_test_error = "; ".join(errors) or None


async def _one_token(hosted: HostedModel) -> None:
    if hosted.engine is not None:
        engine = hosted.engine
        ids = engine.tokenizer.encode("ok", add_special_tokens=True) or [0]
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        outputs = engine.generate(f"selftest-{uuid.uuid4().hex}", ids, params)
        try:
            async for out in outputs:
                if out.finish_reason is not None:
                    return
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]
        raise RuntimeError("the engine ended the stream without finishing")
    if hosted.embedder is not None:
        model = hosted.embedder.model
        await hosted.embedder.embed([model.wrap_ids(model.tokenize(["ok"])[0])])
    if hosted.imager is not None:
        await hosted.imager.self_test()


def _busy(hosted: HostedModel) -> bool:
    engine = hosted.stepping_engine
    if engine is not None:
        stats = engine.stats()
        return float(stats.get("running", 0)) + float(stats.get("waiting", 0)) > 0
    return hosted.embedder is not None and not hosted.embedder.queue.empty()
