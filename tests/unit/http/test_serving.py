"""The ingress's logic without HTTP: the request body, its mapping to domain requests, content
checks, cache keys that follow the weights generators serve. Milliseconds, no Ray, no network
(the generator and the store are a stand-in `Backend`; the integration tests use the real ones).
"""

from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from serve_app.cache.tiered import TieredCache
from serve_app.config import AppArgs
from serve_app.domain import Generation, GenerationRequest, SamplingParams
from serve_app.errors import ForbiddenContentError
from serve_app.http.schemas import GenerateRequest
from serve_app.http.serving import ForbiddenWords, GenerationService, ModelCatalog
from serve_app.models.resolve import ModelInfo


class TestGenerateRequest:
    def test_defaults(self):
        body = GenerateRequest(prompts=["hi"])
        assert body.temperature == 0.0 and body.max_new_tokens is None and body.model is None

    @pytest.mark.parametrize(
        "payload",
        [
            {"prompts": []},
            {"prompts": ["x"] * 65},
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


class TestForbiddenWords:
    def test_whole_words_case_insensitive(self):
        fw = ForbiddenWords(["violence", "hate"])
        with pytest.raises(ForbiddenContentError) as err:
            fw.check(["fine", "I HATE mondays"])
        assert "prompts[1]" in err.value.message
        fw.check(["whatever you say", "non-violent"])  # substrings are not words... mostly

    def test_empty_list_allows_everything(self):
        ForbiddenWords([]).check(["hate"])


class _Backend:
    """The generator and the store as the service sees them, serving the weights `revision`."""

    def __init__(self, revision: str) -> None:
        self.revision = revision
        self.generated = 0

    async def generate(self, request: GenerationRequest) -> Generation:
        self.generated += 1
        return Generation(
            model=request.model,
            prompt=request.prompt,
            completion=" and so on",
            prompt_tokens=2,
            completion_tokens=3,
            model_source="standin",
            model_revision=self.revision,
            finish_reason="length",
            params=request.params.as_dict(),
        )

    async def record(self, records: list[Generation]) -> list[Generation]:
        now = datetime.now(timezone.utc)
        return [r.replace(id=f"id-{i}", created_at=now) for i, r in enumerate(records)]


def _service(ingress_revision: str, backend: _Backend) -> GenerationService:
    args = AppArgs(models=[{"id": "m"}])
    info = ModelInfo(
        id="m",
        source=None,
        kind="standin",
        real_weights=False,
        location="/somewhere",
        revision=ingress_revision,
        architecture="tiny",
        n_positions=512,
        dtype="float32",
    )
    return GenerationService(
        args, ModelCatalog(args, {"m": info}), TieredCache(args.cache, None), backend
    )


class TestCacheKeysFollowTheServedWeights:
    async def test_an_answer_from_other_weights_is_not_cached_under_the_old_revision(self):
        """The ingress resolved revision A at start-up; the generators serve B. An answer made
        by B must never be found under A's key, and keys follow B from then on."""
        backend = _Backend(revision="B")
        service = _service("A", backend)
        request = GenerationRequest("m", "hello", SamplingParams().normalized())

        (first,) = await service.generate([request])
        assert not first.cached and first.model_revision == "B"
        assert service.catalog.revision("m") == "B"
        assert len(service.cache.l1) == 0  # not stored under the key that names A

        (second,) = await service.generate([request])
        assert not second.cached and backend.generated == 2
        (third,) = await service.generate([request])
        assert third.cached and backend.generated == 2  # cached under B's key
        assert third.completion == first.completion and third.finish_reason == "length"

    async def test_agreeing_revisions_cache_at_once(self):
        backend = _Backend(revision="A")
        service = _service("A", backend)
        request = GenerationRequest("m", "hello", SamplingParams().normalized())
        await service.generate([request])
        (again,) = await service.generate([request])
        assert again.cached and backend.generated == 1
