"""Constrained decoding: a grammar compiled once per distinct text, a matcher per sequence, and the
token masks of a step computed on another thread while the step's forward pass runs.

The grammars are llguidance's (JSON schemas, regular expressions, Lark): ARCHITECTURE.md says why
llguidance and not xgrammar. Compiling happens in `GrammarCompiler.compile`, which the model server
calls in a worker thread before a request is queued, so neither the event loop nor the engine's step
loop ever waits for it, and a bad grammar is a 400 before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import llguidance
import llguidance.gbnf_to_lark
import numpy as np
import torch

from budrt.engine import kernels
from budrt.engine.stats import Histogram

# JSON as a model writes it when left alone (a space after ':' and ','), but no other whitespace:
# free whitespace lets a small model pad forever instead of closing the object.
_JSON_OPTIONS: llguidance.JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
_CACHE_ENTRIES = 256


class GrammarError(ValueError):
    """The grammar cannot be compiled (an unsupported keyword, a bad pattern, too large)."""


@dataclass(frozen=True)
class Grammar:
    """What a request constrains its output to, as llguidance grammar text; `key` names it in the
    compiled-grammar cache."""

    text: str
    key: str

    @classmethod
    def _of(cls, text: str) -> Grammar:
        return cls(text, hashlib.sha256(text.encode()).hexdigest())

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> Grammar:
        try:
            return cls._of(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS))
        except ValueError as exc:
            raise GrammarError(str(exc)) from None

    @classmethod
    def json_object(cls) -> Grammar:
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        return cls._of(llguidance.LLMatcher.grammar_from_regex(pattern))

    @classmethod
    def choice(cls, options: Sequence[str]) -> Grammar:
        # JSON string literals are Lark string literals, escapes included.
        return cls.lark("start: " + " | ".join(json.dumps(o) for o in options))

    @classmethod
    def lark(cls, text: str) -> Grammar:
        return cls._of(llguidance.LLMatcher.grammar_from_lark(text))

    @classmethod
    def lark_or_gbnf(cls, text: str) -> Grammar:
        """A grammar as vLLM users send one: llama.cpp's GBNF (rules written `name ::= ...`) or Lark."""
        if "::=" not in text:
            return cls.lark(text)
        try:
            return cls.lark(llguidance.gbnf_to_lark.gbnf_to_lark(text))
        except Exception as exc:  # the converter raises plain errors on text it cannot read
            raise GrammarError(f"the GBNF grammar cannot be read: {exc}") from None


class TokenizerSource(Protocol):
    """What the compiler needs of the model's tokenizer (`engine.tokenizer.TextTokenizer`)."""

    eos_token_ids: list[int]

    def backend_json(self) -> str: ...


class CompiledGrammar:
    """A compiled grammar: a matcher that has consumed nothing, copied for each sequence."""

    __slots__ = ("_prototype",)

    def __init__(self, prototype: llguidance.LLMatcher) -> None:
        self._prototype = prototype

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._prototype.deep_copy())


class GrammarMatcher:
    """One sequence's position in its grammar."""

    __slots__ = ("inner",)

    def __init__(self, inner: llguidance.LLMatcher) -> None:
        self.inner = inner

    def consume(self, token_id: int) -> None:
        """Advance by a sampled token; ValueError when the token leaves the grammar."""
        if not self.inner.consume_token(token_id):
            raise ValueError(f"the output left its grammar: {self.inner.get_error()[:200]}")

    def forced(self) -> list[int]:
        """The tokens the grammar allows as the only continuation from here (fixed keys,
        punctuation), in llguidance's canonical tokenization; [] when there is a choice."""
        return self.inner.compute_ff_tokens()

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete and allows nothing more (not even the end-of-sequence token)."""
        return self.inner.is_stopped()


class GrammarCompiler:
    """Compiles grammars for one model's vocabulary, keeping the last `_CACHE_ENTRIES` by key.
    Thread-safe; compiles run in the caller's thread (llguidance releases the GIL meanwhile)."""

    def __init__(self, tokenizer: TokenizerSource, vocab_size: int, compile_time: Histogram) -> None:
        self._source = tokenizer
        self.vocab_size = vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._compiling: dict[str, Future[CompiledGrammar]] = {}
        self._lock = threading.Lock()
        self.compiles_total = 0
        self.cache_hits_total = 0
        self.compile_time = compile_time  # seconds per compile (a cache miss)

    def compile(self, grammar: Grammar) -> CompiledGrammar:
        """The compiled grammar, from the cache or compiled here; requests that bring the same
        new grammar at once wait for the one compile (a `Future` per key in flight)."""
        with self._lock:
            cached = self._cache.get(grammar.key)
            if cached is not None:
                self._cache.move_to_end(grammar.key)
                self.cache_hits_total += 1
                return cached
            pending = self._compiling.get(grammar.key)
            if pending is None:
                pending = self._compiling[grammar.key] = Future()
                tokenizer = self._llg_tokenizer()
            else:
                self.cache_hits_total += 1
                tokenizer = None
        if tokenizer is None:
            return pending.result()
        try:
            compiled = self._compile(grammar, tokenizer)
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        finally:
            with self._lock:
                del self._compiling[grammar.key]
        pending.set_result(compiled)
        return compiled

    def _compile(self, grammar: Grammar, tokenizer: llguidance.LLTokenizer) -> CompiledGrammar:
        started = time.perf_counter()
        matcher = llguidance.LLMatcher(tokenizer, grammar.text, log_level=0)
        elapsed = time.perf_counter() - started
        if matcher.is_error():
            raise GrammarError(matcher.get_error()[:500])
        compiled = CompiledGrammar(matcher)
        self.compile_time.observe(elapsed)
        with self._lock:
            self.compiles_total += 1
            self._cache[grammar.key] = compiled
            while len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return compiled

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (~0.2 s for a 49k vocabulary), under the lock."""
        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(
                self._source.backend_json(), n_vocab=self.vocab_size, eos_token=self._source.eos_token_ids
            )
        return self._tokenizer


class Constrained(Protocol):
    """A sequence whose next token a grammar restricts (`engine.sequence.Sequence`)."""

    grammar: GrammarMatcher | None


class MaskWorker:
    """Fills the next-token masks of a step's constrained sequences: started before the forward
    pass and collected after it, on its own thread so the two overlap. `overlap=False` fills them
    at once in the caller's thread, which `bench/grammar_masks.py` measures against: on 2 cores,
    where torch's threads take both, the mask thread still came out ahead (0.89x unconstrained
    at the same lengths against 0.87x, 64 streams)."""

    def __init__(self, vocab_size: int, overlap: bool = True) -> None:
        self.vocab_size = vocab_size
        self.overlap = overlap
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")
        # All rows in one call that lets go of the GIL once, not once a row: the step thread and
        # the server's event loop want it meanwhile. One thread: the forward pass has the cores.
        self._executor = llguidance.LLExecutor(num_threads=1)

    def start(self, seqs: Sequence[Constrained]) -> Future[torch.Tensor] | None:
        """The masks of `seqs` (each with a grammar), one row each, as llguidance's packed bits."""
        if not seqs:
            return None
        matchers = [seq.grammar for seq in seqs if seq.grammar is not None]
        if self.overlap:
            return self._pool.submit(self._fill, matchers)
        done: Future[torch.Tensor] = Future()
        done.set_result(self._fill(matchers))
        return done

    def _fill(self, matchers: list[GrammarMatcher]) -> torch.Tensor:
        # llguidance.torch would do this, but importing it compiles a function with
        # torch.compile, which imports dynamo and inductor: 1.6 s of every model server's start.
        bitmask = torch.full((len(matchers), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        rows = [(matcher.inner, row) for row, matcher in enumerate(matchers)]
        self._executor.unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), bitmask.shape[1] * 4, len(matchers))
        for row, matcher in enumerate(matchers):
            if matcher.inner.is_error():  # nothing it allows: let the sample fail the sequence
                bitmask[row] = -1
        return bitmask

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# For each byte of a packed mask, what its 8 tokens add to their logits: 0 (allowed) or -inf.
_BYTE_BIAS = torch.tensor([[0.0 if (b >> k) & 1 else float("-inf") for k in range(8)] for b in range(256)])


def apply_masks(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Tokens a row's grammar forbids get -inf, in place; other rows are untouched. The C++ kernel
    reads each packed word once (csrc/token_masks.cpp); without it, the bits become an additive
    bias by a byte lookup (2.6 ms for 64 rows of SmolLM2's 49k tokens on a 2-core Xeon, against
    12.8 ms unpacking them to booleans for `masked_fill`)."""
    index = torch.tensor(rows, dtype=torch.long)
    if kernels.apply_token_masks(logits, index, bitmask):
        return
    bias = _BYTE_BIAS[torch.from_numpy(bitmask.numpy().view(np.uint8)).to(torch.int32)].view(len(rows), -1)
    width = min(logits.shape[1], bias.shape[1])
    part = logits[index]
    part[:, :width] += bias[:, :width]
    part[:, width:] = float("-inf")
    logits[index] = part
