"""A circuit breaker: stop calling a dependency that keeps failing, and find out on its own
when it is back.

Closed: calls go through; `failure_threshold` consecutive failures open it. Open: callers skip
the dependency at no cost; once `reset_after_s` has passed, one probe may run (half-open). A
successful probe closes the breaker; a failed one opens it again for twice as long, up to
`max_reset_after_s`. Requests never act as probes: the owner runs the probe in the background,
so no request pays for finding out that the dependency is still down.

Plain Python with an injectable clock: the state machine is unit-tested in milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# For a gauge: higher is worse.
STATE_LEVEL = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 3,
        reset_after_s: float = 0.5,
        max_reset_after_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self.max_reset_after_s = max(max_reset_after_s, reset_after_s)
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.opened = 0  # how many times it has opened
        self.last_error: str | None = None
        self._backoff_s = reset_after_s
        self._probe_at = 0.0

    @property
    def allows_calls(self) -> bool:
        """Whether a request may use the dependency now (only when closed)."""
        return self.state is BreakerState.CLOSED

    def seconds_to_probe(self) -> float:
        """How long until a probe may run; 0 when one may run now (or the breaker is closed)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._probe_at - self._clock())

    def begin_probe(self) -> bool:
        """Open and due: move to half-open and let the caller probe. Otherwise False."""
        if self.state is BreakerState.OPEN and self._clock() >= self._probe_at:
            self.state = BreakerState.HALF_OPEN
            return True
        return False

    def record_success(self) -> None:
        if self.state is BreakerState.OPEN:
            return  # a call started before it opened: only the probe may close it
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self._backoff_s = self.reset_after_s

    def record_failure(self, error: str) -> None:
        self.last_error = error
        if self.state is BreakerState.HALF_OPEN:
            self._backoff_s = min(self._backoff_s * 2, self.max_reset_after_s)
            self._open()
        elif self.state is BreakerState.CLOSED:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.failure_threshold:
                self._open()
        # already open: a late failure of a call started before it opened changes nothing

    def _open(self) -> None:
        self.state = BreakerState.OPEN
        self.opened += 1
        self._probe_at = self._clock() + self._backoff_s

    def snapshot(self) -> dict[str, object]:
        return {
            "state": self.state.value,
            "consecutive_failures": self.consecutive_failures,
            "opened": self.opened,
            "last_error": self.last_error,
            "next_probe_in_s": round(self.seconds_to_probe(), 3),
        }
