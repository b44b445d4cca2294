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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

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
        self.body = loaded.model.base_model  # the transformer without the LM head
        self.head = loaded.model.get_output_embeddings()
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

    def forward_last(
        self,
        input_ids: torch.Tensor,
        attention: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache | None,
    ) -> tuple[torch.Tensor, DynamicCache]:
        """Logits of each row's last position, and the updated KV cache.

        The LM head (40% of GPT-2's weights) runs on the last position only, and on a plain
        [rows, hidden] matrix: `logits_to_keep` hands it a strided [rows, 1, hidden] view,
        for which bf16 `linear` falls back to a batched matmul that copies the whole weight
        once per row (measured: 3.6 s of a 3.9 s bf16 prefill of 32 rows).
        """
        out = self.body(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        return self.head(out.last_hidden_state[:, -1, :]), out.past_key_values

    def prefill(self, rows: list[_Row]) -> DecodeBatch:
        """A new batch holding `rows`, their prompts run through the model once."""
        batch = DecodeBatch(self)
        batch.admit(rows)
        return batch

    def stream(self, rows: list[_Row]) -> Iterator[list[StepEvent]]:
        """Decode `rows` together, yielding each step's new tokens as they are produced."""
        if not rows:
            return
        batch = self.prefill(rows)
        while batch.rows:
            yield batch.step()

    def generate(
        self, requests: Sequence[GenerationRequest]
    ) -> list[GenerationResult | ServeError]:
        """Complete every request; a request that cannot run gets its own error, not the batch."""
        start = time.perf_counter()
        rows, errors = self.prepare(requests)
        for _ in self.stream(rows):
            pass
        elapsed_ms = (time.perf_counter() - start) * 1000
        results: list[GenerationResult | ServeError] = [None] * len(requests)  # type: ignore[list-item]
        for i, exc in errors.items():
            results[i] = exc
        for row in rows:
            results[row.index] = self.result(requests[row.index], row, elapsed_ms)
        return results

    def result(self, request: GenerationRequest, row: _Row, elapsed_ms: float) -> GenerationResult:
        info = self.loaded.info
        return GenerationResult(
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


def one_torch_thread() -> None:
    """Give the calling thread one torch intra-op thread: call it first in every thread other
    than the decode thread that runs torch work (model loads, stand-in builds).

    libgomp gives each thread that runs a parallel region a team of its own, kept for as long
    as that thread lives, and counts every thread of every team. Once they outnumber the CPUs
    it "throttles": at each barrier a waiting thread spins 100 times instead of 300,000 before
    it sleeps on a futex. A forward pass is hundreds of parallel regions, so the decode
    thread's worker then sleeps and is woken at each of them. Measured here (2 cores): batch-1
    `generate()` 1.37 s before and 2.22 s after a live side thread had run one 2-thread matmul,
    1.27 s unchanged when that thread ran on one thread; through the service, fp32 decode steps
    50-54 ms with the bfloat16 and int8 models loaded by a 2-thread loader against 43-46 ms
    with fp32 alone, and 38-44 against 40-41 ms with the loader on one thread.

    torch's process-wide count becomes 1 as well, which threads that first use torch later
    start from: the decode thread sets its own count (`ThreadBudget`).
    """
    torch.get_num_threads()  # torch sets a thread's count on its first use: let it happen now
    torch.set_num_threads(1)  # so that this per-thread setting is the one that stays


def torch_side_executor(name: str) -> ThreadPoolExecutor:
    """One worker thread for torch work beside the decode thread, on one intra-op thread
    (see `one_torch_thread`): the decode thread stays the only owner of a thread team."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=one_torch_thread)


class ThreadBudget:
    """torch intra-op threads for each forward pass of the decode thread.

    Steps over at most `single_thread_max_rows` rows run on one thread, the rest (and every
    prefill) on all `threads`; 0 (the default) runs every step on all threads. One thread for
    small steps leaves a core to the request path, and a step on one thread does not stall at
    barriers when the other core is taken. It paid on one 2-core machine (8 users: 230 vs 142
    tok/s) and cost on another (1 user: step 41-43 vs 37-38 ms, 4 users 77 vs 83 tok/s, 8 users
    equal; docs/benchmarks.md), so it is a setting, not a rule. Call only from the thread that
    runs the forward passes.
    """

    def __init__(self, threads: int, single_thread_max_rows: int = 0) -> None:
        self.threads = max(1, threads)
        self.single_thread_max_rows = single_thread_max_rows
        self._current = 0

    def for_step(self, rows: int) -> None:
        self._use(1 if rows <= self.single_thread_max_rows else self.threads)

    def for_prefill(self) -> None:
        self._use(self.threads)

    def _use(self, threads: int) -> None:
        if threads != self._current:
            if not self._current:  # as in one_torch_thread: torch's lazy per-thread setup
                torch.get_num_threads()  # first, or it could apply another thread's count later
            torch.set_num_threads(threads)
            self._current = threads


class DecodeBatch:
    """Rows decoding together, at iteration level: a row joins after its own prefill, at a step
    boundary, and leaves as soon as it is done. Left padding keeps every row's tokens aligned at
    the right edge of one KV cache; columns no row needs any more are trimmed away.

    Not thread-safe: one thread drives a batch.
    """

    def __init__(self, decoder: BatchDecoder) -> None:
        self.decoder = decoder
        self.rows: list[_Row] = []
        # One cache for the batch's lifetime: the model appends to it in place each step; it is
        # only edited (rows stacked in, retired rows and dead columns cut out) when rows change.
        self._cache: DynamicCache | None = None  # per layer [rows, heads, time, head_dim]
        self._attention = torch.zeros((0, 0), dtype=torch.long)
        self._last_pos = torch.zeros((0,), dtype=torch.long)
        self._logits: torch.Tensor | None = None  # next-token logits of every row

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def admit(self, rows: list[_Row]) -> None:
        """Run the new rows' prompts and merge them in: one left-padded forward pass per
        group of similar prompt lengths (`length_groups`), so short prompts pay little
        padding when long ones arrive with them."""
        admitted = len(self.rows)
        try:
            for group in length_groups(rows):
                self._admit_group(group)
        except BaseException:
            self.drop(self.rows[admitted:])  # all newcomers or none: the caller fails them all
            raise

    def _admit_group(self, rows: list[_Row]) -> None:
        width = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), width), self.decoder.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            n = len(row.prompt_ids)
            input_ids[j, width - n :] = torch.tensor(row.prompt_ids)
            attention[j, width - n :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self.decoder.forward_last(input_ids, attention, positions, None)
        if not self.rows:
            self._cache, self._attention = cache, attention
            self._last_pos, self._logits = positions[:, -1], logits
        else:
            total = max(self._attention.shape[1], width)
            for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
                mine.keys = _stack(mine.keys, theirs.keys, total)
                mine.values = _stack(mine.values, theirs.values, total)
            self._attention = torch.cat(
                [_left_pad(self._attention, total), _left_pad(attention, total)]
            )
            self._last_pos = torch.cat([self._last_pos, positions[:, -1]])
            self._logits = torch.cat([self._logits, logits])
        self.rows.extend(rows)

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """Choose every row's next token, retire finished rows, run one forward pass."""
        decoder = self.decoder
        chosen = decoder._choose(self._logits, self.rows)
        events: list[StepEvent] = []
        keep: list[int] = []
        for j, (row, token) in enumerate(zip(self.rows, chosen, strict=True)):
            if token == decoder.eos_id:
                row.finish = "stop"
                events.append(StepEvent(row.index, None, "stop"))
                continue
            row.tokens.append(token)
            if len(row.tokens) >= row.budget:
                row.finish = "length"
            events.append(StepEvent(row.index, token, row.finish))
            if row.finish is None:
                keep.append(j)
        self._retain(keep)
        if self.rows:
            self._forward()
        return events

    def drop(self, rows: list[_Row]) -> None:
        """Stop decoding these rows (their callers went away)."""
        gone = {id(r) for r in rows}
        self._retain([j for j, r in enumerate(self.rows) if id(r) not in gone])

    def _retain(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.__init__(self.decoder)  # empty: release the cache
            return
        index = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[j] for j in keep]
        self._attention = self._attention.index_select(0, index)
        self._last_pos = self._last_pos.index_select(0, index)
        self._logits = self._logits.index_select(0, index)
        # Columns only retired rows attended to would cost every later step: cut them.
        start = int(self._attention.any(dim=0).nonzero()[0])
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self._attention = self._attention[:, start:]

    def _forward(self) -> None:
        next_ids = torch.tensor([[row.tokens[-1]] for row in self.rows], dtype=torch.long)
        self._attention = torch.cat(
            [self._attention, self._attention.new_ones((len(self.rows), 1))], dim=-1
        )
        self._last_pos = self._last_pos + 1
        self._logits, self._cache = self.decoder.forward_last(
            next_ids, self._attention, self._last_pos.unsqueeze(-1), self._cache
        )


GROUP_MIN_TOKENS = 128
"""Prompt tokens a prefill group holds before it may be cut: below about 100 tokens a forward
pass is bound by weight reads, so a smaller group costs nearly as much as a bigger one
(measured, float32 GPT-2 on 2 cores: 33 ms for one 22-token prompt, 67 ms for four)."""
GROUP_CUT_TOKENS = 16
"""A group is cut when taking the next prompt would add at least this much padding to it."""


def length_groups(rows: list[_Row]) -> list[list[_Row]]:
    """`rows` sorted by prompt length and cut into prefill groups.

    A left-padded prefill runs every row at its longest prompt's width: 32 prompts of 19 to 31
    tokens cost 992 token-passes for 800 tokens. Sorted, a group is cut where the next prompt
    would pad it by `GROUP_CUT_TOKENS` or more, as long as both sides hold `GROUP_MIN_TOKENS`,
    and always where the padding alone would reach `GROUP_MIN_TOKENS` (a few short prompts
    arriving with a long one).
    """
    ordered = sorted(rows, key=lambda r: len(r.prompt_ids))
    remaining = sum(len(r.prompt_ids) for r in ordered)
    groups: list[list[_Row]] = []
    group: list[_Row] = []
    tokens = 0
    for row in ordered:
        n = len(row.prompt_ids)
        padding = len(group) * n - tokens  # what taking this row adds to the group
        big_enough = tokens >= GROUP_MIN_TOKENS and remaining >= GROUP_MIN_TOKENS
        if padding >= GROUP_CUT_TOKENS and (big_enough or padding >= GROUP_MIN_TOKENS):
            groups.append(group)
            group, tokens = [], 0
        group.append(row)
        tokens += n
        remaining -= n
    if group:
        groups.append(group)
    return groups


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the time axis (dim 2 of a KV tensor, dim 1 of a mask) on the left to `width`."""
    axis = 2 if t.dim() == 4 else 1
    missing = width - t.shape[axis]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)


def _stack(old: torch.Tensor, new: torch.Tensor, width: int) -> torch.Tensor:
    """Stack two batches' KV tensors of one layer, both left-padded to `width` time steps."""
    return torch.cat([_left_pad(old, width), _left_pad(new, width)])
