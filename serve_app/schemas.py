"""HTTP wire types. Nothing here knows about Ray, Redis or the database; the routes translate
between these and the service's domain objects."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 20_000
MAX_FEEDBACK_COMMENT_CHARS = 2_000


class GenerateRequest(BaseModel):
    """Body of `POST /generate` (the classic FastAPI GPT-2 recipe, extended)."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(min_length=1, max_length=10, description="1-10 prompts.")
    max_length: int | None = Field(
        default=None, ge=1, le=4096, description="Total tokens (prompt + new), as in transformers."
    )
    max_new_tokens: int | None = Field(
        default=None, ge=1, le=256, description="New tokens per prompt; wins over max_length."
    )
    model: str | None = Field(default=None, description="Model id; default model if omitted.")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 means greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    user_id: str | None = Field(default=None, min_length=1, max_length=128)
    cache: bool = Field(
        default=True, description="False: neither read nor write the cache; always generate."
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


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class Feedback(BaseModel):
    rating: int
    comment: str | None = None
    created_at: str = Field(description="When the feedback was given, ISO 8601, UTC.")


class FeedbackRequest(BaseModel):
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
    usage: Usage
    feedback: Feedback | None = None


class HistoryPage(BaseModel):
    items: list[GenerationRecord]
    next_cursor: str | None


class ModelEntry(BaseModel):
    id: str
    source: str | None
    kind: str = Field(description="hub, local or standin")
    real_weights: bool
    revision: str
    architecture: str
    dtype: str
    default: bool
    warning: str | None = None


class ModelList(BaseModel):
    default: str
    models: list[ModelEntry]


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class CacheInvalidation(BaseModel):
    """Answer of `DELETE /cache`: what was removed from each tier of this replica."""

    model: str | None = Field(description="The model whose entries went; null: all of them.")
    deleted_l1: int
    deleted_l2: int
