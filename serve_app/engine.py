"""Batched autoregressive decoding where every row keeps its own generation parameters.

`transformers.generate()` applies one set of sampling settings to a whole batch; a server that
batches unrelated requests cannot. This loop runs one prefill over the left-padded batch and
then one forward step per token, choosing each row's next token with that row's own
temperature / top-p / seeded RNG, and drops rows from the batch (and from the KV cache) as soon
as they finish, so a short request never pays for a long neighbour's remaining steps.

`BatchDecoder.stream()` yields the tokens of every step as they are produced: token streaming
(and an OpenAI-style API) can consume it directly. No Ray import: unit tests drive it in-process.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from serve_app.domain import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    StepEvent,
)
from serve_app.errors import InvalidRequestError, PromptTooLongError, ServeError

if TYPE_CHECKING:
    from serve_app.registry import LoadedModel


@dataclass
class _Row:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    budget: int
    rng: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    finish: FinishReason | None = None


class BatchDecoder:
    """Generates for a batch of requests on one loaded model. Blocking: run it in a thread."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.eos_id = loaded.eos_token_id
        self.pad_id = loaded.eos_token_id
        self.vocab_limit = loaded.vocab_limit
        self.n_positions = loaded.n_positions

    # -- validation -------------------------------------------------------------------------
    def _prepare(self, index: int, request: GenerationRequest) -> _Row:
        ids = self.tokenizer.encode(request.prompt, add_special_tokens=False)
        if not ids:
            raise InvalidRequestError("prompt encodes to no tokens")
        params = request.params
        budget = params.budget(len(ids))
        if budget < 1:
            raise InvalidRequestError(
                f"max_length ({params.max_length}) must exceed the prompt's {len(ids)} tokens"
            )
        if len(ids) + budget > self.n_positions:
            raise PromptTooLongError(
                f"prompt ({len(ids)} tokens) + {budget} new tokens exceeds the model's context "
                f"of {self.n_positions} tokens",
                prompt_tokens=len(ids),
                limit=self.n_positions,
            )
        rng = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            rng = torch.Generator().manual_seed(seed)
        return _Row(index, ids, params, budget, rng)

    def prepare(
        self, requests: Sequence[GenerationRequest]
    ) -> tuple[list[_Row], dict[int, ServeError]]:
        rows: list[_Row] = []
        errors: dict[int, ServeError] = {}
        for i, request in enumerate(requests):
            try:
                rows.append(self._prepare(i, request))
            except ServeError as exc:
                errors[i] = exc
        return rows, errors

    # -- decoding ---------------------------------------------------------------------------
    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Next token for each row, with that row's own parameters."""
        logits = logits.float()
        if self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit :] = float("-inf")
        chosen = logits.argmax(dim=-1).tolist()
        for j, row in enumerate(rows):
            if row.params.greedy:
                continue
            scores = logits[j] / row.params.temperature
            probs = torch.softmax(scores, dim=-1)
            if row.params.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                cumulative = sorted_probs.cumsum(-1)
                # Keep the smallest prefix whose mass reaches top_p (always at least one token).
                drop = cumulative - sorted_probs >= row.params.top_p
                sorted_probs[drop] = 0.0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            chosen[j] = int(torch.multinomial(probs, 1, generator=row.rng).item())
        return chosen

    @torch.inference_mode()
    def stream(self, rows: list[_Row]) -> Iterator[list[StepEvent]]:
        """Decode `rows` together, yielding each step's new tokens as they are produced."""
        if not rows:
            return
        width = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            n = len(row.prompt_ids)
            input_ids[j, width - n :] = torch.tensor(row.prompt_ids)
            attention[j, width - n :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)

        out = self.model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True
        )
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
        last_pos = positions[:, -1]
        active = list(rows)

        while True:
            chosen = self._choose(logits, active)
            events: list[StepEvent] = []
            keep: list[int] = []
            for j, (row, token) in enumerate(zip(active, chosen, strict=True)):
                if token == self.eos_id:
                    row.finish = "stop"
                    events.append(StepEvent(row.index, None, "stop"))
                    continue
                row.tokens.append(token)
                if len(row.tokens) >= row.budget:
                    row.finish = "length"
                events.append(StepEvent(row.index, token, row.finish))
                if row.finish is None:
                    keep.append(j)
            yield events
            if not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(index)
                attention = attention.index_select(0, index)
                last_pos = last_pos.index_select(0, index)
                active = [active[j] for j in keep]
            next_ids = torch.tensor([[row.tokens[-1]] for row in active], dtype=torch.long)
            attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=-1)
            last_pos = last_pos + 1
            out = self.model(
                input_ids=next_ids,
                attention_mask=attention,
                position_ids=last_pos.unsqueeze(-1),
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :]

    def generate(
        self, requests: Sequence[GenerationRequest]
    ) -> list[GenerationResult | ServeError]:
        """Complete every request; a request that cannot run gets its own error, not the batch."""
        start = time.perf_counter()
        rows, errors = self.prepare(requests)
        for _ in self.stream(rows):
            pass
        elapsed_ms = (time.perf_counter() - start) * 1000
        info = self.loaded.info
        results: list[GenerationResult | ServeError] = [None] * len(requests)  # type: ignore[list-item]
        for i, exc in errors.items():
            results[i] = exc
        for row in rows:
            request = requests[row.index]
            results[row.index] = GenerationResult(
                model_id=request.model_id,
                prompt=request.prompt,
                completion=self.tokenizer.decode(row.tokens, skip_special_tokens=True),
                prompt_tokens=len(row.prompt_ids),
                completion_tokens=len(row.tokens),
                finish_reason=row.finish or "length",
                model_source=info.location,
                model_revision=info.revision,
                real_weights=info.real_weights,
                generation_ms=elapsed_ms,
            )
        return results
