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
