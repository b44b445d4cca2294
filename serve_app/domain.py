"""Domain types shared by the ingress, the generator and the cache. Plain dataclasses with no
torch, Ray or HTTP import: the ingress process never loads torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_MAX_NEW_TOKENS = 50
FinishReason = Literal["length", "stop"]


@dataclass(frozen=True)
class SamplingParams:
    """What a caller asked for; `max_new_tokens` wins over `max_length` (total tokens)."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def deterministic(self) -> bool:
        """Greedy, or sampling from an explicit seed: the same input gives the same text."""
        return self.greedy or self.seed is not None

    def normalized(self) -> SamplingParams:
        """Drop settings that cannot change the output, so equal requests compare equal."""
        max_new, max_len = self.max_new_tokens, self.max_length
        if max_new is None and max_len is None:
            max_new = DEFAULT_MAX_NEW_TOKENS
        if max_new is not None:
            max_len = None
        if self.greedy:
            return SamplingParams(max_new_tokens=max_new, max_length=max_len)
        return SamplingParams(max_new, max_len, self.temperature, self.top_p, self.seed)

    def budget(self, prompt_tokens: int) -> int:
        """Number of new tokens to generate for a prompt of this many tokens."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            return self.max_length - prompt_tokens
        return DEFAULT_MAX_NEW_TOKENS


@dataclass(frozen=True)
class GenerationRequest:
    model_id: str
    prompt: str
    params: SamplingParams


@dataclass(frozen=True)
class GenerationResult:
    model_id: str
    prompt: str
    completion: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    model_source: str
    model_revision: str
    real_weights: bool
    generation_ms: float

    @property
    def generated_text(self) -> str:
        """Prompt and continuation, as the transformers text-generation pipeline returns it."""
        return self.prompt + self.completion


@dataclass(frozen=True)
class StepEvent:
    """One token produced for row `index` of the batch (`token_id` None when it finished on EOS)."""

    index: int
    token_id: int | None
    finished: FinishReason | None = None
