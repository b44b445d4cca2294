"""Single-flight: identical work requested concurrently runs once; everyone gets its result.

The first caller for a key starts the work as its own task; callers arriving while it runs
await the same task. The work is shielded from its callers: a client that disconnects does not
cancel the generation others are waiting for. Exactly one caller is told it was the leader.
The registry holds only work in flight, so it is bounded by the requests in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Future[T]] = {}
        self.led = 0
        self.joined = 0

    def __len__(self) -> int:
        return len(self._flights)

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """The result of `work()` for `key`, and whether this caller started it."""
        flight = self._flights.get(key)
        leader = flight is None
        if flight is None:
            flight = asyncio.ensure_future(work())
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._land(key, done))
            self.led += 1
        else:
            self.joined += 1
        return await asyncio.shield(flight), leader

    def _land(self, key: str, flight: asyncio.Future[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # retrieved here, so a flight nobody awaits any more stays quiet
