"""Server-sent events for `POST /generate` with `"stream": true`: `{"text": ...}` events as the
text is decoded, then `{"record": ...}` (the stored record, as the plain answer holds it),
then `[DONE]`. An error after the stream started is its last event."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from serve_app.domain import Generation, GenerationRequest
from serve_app.http.errors import sse_error
from serve_app.http.schemas import GenerationRecord
from serve_app.http.serving import GenerationService


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def stream_generation(
    service: GenerationService, request: GenerationRequest
) -> StreamingResponse:
    events = service.stream(request)
    first = await anext(events)  # errors up to here are plain HTTP errors

    async def frames() -> AsyncIterator[str]:
        try:
            item = first
            while item is not None:
                if isinstance(item, Generation):
                    record = GenerationRecord.from_generation(item)
                    yield sse({"record": record.model_dump(mode="json")})
                elif item.text:
                    yield sse({"text": item.text})
                item = await anext(events, None)
            yield "data: [DONE]\n\n"
        except Exception as exc:
            yield sse_error(exc, openai=False)
        finally:
            await events.aclose()

    return StreamingResponse(frames(), media_type="text/event-stream")
