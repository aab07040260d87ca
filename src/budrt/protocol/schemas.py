"""Pydantic models of the OpenAI request bodies that budrt accepts.

Unknown fields are ignored (as vLLM does) so that LangChain-style clients that send extras keep
working; values of the wrong type (strict: no "2" for 2, no true for 1.0), NaN/infinite numbers and
values out of range are refused with a 400 that names the parameter. Bounds that depend on the
model (context length, vocabulary) or on the server's configuration (`n`) are checked by the server.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from budrt.protocol.structured import (
    LEGACY_FIELDS,
    ResponseFormat,
    StructuredOutputs,
    ToolCall,
    ToolChoice,
    Tools,
)

MAX_ITEMS = 2048  # messages of a chat, prompts of a completion, inputs of an embedding request
MAX_PARTS = 8192  # content parts of all a chat's messages (each costs a model object to validate)
MAX_STOP_CHARS = 256  # per stop string
MAX_LOGIT_BIAS = 1024  # entries: the sampler applies each one at every step
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; choices use seed + i (mod 2**63)
MAX_TOP_K = 2**31 - 1


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), strict=True, allow_inf_nan=False)


# Lists stop at their first bad item (fail_fast) and at MAX_ITEMS, so a union member that does not
# match costs O(1) rather than one error per item: a 16 MB list of ints tried as list[str] took
# tens of seconds of the event loop to refuse.
TokenIds = Annotated[list[int], Field(fail_fast=True)]  # bounded by the model's context (server)
Texts = Annotated[list[str], Field(max_length=MAX_ITEMS, fail_fast=True)]
TokenLists = Annotated[list[TokenIds], Field(max_length=MAX_ITEMS, fail_fast=True)]
Inputs = str | Texts | TokenIds | TokenLists


class StreamOptions(_Request):
    include_usage: bool = False


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_ITEMS, fail_fast=True)] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_ITEMS, fail_fast=True)] | None = None
    tool_call_id: str | None = Field(default=None, max_length=128)

    def text(self) -> str:
        """The message's text; only text parts are supported by the text models."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text":
                raise ValueError(f"content part of type '{part.type[:40]}' is not supported by this model")
            if part.text is None:
                raise ValueError("a content part of type 'text' needs 'text'")
            parts.append(part.text)
        return "".join(parts)


StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=4, fail_fast=True)] | None


class SamplingFields(_Request):
    """Sampling parameters common to chat and completions (OpenAI, plus vLLM's extras)."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)  # the server's `max_n` bounds it
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    user: str | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # vLLM-compatible extras.
    top_k: int = Field(default=-1, ge=-1, le=MAX_TOP_K)  # -1 or 0: off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    ignore_eos: bool = False
    # Constrained output (protocol/structured.py): OpenAI's spelling and vLLM's.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None

    @field_validator(*LEGACY_FIELDS)
    @classmethod
    def _refuse_legacy(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise ValueError(
                f"'{info.field_name}' is vLLM's older spelling; send 'structured_outputs' instead, "
                'e.g. {"structured_outputs": {"regex": "..."}} (json, regex, choice, grammar, json_object)'
            )
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _check_logit_bias_size(cls, value: Any) -> Any:
        # Before the entries are validated: dicts, unlike lists, are checked for length only after.
        if isinstance(value, dict) and len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        for key, bias in value.items():
            # ASCII digits only ("²".isdigit() is true); the server checks the vocabulary's range.
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"logit_bias keys must be token ids (decimal integers), got {key[:20]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError("logit_bias values must be between -100 and 100")
        return value

    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_ITEMS, fail_fast=True)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("messages", mode="before")
    @classmethod
    def _check_parts(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) <= MAX_ITEMS:
            contents = (m.get("content") for m in value if isinstance(m, dict))
            if sum(len(c) for c in contents if isinstance(c, list)) > MAX_PARTS:
                raise ValueError(f"messages may hold at most {MAX_PARTS} content parts in all")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @field_validator("tools")
    @classmethod
    def _check_tools(cls, value: Tools | None) -> Tools | None:
        names = [tool.function.name for tool in value or []]
        if len(set(names)) != len(names):
            raise ValueError("tool names must be unique")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, value: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        names = {tool.function.name for tool in info.data.get("tools") or []}
        if value in ("required",) and not names:
            raise ValueError("'required' needs at least one tool in 'tools'")
        if not isinstance(value, str) and value is not None and value.function.name not in names:
            raise ValueError(f"no tool named {value.function.name!r} in 'tools'")
        return value

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


Prompt = Inputs


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Prompt) -> Prompt:
        if isinstance(value, list) and len(value) == 0:
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("suffix")
    @classmethod
    def _check_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported by this model")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of independent prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class EmbeddingRequest(_Request):
    model: str = Field(min_length=1)
    input: Inputs
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) == 0:
            raise ValueError("input must not be empty")
        if isinstance(value, str) and value == "":
            raise ValueError("input must not be an empty string")
        return value


MAX_PROMPT_CHARS = 32_000  # OpenAI's limit for gpt-image-1; the encoder reads far fewer tokens


class ImageGenerationRequest(_Request):
    """`POST /v1/images/generations`, plus the diffusers knobs the SDK sends through `extra_body`
    (`seed`, `negative_prompt`, `steps`, `guidance_scale`). Size, steps and `n` bounds depend on
    the model and the server; the server checks them."""

    model: str = Field(min_length=1)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(default=1, ge=1)  # the server's `max_n` bounds it
    size: str | None = Field(default=None, max_length=32)  # "WxH"; None or "auto": the model's own
    response_format: Literal["url", "b64_json"] = "b64_json"  # the gateway turns url into b64_json
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100)
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] = "auto"
    stream: bool = False
    partial_images: int = Field(default=2, ge=0, le=3)
    user: str | None = Field(default=None, max_length=256)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=30.0)
    background: str | None = Field(default=None, max_length=32)  # accepted, ignored (as dall-e-2)
    style: str | None = Field(default=None, max_length=32)


class ImageEditRequest(ImageGenerationRequest):
    """`POST /v1/images/edits` (multipart form: the fields as text, validated leniently); `image`
    and `mask` are files, read apart. `strength`: how much of the input is noised away (1 = all;
    default 0.8, or 1 with a mask, as diffusers' img2img and inpainting pipelines)."""

    strength: float | None = Field(default=None, ge=0.0, le=1.0)
