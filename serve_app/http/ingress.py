"""The Ingress deployment: FastAPI routes that translate HTTP into calls on the service.

No postponed annotations here: FastAPI must see the real types through Ray's ingress wrapper.

Wire types live in `schemas`, the request logic in `serving`, error mapping in `errors`.
"""

import asyncio
import logging
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.cache.metrics import CacheMetrics
from serve_app.cache.redis_link import RedisLink
from serve_app.cache.redis_tier import redis_client
from serve_app.cache.tiered import TieredCache
from serve_app.config import AppArgs, apply_cache_user_config
from serve_app.errors import InvalidRequestError, NotFoundError
from serve_app.http.access import (
    Access,
    RateLimiter,
    add_access_middleware,
    install_access,
    owner_scope,
    scoped_key_name,
    visible,
)
from serve_app.http.backend import HandleBackend, call
from serve_app.http.errors import as_serve_error, install_error_handlers
from serve_app.http.etag import conditional_json
from serve_app.http.health import readiness
from serve_app.http.limits import BodyLimit, limit_body
from serve_app.http.openai.protocol import (
    ChatCompletionList,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelListResponse,
)
from serve_app.http.openai.serving import OpenAIServing, metadata_filter, record_id
from serve_app.http.playground import mount_playground
from serve_app.http.schemas import (
    CacheInvalidation,
    ErrorResponse,
    FeedbackRequest,
    GenerateRequest,
    GenerationRecord,
    HistoryPage,
    ModelEntry,
    ModelList,
)
from serve_app.http.serving import GenerationService, ModelCatalog
from serve_app.http.streaming import stream_generation
from serve_app.models.resolve import resolve_model
from serve_app.telemetry.requests import RequestTelemetry, install_request_log

logger = logging.getLogger("ray.serve").getChild(__name__)

api = FastAPI(
    title="GPT-2 on Ray Serve",
    description="Multiplexed GPT-2-family text generation with batching, cache and history.",
    version="0.1.0",
    responses={code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 422, 429, 503)},
)
api.add_middleware(BodyLimit)  # innermost: the middlewares below time and log its 413s
add_access_middleware(api)  # before the body is read: no key, no 1 MiB upload
install_error_handlers(api)
install_request_log(api)  # after the error handlers: it logs what they answered
mount_playground(api)  # the page at / and its files under /static (docs stay at /docs)

HEALTH_TIMEOUT_S = 2.0


async def _probe(response: Any) -> Any:
    """A best-effort read for health and stats: a failure is reported, never raised, and in
    words that show no internals (no exception class names, paths or tracebacks)."""
    try:
        return await asyncio.wait_for(response, HEALTH_TIMEOUT_S)
    except asyncio.TimeoutError:
        return {"status": "unavailable", "error": f"no answer within {HEALTH_TIMEOUT_S:g} s"}
    except Exception as exc:
        known = as_serve_error(exc)
        return {"status": "unavailable", "error": known.message if known else "unreachable"}


@serve.deployment
@serve.ingress(api)
class Ingress:
    async def __init__(
        self,
        args: AppArgs,
        generator: DeploymentHandle,
        store: DeploymentHandle,
        redis_host: DeploymentHandle | None = None,
    ) -> None:
        from pathlib import Path as FsPath

        self.args = args
        limit_body(api, args.max_body_bytes)
        self.generator = generator
        self.store = store
        standin_dir = FsPath(args.standin_dir or ".")
        infos = {
            spec.id: resolve_model(spec, standin_dir, args.hub_timeout_s, args.offline)
            for spec in args.models
        }
        self.catalog = ModelCatalog(args, infos)

        self.cache = TieredCache(args.cache, None)
        self._closing: set[asyncio.Task] = set()  # old rate-limiter clients being closed
        # An external Redis, or the app's one embedded redis-server (RedisHost) when unset.
        self.redis = RedisLink(self.cache, args.redis_url if args.needs_redis else None, redis_host)
        self.redis.on_connect(self._install_access)
        await self.redis.start()
        if self.redis.url is None:
            self._install_access(None)
        # The constructor runs on the replica's event loop, so background tasks can start here.
        self.metrics = CacheMetrics(self.cache.snapshot)
        self._metrics_task = asyncio.get_running_loop().create_task(self.metrics.run())
        self.service = GenerationService(
            args,
            self.catalog,
            self.cache,
            HandleBackend(
                generator, store, args.persistence.write_timeout_s, args.timeouts.generate_s
            ),
            RequestTelemetry(args.log_prompts),
        )
        self.openai = OpenAIServing(self.service)

    def _install_access(self, redis_url: str | None) -> None:
        """API keys, and the rate limiter on this Redis (again when the embedded one moves)."""
        old = getattr(api.state, "access", None)
        if old is not None and old.limiter is not None:  # the embedded Redis moved
            closing = asyncio.get_running_loop().create_task(old.limiter.redis.aclose())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        limiter = None
        if self.args.access.rate_limit is not None and redis_url is not None:
            limiter = RateLimiter(
                self.args.access.rate_limit,
                redis_client(redis_url, self.args.cache.timeout_s),
                self.args.cache.prefix,
            )
        install_access(api, Access(self.args.access, limiter))

    def _page(self, limit: int) -> int:
        cap = self.args.limits.max_history_page
        if limit > cap:
            raise InvalidRequestError(f"limit may be at most {cap}", param="limit", limit=limit)
        return limit

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live cache tunables from the deployment's `user_config` (async: runs on the loop
        that owns the L1, not in Ray's thread pool)."""
        self.cache.configure(apply_cache_user_config(self.args.cache, user_config))

    @api.post("/generate", response_model=list[GenerationRecord])
    async def generate(
        self,
        body: GenerateRequest,
        header_model: Annotated[str | None, Header(alias="serve_multiplexed_model_id")] = None,
    ) -> Any:
        """The records, or with `"stream": true` (one prompt) server-sent events: `{"text"}`
        as the text is decoded, then `{"record"}`, then `[DONE]`."""
        model = body.model or header_model or self.args.default_model_id
        requests = body.to_requests(model)
        if body.stream:
            if len(requests) != 1:
                raise InvalidRequestError("streaming takes exactly one prompt", param="prompts")
            return await stream_generation(self.service, requests[0])
        records = await self.service.generate(requests)
        return [GenerationRecord.from_generation(g) for g in records]

    @api.post("/v1/completions", response_model=CompletionResponse)
    async def completions(self, body: CompletionRequest) -> Any:
        """OpenAI text completions; `"stream": true` answers with server-sent events."""
        return await self.openai.completions(body)

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        """OpenAI chat completions, the messages rendered by the model's `chat_template`."""
        return await self.openai.chat(body)

    @api.get("/v1/chat/completions", response_model=ChatCompletionList)
    async def stored_chats(
        self,
        request: Request,
        model: Annotated[str | None, Query(max_length=64)] = None,
        after: Annotated[str | None, Query(max_length=80)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 20,
        order: Literal["asc", "desc"] = "asc",
    ) -> ChatCompletionList:
        """Stored chat completions (OpenAI's listing), filtered by `model` and `metadata[k]=v`."""
        query = {"model": model, "order": order, "metadata": metadata_filter(request)}
        query["key_name"] = scoped_key_name(None)
        limit = self._page(limit)
        if after is not None:
            query["after"] = record_id(after)
        records, has_more = await call(
            self.store.chats.remote(limit, **query), "persistence", self.args.timeouts.read_s
        )
        return self.openai.stored_chats(records, has_more)

    @api.get("/v1/chat/completions/{completion_id}", response_model=ChatCompletionResponse)
    async def stored_chat(
        self, completion_id: Annotated[str, Path(max_length=80)]
    ) -> ChatCompletionResponse:
        stored = await call(
            self.store.get.remote(record_id(completion_id)),
            "persistence",
            self.args.timeouts.read_s,
        )
        if not visible(stored) or stored.messages is None:
            raise NotFoundError(f"no chat completion with id {completion_id!r}")
        return self.openai.stored_chat(stored)

    @api.get("/v1/models", response_model=ModelListResponse)
    async def openai_models(self) -> ModelListResponse:
        return self.openai.models()

    @api.get("/v1/models/{model_id}", response_model=ModelCard)
    async def openai_model(self, model_id: Annotated[str, Path(max_length=64)]) -> ModelCard:
        return self.openai.model(model_id)

    @api.get("/history", response_model=HistoryPage)
    async def history(
        self,
        request: Request,
        limit: Annotated[int, Query(ge=1, le=1000)] = 20,
        cursor: Annotated[str | None, Query(max_length=512)] = None,
        user_id: Annotated[str | None, Query(max_length=128)] = None,
        model: Annotated[str | None, Query(max_length=64)] = None,
        since: Annotated[datetime | None, Query(description="Inclusive; ISO 8601.")] = None,
        until: Annotated[datetime | None, Query(description="Exclusive; ISO 8601.")] = None,
        key_name: Annotated[
            str | None, Query(max_length=64, description="Records one API key asked for.")
        ] = None,
        if_none_match: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Newest first; `metadata[key]=value` parameters filter on the records' metadata."""
        query = {"user_id": user_id, "model": model, "since": since, "until": until}
        query["metadata"] = metadata_filter(request)
        query["key_name"] = scoped_key_name(key_name)
        limit = self._page(limit)
        items, next_cursor = await call(
            self.store.history.remote(limit, cursor, **query),
            "persistence",
            self.args.timeouts.read_s,
        )
        return conditional_json(HistoryPage.from_generations(items, next_cursor), if_none_match)

    @api.get("/history/{generation_id}", response_model=GenerationRecord)
    async def history_item(
        self,
        generation_id: Annotated[str, Path(max_length=64)],
        if_none_match: Annotated[str | None, Header()] = None,
    ) -> Response:
        stored = await call(
            self.store.get.remote(record_id(generation_id)),
            "persistence",
            self.args.timeouts.read_s,
        )
        if not visible(stored):
            raise NotFoundError(f"no generation with id {generation_id!r}")
        return conditional_json(GenerationRecord.from_generation(stored), if_none_match)

    @api.post("/generations/{generation_id}/feedback", response_model=GenerationRecord)
    async def feedback(
        self, generation_id: Annotated[str, Path(max_length=64)], body: FeedbackRequest
    ) -> GenerationRecord:
        stored = await call(
            self.store.set_feedback.remote(generation_id, body.rating, body.comment, owner_scope()),
            "persistence",
            self.args.persistence.write_timeout_s,
        )
        if stored is None:
            raise NotFoundError(f"no generation with id {generation_id!r}")
        return GenerationRecord.from_generation(stored)

    @api.get("/models", response_model=ModelList)
    async def models(self) -> ModelList:
        default = self.args.default_model_id
        entries = []
        for spec in self.args.models:
            info = self.catalog.info(spec.id).to_public()
            entries.append(ModelEntry(**info, default=spec.id == default))
        return ModelList(default=default, models=entries)

    @api.get("/livez")
    async def livez(self) -> dict[str, str]:
        """This replica answers HTTP: no Redis, no downstream call. The floor of any request's
        cost through Ray Serve, and the baseline of the cache benchmark."""
        return {"status": "ok"}

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Ready: 200 ("ok", or "degraded" when only Redis is down: answers go on without
        the cache), 503 naming what is down when the generator or the database is."""
        redis, database, generator = await asyncio.gather(
            self.cache.health(),
            _probe(self.store.health.remote()),
            _probe(self.generator.health.remote()),
        )
        redis["mode"] = self.redis.mode
        status, body = readiness({"redis": redis, "database": database, "generator": generator})
        return JSONResponse(body, status_code=status)

    @api.get("/stats")
    async def stats(self) -> dict[str, Any]:
        generator, records, persistence = await asyncio.gather(
            _probe(self.generator.stats.remote()),
            _probe(self.store.count.remote()),
            _probe(self.store.stats.remote()),
        )
        snapshot = self.service.stats()
        snapshot["records_total"] = records
        snapshot["generator"] = generator
        snapshot["persistence"] = persistence
        return snapshot

    @api.delete("/cache", response_model=CacheInvalidation)
    async def invalidate_cache(
        self,
        model: Annotated[str | None, Query(max_length=64)] = None,
    ) -> CacheInvalidation:
        """Drop cached answers (all, or one model's) from Redis and from every replica's L1.
        Needs an admin API key (`Authorization: Bearer <key>`)."""
        if model is not None:
            model = self.catalog.spec(model).id  # 404 with the valid ids for a typo
        deleted = await self.cache.invalidate(model)
        logger.info("cache invalidated (model=%s): %s", model or "all", deleted)
        return CacheInvalidation(model=model, deleted_l1=deleted["l1"], deleted_l2=deleted["l2"])
