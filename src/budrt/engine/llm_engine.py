"""The asyncio-facing `Engine`: a background thread runs the step loop, requests stream back.

The step loop runs in its own thread so the model's forward (which releases the GIL inside torch)
never blocks the HTTP server's event loop. Requests cross into the thread through an inbox; outputs
cross back through `loop.call_soon_threadsafe` into one asyncio.Queue per request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import torch

from budrt.engine import openmp
from budrt.engine.block_manager import BlockManager
from budrt.engine.grammar import CompiledGrammar, Grammar, GrammarCompiler, MaskWorker
from budrt.engine.interface import (
    Engine,
    EngineDead,
    EngineOverloaded,
    GenerationOutput,
    SamplingParams,
    TokenLogprob,
)
from budrt.engine.kv_cache import KVCache
from budrt.engine.llama import LayerStack, LlamaForCausalLM
from budrt.engine.runner import ModelRunner
from budrt.engine.sampler import Sampler
from budrt.engine.scheduler import Scheduler
from budrt.engine.sequence import Sequence, Sink, make_sequence
from budrt.engine.stats import EngineHistograms
from budrt.engine.step_path import PathRule
from budrt.engine.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


class LLMEngine(Engine):
    def __init__(
        self,
        model_name: str,
        model: LlamaForCausalLM,
        tokenizer: TextTokenizer,
        *,
        max_model_len: int,
        max_num_seqs: int,
        max_waiting: int,
        cache: KVCache,
        max_num_batched_tokens: int = 512,
        enable_prefix_caching: bool = True,
        jump_forward: bool = False,
        dtype: torch.dtype = torch.float32,
        identity: str = "",
        path_rule: PathRule | None = None,
        decode_stack: LayerStack | None = None,
        runtime: dict[str, Any] | None = None,
    ) -> None:
        self.model_name = model_name
        # How the model runs (dtype, CPU kernel level, and why), for the log and `budrt status`.
        self.runtime: dict[str, Any] = dict(runtime or {})
        if self.runtime:
            log.info("model %s runs on %s", model_name, self.runtime)
        self.tokenizer = tokenizer
        # A sequence must fit the whole cache, or preempting everything else would not save it.
        self.max_model_len = min(max_model_len, cache.num_blocks * cache.block_size)
        self.max_waiting = max_waiting
        self.dtype = dtype
        self.vocab_size = model.args.vocab_size
        self.runner = ModelRunner(model, cache, path_rule, decode_stack)
        # Prefix-cache hashes include the model's identity so two models never share blocks.
        self.blocks = BlockManager(
            cache.num_blocks, cache.block_size, enable_prefix_caching, identity or model_name
        )
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max(max_num_batched_tokens, 1))
        self.sampler = Sampler(tokenizer)
        self.max_num_seqs = max_num_seqs
        self.jump_forward = jump_forward  # see ModelConfig.jump_forward
        self.histograms = EngineHistograms()
        grammar_vocab = max(self.vocab_size, tokenizer.vocab_size)
        self.grammars = GrammarCompiler(tokenizer, grammar_vocab, self.histograms.grammar_compile_time)
        self.masks = MaskWorker(grammar_vocab)

        # Shared with the event loop, guarded by _lock: the inbox and the id -> sequence map.
        self._lock = threading.Lock()
        self._inbox: deque[Sequence] = deque()
        self._aborts: deque[str] = deque()
        self._requests: dict[str, Sequence] = {}
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.requests_finished_total = 0

    # --- Engine API (event-loop side) ---

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{self.model_name}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Abort everything in flight (their streams end with finish_reason "abort") and join."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationOutput]:
        # Checked here, not in the generator body, so callers get the error from the call itself.
        self._check_accepting()
        return self._stream(request_id, list(prompt_token_ids), params)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wakeup.set()

    def stats(self) -> dict[str, float]:
        return {
            "running": len(self.scheduler.running),
            "waiting": self.num_waiting,
            "kv_usage": self.blocks.usage(),  # fraction of KV blocks held by live sequences
            "kv_num_blocks": self.blocks.num_blocks,
            "max_num_seqs": self.max_num_seqs,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "requests_finished_total": self.requests_finished_total,
            "prefix_cache_queries_total": self.blocks.prefix_queries,
            "prefix_cache_hits_total": self.blocks.prefix_hits,
            "num_preemptions_total": self.scheduler.num_preemptions,
            "grammar_compiles_total": self.grammars.compiles_total,
            "grammar_cache_hits_total": self.grammars.cache_hits_total,
        }

    def compile_grammar(self, grammar: Grammar) -> CompiledGrammar:
        return self.grammars.compile(grammar)

    def is_healthy(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting)

    def _check_accepting(self) -> None:
        if self._dead is not None:
            raise EngineDead(f"engine step loop died: {self._dead!r}")
        if self._stopping or self._thread is None:
            raise EngineDead("engine is not running")
        if self.num_waiting >= self.max_waiting:
            raise EngineOverloaded(f"{self.num_waiting} requests waiting (max_waiting={self.max_waiting})")

    async def _stream(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationOutput | BaseException] = asyncio.Queue()

        def sink(item: GenerationOutput | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        seq = self._submit(request_id, prompt_token_ids, params, sink)
        done = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                if item.finish_reason is not None:
                    done = True
                yield item
                if done:
                    return
        finally:
            if not done:  # the consumer left early (client disconnected): free its blocks
                self.abort(seq.request_id)

    def _submit(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, sink: Sink
    ) -> Sequence:
        self._check_accepting()
        seq = make_sequence(
            request_id,
            prompt_token_ids,
            params,
            self.tokenizer,
            self.max_model_len,
            self.vocab_size,
            sink,
            jump_forward=self.jump_forward,
        )
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._requests[request_id] = seq
            self._inbox.append(seq)
        self._wakeup.set()
        return seq

    # --- the step loop (engine thread) ---

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.scheduler.has_work():
                    openmp.release_thread_pool()  # idle: let other threads' pools spin (openmp.py)
                    self._wakeup.wait(timeout=1.0)
                    self._wakeup.clear()
                    continue
                try:
                    self.step()
                except Exception as exc:  # keep serving: fail what was in this step, not the engine
                    log.exception("engine step failed")
                    for seq in list(self.scheduler.running):
                        self._fail(seq, exc)
            self._drain_inbox()
            self._abort_all()
            self.masks.close()
        except BaseException as exc:
            self._dead = exc
            log.exception("engine step loop died")
            self._fail_all(EngineDead(f"engine step loop died: {exc!r}"))
            raise

    def _drain_inbox(self) -> None:
        with self._lock:
            new, self._inbox = list(self._inbox), deque()
            aborts, self._aborts = list(self._aborts), deque()
        for seq in new:
            self.scheduler.add(seq)
        for request_id in aborts:
            seq = self._requests.get(request_id)
            if seq is not None and not seq.is_finished:
                self._finish(seq, seq.abort_output())

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: decode every running sequence by a token and prefill the next chunks."""
        batch = self.scheduler.schedule()
        if not batch:
            return
        now = time.monotonic()
        for seq, _ in batch:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
                self.histograms.request_queue_time.observe(now - seq.arrival_time)
        # The masks of constrained sequences that sample this step are filled while the forward runs.
        constrained = [
            s for s, n in batch if s.grammar is not None and s.num_computed_tokens + n == s.num_tokens
        ]
        masks = self.masks.start(constrained)
        logits, samplers = self.runner.run(batch)
        for seq, n in batch:
            seq.num_computed_tokens += n
            self.blocks.seal_full_blocks(seq)
        if not samplers:
            return
        mask_rows = None
        if masks is not None:
            row_of = {id(seq): i for i, seq in enumerate(samplers)}
            mask_rows = ([row_of[id(seq)] for seq in constrained], masks.result())
        result = self.sampler(logits, samplers, mask_rows)
        self.generation_tokens_total += len(samplers)
        now = time.monotonic()
        for seq, token_id, logprob in zip(samplers, result.token_ids, result.logprobs, strict=True):
            if not seq.output_token_ids:
                self.prompt_tokens_total += seq.num_prompt_tokens
            elif seq.last_token_time is not None:
                self.histograms.inter_token_latency.observe(now - seq.last_token_time)
            seq.last_token_time = now
            self._emit(seq, token_id, logprob)

    def _emit(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None) -> None:
        """Append the sampled token, then any its grammar forces (computed with the next step's
        forward pass as one chunk: jump-forward), sending each token's output."""
        try:
            output = seq.append_token(token_id, logprob)
            forced = seq.forced_tokens() if output.finish_reason is None else []
            for forced_id in forced:
                seq.sink(output)
                output = seq.append_token(forced_id, None)
                self.generation_tokens_total += 1
                if output.finish_reason is not None:
                    break
        except Exception as exc:
            self._fail(seq, exc)
            return
        if output.finish_reason is not None:
            self._finish(seq, output)
        else:
            seq.sink(output)

    def _finish(self, seq: Sequence, output: GenerationOutput) -> None:
        self.scheduler.finish(seq)
        with self._lock:
            self._requests.pop(seq.request_id, None)
        self.requests_finished_total += 1
        seq.sink(output)

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        self.scheduler.finish(seq)
        with self._lock:
            self._requests.pop(seq.request_id, None)
        error = exc if isinstance(exc, EngineDead) else RuntimeError(f"generation failed: {exc!r}")
        seq.sink(error)

    def _abort_all(self) -> None:
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self._finish(seq, seq.abort_output())

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            pending = list(self._requests.values())
        for seq in pending:
            if not seq.is_finished:
                self._fail(seq, exc)
