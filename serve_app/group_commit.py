"""Group commit: concurrent writers share one transaction, so throughput grows with concurrency
instead of with fsyncs.

One writer task drains a queue. While a commit is in flight, new calls wait in the queue; when it
finishes, the next transaction takes every call that is waiting (up to `max_rows`). A lone call
is committed at once, with no batching delay; under load a group is as large as the load makes
it. This replaced `@serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)`, which closes a
group after a fixed wait and size (see docs/persistence.md for the measured difference).

Plain asyncio with no Ray import: the Persistence deployment wraps it, and unit tests drive it
against a real database.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupCommitter"]

logger = logging.getLogger("ray.serve")

RowT = TypeVar("RowT")
ResultT = TypeVar("ResultT")


class GroupCommitter(Generic[RowT, ResultT]):
    """Serialises writes through one task and commits everything pending in one transaction.

    `write(rows)` must commit all rows atomically and return one result per row, in order. A
    caller's `submit()` returns only after the transaction holding its rows committed. If a
    group's transaction fails, each of its calls is retried in a transaction of its own, so one
    bad row fails only its own caller; a caller whose transaction fails gets the exception and
    none of its rows is stored. A caller cancelled before its group starts is dropped from it.

    `group=False` commits each row in a transaction of its own (the baseline the benchmark
    measures group commit against).
    """

    def __init__(
        self,
        write: Callable[[list[RowT]], Awaitable[list[ResultT]]],
        max_rows: int = 1024,
        group: bool = True,
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self._write = write
        self.max_rows = max_rows
        self.group = group
        self._queue: deque[tuple[list[RowT], asyncio.Future[list[ResultT]]]] = deque()
        self._writer: asyncio.Task[None] | None = None
        self.transactions = 0
        self.rows = 0
        self.largest_group = 0

    def configure(self, max_rows: int, group: bool) -> None:
        """Applied from the next transaction on (the deployment's `reconfigure`)."""
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.max_rows, self.group = max_rows, group

    async def submit(self, rows: Sequence[RowT]) -> list[ResultT]:
        """Commit `rows` (with whatever else is pending) and return their results."""
        if not rows:
            return []
        future: asyncio.Future[list[ResultT]] = asyncio.get_running_loop().create_future()
        self._queue.append((list(rows), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        return await future

    def stats(self) -> dict[str, float | int | bool]:
        return {
            "group_commit": self.group,
            "transactions": self.transactions,
            "rows": self.rows,
            "mean_rows_per_transaction": round(self.rows / self.transactions, 2)
            if self.transactions
            else 0.0,
            "largest_group": self.largest_group,
            "queued_calls": len(self._queue),
        }

    def _take_group(self) -> list[tuple[list[RowT], asyncio.Future[list[ResultT]]]]:
        group: list[tuple[list[RowT], asyncio.Future[list[ResultT]]]] = []
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
        while self._queue:
            group = self._take_group()
            if not group:
                continue
            try:
                if self.group:
                    await self._commit_group(group)
                else:
                    # One call per group here, one transaction per row.
                    rows, future = group[0]
                    results: list[ResultT] = []
                    for row in rows:
                        results += await self._commit([row])
                    _resolve(future, results)
            except BaseException as exc:
                for _, future in group:
                    _resolve(future, exc)
                if isinstance(exc, asyncio.CancelledError):
                    self._fail_queued(exc)
                    raise
                logger.warning("commit of %d call(s) failed: %r", len(group), exc)

    async def _commit_group(
        self, group: list[tuple[list[RowT], asyncio.Future[list[ResultT]]]]
    ) -> None:
        try:
            results = await self._commit([r for rows, _ in group for r in rows])
        except Exception as exc:
            if len(group) == 1:
                raise
            logger.warning(
                "group commit of %d calls failed, retrying one by one: %r", len(group), exc
            )
            for rows, future in group:
                try:
                    _resolve(future, await self._commit(rows))
                except Exception as one_exc:
                    _resolve(future, one_exc)
            return
        offset = 0
        for rows, future in group:
            _resolve(future, results[offset : offset + len(rows)])
            offset += len(rows)

    async def _commit(self, rows: list[RowT]) -> list[ResultT]:
        results = await self._write(rows)
        if len(results) != len(rows):
            raise RuntimeError(f"write returned {len(results)} results for {len(rows)} rows")
        self.transactions += 1
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
