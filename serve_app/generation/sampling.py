"""Choosing each row's next token with its own sampling parameters.

`transformers.generate()` applies one set of sampling settings to a whole batch; a server that
batches unrelated requests cannot, so every row carries its own temperature, top-p and RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from serve_app.domain import SamplingParams


class SampledRow(Protocol):
    params: SamplingParams
    rng: torch.Generator | None


def choose_tokens(logits: torch.Tensor, rows: Sequence[SampledRow], vocab_limit: int) -> list[int]:
    """Next token for each row of `logits`, with that row's own parameters: argmax for greedy
    rows, else temperature and top-p sampling from the row's own seeded generator. Ids at or
    above `vocab_limit` (embedding rows the tokenizer has no token for) are never chosen."""
    logits = logits.float()
    if vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = float("-inf")
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
