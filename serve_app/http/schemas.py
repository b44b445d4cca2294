"""HTTP wire types, and the one place that maps them to and from the domain types
(`GenerationRequest` in, `Generation` out). Nothing here knows about Ray, Redis or the database.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app import domain

MAX_PROMPT_CHARS = 20_000
MAX_FEEDBACK_COMMENT_CHARS = 2_000


def iso_z(value: datetime) -> str:
    """How the API shows a timestamp: ISO 8601 in UTC, microseconds, a `Z` suffix."""
    return value.astimezone(timezone.utc).replace(tzinfo=None).isoformat("T", "microseconds") + "Z"


def _unicode_problem(value: Any, where: str) -> str | None:
    """What is wrong with the text in `value`, naming where, or None. Refused: a lone
    surrogate (JSON's `\ud800` escape can carry one), which is not Unicode text at all, and
    NUL, which PostgreSQL cannot store in a text column: refused on every database, so an
    answer never depends on which one the service runs on."""
    if isinstance(value, str):
        if "\x00" in value:
            return f"{where} contains a NUL character (U+0000), which cannot be stored"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{where} is not valid Unicode text (a lone surrogate)"
    elif isinstance(value, BaseModel):
        return _unicode_problem(dict(value), where)
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _unicode_problem(key, where) or _unicode_problem(item, f"{where}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _unicode_problem(item, f"{where}[{i}]")
            if found:
                return found
    return None


class InvalidTextError(ValueError):
    def __init__(self, problem: str, field: str) -> None:
        super().__init__(problem)
        self.param = field  # the error mapper names it (OpenAI's `param`)


class RequestBody(BaseModel):
    """A request body whose every string is valid Unicode: the tokenizer, the database and the
    JSON answer all need UTF-8, so a lone surrogate is a 400 here, not a 500 later."""

    @model_validator(mode="after")
    def _valid_unicode(self) -> Any:
        for name in type(self).model_fields:
            where = _unicode_problem(getattr(self, name), name)
            if where:
                raise InvalidTextError(where, name)
        return self


class GenerateRequest(RequestBody):
    """Body of `POST /generate` (the classic FastAPI GPT-2 recipe, extended)."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(
        min_length=1,
        max_length=64,
        description="1-64 prompts (fewer if `limits.max_prompts_per_request` says so).",
    )
    max_length: int | None = Field(
        default=None, ge=1, le=4096, description="Total tokens (prompt + new), as in transformers."
    )
    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="New tokens per prompt (at most `limits.max_new_tokens`); wins over "
        "max_length.",
    )
    model: str | None = Field(default=None, description="Model id; default model if omitted.")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 means greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    user_id: str | None = Field(default=None, min_length=1, max_length=128)
    cache: bool = Field(
        default=True, description="False: neither read nor write the cache; always generate."
    )
    stream: bool = Field(
        default=False,
        description="Server-sent events as the text is decoded (one prompt only).",
    )

    @field_validator("prompts")
    @classmethod
    def _prompts_have_text(cls, prompts: list[str]) -> list[str]:
        for i, prompt in enumerate(prompts):
            if not prompt.strip():
                raise ValueError(f"prompts[{i}] is empty")
            if len(prompt) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompts[{i}] is longer than {MAX_PROMPT_CHARS} characters")
        return prompts

    def to_requests(self, model: str) -> list[domain.GenerationRequest]:
        """One validated request per prompt, for `model` (the body's, the header's or the
        default: the route decides)."""
        params = domain.SamplingParams(
            max_new_tokens=self.max_new_tokens,
            max_length=self.max_length,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
        ).normalized()
        return [
            domain.GenerationRequest(model, prompt, params, self.user_id, self.cache, self.stream)
            for prompt in self.prompts
        ]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class Feedback(BaseModel):
    rating: int
    comment: str | None = None
    created_at: str = Field(description="When the feedback was given, ISO 8601, UTC.")


class FeedbackRequest(RequestBody):
    """Body of `POST /generations/{id}/feedback`; new feedback replaces earlier feedback."""

    model_config = ConfigDict(extra="forbid")

    rating: int = Field(ge=1, le=5, strict=True, description="1 (bad) to 5 (good); a JSON integer.")
    comment: str | None = Field(default=None, max_length=MAX_FEEDBACK_COMMENT_CHARS)


class GenerationRecord(BaseModel):
    id: str
    prompt: str
    generated_text: str = Field(description="Prompt followed by the generated continuation.")
    completion: str = Field(description="The generated continuation alone.")
    model_name: str
    created_at: str = Field(description="ISO 8601, UTC.")
    cached: bool
    user_id: str | None = None
    key_name: str | None = Field(
        default=None, description="The name of the API key that asked (keys on only)."
    )
    usage: Usage
    finish_reason: Literal["length", "stop", "cancelled"] | None = Field(
        description="`length`: the token budget was reached; `stop`: end of text or a stop "
        "string; `cancelled`: the client left a stream early. Null for records stored before "
        "it was recorded."
    )
    messages: list[dict[str, str]] | None = Field(
        default=None, description="The chat the prompt was rendered from (chat completions)."
    )
    metadata: dict[str, str] | None = Field(
        default=None, description="The labels the client sent (OpenAI routes' `metadata`)."
    )
    latency_ms: float = Field(description="The request's whole time at the server.")
    ttft_ms: float | None = Field(
        default=None, description="Time to the first streamed text; null when not streamed."
    )
    feedback: Feedback | None = None

    @classmethod
    def from_generation(cls, g: domain.Generation) -> GenerationRecord:
        if g.id is None or g.created_at is None:
            raise ValueError("only a stored generation has a wire record")
        feedback = None
        if g.feedback is not None:
            feedback = Feedback(
                rating=g.feedback.rating,
                comment=g.feedback.comment,
                created_at=iso_z(g.feedback.created_at),
            )
        return cls(
            id=g.id,
            prompt=g.prompt,
            generated_text=g.generated_text,
            completion=g.completion,
            model_name=g.model,
            created_at=iso_z(g.created_at),
            cached=g.cached,
            user_id=g.user_id,
            key_name=g.key_name,
            usage=Usage(prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens),
            finish_reason=g.finish_reason,
            messages=g.messages,
            metadata=g.metadata,
            latency_ms=round(g.latency_ms, 3),
            ttft_ms=None if g.ttft_ms is None else round(g.ttft_ms, 3),
            feedback=feedback,
        )


class HistoryPage(BaseModel):
    items: list[GenerationRecord]
    next_cursor: str | None

    @classmethod
    def from_generations(
        cls, items: list[domain.Generation], next_cursor: str | None
    ) -> HistoryPage:
        return cls(
            items=[GenerationRecord.from_generation(g) for g in items], next_cursor=next_cursor
        )


class ModelEntry(BaseModel):
    id: str
    source: str | None
    kind: str = Field(description="hub, local or standin")
    real_weights: bool
    revision: str
    architecture: str
    dtype: str
    device: str = Field(default="auto", description="auto, cpu or cuda, as configured")
    kernel: str | None = Field(
        default=None, description='Kernels the model runs on, e.g. "fbgemm int8 (AVX2)"'
    )
    default: bool
    warning: str | None = None


class ModelList(BaseModel):
    default: str
    models: list[ModelEntry]


class ErrorBody(BaseModel):
    type: str = Field(description="Stable machine-readable kind, e.g. `validation_error`.")
    message: str


class ErrorResponse(BaseModel):
    """The body of every error answer (documented on every route)."""

    error: ErrorBody


class CacheInvalidation(BaseModel):
    """Answer of `DELETE /cache`: what was removed from each tier of this replica."""

    model: str | None = Field(description="The model whose entries went; null: all of them.")
    deleted_l1: int
    deleted_l2: int
