"""The service's backend as the ingress reaches it: the Generator and Persistence deployments
through Ray Serve handles, with infrastructure failures turned into 503s."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_app.domain import Generation, GenerationRequest, Receipt, TextDelta
from serve_app.errors import DependencyUnavailableError
from serve_app.http.errors import as_serve_error
from serve_app.storage.group_commit import GroupCommitter

logger = logging.getLogger("ray.serve").getChild(__name__)


def unavailable(exc: BaseException, what: str) -> BaseException:
    """What a failed handle call means to the client: the replica's own error if it raised
    one on purpose, else a 503."""
    known = as_serve_error(exc)
    if known is not None:
        return known
    logger.warning("%s unavailable: %r", what, exc)
    return DependencyUnavailableError(f"{what} is unavailable, try again")


async def call(response: Any, what: str, timeout_s: float | None = None) -> Any:
    """Await a handle call; infrastructure failures become a 503, meaningful errors pass."""
    try:
        if timeout_s is None:
            return await response
        return await asyncio.wait_for(response, timeout_s)
    except asyncio.TimeoutError as exc:
        raise DependencyUnavailableError(f"{what} did not answer in time") from exc
    except (RayError, BackPressureError) as exc:
        raise unavailable(exc, what) from None


class HandleBackend:
    """The service's backend, reached through Ray Serve deployment handles."""

    def __init__(
        self, generator: DeploymentHandle, store: DeploymentHandle, write_timeout_s: float
    ) -> None:
        self.generator = generator
        self.store = store
        self.write_timeout_s = write_timeout_s
        # Requests finishing together share one `record` call (a handle call costs more than a
        # row). Never retried: a call that failed may still have committed.
        self.recorder: GroupCommitter[Generation, Generation] = GroupCommitter(
            self._record_call, concurrency=2, isolate_failures=False
        )

    async def generate(self, request: GenerationRequest) -> Generation:
        handle = self.generator.options(multiplexed_model_id=request.model)
        return await call(handle.generate.remote(request), "generator")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Generation]:
        handle = self.generator.options(multiplexed_model_id=request.model, stream=True)
        responses = handle.generate_stream.remote(request)
        finished = False
        try:
            async for item in responses:
                yield item
            finished = True
        except (RayError, BackPressureError) as exc:
            finished = True
            raise unavailable(exc, "generator") from None
        finally:
            if not finished:  # the client went away: stop the row in the generator
                responses.cancel()

    async def record(self, records: list[Generation]) -> list[Generation]:
        return await self.recorder.submit(records)

    async def _record_call(self, rows: list[Generation]) -> list[Generation]:
        # A timed-out write is a 503 even if it commits later: no id is ever answered uncommitted.
        receipts: list[Receipt] = await call(
            self.store.record.remote(rows), "persistence", self.write_timeout_s
        )
        if len(receipts) != len(rows):
            raise DependencyUnavailableError("persistence answered with the wrong number of rows")
        return [
            row.replace(id=receipt.id, created_at=receipt.created_at)
            for row, receipt in zip(rows, receipts, strict=True)
        ]
