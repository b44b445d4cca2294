"""OpenAI wire types for /v1/completions, /v1/chat/completions and /v1/models (the shapes of
vLLM's `entrypoints/openai/protocol.py`), and their mapping onto `GenerationRequest`.

Fields this service does not implement are refused with a 400 that names them, unless they
hold the value that means "off" (clients such as LangChain send `presence_penalty: 0`): a
silently ignored `logprobs` or `tools` would be a wrong answer.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.domain import Generation, GenerationRequest, SamplingParams
from serve_app.http.schemas import RequestBody

MAX_CHOICES = 8
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_PROMPTS = 16
MAX_PROMPT_CHARS = 20_000
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 64
MAX_TOKENS = 4096  # the ceiling; `limits.max_new_tokens` is the cap in force

# Accepted only with the value that turns them off.
_OFF: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False),
    "response_format": (None, {"type": "text"}),
}


MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


def check_metadata(metadata: dict[str, str]) -> None:
    """OpenAI's bounds: at most 16 pairs, keys up to 64 and values up to 512 characters."""
    if len(metadata) > MAX_METADATA_PAIRS:
        raise ValueError(f"metadata holds at most {MAX_METADATA_PAIRS} pairs")
    for key, value in metadata.items():
        if not 0 < len(key) <= MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise ValueError(
                f"metadata keys need 1 to {MAX_METADATA_KEY} characters and values at most "
                f"{MAX_METADATA_VALUE}"
            )


class UnsupportedFieldError(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"'{name}' is not supported by this server")
        self.param = name


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _SamplingRequest(RequestBody):
    """What both routes share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1 - MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, min_length=1, max_length=128)
    metadata: dict[str, str] | None = Field(
        default=None, description="Up to 16 labels stored with the answer; history filters on them."
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():
                if name in _OFF and value not in _OFF[name]:
                    raise UnsupportedFieldError(name)
                if name not in _OFF and name not in cls.model_fields:
                    raise UnsupportedFieldError(name)
            data = {k: v for k, v in data.items() if k not in _OFF}
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must have 1 to {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is not None:
            check_metadata(metadata)
        return metadata

    def context(self, **fields: Any) -> dict[str, Any]:
        """Record fields this request sets besides its generation settings."""
        return {"metadata": self.metadata, **fields}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _requests(
        self, prompt: str, max_tokens: int, extra_stop: list[str] = ()
    ) -> list[GenerationRequest]:
        """One request per choice; choice i of a seeded request samples from seed + i."""
        return [
            GenerationRequest(
                model=self.model,
                prompt=prompt,
                params=SamplingParams(
                    max_new_tokens=max_tokens,
                    temperature=self.temperature,
                    top_p=self.top_p,
                    seed=None if self.seed is None else self.seed + i,
                    stop=tuple([*(self.stop or ()), *extra_stop]),
                ).normalized(),
                user_id=self.user,
                stream=self.stream,
            )
            for i in range(self.n)
        ]


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt: str | list[str]) -> str | list[str]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts")
        for p in prompts:
            if not p.strip() or len(p) > MAX_PROMPT_CHARS:
                raise ValueError(f"a prompt needs 1 to {MAX_PROMPT_CHARS} characters")
        return prompt

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def to_requests(self) -> list[GenerationRequest]:
        """Choices in OpenAI's order: prompt 0's n choices, then prompt 1's..."""
        tokens = self.max_tokens or DEFAULT_COMPLETION_TOKENS
        return [r for p in self.prompts for r in self._requests(p, tokens)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)

    @field_validator("messages")
    @classmethod
    def _text_only(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        total = sum(len(m.text) for m in messages)  # raises for non-text parts
        if total > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages hold more than {MAX_PROMPT_CHARS} characters")
        return messages

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text} for m in self.messages]

    def to_requests(self, prompt: str, template_stop: list[str]) -> list[GenerationRequest]:
        tokens = self.max_completion_tokens or self.max_tokens or DEFAULT_CHAT_TOKENS
        return self._requests(prompt, tokens, template_stop)


# --- responses ---------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, generations: list[Generation]) -> Usage:
        # A prompt counts once however many choices it has (OpenAI counts it so too).
        prompts = {(g.prompt, g.prompt_tokens) for g in generations}
        prompt_tokens = sum(n for _, n in prompts)
        completion_tokens = sum(g.completion_tokens for g in generations)
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    metadata: dict[str, str] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    metadata: dict[str, str] | None = None


class ChatCompletionList(BaseModel):
    """OpenAI's listing of stored chat completions."""

    object: Literal["list"] = "list"
    data: list[ChatCompletionResponse]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "serve-gpt2"


class ModelListResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
