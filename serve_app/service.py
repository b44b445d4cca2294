"""What the ingress does for a request, without HTTP and without Ray: validate content, answer
from cache where allowed (each prompt on its own), generate the rest, record every answered
prompt, count.

The generator and the store are reached through the small `Backend` protocol, so this module is
exercised by the integration tests through the real deployments and needs no Ray import itself.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from serve_app.cache import CachedResponse, cache_key, is_cacheable
from serve_app.config import AppArgs, ModelSpec
from serve_app.domain import GenerationRequest, GenerationResult, SamplingParams
from serve_app.errors import ForbiddenContentError, UnknownModelError
from serve_app.store import NewGeneration, StoredGeneration
from serve_app.tiered_cache import Served, Source, TieredCache

if TYPE_CHECKING:
    from serve_app.registry import ModelInfo


class Backend(Protocol):
    async def generate(self, request: GenerationRequest) -> GenerationResult: ...

    async def record(self, rows: list[NewGeneration]) -> list[StoredGeneration]: ...


@dataclass(frozen=True)
class GenerateCommand:
    prompts: Sequence[str]
    model_id: str
    params: SamplingParams
    user_id: str | None = None
    use_cache: bool = True  # False: neither read nor write the cache, always generate


@dataclass(frozen=True)
class Answer:
    record: StoredGeneration
    completion: str


@dataclass
class Counters:
    requests: int = 0
    prompts: int = 0
    generations: int = 0
    uncacheable: int = 0
    bypassed: int = 0
    started_at: float = field(default_factory=time.time)


class ForbiddenWords:
    """Whole-word, case-insensitive match: 'hate' is refused, 'whatever' is not."""

    def __init__(self, words: Sequence[str]) -> None:
        cleaned = [re.escape(w.strip()) for w in words if w.strip()]
        self.pattern = (
            re.compile(r"\b(" + "|".join(cleaned) + r")\b", re.IGNORECASE) if cleaned else None
        )

    def check(self, prompts: Sequence[str]) -> None:
        if self.pattern is None:
            return
        for i, prompt in enumerate(prompts):
            found = self.pattern.search(prompt)
            if found:
                raise ForbiddenContentError(
                    f"prompts[{i}] contains a forbidden word: {found.group(0).lower()!r}"
                )


class ModelCatalog:
    """The configured models and what each resolves to (hub, local copy or stand-in)."""

    def __init__(self, args: AppArgs, infos: dict[str, ModelInfo]) -> None:
        self.args = args
        self.infos = infos

    def spec(self, model_id: str | None) -> ModelSpec:
        model_id = model_id or self.args.default_model_id
        spec = self.args.model(model_id)
        if spec is None:
            raise UnknownModelError(
                f"unknown model {model_id!r}; valid ids: {', '.join(self.args.model_ids)}",
                valid_ids=self.args.model_ids,
            )
        return spec

    def info(self, model_id: str) -> ModelInfo:
        return self.infos[model_id]


class GenerationService:
    def __init__(
        self,
        args: AppArgs,
        catalog: ModelCatalog,
        cache: TieredCache,
        backend: Backend,
    ) -> None:
        self.args = args
        self.catalog = catalog
        self.cache = cache
        self.backend = backend
        self.forbidden = ForbiddenWords(args.forbidden_words)
        self.counters = Counters()

    async def generate(self, command: GenerateCommand) -> list[Answer]:
        self.counters.requests += 1
        spec = self.catalog.spec(command.model_id)
        self.forbidden.check(command.prompts)
        info = self.catalog.info(spec.id)
        params = command.params.normalized()
        started = time.perf_counter()
        prompts = command.prompts
        self.counters.prompts += len(prompts)

        async def run(i: int) -> CachedResponse:
            result = await self.backend.generate(GenerationRequest(spec.id, prompts[i], params))
            self.counters.generations += 1
            return CachedResponse(
                completion=result.completion,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                model_source=result.model_source,
                model_revision=result.model_revision,
            )

        served: list[Served]
        if self.cache.enabled and command.use_cache and is_cacheable(params):
            keys = [
                cache_key(self.args.cache.prefix, spec.id, info.revision, p, params)
                for p in prompts
            ]
            # Fresh answers are cached as soon as they exist, so identical requests waiting
            # on this one (here or on another replica) are released before recording.
            served = await self.cache.fetch(keys, run)
        else:
            if not command.use_cache:
                self.counters.bypassed += len(prompts)
            elif self.cache.enabled:
                self.counters.uncacheable += len(prompts)
            fresh = await asyncio.gather(*(run(i) for i in range(len(prompts))))
            served = [Served(value, Source.GENERATED) for value in fresh]

        latency_ms = (time.perf_counter() - started) * 1000
        rows = [
            NewGeneration(
                prompt=prompt,
                generated_text=prompt + answer.value.completion,
                model_name=spec.id,
                model_source=answer.value.model_source,
                model_revision=answer.value.model_revision,
                params=_params_dict(params),
                user_id=command.user_id,
                cached=answer.cached,
                prompt_tokens=answer.value.prompt_tokens,
                completion_tokens=answer.value.completion_tokens,
                latency_ms=latency_ms,
            )
            for prompt, answer in zip(prompts, served, strict=True)
        ]
        # Durable, then answered: a client never sees an id that is not stored.
        stored = await self.backend.record(rows)
        return [
            Answer(record, answer.value.completion)
            for record, answer in zip(stored, served, strict=True)
        ]

    def stats(self) -> dict[str, object]:
        c = self.counters
        return {
            "requests": c.requests,
            "prompts": c.prompts,
            "generations": c.generations,
            "cache": {
                **self.cache.snapshot(),
                "uncacheable": c.uncacheable,
                "bypassed": c.bypassed,
            },
            "uptime_s": round(time.time() - c.started_at, 1),
        }


def _params_dict(params: SamplingParams) -> dict[str, object]:
    return {k: v for k, v in vars(params).items() if v is not None}
