"""Pure logic: request validation, sampling-parameter normalisation, cache policy and keys,
forbidden words, configuration. Milliseconds, no Ray, no network."""

import pytest
from pydantic import ValidationError

from serve_app.cache import cache_key, is_cacheable
from serve_app.config import AppArgs, EnvSettings, resolve_args
from serve_app.domain import SamplingParams
from serve_app.errors import ForbiddenContentError
from serve_app.schemas import GenerateRequest
from serve_app.service import ForbiddenWords


def key(prompt="hello", model="m", revision="r1", **params):
    return cache_key("pfx", model, revision, prompt, SamplingParams(**params))


class TestGenerateRequest:
    def test_defaults(self):
        body = GenerateRequest(prompts=["hi"])
        assert body.temperature == 0.0 and body.max_new_tokens is None and body.model is None

    @pytest.mark.parametrize(
        "payload",
        [
            {"prompts": []},
            {"prompts": ["x"] * 11},
            {"prompts": [""]},
            {"prompts": ["   "]},
            {"prompts": ["x"], "max_new_tokens": 0},
            {"prompts": ["x"], "max_new_tokens": 10000},
            {"prompts": ["x"], "temperature": 2.5},
            {"prompts": ["x"], "temperature": -0.1},
            {"prompts": ["x"], "top_p": 0},
            {"prompts": ["x"], "seed": -1},
            {"prompts": ["x"], "unknown_field": 1},
            {"prompts": "not a list"},
        ],
    )
    def test_rejects(self, payload):
        with pytest.raises(ValidationError):
            GenerateRequest.model_validate(payload)

    def test_accepts_limits(self):
        GenerateRequest(prompts=["x"] * 10, max_new_tokens=256, temperature=2.0, top_p=1.0)


class TestSamplingParams:
    def test_max_new_tokens_wins_over_max_length(self):
        p = SamplingParams(max_new_tokens=5, max_length=100)
        assert p.budget(10) == 5
        assert p.normalized().max_length is None

    def test_max_length_is_total_tokens(self):
        assert SamplingParams(max_length=30).budget(12) == 18

    def test_default_budget(self):
        assert SamplingParams().budget(3) == 50
        assert SamplingParams().normalized().max_new_tokens == 50

    def test_greedy_drops_sampling_knobs(self):
        assert SamplingParams(top_p=0.5, seed=3).normalized() == SamplingParams(max_new_tokens=50)

    def test_deterministic(self):
        assert SamplingParams().deterministic
        assert SamplingParams(temperature=0.7, seed=1).deterministic
        assert not SamplingParams(temperature=0.7).deterministic


class TestCachePolicyAndKeys:
    def test_policy(self):
        assert is_cacheable(SamplingParams())
        assert is_cacheable(SamplingParams(temperature=1.0, seed=0))
        assert not is_cacheable(SamplingParams(temperature=1.0))

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


class TestForbiddenWords:
    def test_whole_words_case_insensitive(self):
        fw = ForbiddenWords(["violence", "hate"])
        with pytest.raises(ForbiddenContentError) as err:
            fw.check(["fine", "I HATE mondays"])
        assert "prompts[1]" in err.value.message
        fw.check(["whatever you say", "non-violent"])  # substrings are not words... mostly

    def test_empty_list_allows_everything(self):
        ForbiddenWords([]).check(["hate"])


class TestConfig:
    def test_model_ids_unique(self):
        with pytest.raises(ValidationError):
            AppArgs(models=[{"id": "a"}, {"id": "a"}])

    def test_default_model_must_exist(self):
        with pytest.raises(ValidationError):
            AppArgs(models=[{"id": "a"}], default_model="b")
        assert AppArgs(models=[{"id": "a"}, {"id": "b"}]).default_model_id == "a"

    def test_unknown_keys_rejected(self):
        with pytest.raises(ValidationError):
            AppArgs.model_validate({"models": [{"id": "a"}], "typo": 1})

    def test_env_overrides_yaml(self, monkeypatch, tmp_path):
        monkeypatch.setenv("REDIS_URL", "redis://example:1/0")
        monkeypatch.setenv("DATABASE_URL", "sqlite+aiosqlite:///x.db")
        monkeypatch.setenv("STANDIN_DIR", str(tmp_path))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        args = resolve_args(AppArgs(models=[{"id": "a"}], redis_url="redis://yaml:2/0"))
        assert args.redis_url == "redis://example:1/0"
        assert args.database_url == "sqlite+aiosqlite:///x.db"
        assert args.standin_dir == str(tmp_path.resolve())
        assert args.offline is True

    def test_no_env_keeps_yaml(self, monkeypatch):
        for name in ("REDIS_URL", "DATABASE_URL", "STANDIN_DIR", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        args = resolve_args(AppArgs(models=[{"id": "a"}]), EnvSettings())
        assert args.redis_url is None and args.offline is False
        assert args.standin_dir.endswith("standins")
