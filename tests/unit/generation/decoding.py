"""Driving a `DecodeBatch` to completion in the test's own thread: the reference that batched,
joined and scheduled rows are compared with."""

from __future__ import annotations

from collections.abc import Sequence

from serve_app.domain import Generation, GenerationRequest
from serve_app.errors import ServeError
from serve_app.generation.engine import BatchDecoder, DecodeBatch


def prefill(decoder: BatchDecoder, rows: list) -> DecodeBatch:
    batch = DecodeBatch(decoder)
    batch.admit(rows)
    return batch


def run(decoder: BatchDecoder, rows: list) -> list[int]:
    """Decode `rows` together until all are done; returns the rows in the batch at each step."""
    batch = prefill(decoder, rows)
    sizes = []
    while batch.rows:
        sizes.append(len(batch))
        batch.step()
    return sizes


def generate(
    decoder: BatchDecoder, requests: Sequence[GenerationRequest]
) -> list[Generation | ServeError]:
    """Complete `requests` together; a request that cannot run gets its own error."""
    rows, errors = decoder.prepare(requests)
    if rows:
        run(decoder, rows)
    results: list[Generation | ServeError] = [errors.get(i) for i in range(len(requests))]
    for row in rows:
        results[row.index] = decoder.result(requests[row.index], row)
    return results


def lone(decoder: BatchDecoder, request: GenerationRequest) -> Generation:
    (result,) = generate(decoder, [request])
    assert isinstance(result, Generation), result
    return result
