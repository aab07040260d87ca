"""The model's tokenizer, built with the `tokenizers` library from GGUF metadata or a tokenizer.json.

Chat templates are rendered with a sandboxed Jinja2 environment set up the way transformers' own
`apply_chat_template` does (trim_blocks, lstrip_blocks, `raise_exception`, `tojson`), so prompts
are byte-identical to what the model was trained with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from budrt.engine.interface import Tokenizer

# llama.cpp token types (tokenizer.ggml.token_type).
_CONTROL = 3
_USER_DEFINED = 4

# Tokens chat templates use to end a turn. Generation must stop on them even when the file's
# eos_token_id names another token (e.g. `<|endoftext|>`).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The text split the vocabulary's merges were learned with (`tokenizer.ggml.pre`)."""
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"):
        split = _LLAMA3_SPLIT
    elif pre in ("qwen2", "deepseek-r1-qwen"):
        split = _QWEN2_SPLIT
    elif pre == "smollm":
        # SmolLM's tokenizer.json: every digit is its own pre-token, then GPT-2's byte-level split.
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:  # "gpt2", "default" and unknown: GPT-2's own regex inside ByteLevel
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _tokenizer_from_gguf(meta: dict[str, Any]) -> HFTokenizer:
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens outside the byte alphabet (rare; added tokens written in plain UTF-8) get respelled.
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = HFTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == _CONTROL and set(t) <= alphabet
    ]
    tok.add_special_tokens(specials)
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _USER_DEFINED and t in vocab
        ]
    )
    return tok


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


MAX_TOKEN_CHARS_KEY = "budrt_max_token_chars"  # in the gguf cache's tokenizer_config.json


class TextTokenizer(Tokenizer):
    """`Tokenizer` over a `tokenizers.Tokenizer` plus the model's special tokens and chat template."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        add_bos: bool,
        chat_template: str | None,
        max_token_chars: int | None = None,
    ) -> None:
        """`max_token_chars`: the longest token's length, when it is known (the gguf cache stores
        it: reading the vocabulary for it took ~25 ms of each load)."""
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.add_bos = add_bos and bos_token_id is not None
        self.bos_token = backend.id_to_token(bos_token_id) if bos_token_id is not None else ""
        self.eos_token = backend.id_to_token(eos_token_ids[0]) if eos_token_ids else ""
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template else None
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # (byte-level BPE spells one byte per character, so this is also the most bytes)
        if max_token_chars is None:
            max_token_chars = max(map(len, backend.get_vocab(with_added_tokens=True)), default=1)
        self.max_token_chars = max_token_chars

    def backend_json(self) -> str:
        """The `tokenizers` definition as JSON (what llguidance builds its token trie from)."""
        return self.backend.to_str()

    # --- constructors ---

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> TextTokenizer:
        backend = _tokenizer_from_gguf(meta)
        template = meta.get("tokenizer.chat_template")
        eos_ids = [
            meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta
        ]
        return cls(
            backend,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_with_end_of_turn(backend, [int(i) for i in eos_ids], template),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=template,
        )

    @classmethod
    def from_directory(cls, directory: Path | str) -> TextTokenizer:
        """A Hugging Face model directory: tokenizer.json + tokenizer_config.json (+ generation_config)."""
        directory = Path(directory)
        backend = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        config = _read_json(directory / "tokenizer_config.json")
        generation = _read_json(directory / "generation_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text()

        def token_id(name: str) -> int | None:
            value = config.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        eos = generation.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if (config_eos := token_id("eos_token")) is not None and config_eos not in eos_ids:
            eos_ids.insert(0, config_eos)
        return cls(
            backend,
            bos_token_id=token_id("bos_token"),
            eos_token_ids=_with_end_of_turn(backend, eos_ids, template),
            add_bos=bool(config.get("add_bos_token", False)),
            max_token_chars=stored if isinstance(stored := config.get(MAX_TOKEN_CHARS_KEY), int) else None,
            chat_template=template,
        )

    # --- Tokenizer ---

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # Post-processing is ours (BOS only): the backend never adds special tokens itself.
        # encode_batch releases the GIL while it works (encode does not), so a long prompt
        # tokenized in a worker thread leaves the server's event loop running.
        ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]  # type: ignore[list-item]
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's text as OpenAI logprobs show it (special tokens included)."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template")
        return self._template.render(
            messages=messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt,
        )


def _with_end_of_turn(backend: HFTokenizer, eos_ids: list[int], template: str | None) -> list[int]:
    """eos ids plus the end-of-turn tokens the chat template writes after each message."""
    ids = list(dict.fromkeys(eos_ids))
    for token in END_OF_TURN_TOKENS:
        token_id = backend.token_to_id(token)
        if token_id is not None and template and token in template and token_id not in ids:
            ids.append(token_id)
    return ids


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}
