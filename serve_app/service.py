"""What the ingress does for a request, without HTTP and without Ray: validate content, answer
from cache where allowed, generate the rest, record every answered prompt, count.

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

from serve_app.cache import CachedResponse, ResponseCache, cache_key, is_cacheable
from serve_app.config import AppArgs, ModelSpec
from serve_app.domain import GenerationRequest, GenerationResult, SamplingParams
from serve_app.errors import ForbiddenContentError, UnknownModelError
from serve_app.store import NewGeneration, StoredGeneration

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


@dataclass(frozen=True)
class Answer:
    record: StoredGeneration
    completion: str


@dataclass
class Counters:
    requests: int = 0
    prompts: int = 0
    generations: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    uncacheable: int = 0
    started_at: float = field(default_factory=time.time)

    def snapshot(self) -> dict[str, object]:
        lookups = self.cache_hits + self.cache_misses
        return {
            "requests": self.requests,
            "prompts": self.prompts,
            "generations": self.generations,
            "cache": {
                "hits": self.cache_hits,
                "misses": self.cache_misses,
                "uncacheable": self.uncacheable,
                "hit_ratio": round(self.cache_hits / lookups, 4) if lookups else 0.0,
            },
            "uptime_s": round(time.time() - self.started_at, 1),
        }


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
        cache: ResponseCache,
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
        self.counters.prompts += len(command.prompts)

        keys: list[str | None] = [None] * len(command.prompts)
        hits: list[CachedResponse | None] = [None] * len(command.prompts)
        if is_cacheable(params) and self.cache.enabled:
            keys = [
                cache_key(self.args.cache.prefix, spec.id, info.revision, p, params)
                for p in command.prompts
            ]
            hits = await self.cache.get_many(keys)  # type: ignore[arg-type]
            found = sum(h is not None for h in hits)
            self.counters.cache_hits += found
            self.counters.cache_misses += len(hits) - found
        else:
            self.counters.uncacheable += len(command.prompts)

        misses = [i for i, hit in enumerate(hits) if hit is None]
        generated = await asyncio.gather(
            *(
                self.backend.generate(GenerationRequest(spec.id, command.prompts[i], params))
                for i in misses
            )
        )
        self.counters.generations += len(generated)
        fresh: dict[str, CachedResponse] = {}
        for i, result in zip(misses, generated, strict=True):
            value = CachedResponse(
                completion=result.completion,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                model_source=result.model_source,
                model_revision=result.model_revision,
            )
            hits[i] = value
            if keys[i] is not None:
                fresh[keys[i]] = value  # type: ignore[index]

        latency_ms = (time.perf_counter() - started) * 1000
        served = set(misses)
        rows = [
            NewGeneration(
                prompt=prompt,
                generated_text=prompt + answer.completion,
                model_name=spec.id,
                model_source=answer.model_source,
                model_revision=answer.model_revision,
                params=_params_dict(params),
                user_id=command.user_id,
                cached=i not in served,
                prompt_tokens=answer.prompt_tokens,
                completion_tokens=answer.completion_tokens,
                latency_ms=latency_ms,
            )
            for i, (prompt, answer) in enumerate(zip(command.prompts, hits, strict=True))
            if answer is not None
        ]
        # Durable first, then cache, then answer: a client never sees an id that is not stored.
        stored = await self.backend.record(rows)
        await self.cache.put_many(fresh)
        return [
            Answer(record, hit.completion)  # type: ignore[union-attr]
            for record, hit in zip(stored, hits, strict=True)
        ]


def _params_dict(params: SamplingParams) -> dict[str, object]:
    return {k: v for k, v in vars(params).items() if v is not None}
