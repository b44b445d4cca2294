"""The decoding loop on a real (tiny, random-weight) GPT-2: per-row parameters inside one batch
give each caller exactly what a lone request would."""

from types import SimpleNamespace

import pytest

from serve_app.config import ModelSpec
from serve_app.domain import Generation, GenerationRequest, SamplingParams
from serve_app.errors import GenerationFailedError, InvalidRequestError, PromptTooLongError
from serve_app.generation.engine import (
    GROUP_CUT_TOKENS,
    GROUP_MIN_TOKENS,
    BatchDecoder,
    length_groups,
)
from serve_app.models.loading import load_model
from serve_app.models.resolve import resolve_model
from tests.unit.generation.decoding import generate, lone, prefill, run


@pytest.fixture(scope="module", params=["onednn", "stock"])
def decoder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    spec = ModelSpec(id="tiny-test", architecture="tiny", seed=7, kernels=request.param)
    info = resolve_model(spec, root, hub_timeout_s=1.0, offline=True)
    return BatchDecoder(load_model(spec, info, root))


def req(prompt="The quick brown fox", model="tiny-test", **params) -> GenerationRequest:
    return GenerationRequest(model, prompt, SamplingParams(**params))


def test_greedy_is_deterministic(decoder):
    a = lone(decoder, req(max_new_tokens=20))
    b = lone(decoder, req(max_new_tokens=20))
    assert a.completion == b.completion and a.completion_tokens == b.completion_tokens
    assert a.generated_text == "The quick brown fox" + a.completion


def test_budget_max_new_tokens_and_max_length(decoder):
    r = lone(decoder, req(max_new_tokens=9))
    assert r.completion_tokens == 9 or r.finish_reason == "stop"
    r = lone(decoder, req(max_length=r.prompt_tokens + 4))
    assert r.completion_tokens == 4 or r.finish_reason == "stop"
    r = lone(decoder, req(max_new_tokens=3, max_length=100))  # max_new_tokens wins
    assert r.completion_tokens <= 3


def test_end_of_text_finishes_with_stop_and_the_budget_with_length(decoder, monkeypatch):
    first = lone(decoder, req(max_new_tokens=1))
    assert (first.finish_reason, first.completion_tokens) == ("length", 1)
    rows, _ = decoder.prepare([req(max_new_tokens=1)])
    prefill(decoder, rows).step()
    monkeypatch.setattr(decoder, "eos_id", rows[0].tokens[0])  # the next token ends the text
    stopped = lone(decoder, req(max_new_tokens=5))
    assert (stopped.finish_reason, stopped.completion_tokens, stopped.completion) == ("stop", 0, "")


def test_a_stop_string_ends_the_text_before_it(decoder):
    full = lone(decoder, req("Stop strings", max_new_tokens=24))
    assert full.finish_reason == "length" and len(full.completion) > 12
    stop = full.completion[6:9]
    cut = lone(decoder, req("Stop strings", max_new_tokens=24, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.completion == full.completion[: full.completion.index(stop)]
    assert cut.completion_tokens < full.completion_tokens
    missing = lone(decoder, req("Stop strings", max_new_tokens=24, stop=("\u2603never",)))
    assert missing.completion == full.completion and missing.finish_reason == "length"


def test_batch_with_mixed_parameters_equals_lone_requests(decoder):
    batch = [
        req("Hello there", max_new_tokens=12),
        req("A much longer prompt that needs padding on the left side", max_new_tokens=5),
        req("Sampling with a seed", temperature=0.9, seed=123, max_new_tokens=16),
        req("Sampling with a seed", temperature=1.3, top_p=0.8, seed=5, max_new_tokens=16),
        req("Short", max_new_tokens=1),
        req("Hello there", max_length=20),
    ]
    together = generate(decoder, batch)
    for request, batched in zip(batch, together, strict=True):
        alone = lone(decoder, request)
        assert batched.completion == alone.completion, request
        assert batched.completion_tokens == alone.completion_tokens
        assert batched.prompt_tokens == alone.prompt_tokens


WORDS = "river stone garden engine market silver quiet window morning story lantern".split()


def varied_prompts(n: int) -> list[str]:
    """Prompts from 2 to about 60 tokens: long enough together for several prefill groups."""
    return [" ".join(WORDS[j % len(WORDS)] for j in range(2 + 5 * i)) for i in range(n)]


def test_prefill_groups_follow_prompt_length(decoder):
    rows, _ = decoder.prepare([req(p) for p in varied_prompts(12)])
    groups = length_groups(list(reversed(rows)))
    flat = [r for g in groups for r in g]
    assert sorted(map(id, flat)) == sorted(map(id, rows))  # every row once
    lengths = [len(r.prompt_ids) for r in flat]
    assert lengths == sorted(lengths)
    assert len(groups) > 1
    for group in groups[:-1]:
        assert sum(len(r.prompt_ids) for r in group) >= GROUP_MIN_TOKENS
    padded = sum(len(g) * len(g[-1].prompt_ids) for g in groups)
    assert padded < len(rows) * max(lengths)  # the point: less padding than one group

    # Equal lengths, or too few tokens to split: one group.
    same, _ = decoder.prepare([req("Hello there, world") for _ in range(40)])
    assert len(length_groups(same)) == 1
    few, _ = decoder.prepare([req("Hi"), req(varied_prompts(3)[-1])])
    assert len(length_groups(few)) == 1
    assert GROUP_CUT_TOKENS > 0


def test_short_prompts_are_not_padded_to_a_long_ones_width():
    rows = [SimpleNamespace(prompt_ids=[0] * n) for n in (300, 1, 3, 1, 200, 1)]
    widths = [[len(r.prompt_ids) for r in g] for g in length_groups(rows)]
    assert widths == [[1, 1, 1, 3], [200], [300]]
    assert length_groups([]) == []


def test_a_failed_prefill_leaves_the_running_rows_alone(decoder, monkeypatch):
    rows, _ = decoder.prepare([req("Hello there", max_new_tokens=8)])
    batch = prefill(decoder, rows)
    batch.step()
    newcomers, _ = decoder.prepare([req(p, max_new_tokens=4) for p in varied_prompts(12)])
    assert len(length_groups(newcomers)) > 1
    calls = []
    real = batch._admit_group

    def fail_second(group):
        calls.append(group)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        real(group)

    monkeypatch.setattr(batch, "_admit_group", fail_second)
    with pytest.raises(RuntimeError):
        batch.admit(newcomers)
    assert batch.rows == rows  # the first group, admitted before the failure, is gone again
    while batch.rows:
        batch.step()
    assert (
        decoder.tokenizer.decode(rows[0].tokens)
        == lone(decoder, req("Hello there", max_new_tokens=8)).completion
    )


def test_rows_prefilled_in_length_groups_get_what_a_lone_request_would(decoder):
    batch = [
        req(p, max_new_tokens=6 + i % 5, **({"temperature": 0.8, "seed": i} if i % 3 else {}))
        for i, p in enumerate(varied_prompts(12))
    ]
    rows, _ = decoder.prepare(batch)
    assert len(length_groups(rows)) > 1
    together = generate(decoder, batch)
    for request, batched in zip(batch, together, strict=True):
        assert batched.completion == lone(decoder, request).completion, request


def test_seeded_sampling_repeats_and_unseeded_varies(decoder):
    seeded = req(temperature=1.0, seed=42, max_new_tokens=24)
    assert lone(decoder, seeded).completion == lone(decoder, seeded).completion
    unseeded = req(temperature=1.0, max_new_tokens=24)
    outs = {lone(decoder, unseeded).completion for _ in range(4)}
    assert len(outs) > 1
    greedy = lone(decoder, req(max_new_tokens=24)).completion
    assert lone(decoder, req(temperature=1.0, seed=1, max_new_tokens=24)).completion != greedy


def test_row_errors_stay_with_their_row(decoder, monkeypatch):
    too_long = "word " * 600  # > 512 positions of the tiny architecture
    real_encode = decoder.tokenizer.encode

    def encode(text, **kwargs):  # a tokenizer failure that is no ServeError
        if text == "boom":
            raise RuntimeError("tokenizer crashed")
        return real_encode(text, **kwargs)

    monkeypatch.setattr(decoder.tokenizer, "encode", encode)
    results = generate(
        decoder,
        [req(max_new_tokens=4), req(too_long, max_new_tokens=4), req(max_length=2), req("boom")],
    )
    assert isinstance(results[0], Generation)
    assert results[0].finish_reason in ("length", "stop")
    assert isinstance(results[1], PromptTooLongError)
    assert isinstance(results[2], InvalidRequestError)
    assert isinstance(results[3], GenerationFailedError)
    assert "crashed" not in results[3].message  # internals stay in the log


def test_stream_drops_finished_rows_and_ids_stay_in_vocab(decoder):
    rows, errors = decoder.prepare(
        [req(max_new_tokens=2), req(max_new_tokens=6), req(temperature=1.0, max_new_tokens=6)]
    )
    assert not errors
    sizes = run(decoder, rows)
    assert sizes[:2] == [3, 3]
    assert len(sizes) <= 6
    assert all(size <= 2 for size in sizes[2:])  # the 2-token row left the batch
    assert all(0 <= t < decoder.vocab_limit for row in rows for t in row.tokens)


def test_rows_joining_a_running_batch_get_what_a_lone_request_would(decoder):
    first = [
        req("Hello there", max_new_tokens=12),
        req("A much longer prompt that starts the batch wide", max_new_tokens=3),
    ]
    late = [
        req("Late", max_new_tokens=10),
        req("Sampled late arrival", temperature=0.9, seed=9, max_new_tokens=10),
        req(
            "An even longer prompt that arrives late and is wider than the batch so far",
            max_new_tokens=6,
        ),
    ]
    rows, _ = decoder.prepare(first)
    batch = prefill(decoder, rows)
    for _ in range(4):  # the 3-token row retires meanwhile, trimming the cache
        batch.step()
    assert len(batch) == 1
    late_rows, _ = decoder.prepare(late)
    batch.admit(late_rows)
    assert len(batch) == 4
    while batch.rows:
        batch.step()
    for request, row in zip(first + late, rows + late_rows, strict=True):
        assert decoder.tokenizer.decode(row.tokens) == lone(decoder, request).completion, request


def test_dropped_rows_stop_and_the_rest_continue(decoder):
    rows, _ = decoder.prepare([req("keep me", max_new_tokens=8), req("drop me", max_new_tokens=8)])
    batch = prefill(decoder, rows)
    batch.step()
    batch.drop([rows[1]])
    while batch.rows:
        batch.step()
    assert len(rows[1].tokens) == 1
    assert (
        decoder.tokenizer.decode(rows[0].tokens)
        == lone(decoder, req("keep me", max_new_tokens=8)).completion
    )


def test_the_kv_cache_grows_in_place_and_gives_generates_tokens(decoder):
    """Decode steps write into slack in the cache's buffers instead of copying it (one
    reallocation per `KV_SLACK` tokens), and the tokens are those of transformers' own
    `generate()` with its concatenating cache."""
    import torch

    from serve_app.generation.engine import KV_SLACK

    request = req("The kv cache", max_new_tokens=2 * KV_SLACK)
    rows, _ = decoder.prepare([request])
    batch = prefill(decoder, rows)
    pointers = []
    while batch.rows:
        batch.step()
        if batch.rows:
            pointers.append(batch._cache.layers[0].keys.data_ptr())
    assert len(set(pointers)) <= 3  # the prefill's tensor, then one buffer per KV_SLACK steps
    ids = torch.tensor([rows[0].prompt_ids])
    with torch.inference_mode():
        reference = decoder.loaded.model.generate(
            ids, max_new_tokens=2 * KV_SLACK, do_sample=False, pad_token_id=decoder.pad_id
        )
    assert rows[0].tokens == reference[0, ids.shape[1] :].tolist()


def test_rows_joining_and_leaving_are_copied_once_into_buffers_steps_append_to(
    decoder, monkeypatch
):
    """Stacking rows in and cutting them out copies the cache once, straight into a buffer
    with slack, which the next steps append to: the batch makes no second copy after an edit
    (8% of the service's decode thread), and every row still gets a lone request's tokens."""
    from serve_app.generation import engine

    copies = []
    real = engine._with_slack
    monkeypatch.setattr(engine, "_with_slack", lambda t, need: copies.append(need) or real(t, need))
    first = [req("Hello there", max_new_tokens=8), req("A short one", max_new_tokens=2)]
    rows, _ = decoder.prepare(first)
    batch = prefill(decoder, rows)
    batch.step()  # the first step moves the prefill's cache into buffers with slack
    moved = len(copies)
    assert moved == 2 * len(batch._cache.layers)
    batch.step()  # "A short one" leaves: cut out
    assert len(batch) == 1
    late = [req("A late arrival with a longer prompt", max_new_tokens=4)]
    late_rows, _ = decoder.prepare(late)
    batch.admit(late_rows)  # stacked in
    while batch.rows:
        batch.step()
    assert len(copies) == moved
    for request, row in zip(first + late, rows + late_rows, strict=True):
        assert decoder.tokenizer.decode(row.tokens) == lone(decoder, request).completion, request
