"""What the ingress does for a request, without HTTP and without Ray: check content, answer
from cache where allowed (each prompt on its own), generate the rest, record every answered
prompt, count.

The generator and the store are reached through the small `Backend` protocol, so this module
needs no Ray import; the integration tests exercise it through the real deployments.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from serve_app.cache.keys import cache_key
from serve_app.cache.tiered import Served, Source, TieredCache
from serve_app.config import AppArgs, ModelSpec
from serve_app.domain import Generation, GenerationRequest, TextDelta
from serve_app.errors import ForbiddenContentError, InvalidRequestError, UnknownModelError
from serve_app.http.access import current_key_name

if TYPE_CHECKING:
    from serve_app.models.resolve import ModelInfo


class Backend(Protocol):
    async def generate(self, request: GenerationRequest) -> Generation: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Generation]: ...

    async def record(self, records: list[Generation]) -> list[Generation]: ...


class Telemetry(Protocol):
    """Where the service reports what a request got (metrics, the request log)."""

    def answered(self, records: list[Generation]) -> None: ...

    def first_token(self, model: str, seconds: float) -> None: ...

    def token_gap(self, model: str, seconds_per_token: float) -> None: ...


class _NoTelemetry:
    def answered(self, records: list[Generation]) -> None:
        pass

    def first_token(self, model: str, seconds: float) -> None:
        pass

    def token_gap(self, model: str, seconds_per_token: float) -> None:
        pass


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
    """The configured models, what each resolves to (hub, local copy or stand-in), and the
    revision the generators actually serve, which cache keys use.

    The ingress resolves each model once at start-up, but a generator replica resolves on its
    own (later, perhaps after the hub came back or a local checkpoint was replaced). Every
    generation reports the revision that made it; when that differs from the one known here,
    the catalog follows the generators, so keys name the weights that are really served.
    """

    def __init__(self, args: AppArgs, infos: dict[str, ModelInfo]) -> None:
        self.args = args
        self.infos = infos
        self._served: dict[str, str] = {}

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

    def revision(self, model_id: str) -> str:
        """The revision cache keys use for `model_id`: the last one a generator served."""
        return self._served.get(model_id) or self.infos[model_id].revision

    def served(self, model_id: str, revision: str) -> None:
        self._served[model_id] = revision


class GenerationService:
    def __init__(
        self,
        args: AppArgs,
        catalog: ModelCatalog,
        cache: TieredCache,
        backend: Backend,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.args = args
        self.telemetry = telemetry or _NoTelemetry()
        self.catalog = catalog
        self.cache = cache
        self.backend = backend
        self.forbidden = ForbiddenWords(args.forbidden_words)
        self.counters = Counters()
        self._tasks: set[asyncio.Future] = set()

    def _admit(self, requests: Sequence[GenerationRequest]) -> str:
        """Count a call and check what it asks for; returns its model id."""
        self.counters.requests += 1
        limits = self.args.limits
        if len(requests) > limits.max_prompts_per_request:
            raise InvalidRequestError(
                f"{len(requests)} completions asked for; at most "
                f"{limits.max_prompts_per_request} per request",
                param="prompt",
            )
        asked = max((r.params.max_new_tokens or 0) for r in requests)
        if asked > limits.max_new_tokens:
            raise InvalidRequestError(
                f"{asked} new tokens asked for; at most {limits.max_new_tokens}",
                param="max_tokens",
            )
        models = {r.model for r in requests}
        if len(models) != 1:
            raise InvalidRequestError("all prompts of a request go to one model")
        model = self.catalog.spec(models.pop()).id
        self.forbidden.check([r.prompt for r in requests])
        self.counters.prompts += len(requests)
        return model

    def _cache_keys(
        self, model: str, requests: Sequence[GenerationRequest]
    ) -> tuple[list[str], str]:
        """The cache keys of `requests` and the revision they name, or no keys (counted as
        bypassed or uncacheable) when the cache may not answer them."""
        revision = self.catalog.revision(model)
        if self.cache.enabled and all(r.cacheable for r in requests):
            return [cache_key(self.args.cache.prefix, r, revision) for r in requests], revision
        if not all(r.use_cache for r in requests):
            self.counters.bypassed += len(requests)
        elif self.cache.enabled:
            self.counters.uncacheable += len(requests)
        return [], revision

    async def generate(
        self,
        requests: Sequence[GenerationRequest],
        first_id: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> list[Generation]:
        """Answer every request (the prompts of one HTTP call: one model, one set of settings)
        and return the records once they are stored. `first_id` names the first record (an
        OpenAI response's id); `context` holds record fields the caller knows (`messages`,
        `metadata`)."""
        model = self._admit(requests)
        started = time.perf_counter()
        key_name = current_key_name()

        async def run(i: int) -> Generation:
            result = await self.backend.generate(requests[i])
            self.counters.generations += 1
            self.catalog.served(model, result.model_revision)
            return result

        served: list[Served]
        keys, revision = self._cache_keys(model, requests)
        if keys:
            # Fresh answers are cached as soon as they exist, so identical requests waiting
            # on this one (here or on another replica) are released before recording. An
            # answer from other weights than the key names is returned but not cached.
            served = await self.cache.fetch(
                keys, run, storable=lambda g: g.model_revision == revision
            )
        else:
            fresh = await asyncio.gather(*(run(i) for i in range(len(requests))))
            served = [Served(value, Source.GENERATED) for value in fresh]

        latency_ms = _ms(started)
        records = [
            answer.value.replace(
                user_id=r.user_id,
                key_name=key_name,
                cached=answer.cached,
                latency_ms=latency_ms,
                id=first_id if i == 0 else None,
                **(context or {}),
            )
            for i, (r, answer) in enumerate(zip(requests, served, strict=True))
        ]
        # Durable, then answered: a client never sees an id that is not stored.
        stored = await self.backend.record(records)
        self.telemetry.answered(stored)
        return stored

    async def stream(
        self,
        request: GenerationRequest,
        record_id: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> AsyncIterator[TextDelta | Generation]:
        """`TextDelta`s as the text is decoded, then the stored record. A cached answer streams
        back at once. If the consumer stops early (the client went away), what was produced is
        recorded with finish_reason "cancelled"."""
        model = self._admit([request])
        started = time.perf_counter()
        context = {"user_id": request.user_id, "key_name": current_key_name(), **(context or {})}
        keys, revision = self._cache_keys(model, [request])
        key = keys[0] if keys else None
        if key is not None:
            hit = await self.cache.lookup(key)
            if hit is not None:
                for piece in _pieces(hit.completion):
                    yield TextDelta(piece, hit.completion_tokens, hit.prompt_tokens)
                yield await self._record_one(
                    hit.replace(cached=True, ttft_ms=_ms(started), **context), started, record_id
                )
                return

        text: list[str] = []
        tokens, prompt_tokens, ttft_ms = 0, 0, None
        last = started
        final: Generation | None = None
        try:
            async for item in self.backend.stream(request):
                if isinstance(item, Generation):
                    final = item
                    break
                now = time.perf_counter()
                if ttft_ms is None:
                    ttft_ms = _ms(started, now)
                    self.telemetry.first_token(model, now - started)
                elif item.completion_tokens > tokens:
                    per_token = (now - last) / (item.completion_tokens - tokens)
                    self.telemetry.token_gap(model, per_token)
                last = now
                text.append(item.text)
                tokens, prompt_tokens = item.completion_tokens, item.prompt_tokens
                yield item
        except (GeneratorExit, asyncio.CancelledError):
            # The client went away mid-stream: keep what it was sent. Not awaited here (this
            # generator is being closed); the task holds its own reference. (A failure of
            # the generator is no cancellation: the client gets the error as the last event.)
            if text or tokens:
                partial = Generation(
                    model=model,
                    prompt=request.prompt,
                    completion="".join(text),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=tokens,
                    model_source=self.catalog.info(model).location,
                    model_revision=self.catalog.revision(model),
                    finish_reason="cancelled",
                    params=request.params.as_dict(),
                    ttft_ms=ttft_ms,
                    **context,
                )
                self.keep(self._record_one(partial, started, record_id))
            raise
        self.counters.generations += 1
        self.catalog.served(model, final.model_revision)
        if key is not None and final.model_revision == revision:
            await self.cache.store(key, final)
        yield await self._record_one(final.replace(ttft_ms=ttft_ms, **context), started, record_id)

    async def _record_one(
        self, record: Generation, started: float, record_id: str | None
    ) -> Generation:
        (stored,) = await self.backend.record(
            [record.replace(latency_ms=_ms(started), id=record_id)]
        )
        self.telemetry.answered([stored])
        return stored

    def keep(self, work: Any) -> None:
        """Run `work` to its end in the background, even when the request that started it is
        cancelled (the task is held here until it is done). A coroutine runs in a context of
        its own: Ray Serve cancels the handle calls made in a cancelled request's context,
        which would drop the record of a stream whose client went away."""
        if asyncio.iscoroutine(work):
            task = asyncio.get_running_loop().create_task(work, context=contextvars.Context())
        else:
            task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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


def _ms(started: float, now: float | None = None) -> float:
    return ((now or time.perf_counter()) - started) * 1000


def _pieces(text: str, size: int = 32) -> list[str]:
    """A cached answer in stream-sized pieces (at least one, so the stream has a first chunk)."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]
