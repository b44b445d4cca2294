"""The ingress's overload gate: after the generator refuses, calls beyond the in-flight count
it refused at are refused locally until the Retry-After passes."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.errors import OverloadedError
from serve_app.http.backend import OverloadGate


async def _hold(gate: OverloadGate, release: asyncio.Event) -> None:
    async with gate.admitted():
        await release.wait()


async def _refused(gate: OverloadGate, retry_after_s: float) -> None:
    async with gate.admitted():
        raise OverloadedError("full", retry_after_s=retry_after_s)


def test_a_refusal_closes_the_gate_at_the_refused_in_flight_count():
    async def scenario() -> None:
        gate, release = OverloadGate(), asyncio.Event()
        holders = [asyncio.ensure_future(_hold(gate, release)) for _ in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError):
            await _refused(gate, retry_after_s=5)
        assert gate.inflight == 3 and gate.limit == 3
        with pytest.raises(OverloadedError) as refused:
            gate.enter()  # refused here: no call reaches the generator
        assert refused.value.details["retry_after_s"] == 5  # the generator's estimate
        release.set()
        await asyncio.gather(*holders)
        assert gate.inflight == 0
        async with gate.admitted():  # below the learned bound: the generator decides again
            assert gate.inflight == 1

    asyncio.run(scenario())


def test_the_gate_opens_when_the_retry_after_has_passed():
    async def scenario() -> None:
        gate, release = OverloadGate(), asyncio.Event()
        holder = asyncio.ensure_future(_hold(gate, release))
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError):
            await _refused(gate, retry_after_s=0.05)
        with pytest.raises(OverloadedError):
            gate.enter()
        await asyncio.sleep(0.06)
        async with gate.admitted():
            assert gate.inflight == 2
        release.set()
        await holder

    asyncio.run(scenario())


def test_other_failures_leave_the_gate_open():
    async def scenario() -> None:
        gate = OverloadGate()
        with pytest.raises(RuntimeError):
            async with gate.admitted():
                raise RuntimeError("boom")
        assert gate.inflight == 0 and gate.until == 0.0

    asyncio.run(scenario())


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _overload(
    waiting: int, capacity: int, hold_s: float, queue_drain_s: float, seconds: float
) -> tuple[list[float], list[float]]:
    """A closed loop in simulated time: `capacity + waiting` clients against a generator that
    holds `capacity` calls `hold_s` each and refuses more with `queue_drain_s`. A refused
    client comes back when the Retry-After says; an answered one at once. Returns the times of
    refusals and the Retry-After each was sent, over the last half of `seconds`."""
    import heapq

    clock = _Clock()
    gate = OverloadGate(clock)
    events = [(i * 0.01, "try") for i in range(capacity + waiting)]
    heapq.heapify(events)
    held = 0
    refusals: list[float] = []
    sent: list[float] = []
    while events:
        clock.now, what = heapq.heappop(events)
        if clock.now > seconds:
            break
        if what == "done":
            held -= 1
            gate.leave()
            heapq.heappush(events, (clock.now, "try"))
            continue
        try:
            gate.enter()
        except OverloadedError as exc:
            retry_after = exc.details["retry_after_s"]
        else:
            if held < capacity:
                held += 1
                heapq.heappush(events, (clock.now + hold_s, "done"))
                continue
            refusal = OverloadedError("full", retry_after_s=queue_drain_s)
            gate.leave(refusal)
            retry_after = refusal.details["retry_after_s"]
        if clock.now > seconds / 2:
            refusals.append(clock.now)
            sent.append(retry_after)
        heapq.heappush(events, (clock.now + retry_after, "try"))
    return refusals, sent


def test_retry_after_grows_to_what_the_waiting_clients_can_expect():
    """100 clients wait while 2 calls a second get in: each can expect about 50 s, and told
    so, they come back about as fast as calls are admitted instead of every 8 s (the queue's
    drain time), which brought 12 refusals a second."""
    refusals, sent = _overload(waiting=100, capacity=10, hold_s=5, queue_drain_s=8, seconds=600)
    per_s = len(refusals) / 300
    assert 1.0 <= per_s <= 4.0, per_s
    assert 35 <= sorted(sent)[len(sent) // 2] <= OverloadGate.MAX_RETRY_AFTER_S


def test_retry_after_is_never_below_the_generators_estimate():
    """A few clients beyond capacity: the queue's drain time is the longer wait."""
    _, sent = _overload(waiting=3, capacity=10, hold_s=5, queue_drain_s=8, seconds=300)
    assert sent and min(sent) >= 8


def test_what_the_gate_remembers_stays_within_its_window():
    clock = _Clock()
    gate = OverloadGate(clock)
    for i in range(10_000):  # an hour of calls, never refused
        clock.now = i * 0.36
        gate.enter()
        gate.leave()
    assert len(gate._admissions) <= OverloadGate.WINDOW_S / 0.36 + 1
