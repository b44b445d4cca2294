"""The Generator deployment: multiplexed GPT-2 models, dynamically batched requests.

Models are loaded by id through the registry with `@serve.multiplexed` (LRU per replica).
Requests are grouped by `@serve.batch`; each batch is decoded by `BatchDecoder` in a dedicated
worker thread, so the replica's event loop keeps answering (health checks, new requests joining
the next batch) while a batch runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve

from serve_app.config import AppArgs, BatchingConfig
from serve_app.domain import GenerationRequest, GenerationResult
from serve_app.errors import ServeError, UnknownModelError

logger = logging.getLogger("ray.serve")


class ResidentModel:
    """A loaded model as held by the multiplexer; tells the replica when Ray evicts it."""

    def __init__(self, loaded: Any, on_evict: Any) -> None:
        from serve_app.engine import BatchDecoder

        self.loaded = loaded
        self.decoder = BatchDecoder(loaded)
        self._on_evict = on_evict

    def __del__(self) -> None:  # Ray's multiplexer calls this when it evicts the model
        callback, self._on_evict = getattr(self, "_on_evict", None), None
        if callback is not None:
            callback(self.loaded.info.id)


@serve.deployment
class Generator:
    def __init__(self, args: AppArgs) -> None:
        import torch

        self.args = args
        threads = args.generator.torch_threads or os.cpu_count() or 1
        torch.set_num_threads(threads)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._standin_dir = Path(args.standin_dir or ".")
        self.loads: Counter[str] = Counter()
        self.evictions = 0
        self.resident: list[str] = []
        self.batches = 0
        self.batched_requests = 0
        self.max_batch_seen = 0
        self.tokens_generated = 0

        from serve_app.registry import prepare_model

        for spec in args.models:  # stand-in checkpoints are built once, before serving
            prepare_model(spec, self._standin_dir, args.hub_timeout_s, args.offline)

        # The LRU size is configuration, so the multiplexed loader is created per instance.
        async def load_model(model_id: str) -> ResidentModel:
            return await self._load(model_id)

        self._get_model = serve.multiplexed(
            max_num_models_per_replica=args.generator.max_models_per_replica
        )(load_model)
        logger.info("Generator ready: torch threads=%d", threads)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        config = BatchingConfig.model_validate(user_config or {})
        self._batched.set_max_batch_size(config.max_batch_size)
        self._batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        logger.info("Generator batching: %s", config)

    async def _load(self, model_id: str) -> ResidentModel:
        from serve_app.registry import load_model, resolve_model

        spec = self.args.model(model_id)
        if spec is None:
            raise UnknownModelError(f"unknown model {model_id!r}", valid_ids=self.args.model_ids)
        offline = self.args.offline
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        info = await loop.run_in_executor(
            None, resolve_model, spec, self._standin_dir, self.args.hub_timeout_s, offline
        )
        loaded = await loop.run_in_executor(
            self._executor, load_model, spec, info, self._standin_dir
        )
        self.loads[model_id] += 1
        self.resident.append(model_id)
        logger.info(
            "Loaded model %s (%s, %s) in %.2fs",
            model_id,
            info.kind,
            info.revision,
            time.perf_counter() - started,
        )
        return ResidentModel(loaded, self._evicted)

    def _evicted(self, model_id: str) -> None:
        self.evictions += 1
        if model_id in self.resident:
            self.resident.remove(model_id)
        logger.info("Evicted model %s", model_id)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        outcome = await self._batched(request)
        if isinstance(outcome, ServeError):
            raise outcome
        return outcome

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batched(
        self, requests: list[GenerationRequest]
    ) -> list[GenerationResult | ServeError]:
        self.batches += 1
        self.batched_requests += len(requests)
        self.max_batch_seen = max(self.max_batch_seen, len(requests))
        results: list[GenerationResult | ServeError] = [None] * len(requests)  # type: ignore[list-item]
        by_model: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_model.setdefault(request.model_id, []).append(i)
        loop = asyncio.get_running_loop()
        for model_id, indices in by_model.items():
            try:
                resident = await self._get_model(model_id)
            except ServeError as exc:
                for i in indices:
                    results[i] = exc
                continue
            group = [requests[i] for i in indices]
            outcomes = await loop.run_in_executor(self._executor, resident.decoder.generate, group)
            for i, outcome in zip(indices, outcomes, strict=True):
                results[i] = outcome
                if isinstance(outcome, GenerationResult):
                    self.tokens_generated += outcome.completion_tokens
        return results

    async def stats(self) -> dict[str, Any]:
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "resident_models": list(self.resident),
            "loads": dict(self.loads),
            "evictions": self.evictions,
            "batches": self.batches,
            "batched_requests": self.batched_requests,
            "mean_batch_size": round(self.batched_requests / self.batches, 2)
            if self.batches
            else 0.0,
            "max_batch_size_seen": self.max_batch_seen,
            "tokens_generated": self.tokens_generated,
        }

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "resident_models": list(self.resident)}
