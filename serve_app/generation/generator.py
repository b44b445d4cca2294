"""The Generator deployment: multiplexed GPT-2 models, dynamically batched requests.

Models are loaded by id through the registry with `@serve.multiplexed` (LRU per replica).
`@serve.batch` gathers arrivals and hands them to the `Scheduler`, whose decode thread batches
at token level (rows join and leave at step boundaries), so the replica's event loop keeps
answering health checks and taking requests while the model runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from serve_app.config import AppArgs, BatchingConfig
from serve_app.domain import Generation, GenerationRequest, TextDelta, merge_deltas
from serve_app.errors import OverloadedError, ServeError, UnknownModelError
from serve_app.generation.metrics import GeneratorMetrics
from serve_app.generation.scheduler import Scheduler

logger = logging.getLogger("ray.serve").getChild(__name__)

DEFAULT_RETRY_AFTER_S = 5.0  # until the completion rate is known


class ResidentModel:
    """A loaded model as held by the multiplexer; tells the replica when Ray evicts it."""

    def __init__(self, loaded: Any, on_evict: Any) -> None:
        from serve_app.generation.engine import BatchDecoder

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

        from serve_app.generation.threads import ThreadBudget, torch_side_executor

        self.args = args
        threads = args.generator.torch_threads or os.cpu_count() or 1
        torch.set_num_threads(threads)
        # Model loads and stand-in builds run torch on a thread of their own, on one intra-op
        # thread: a second multi-threaded torch thread in the process throttles OpenMP's
        # spinning for the decode thread too (threads.one_torch_thread: fp32 steps 50-54 vs
        # 43-46 ms once the bf16 and int8 models had been loaded on two threads).
        self._loader = torch_side_executor("model-load")
        self._standin_dir = Path(args.standin_dir or ".")
        self.loads: Counter[str] = Counter()
        self.evictions = 0
        self.resident: list[str] = []
        self.metrics = GeneratorMetrics()
        batching = BatchingConfig()  # until reconfigure() applies the deployment's user_config
        self._threads = ThreadBudget(threads, batching.single_thread_max_rows)
        self._max_queued = batching.max_queued_requests
        self._inflight = 0  # requests between `_enter` and `_leave` (the event loop's own)
        self._finished: deque[float] = deque(maxlen=256)  # when recent requests left
        self._scheduler = Scheduler(
            batching.max_batch_size,
            observer=self.metrics,
            admit_min_rows=batching.admit_min_rows,
            admit_max_wait_s=batching.admit_max_wait_s,
            threads=self._threads,
            crash_marker=args.generator.crash_marker,
            niceness=args.generator.decode_niceness,
        )

        from serve_app.models.resolve import prepare_model

        for spec in args.models:  # stand-in checkpoints are built once, before serving
            self._loader.submit(
                prepare_model, spec, self._standin_dir, args.hub_timeout_s, args.offline
            ).result()

        # The LRU size is configuration, so the multiplexed loader is created per instance.
        async def load_model(model_id: str) -> ResidentModel:
            return await self._load(model_id)

        self._get_model = serve.multiplexed(
            max_num_models_per_replica=args.generator.max_models_per_replica
        )(load_model)
        logger.info(
            "Generator ready: torch threads=%d, decode niceness +%d",
            threads,
            args.generator.decode_niceness,
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        config = BatchingConfig.model_validate(user_config or {})
        self._scheduler.max_batch_size = config.max_batch_size
        self._scheduler.admit_min_rows = config.admit_min_rows
        self._scheduler.admit_max_wait_s = config.admit_max_wait_s
        self._threads.single_thread_max_rows = config.single_thread_max_rows
        self._scheduler.stream_messages_per_step = config.stream_messages_per_step
        self._max_queued = config.max_queued_requests
        self._admit.set_max_batch_size(config.max_batch_size)
        self._admit.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        logger.info("Generator batching: %s", config)

    async def _load(self, model_id: str) -> ResidentModel:
        from serve_app.models.loading import load_model
        from serve_app.models.resolve import resolve_model

        spec = self.args.model(model_id)
        if spec is None:
            raise UnknownModelError(f"unknown model {model_id!r}", valid_ids=self.args.model_ids)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        info = await loop.run_in_executor(
            None, resolve_model, spec, self._standin_dir, self.args.hub_timeout_s, self.args.offline
        )
        loaded = await loop.run_in_executor(self._loader, load_model, spec, info, self._standin_dir)
        seconds = time.perf_counter() - started
        self.loads[model_id] += 1
        self.resident.append(model_id)
        self.metrics.model_loaded(model_id, seconds)
        logger.info(
            "Loaded model %s (%s, %s, %s, %s kernels) in %.2fs",
            model_id,
            info.kind,
            info.revision,
            spec.dtype,
            loaded.kernels,
            seconds,
        )
        return ResidentModel(loaded, self._evicted)

    def _evicted(self, model_id: str) -> None:
        self.evictions += 1
        self.metrics.model_evicted(model_id)
        if model_id in self.resident:
            self.resident.remove(model_id)
        logger.info("Evicted model %s", model_id)

    def _enter(self) -> None:
        """Admission control, before any model work: a replica holding `max_queued_requests`
        requests beyond what its batches take refuses the next one at once (503 + Retry-After),
        so overload costs the refused client a round trip instead of a growing wait for all."""
        # A batch's free rows are filled at its next step, and rows that finish are answered
        # before the step's forward pass (their callers can be back before it ends): so a
        # whole batch counts as started even while fewer rows decode.
        scheduler = self._scheduler
        queued = self._inflight - max(scheduler.started, scheduler.max_batch_size)
        if queued >= self._max_queued:
            self.metrics.refused("overloaded")
            raise OverloadedError(
                "the generator is at capacity; retry later", retry_after_s=self._drain_s(queued)
            )
        self._inflight += 1

    def _leave(self) -> None:
        self._inflight -= 1
        self._finished.append(time.monotonic())

    def _drain_s(self, queued: int) -> float:
        """How long the queue ahead takes to clear at the recent completion rate (1-30 s).
        Before enough requests have finished to tell, 5 s: a Retry-After of 1 would bring
        every refused client straight back, and their round trips eat the cores the admitted
        requests decode on."""
        recent = [t for t in self._finished if t > time.monotonic() - 30.0]
        if len(recent) < 8 or recent[-1] <= recent[0]:
            return DEFAULT_RETRY_AFTER_S
        rate = (len(recent) - 1) / (recent[-1] - recent[0])
        return min(30.0, max(1.0, queued / rate))

    async def generate(self, request: GenerationRequest) -> Generation:
        self._enter()
        try:
            future = await self._admit(request)
            return await future
        finally:
            self._leave()

    async def generate_stream(
        self, request: GenerationRequest
    ) -> AsyncIterator[TextDelta | Generation]:
        """`TextDelta`s as the text is decoded, then the `Generation`. Called with
        `handle.options(stream=True)`; rows join the same continuous batches as `generate`.
        When the caller goes away, Ray cancels this generator and the row leaves its batch at
        the next step.

        Deltas that queued up while the last one was being sent leave as one: every item is a
        message through Ray and then the HTTP proxy, so under load (32 streams) sending each
        token alone cost a fifth of the throughput, while a lone stream still gets each token
        as soon as it is decoded."""
        self._enter()
        try:
            resident = await self._get_model(request.model)
            channel, future = self._scheduler.submit_stream(resident.decoder, request)
        except BaseException:
            self._leave()
            raise
        try:
            while True:
                items = [await channel.get()]
                while not channel.empty():
                    items.append(channel.get_nowait())
                for _, item in merge_deltas([(None, item) for item in items]):
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if isinstance(item, Generation):
                        return
        finally:
            future.cancel()  # a no-op once answered
            self._leave()

    # Grouping only: the group is handed to the decode loop, which admits it at its next step
    # boundary, so a group never waits for the previous one; max_concurrent_batches lets groups
    # for other models proceed while one waits for its model to load.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, max_concurrent_batches=4)
    async def _admit(self, requests: list[GenerationRequest]) -> list[asyncio.Future]:
        futures: list[asyncio.Future] = [None] * len(requests)  # type: ignore[list-item]
        by_model: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_model.setdefault(request.model, []).append(i)
        for model_id, indices in by_model.items():
            try:
                resident = await self._get_model(model_id)
            except ServeError as exc:
                for i in indices:
                    futures[i] = _failed(exc)
                continue
            try:
                submitted = self._scheduler.submit(resident.decoder, [requests[i] for i in indices])
            except ServeError as exc:  # the decode loop has stopped
                submitted = [_failed(exc) for _ in indices]
            for i, future in zip(indices, submitted, strict=True):
                futures[i] = future
        return futures

    async def stats(self) -> dict[str, Any]:
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "resident_models": list(self.resident),
            "loads": dict(self.loads),
            "evictions": self.evictions,
            "max_batch_size": self._scheduler.max_batch_size,
            "queued": self._scheduler.queued,
            "in_flight": self._inflight,
            "max_queued_requests": self._max_queued,
            "active_rows": self._scheduler.active,
            **self._scheduler.stats.snapshot(),
        }

    async def health(self) -> dict[str, Any]:
        status = "ok" if self._scheduler.alive else "unavailable"
        return {"status": status, "resident_models": list(self.resident)}

    def __del__(self) -> None:
        # Ray calls this once the replica's requests have finished (graceful shutdown).
        scheduler = getattr(self, "_scheduler", None)
        if scheduler is not None:
            scheduler.stop()

    def check_health(self) -> None:
        """Ray's replica health check: a replica whose decode loop died is replaced."""
        if not self._scheduler.alive:
            raise RuntimeError("the decode loop has stopped")


def _failed(exc: BaseException) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future
