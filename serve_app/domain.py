"""The request and the record that every deployment shares.

One validated `GenerationRequest` per prompt flows ingress -> cache key -> generator. One
`Generation` record flows back: the generator fills in the text, usage and finish reason, the
ingress the cache outcome, user and latency, persistence the id and creation time; history reads
the same record back. The HTTP wire types map to and from these in `serve_app.http.schemas`.

Plain dataclasses with no torch, Ray or HTTP import: the ingress process never loads torch, and
they pickle cheaply across a DeploymentHandle.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

DEFAULT_MAX_NEW_TOKENS = 50
GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily: dividing logits by less overflows to inf and NaN
probabilities (a temperature of 1.25e-239 made the sampler fail), and the distribution is a
point mass there anyway. vLLM uses the same bound."""
FinishReason = Literal["length", "stop", "cancelled"]
"""`length`: the token budget ran out; `stop`: end-of-text or a stop string; `cancelled`: the
client went away while the text streamed."""


@dataclass(frozen=True)
class SamplingParams:
    """What a caller asked for; `max_new_tokens` wins over `max_length` (total tokens)."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Strings that end the text where they first appear (not included), matched on the
    decoded text across token boundaries."""

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

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
        stop = tuple(dict.fromkeys(s for s in self.stop if s))
        if self.greedy:
            return SamplingParams(max_new_tokens=max_new, max_length=max_len, stop=stop)
        return SamplingParams(max_new, max_len, self.temperature, self.top_p, self.seed, stop)

    def budget(self, prompt_tokens: int) -> int:
        """Number of new tokens to generate for a prompt of this many tokens."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            return self.max_length - prompt_tokens
        return DEFAULT_MAX_NEW_TOKENS

    def as_dict(self) -> dict[str, Any]:
        """The settings that are set, as stored with each record."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, ())}


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete, validated and with its parameters normalized."""

    model: str
    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)
    user_id: str | None = None
    use_cache: bool = True  # False: neither read nor write the cache, always generate
    stream: bool = False  # the generator reports the text as it is decoded

    @property
    def cacheable(self) -> bool:
        return self.use_cache and self.params.deterministic


@dataclass(frozen=True)
class Feedback:
    rating: int  # 1 (bad) to 5 (good)
    comment: str | None
    created_at: datetime  # aware, UTC


@dataclass(frozen=True)
class Generation:
    """One answered prompt, from the generator's output to the stored row and back."""

    model: str
    prompt: str
    completion: str
    prompt_tokens: int
    completion_tokens: int
    model_source: str
    model_revision: str
    finish_reason: FinishReason | None = None  # None: not recorded (rows from before it was)
    params: dict[str, Any] = field(default_factory=dict)
    user_id: str | None = None
    key_name: str | None = None  # the name of the API key that asked (never the key)
    cached: bool = False
    latency_ms: float = 0.0  # the request's whole time at the ingress
    ttft_ms: float | None = None  # time to the first streamed text; None when not streamed
    messages: list[dict[str, str]] | None = None  # the chat that `prompt` renders
    metadata: dict[str, str] | None = None  # the client's labels (OpenAI `metadata`)
    id: str | None = None  # chosen by the ingress or by persistence; final once committed
    created_at: datetime | None = None  # aware, UTC; assigned with the id
    feedback: Feedback | None = None

    @property
    def generated_text(self) -> str:
        """Prompt and continuation, as the transformers text-generation pipeline returns it."""
        return self.prompt + self.completion

    def replace(self, **changes: Any) -> Generation:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Receipt:
    """What persistence assigned to a committed record: all that travels back across the
    handle, since the writer holds the rest (`Generation.replace(id=..., created_at=...)`)."""

    id: str
    created_at: datetime  # aware, UTC


@dataclass(frozen=True)
class TextDelta:
    """Text a streaming generation decoded since the last delta (whole characters only), and
    the tokens it has produced so far. The stream ends with the `Generation` itself."""

    text: str
    completion_tokens: int
    prompt_tokens: int = 0


def merge_deltas(events: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """`(key, item)` events with consecutive `TextDelta`s of one key merged into one (text
    joined, the later token counts); anything else kept in its place. Streams send what
    queued up while the last message was out as one message."""
    out: list[tuple[Any, Any]] = []
    for key, item in events:
        if out and out[-1][0] == key and isinstance(item, TextDelta):
            earlier = out[-1][1]
            if isinstance(earlier, TextDelta):
                joined = earlier.text + item.text
                out[-1] = (key, TextDelta(joined, item.completion_tokens, item.prompt_tokens))
                continue
        out.append((key, item))
    return out


def new_id() -> str:
    """A UUIDv7 (RFC 9562) string: 48-bit Unix ms, then random bits, so ids sort by time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(uuid.uuid4().bytes, "big")  # 122 random bits; we keep 74
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b, 62 bits
    return str(uuid.UUID(int=value))
