"""Group commit: concurrent writers share one write, so throughput grows with concurrency instead
of with fsyncs (in the database) or with per-call overhead (across a DeploymentHandle).

Writer tasks drain a queue. While a write is in flight, new calls wait in the queue; when it
finishes, the next write takes every call that is waiting (up to `max_rows`). A lone call is
written at once, with no batching delay; under load a group is as large as the load makes it.
This replaced `@serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)`, which closes a
group after a fixed wait and size: a lone call paid the wait, a group under load stopped at 64.

It is used twice on the path of a record:
- in the Persistence replica, one writer, `write` = one database transaction;
- in the ingress, `write` = one `record` call on the Persistence handle, so one Ray call carries
  the rows of every request that finished meanwhile. On a 2-core machine a Serve handle call
  costs more than committing a row, so this is what lets rows/s exceed calls/s.

Plain asyncio with no Ray import, unit-tested against a real database.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupCommitter"]

logger = logging.getLogger("ray.serve").getChild(__name__)

RowT = TypeVar("RowT")
ResultT = TypeVar("ResultT")
_Call = tuple[list[RowT], "asyncio.Future[list[ResultT]]"]


class GroupCommitter(Generic[RowT, ResultT]):
    """Gathers concurrent calls into shared writes of everything pending.

    `write(rows)` must store all rows atomically and return one result per row, in order. A
    caller's `submit()` returns only after the write holding its rows returned; if that write
    raises, the caller gets the exception. A caller cancelled before its group starts is dropped
    from it.

    - `concurrency`: writes in flight at once (1 for a database with a single writer).
    - `isolate_failures`: when a shared write fails, retry each of its calls alone, so one bad
      row fails only its own caller. Only safe where a failed write is known to have stored
      nothing (a rolled-back transaction), never where it may have (a lost reply). A
      predicate instead of True retries only the failures it accepts (a refused row, not a
      database that is down, where retrying each call would only multiply the wait).
    - `group=False` writes each row on its own (the baseline the benchmark measures against).
    """

    def __init__(
        self,
        write: Callable[[list[RowT]], Awaitable[list[ResultT]]],
        max_rows: int = 1024,
        group: bool = True,
        concurrency: int = 1,
        isolate_failures: bool | Callable[[Exception], bool] = True,
    ) -> None:
        if max_rows < 1 or concurrency < 1:
            raise ValueError("max_rows and concurrency must be at least 1")
        self._write = write
        self.max_rows = max_rows
        self.group = group
        self.concurrency = concurrency
        self.isolate_failures = isolate_failures
        self._queue: deque[_Call] = deque()
        self._writers: set[asyncio.Task[None]] = set()
        self.writes = 0
        self.rows = 0
        self.largest_group = 0
        self.write_seconds = 0.0

    def configure(self, max_rows: int, group: bool) -> None:
        """Applied from the next write on (the deployment's `reconfigure`)."""
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.max_rows, self.group = max_rows, group

    async def submit(self, rows: Sequence[RowT]) -> list[ResultT]:
        """Write `rows` (with whatever else is pending) and return their results."""
        if not rows:
            return []
        future: asyncio.Future[list[ResultT]] = asyncio.get_running_loop().create_future()
        self._queue.append((list(rows), future))
        if len(self._writers) < self.concurrency:
            # A context of its own: the writer serves every caller, so it must not inherit
            # (and be cancelled with) the request of whichever caller happened to start it.
            writer = asyncio.create_task(self._drain(), context=contextvars.Context())
            self._writers.add(writer)
        return await future

    def stats(self) -> dict[str, float | int | bool]:
        return {
            "group_commit": self.group,
            "writes": self.writes,
            "rows": self.rows,
            "mean_rows_per_write": round(self.rows / self.writes, 2) if self.writes else 0.0,
            "largest_group": self.largest_group,
            "mean_write_ms": round(self.write_seconds / self.writes * 1000, 2)
            if self.writes
            else 0.0,
            "queued_calls": len(self._queue),
        }

    def _take_group(self) -> list[_Call]:
        group: list[_Call] = []
        size = 0
        while self._queue:
            rows, future = self._queue[0]
            if future.done():  # the caller was cancelled: nobody will see these ids
                self._queue.popleft()
                continue
            if group and (not self.group or size + len(rows) > self.max_rows):
                break
            self._queue.popleft()
            group.append((rows, future))
            size += len(rows)
        return group

    async def _drain(self) -> None:
        try:
            while self._queue:
                group = self._take_group()
                if group:
                    await self._write_group(group)
        finally:
            # In the same step that saw the queue empty, so a submit() never finds a writer
            # that is about to leave.
            self._writers.discard(asyncio.current_task())  # type: ignore[arg-type]

    async def _write_group(self, group: list[_Call]) -> None:
        try:
            if self.group:
                results = await self._counted_write([r for rows, _ in group for r in rows])
            else:  # one call per group here, one write per row
                results = []
                for row in group[0][0]:
                    results += await self._counted_write([row])
        except asyncio.CancelledError as exc:
            for _, future in group:
                _resolve(future, exc)
            self._fail_queued(exc)
            raise
        except Exception as exc:
            isolate = self.isolate_failures
            if callable(isolate):
                isolate = isolate(exc)
            if not isolate or len(group) == 1:
                logger.warning("write of %d call(s) failed: %r", len(group), exc)
                for _, future in group:
                    _resolve(future, exc)
                return
            logger.warning("write of %d calls failed, retrying one by one: %r", len(group), exc)
            for rows, future in group:
                try:
                    _resolve(future, await self._counted_write(rows))
                except Exception as one_exc:
                    _resolve(future, one_exc)
            return
        offset = 0
        for rows, future in group:
            _resolve(future, results[offset : offset + len(rows)])
            offset += len(rows)

    async def _counted_write(self, rows: list[RowT]) -> list[ResultT]:
        started = time.perf_counter()
        results = await self._write(rows)
        self.write_seconds += time.perf_counter() - started
        if len(results) != len(rows):
            raise RuntimeError(f"write returned {len(results)} results for {len(rows)} rows")
        self.writes += 1
        self.rows += len(rows)
        self.largest_group = max(self.largest_group, len(rows))
        return results

    def _fail_queued(self, exc: BaseException) -> None:
        while self._queue:
            _resolve(self._queue.popleft()[1], exc)


def _resolve(future: asyncio.Future[list[ResultT]], outcome: list[ResultT] | BaseException) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
