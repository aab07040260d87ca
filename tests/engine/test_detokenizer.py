"""The incremental detokenizer's stop strings, on a real byte-level tokenizer (one token per byte)."""

from __future__ import annotations

import random
import time

import pytest

from budrt.engine.detokenizer import IncrementalDetokenizer
from budrt.engine.tokenizer import TextTokenizer
from tests.tiny_models import build_tiny_llama


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    return TextTokenizer.from_directory(build_tiny_llama(tmp_path_factory.mktemp("tok")))


def _reference(text: str, stops: list[str]) -> tuple[str, list[int]]:
    """By brute force, char by char: the text kept, and after each char how much is held back."""
    held = []
    for end in range(1, len(text) + 1):
        seen = text[:end]
        starts = [end - len(s) for s in stops if seen.endswith(s)]
        if starts:
            return text[: min(starts)], held
        held.append(max((n for s in stops for n in range(1, len(s)) if seen.endswith(s[:n])), default=0))
    return text, held


def test_stop_strings_match_a_brute_force_reference(tokenizer: TextTokenizer) -> None:
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("aab") for _ in range(rng.randint(1, 40)))
        count = rng.randint(1, 4)
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(count)]
        detok = IncrementalDetokenizer(tokenizer, stops)
        out = []
        kept, held = _reference(text, stops)
        for i, token in enumerate(tokenizer.encode(text, add_special_tokens=False)):
            detok.add_token(token)
            if detok.stopped:
                out.append(detok.take(final=True))
                break
            out.append(detok.take(final=False))
            assert len(detok.text) - detok._emitted == held[i], (text, stops, i)
        else:
            out.append(detok.take(final=True))
        assert "".join(out) == kept, (text, stops)
        assert detok.stopped == (kept != text)


def test_long_stop_strings_cost_linear_time(tokenizer: TextTokenizer) -> None:
    """4 stop strings of 8,000 characters after 8,000 characters of text: a step must not rescan
    the stops' prefixes (that was quadratic in their length: ~20 ms a step here, and every
    sequence sharing the engine's steps waited for it)."""
    stops = ["a" * 7999 + c for c in "bcde"]
    detok = IncrementalDetokenizer(tokenizer, stops)
    for token in tokenizer.encode("x" * 8000, add_special_tokens=False):
        detok.add_token(token)
    steps = tokenizer.encode("y" * 300, add_special_tokens=False)
    started = time.perf_counter()
    for token in steps:
        detok.add_token(token)
        assert detok.take(final=False) != ""  # nothing here can start a stop string
    elapsed = time.perf_counter() - started
    assert not detok.stopped
    assert elapsed < 1.0, f"{len(steps)} steps took {elapsed:.2f} s"
