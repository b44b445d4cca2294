"""The service's backend as the ingress reaches it: the Generator and Persistence deployments
through Ray Serve handles, with infrastructure failures turned into 503s."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_app.domain import Generation, GenerationRequest, Receipt, TextDelta
from serve_app.errors import (
    DependencyUnavailableError,
    OverloadedError,
    ServeError,
    UpstreamTimeoutError,
)
from serve_app.http.errors import as_serve_error
from serve_app.storage.group_commit import GroupCommitter
from serve_app.telemetry.metrics import metric

logger = logging.getLogger("ray.serve").getChild(__name__)


def unavailable(exc: BaseException, what: str) -> BaseException:
    """What a failed handle call means to the client: the replica's own error if it raised
    one on purpose, else a 503."""
    known = as_serve_error(exc)
    if known is not None:
        return known
    logger.warning("%s unavailable: %r", what, exc)
    return DependencyUnavailableError(f"{what} is unavailable, try again")


def at_capacity(what: str) -> OverloadedError:
    """Ray's router refused the call: every replica is at max_ongoing_requests and the queue in
    front of them (the deployment's max_queued_requests) is full."""
    metric("gpt2serve_requests_refused").inc(tags={"reason": "overloaded"})
    return OverloadedError(f"the {what} is at capacity; retry later", retry_after_s=1.0)


async def call(
    response: Any,
    what: str,
    timeout_s: float | None = None,
    late: type[ServeError] = DependencyUnavailableError,
) -> Any:
    """Await a handle call; infrastructure failures become a 503, meaningful errors pass,
    and a call past `timeout_s` is cancelled and answered with `late` (503 or 504)."""
    try:
        if timeout_s is None:
            return await response
        return await asyncio.wait_for(response, timeout_s)
    except asyncio.TimeoutError as exc:
        raise late(f"{what} did not answer in time ({timeout_s:g} s)") from exc
    except BackPressureError:
        raise at_capacity(what) from None
    except RayError as exc:
        raise unavailable(exc, what) from None


class OverloadGate:
    """What the generator's refusals teach this ingress replica. After a 503 "overloaded", for
    its Retry-After, a call is refused here (no round trip through Ray, which is most of what a
    refusal costs) while this replica already has as many generator calls in flight as when
    the generator refused; below that, calls go through and the generator decides again.

    The Retry-After it sends is what a refused client can expect to wait with the others:
    the clients waiting outside (Little's law: the Retry-After seconds handed out in the last
    `WINDOW_S`, per second) over the rate calls are admitted, never less than the generator's
    own estimate (its queue's drain time). A queue's drain time alone brought three times more
    clients back than could get in, and their round trips took the cores from the rows being
    decoded. The estimate of who waits does not depend on the Retry-After sent, so it settles
    at once rather than swinging."""

    WINDOW_S = 10.0
    MAX_RETRY_AFTER_S = 60.0  # the longest the openai client honours

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.inflight = 0
        self.limit = 0
        self.until = 0.0
        self.retry_after_s = 1.0  # the generator's last estimate
        self._refusals: deque[tuple[float, float]] = deque()  # (when, Retry-After sent)
        self._admissions: deque[float] = deque()  # when calls were let through

    def enter(self) -> None:
        if self.until > self.clock() and self.inflight >= self.limit:
            metric("gpt2serve_requests_refused").inc(tags={"reason": "overloaded"})
            raise OverloadedError(
                "the generator is at capacity; retry later", retry_after_s=self._refused()
            )
        self.inflight += 1
        self._forget()
        self._admissions.append(self.clock())

    def leave(self, refusal: OverloadedError | None = None) -> None:
        self.inflight -= 1
        if refusal is None:
            return
        if self._admissions:
            self._admissions.pop()  # let through, but the generator refused it
        self.limit = max(1, self.inflight)  # the refused call itself was in flight
        # The generator's whole estimate, not what is left of it: a client told "1 s" at the
        # end of the window would be back at once, with everyone else.
        self.retry_after_s = float(refusal.details.get("retry_after_s") or 1.0)
        self.until = self.clock() + self.retry_after_s
        refusal.details["retry_after_s"] = self._refused()

    def _refused(self) -> float:
        """The Retry-After for a refusal now (see the class), noted for the next ones."""
        self._forget()
        # Clients waiting (Retry-After seconds sent per second) over calls admitted per
        # second, both over the same window: the seconds cancel.
        waiting_s = sum(sent for _, sent in self._refusals)
        retry_after = max(self.retry_after_s, waiting_s / max(1, len(self._admissions)))
        retry_after = min(self.MAX_RETRY_AFTER_S, retry_after)
        self._refusals.append((self.clock(), retry_after))
        return retry_after

    def _forget(self) -> None:
        """Drop what is older than the window."""
        horizon = self.clock() - self.WINDOW_S
        while self._refusals and self._refusals[0][0] < horizon:
            self._refusals.popleft()
        while self._admissions and self._admissions[0] < horizon:
            self._admissions.popleft()

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        self.enter()
        try:
            yield
        except OverloadedError as exc:
            self.leave(exc)
            raise
        except BaseException:
            self.leave()
            raise
        self.leave()


class HandleBackend:
    """The service's backend, reached through Ray Serve deployment handles."""

    def __init__(
        self,
        generator: DeploymentHandle,
        store: DeploymentHandle,
        write_timeout_s: float,
        generate_timeout_s: float = 300.0,
    ) -> None:
        self.generator = generator
        self.store = store
        self.write_timeout_s = write_timeout_s
        self.generate_timeout_s = generate_timeout_s
        self.gate = OverloadGate()
        # Requests finishing together share one `record` call (a handle call costs more than a
        # row). Never retried: a call that failed may still have committed.
        self.recorder: GroupCommitter[Generation, Generation] = GroupCommitter(
            self._record_call, concurrency=2, isolate_failures=False
        )

    async def generate(self, request: GenerationRequest) -> Generation:
        handle = self.generator.options(multiplexed_model_id=request.model)
        async with self.gate.admitted():
            return await call(
                handle.generate.remote(request),
                "generator",
                self.generate_timeout_s,
                UpstreamTimeoutError,
            )

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Generation]:
        handle = self.generator.options(multiplexed_model_id=request.model, stream=True)
        async with self.gate.admitted():
            async for item in self._stream(handle, request):
                yield item

    async def _stream(
        self, handle: DeploymentHandle, request: GenerationRequest
    ) -> AsyncIterator[TextDelta | Generation]:
        responses = handle.generate_stream.remote(request)
        finished = False
        try:
            while True:
                try:  # a stalled stream (a dead or hung replica) must not hold the client
                    async with asyncio.timeout(self.generate_timeout_s):  # no task per event
                        item = await anext(responses)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise UpstreamTimeoutError(
                        f"generator did not answer in time ({self.generate_timeout_s:g} s)"
                    ) from None
                yield item
            finished = True
        except BackPressureError:
            finished = True
            raise at_capacity("generator") from None
        except RayError as exc:
            finished = True
            raise unavailable(exc, "generator") from None
        finally:
            if not finished:  # the client went away: stop the row in the generator
                responses.cancel()

    async def record(self, records: list[Generation]) -> list[Generation]:
        """The records as stored; a row the database refused fails this call alone."""
        stored = await self.recorder.submit(records)
        for outcome in stored:
            if isinstance(outcome, BaseException):
                raise outcome
        return stored

    async def _record_call(self, rows: list[Generation]) -> list[Generation]:
        # A timed-out write is a 503 even if it commits later: no id is ever answered uncommitted.
        receipts: list[Receipt | ServeError] = await call(
            self.store.record.remote(rows), "persistence", self.write_timeout_s
        )
        if len(receipts) != len(rows):
            raise DependencyUnavailableError("persistence answered with the wrong number of rows")
        return [
            row.replace(id=receipt.id, created_at=receipt.created_at)
            if isinstance(receipt, Receipt)
            else receipt  # this row was refused; the others are stored
            for row, receipt in zip(rows, receipts, strict=True)
        ]
