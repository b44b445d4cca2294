"""The Persistence deployment's `record` (its class, without Ray) on a real database: one call
carries the rows of many requests, and a row the database refuses fails alone."""

from __future__ import annotations

import pytest

from serve_app.domain import Receipt
from serve_app.errors import RecordRefusedError
from serve_app.storage.persistence import Persistence
from tests.unit.storage.rows import make_row


@pytest.fixture
async def persistence(store_url: str):
    cls = Persistence.func_or_class
    instance = cls.__new__(cls)
    await instance.__init__(store_url)
    yield instance
    await instance.store.close()


async def _bad_rows(persistence, store_url: str) -> list:
    [taken] = await persistence.record([make_row(900)])
    bad = [make_row(901).replace(id=taken.id)]  # a primary key taken: refused everywhere
    if store_url.startswith("postgresql"):
        bad.append(make_row(902).replace(completion=" a \x00 b"))  # PostgreSQL refuses NUL
    return bad


async def test_a_refused_row_fails_alone(persistence, store_url: str) -> None:
    bad = await _bad_rows(persistence, store_url)
    rows = [make_row(i) for i in range(6)]
    call = rows[:3] + bad + rows[3:]
    outcomes = await persistence.record(call)

    assert len(outcomes) == len(call)
    refused = [i for i, o in enumerate(outcomes) if isinstance(o, RecordRefusedError)]
    assert refused == list(range(3, 3 + len(bad)))
    receipts = [o for o in outcomes if isinstance(o, Receipt)]
    assert len(receipts) == 6
    for receipt, row in zip(receipts, rows, strict=True):
        stored = await persistence.store.get(receipt.id)
        assert stored is not None and stored.prompt == row.prompt
    assert await persistence.store.count() == 6 + 1  # and the row whose id was taken
    error = outcomes[3]
    assert error.status_code == 422 and "/" not in error.message  # no paths, no SQL


async def test_the_next_call_after_a_refusal_commits(persistence, store_url: str) -> None:
    outcomes = await persistence.record(await _bad_rows(persistence, store_url))
    assert all(isinstance(o, RecordRefusedError) for o in outcomes)
    [receipt] = await persistence.record([make_row(1)])
    assert isinstance(receipt, Receipt)
    assert await persistence.store.get(receipt.id) is not None
