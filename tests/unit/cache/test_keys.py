"""Cache policy and keys: what may be cached, and what makes two requests share an answer."""

import pytest

from serve_app.cache.keys import cache_key
from serve_app.domain import GenerationRequest, SamplingParams


def key(prompt="hello", model="m", revision="r1", **params):
    return cache_key("pfx", GenerationRequest(model, prompt, SamplingParams(**params)), revision)


class TestCachePolicyAndKeys:
    def test_policy(self):
        assert GenerationRequest("m", "p", SamplingParams()).cacheable
        assert GenerationRequest("m", "p", SamplingParams(temperature=1.0, seed=0)).cacheable
        assert not GenerationRequest("m", "p", SamplingParams(temperature=1.0)).cacheable
        assert not GenerationRequest("m", "p", SamplingParams(), use_cache=False).cacheable

    def test_same_request_same_key(self):
        assert key() == key()
        assert key().startswith("pfx:resp:m:")

    def test_equivalent_requests_share_a_key(self):
        # Default budget spelled out or not; max_length ignored when max_new_tokens is given.
        assert key() == key(max_new_tokens=50)
        assert key(max_new_tokens=8) == key(max_new_tokens=8, max_length=99)
        assert key(top_p=0.3) == key()  # greedy ignores top_p

    @pytest.mark.parametrize(
        "other",
        [
            {"prompt": "hello!"},
            {"model": "m2"},
            {"revision": "r2"},
            {"max_new_tokens": 7},
            {"max_length": 20},
            {"temperature": 0.5, "seed": 1},
        ],
    )
    def test_every_input_changes_the_key(self, other):
        assert key(**other) != key()

    def test_sampling_keys_differ_by_seed_temperature_top_p(self):
        base = {"temperature": 0.8, "seed": 1}
        assert key(**base) != key(**{**base, "seed": 2})
        assert key(**base) != key(**{**base, "temperature": 0.9})
        assert key(**base) != key(**{**base, "top_p": 0.9})
