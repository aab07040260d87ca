"""The engine's own checks of a request, before it joins the steps every request shares."""

from __future__ import annotations

import math

import pytest

from budrt.engine.interface import SamplingParams
from budrt.engine.sequence import make_sequence
from budrt.engine.tokenizer import TextTokenizer
from tests.tiny_models import build_tiny_llama


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    return TextTokenizer.from_directory(build_tiny_llama(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", 2**64),
        ("seed", 2**64),
        ("seed", -1),
        ("temperature", math.nan),
        ("top_p", math.nan),
        ("presence_penalty", math.inf),
        ("logit_bias", {1: math.nan}),
        ("logprobs", 10**6),
    ],
)
def test_the_engine_refuses_values_that_would_fail_its_shared_step(
    tokenizer: TextTokenizer, field: str, value: object
) -> None:
    """The engine's own check, whatever the server let through: a value the sampler cannot take
    (top_k past int64 overflowed its tensor) failed the whole step, every sequence in it."""
    params = SamplingParams(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        make_sequence("r", [1, 2], params, tokenizer, 64, tokenizer.vocab_size, lambda _: None)
