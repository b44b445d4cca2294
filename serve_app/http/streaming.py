"""Server-sent events for `POST /generate` with `"stream": true`: `{"text": ...}` events as the
text is decoded, then `{"record": ...}` (the stored record, as the plain answer holds it),
then `[DONE]`. An error after the stream started is its last event."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from serve_app.domain import Generation, GenerationRequest, TextDelta
from serve_app.http.errors import sse_error
from serve_app.http.schemas import GenerationRecord
from serve_app.http.serving import GenerationService


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def sse_response(
    events: AsyncIterator[Any],
    render: Callable[[Any], str],
    openai: bool,
    tail: Callable[[], str] = str,
) -> StreamingResponse:
    """Server-sent events: `render(item)` for each of `events`, then `tail()`, then `[DONE]`.
    The first event is awaited before the response starts, so errors up to it are plain HTTP
    errors; a later one is the stream's last event. Closing the response (the client went
    away) closes `events`."""
    first = await anext(events)

    async def frames() -> AsyncIterator[str]:
        try:
            item = first
            while item is not None:
                yield render(item)
                item = await anext(events, None)
            yield tail()
            yield "data: [DONE]\n\n"
        except Exception as exc:
            yield sse_error(exc, openai)
        finally:
            await events.aclose()

    return StreamingResponse(frames(), media_type="text/event-stream")


async def stream_generation(
    service: GenerationService, request: GenerationRequest
) -> StreamingResponse:
    def render(item: TextDelta | Generation) -> str:
        if isinstance(item, Generation):
            record = GenerationRecord.from_generation(item)
            return sse({"record": record.model_dump(mode="json")})
        return sse({"text": item.text}) if item.text else ""

    return await sse_response(service.stream(request), render, openai=False)
