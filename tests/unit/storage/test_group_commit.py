"""Group commit against a real database (SQLite file; PostgreSQL when TEST_POSTGRES_URL is set):
concurrent callers share transactions, each gets exactly its own committed rows, and a bad row
fails only its own caller, storing none of that caller's rows."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from serve_app.domain import Generation
from serve_app.storage.group_commit import GroupCommitter
from serve_app.storage.store import Store
from tests.unit.storage.rows import make_row

_row = make_row


def _committer(store: Store, **kwargs) -> GroupCommitter[Generation, Generation]:
    return GroupCommitter(store.insert_many, **kwargs)


async def test_concurrent_callers_share_transactions(store: Store) -> None:
    committer = _committer(store)
    calls = [[_row(10 * c + i) for i in range(c % 3 + 1)] for c in range(64)]
    results = await asyncio.gather(*(committer.submit(rows) for rows in calls))

    for rows, stored in zip(calls, results, strict=True):
        assert [s.prompt for s in stored] == [r.prompt for r in rows]  # own rows, in order
        for s in stored:
            assert await store.get(s.id) == s  # committed before submit returned
    total = sum(len(rows) for rows in calls)
    assert await store.count() == total
    stats = committer.stats()
    assert stats["rows"] == total
    assert stats["writes"] < len(calls)  # shared, not one per call
    assert stats["largest_group"] > 1


async def test_groups_are_bounded_by_max_rows(store: Store) -> None:
    committer = _committer(store, max_rows=5)
    results = await asyncio.gather(*(committer.submit([_row(i), _row(i + 100)]) for i in range(20)))
    assert sum(len(r) for r in results) == 40 == await store.count()
    assert committer.stats()["largest_group"] <= 5
    assert committer.stats()["writes"] >= 8


async def test_per_row_mode_commits_each_row_alone(store: Store) -> None:
    committer = _committer(store, group=False)
    results = await asyncio.gather(*(committer.submit([_row(i), _row(i + 50)]) for i in range(10)))
    assert sum(len(r) for r in results) == 20 == await store.count()
    assert committer.stats()["writes"] == 20
    assert committer.stats()["largest_group"] == 1
    committer.configure(max_rows=100, group=True)  # reconfigure switches modes live
    await asyncio.gather(*(committer.submit([_row(i)]) for i in range(10)))
    assert committer.stats()["writes"] < 30


async def test_a_bad_row_fails_only_its_own_caller(store: Store) -> None:
    committer = _committer(store)
    bad = dataclasses.replace(_row(999), prompt=None)  # violates NOT NULL
    calls = [[_row(i)] for i in range(8)] + [[_row(998), bad]] + [[_row(i)] for i in range(8, 16)]
    outcomes = await asyncio.gather(
        *(committer.submit(rows) for rows in calls), return_exceptions=True
    )

    assert [i for i, out in enumerate(outcomes) if isinstance(out, Exception)] == [8]
    stored = [s for out in outcomes if not isinstance(out, Exception) for s in out]
    for s in stored:
        assert await store.get(s.id) == s
    assert await store.count() == len(stored) == 16  # not even the bad call's good row
    assert "prompt 998" not in {s.prompt for s in (await store.history(100))[0]}
    [after] = await committer.submit([_row(500)])  # the writer carries on
    assert await store.get(after.id) == after


async def test_a_caller_cancelled_before_its_group_is_not_written(store: Store) -> None:
    committer = _committer(store)
    cancelled = asyncio.create_task(committer.submit([_row(1, user_id="gone")]))
    kept = asyncio.create_task(committer.submit([_row(2, user_id="kept")]))
    await asyncio.sleep(0)  # both are queued; the writer has not run yet
    cancelled.cancel()
    [stored] = await kept
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    items, _ = await store.history(10)
    assert [s.id for s in items] == [stored.id]


async def test_empty_submit_is_a_no_op(store: Store) -> None:
    committer = _committer(store)
    assert await committer.submit([]) == []
    assert committer.stats()["writes"] == 0
    with pytest.raises(ValueError):
        GroupCommitter(store.insert_many, max_rows=0)


async def test_a_caller_side_committer_never_resends_a_failed_write(store: Store) -> None:
    """As the ingress uses it: a failed write may have committed (a lost reply), so the whole
    group fails and nothing is written twice."""
    calls: list[int] = []

    async def lossy_write(rows: list[Generation]) -> list[Generation]:
        await store.insert_many(rows)
        calls.append(len(rows))
        raise ConnectionError("reply lost after commit")

    committer: GroupCommitter[Generation, Generation] = GroupCommitter(
        lossy_write, concurrency=2, isolate_failures=False
    )
    outcomes = await asyncio.gather(
        *(committer.submit([_row(i)]) for i in range(10)), return_exceptions=True
    )
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    assert sum(calls) == 10 == await store.count()  # each row written exactly once


async def test_concurrency_allows_writes_in_flight_together(store: Store) -> None:
    in_flight = peak = 0

    async def slow_write(rows: list[Generation]) -> list[Generation]:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.01)
            return await store.insert_many(rows)
        finally:
            in_flight -= 1

    committer: GroupCommitter[Generation, Generation] = GroupCommitter(
        slow_write, max_rows=4, concurrency=2
    )
    results = await asyncio.gather(*(committer.submit([_row(i)]) for i in range(16)))
    assert peak == 2
    assert sorted(s.prompt for r in results for s in r) == sorted(f"prompt {i}" for i in range(16))
    assert await store.count() == 16
