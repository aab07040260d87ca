"""The fixed, seeded synthetic chat workload of `serve_bench.py`.

Each request is one user message whose chat-templated prompt is `prompt_len` tokens long (counted
with the served model's own tokenizer, so the server's `usage.prompt_tokens` agrees to within a token
or two) and asks for exactly `max_tokens` output tokens (`ignore_eos`). Text is random English words:
ids decoded from random token ids would re-tokenize to other lengths.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government number "
    "night point home water room mother area money story fact month lot right study book eye job word "
    "business issue side kind head house service friend father power hour game line end member law car "
    "city community name president team minute idea kid body information back parent face others level "
    "office door health person art war history party result change morning reason research girl guy "
    "moment air teacher force education foot boy age policy music market sense nation plan college "
    "interest death experience effect use class control care field development role effort rate heart "
    "drug show leader light voice wife police mind price report decision son view relationship town road "
    "arm difference value building action model season society tax director position player record paper "
    "space ground form event official matter center couple site project activity star table need court "
    "oil situation cost industry figure street image phone data picture practice piece land product "
    "doctor wall patient worker news test movie north love support technology step baby computer type "
    "attention film tree source organization hair window evidence population truth song energy memory "
    "explain describe compare summarize write list consider imagine analyze quickly carefully often"
).split()

INSTRUCTION = "Continue the following text with a long, detailed story:"


@dataclass
class BenchRequest:
    index: int
    messages: list[dict[str, str]]
    prompt_ids: list[int]  # the templated prompt, as the server tokenizes it
    max_tokens: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def body(self, model: str, stream: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,  # budrt/vLLM extension: output length is exactly max_tokens
        }
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body

    def completion_body(self, model: str, temperature: float, seed: int | None = None) -> dict[str, Any]:
        """A streaming `/v1/completions` body with the prompt as token ids, so every server sees
        the same prompt tokens (llama.cpp's server and budrt both accept ids). The sampling fields
        are spelled out: llama.cpp's own defaults (top_k 40, top_p 0.95, min_p 0.05) would
        otherwise give it a different, cheaper distribution to sample from."""
        body: dict[str, Any] = {
            "model": model,
            "prompt": self.prompt_ids,
            "max_tokens": self.max_tokens,
            "temperature": temperature,
            "top_p": 1.0,
            "top_k": 0,  # off on both servers
            "min_p": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if seed is not None:
            body["seed"] = seed
        return body


def _prompt(tokenizer: Any, rng: random.Random, target: int, prefix: str = "") -> tuple[str, list[int]]:
    """User content whose templated prompt has about `target` tokens."""

    def templated(content: str) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}])
        return tokenizer.encode(text)

    head = f"{prefix}{INSTRUCTION} "
    overhead = len(templated(head))
    filler = " ".join(rng.choice(WORDS) for _ in range(target * 2))
    filler_ids = tokenizer.encode(filler, add_special_tokens=False)
    keep = max(target - overhead, 1)
    content = head + tokenizer.decode(filler_ids[:keep])
    # Decoding a token prefix and re-encoding it can shift a boundary: trim to the target.
    ids = templated(content)
    while len(ids) > target and keep > 1:
        keep -= 1
        content = head + tokenizer.decode(filler_ids[:keep])
        ids = templated(content)
    return content, ids


def synthetic_workload(
    tokenizer: Any,
    num_requests: int,
    seed: int = 0,
    prompt_range: tuple[int, int] = (64, 256),
    output_range: tuple[int, int] = (32, 256),
    text_seed: int | None = None,
) -> list[BenchRequest]:
    """`num_requests` chat requests, prompt and output lengths uniform in the given ranges.
    With `text_seed`, the lengths still follow `seed` but the words follow `text_seed`: the same
    shapes with other prompts, which no prefix cache holds from an earlier phase."""
    rng = random.Random(seed)
    words_rng = rng if text_seed is None else random.Random(text_seed)
    requests = []
    for i in range(num_requests):
        target = rng.randint(*prompt_range)
        max_tokens = rng.randint(*output_range)
        content, ids = _prompt(tokenizer, words_rng, target)
        requests.append(BenchRequest(i, [{"role": "user", "content": content}], ids, max_tokens))
    return requests


def prefix_workload(
    tokenizer: Any, num_requests: int, prefix_tokens: int = 1000, seed: int = 1, max_tokens: int = 8
) -> tuple[list[BenchRequest], list[BenchRequest]]:
    """(shared, unique): requests that all start with the same `prefix_tokens`-token system prompt,
    and requests of the same shape whose system prompts are all different."""
    rng = random.Random(seed)

    def system_prompt() -> str:
        words = " ".join(rng.choice(WORDS) for _ in range(prefix_tokens * 2))
        return tokenizer.decode(tokenizer.encode(words, add_special_tokens=False)[:prefix_tokens])

    shared_system = system_prompt()
    shared, unique = [], []
    for i in range(num_requests):
        question = f"Question {i}: " + " ".join(rng.choice(WORDS) for _ in range(12)) + "?"
        for system, out in ((shared_system, shared), (system_prompt(), unique)):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
            out.append(BenchRequest(i, messages, ids, max_tokens))
    return shared, unique


def token_prompts(
    tokenizer: Any, num_requests: int, prompt_tokens: int, seed: int = 2, max_tokens: int = 1
) -> list[BenchRequest]:
    """Raw prompts of exactly `prompt_tokens` random-word tokens, each different from its first
    token on (no prefix cache can serve one from another): the prefill case."""
    rng = random.Random(seed)
    out = []
    for i in range(num_requests):
        ids: list[int] = []
        while len(ids) < prompt_tokens:
            words = " ".join(rng.choice(WORDS) for _ in range(prompt_tokens))
            ids = tokenizer.encode(f"{i} {words}", add_special_tokens=False)
        out.append(BenchRequest(i, [], ids[:prompt_tokens], max_tokens))
    return out
