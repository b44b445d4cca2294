"""Batched autoregressive decoding where every row keeps its own generation parameters.

A `DecodeBatch` runs each newcomer's prompt through the model once (a left-padded prefill),
then one forward step per token for all its rows, each row's next token chosen with its own
temperature / top-p / seeded RNG (`sampling`). A row leaves the batch and the KV cache as soon
as it finishes, so a short request never pays for a long neighbour's remaining steps. Each
`step()` returns the tokens it produced, for token streaming.

No Ray import: unit tests drive it in-process.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from serve_app.domain import FinishReason, Generation, GenerationRequest, SamplingParams
from serve_app.errors import (
    GenerationFailedError,
    InvalidRequestError,
    PromptTooLongError,
    ServeError,
)
from serve_app.generation.detokenize import TextTracker
from serve_app.generation.sampling import choose_tokens

if TYPE_CHECKING:
    from serve_app.models.loading import LoadedModel

logger = logging.getLogger("ray.serve").getChild(__name__)


@dataclass
class _Row:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    budget: int
    rng: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    text: TextTracker | None = None  # set for streamed rows and rows with stop strings


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
        self.device = torch.device(loaded.device)

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
        text = None
        if request.stream or params.stop:
            text = TextTracker(self.decode, params.stop)
        return _Row(index, ids, params, budget, rng, text=text)

    def decode(self, tokens: Sequence[int]) -> str:
        # NUL becomes U+FFFD: PostgreSQL cannot store it, and every answer is stored.
        return self.tokenizer.decode(tokens, skip_special_tokens=True).replace("\x00", "\ufffd")

    def prepare(
        self, requests: Sequence[GenerationRequest]
    ) -> tuple[list[_Row], dict[int, ServeError]]:
        """A row for each request that can run, and an error for each one that cannot: one bad
        request fails alone, and nothing raised here can reach the decode thread's loop."""
        rows: list[_Row] = []
        errors: dict[int, ServeError] = {}
        for i, request in enumerate(requests):
            try:
                rows.append(self._prepare(i, request))
            except ServeError as exc:
                errors[i] = exc
            except Exception:
                logger.exception("preparing a request for model %s failed", request.model)
                errors[i] = GenerationFailedError("generation failed")
        return rows, errors

    # -- decoding ---------------------------------------------------------------------------
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
        if cache is None:
            cache = DynamicCache()
            cache.layer_class_to_replicate = SlackLayer
        device = self.device
        out = self.body(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            position_ids=positions.to(device),
            past_key_values=cache,
            use_cache=True,
        )
        logits = self.head(out.last_hidden_state[:, -1, :])
        if device.type != "cpu":  # sampling runs on the CPU, with per-row CPU generators
            logits = logits.float().cpu()
        return logits, out.past_key_values

    def result(self, request: GenerationRequest, row: _Row) -> Generation:
        info = self.loaded.info
        completion = row.text.final(row.tokens) if row.text else self.decode(row.tokens)
        return Generation(
            model=request.model,
            prompt=request.prompt,
            completion=completion,
            prompt_tokens=len(row.prompt_ids),
            completion_tokens=len(row.tokens),
            finish_reason=row.finish or "length",
            model_source=info.location,
            model_revision=info.revision,
            params=request.params.as_dict(),
        )


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
                _adopt(
                    mine,
                    _stack(mine.keys, theirs.keys, total),
                    _stack(mine.values, theirs.values, total),
                    total,
                )
            self._attention = torch.cat(
                [_left_pad(self._attention, total), _left_pad(attention, total)]
            )
            self._last_pos = torch.cat([self._last_pos, positions[:, -1]])
            self._logits = torch.cat([self._logits, logits])
        self.rows.extend(rows)

    @torch.inference_mode()
    def step(self, chosen_hook: Callable[[], None] | None = None) -> None:
        """Choose every row's next token, retire finished rows, run one forward pass.

        `chosen_hook` runs between choosing and the forward pass: what it hands out (finished
        rows, streamed text) then waits for no forward pass of the rows that go on."""
        decoder = self.decoder
        chosen = choose_tokens(self._logits, self.rows, decoder.vocab_limit)
        keep: list[int] = []
        for j, (row, token) in enumerate(zip(self.rows, chosen, strict=True)):
            if token == decoder.eos_id:
                row.finish = "stop"
                continue
            row.tokens.append(token)
            if row.text is not None:
                row.text.add(row.tokens)
                if row.text.stopped:
                    row.finish = "stop"
            if row.finish is None and len(row.tokens) >= row.budget:
                row.finish = "length"
            if row.finish is None:
                keep.append(j)
        self._retain(keep)
        if chosen_hook is not None:
            chosen_hook()
        if self.rows:
            self._forward()

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
        index = index.to(self.decoder.device)
        for layer in self._cache.layers:
            width = layer.keys.shape[2] - start
            keys = _slack_buffer(layer.keys, len(keep), width)
            values = _slack_buffer(layer.values, len(keep), width)
            torch.index_select(layer.keys[:, :, start:], 0, index, out=keys[:, :, :width])
            torch.index_select(layer.values[:, :, start:], 0, index, out=values[:, :, :width])
            _adopt(layer, keys, values, width)
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


class SlackLayer(DynamicLayer):
    """A KV cache layer that appends in place: its keys and values are views of buffers with
    `KV_SLACK` free time steps, so a decode step writes one column instead of copying the
    whole cache (`DynamicLayer` concatenates: 20% of an int8 decode step of 32 rows, profiled
    on 2 AVX2 cores). The batch stacks rows in and cuts them out straight into new buffers
    with slack (`_adopt`); keys/values assigned any other way are moved into a fresh buffer
    by the next update."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys.numel() == 0:
            self.keys, self.values = key_states, value_states
            self._k_buf = self._v_buf = None
            return self.keys, self.values
        used, new = self.keys.shape[-2], key_states.shape[-2]
        k_buf, v_buf = getattr(self, "_k_buf", None), getattr(self, "_v_buf", None)
        fits = (
            k_buf is not None
            and _is_prefix_view(self.keys, k_buf)
            and _is_prefix_view(self.values, v_buf)
            and used + new <= k_buf.shape[-2]
        )
        if not fits:
            k_buf, v_buf = _with_slack(self.keys, used + new), _with_slack(self.values, used + new)
            self._k_buf, self._v_buf = k_buf, v_buf
        k_buf[:, :, used : used + new] = key_states
        v_buf[:, :, used : used + new] = value_states
        self.keys, self.values = k_buf[:, :, : used + new], v_buf[:, :, : used + new]
        return self.keys, self.values


KV_SLACK = 32
"""Free time steps a KV buffer gets when it is (re)allocated: a copy every 32 tokens, not 1."""


def _with_slack(t: torch.Tensor, need: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[-2] = need + KV_SLACK
    buf = t.new_empty(shape)
    buf[:, :, : t.shape[-2]] = t
    return buf


def _slack_buffer(like: torch.Tensor, rows: int, steps: int) -> torch.Tensor:
    """An uninitialised KV buffer shaped as `like` but for `rows` rows, with room for `steps`
    time steps and `KV_SLACK` more."""
    return like.new_empty((rows, like.shape[1], steps + KV_SLACK, like.shape[3]))


def _adopt(layer: DynamicLayer, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
    """Make buffers `keys`/`values`, filled up to time step `width`, `layer`'s cache: a
    `SlackLayer` appends to them in place, with no copy into a fresh buffer first. The batch
    edits its cache whenever rows join or leave; in the service at 32 users (AVX2 cap) the
    second copy was 8% of the decode thread (py-spy)."""
    layer.keys, layer.values = keys[:, :, :width], values[:, :, :width]
    if isinstance(layer, SlackLayer):
        layer._k_buf, layer._v_buf = keys, values


def _is_prefix_view(view: torch.Tensor, buf: torch.Tensor) -> bool:
    return (
        view.data_ptr() == buf.data_ptr()
        and view.shape[:2] == buf.shape[:2]
        and view.stride() == buf.stride()
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
    """Two batches' KV tensors of one layer stacked, both left-padded with zeros to `width`
    time steps, in a buffer with `KV_SLACK` more (`_adopt` it)."""
    buf = _slack_buffer(old, old.shape[0] + new.shape[0], width)
    for part, rows in ((old, slice(0, old.shape[0])), (new, slice(old.shape[0], None))):
        pad = width - part.shape[2]
        buf[rows, :, :pad] = 0  # padding is masked out, but must stay finite (0 x NaN is NaN)
        buf[rows, :, pad:width] = part
    return buf
