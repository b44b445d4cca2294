"""The OpenAI routes' logic: requests mapped onto the service, answers and SSE chunks built
from the records it returns. No Ray import; the routes in `http.ingress` only call these.

Every choice is a `GenerationRequest` of its own and becomes a stored record. The response id
is the first choice's record id with OpenAI's prefix (`cmpl-`, `chatcmpl-`), so
GET /history/{id} opens it. Streams are prepared up to their first event before the response
starts, so an error that can be known early (unknown model, prompt too long) is a plain HTTP
error; a later one is sent as a last SSE event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from serve_app.domain import Generation, GenerationRequest, TextDelta, merge_deltas, new_id
from serve_app.errors import InvalidRequestError
from serve_app.http.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionList,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelListResponse,
    Usage,
    check_metadata,
)
from serve_app.http.serving import GenerationService
from serve_app.http.streaming import sse, sse_response

Event = tuple[int, TextDelta | Generation]  # (choice index, what it produced)
ID_PREFIXES = ("chatcmpl-", "cmpl-")


def _chat_response(
    response_id: str,
    created: int,
    model: str,
    records: list[Generation],
    metadata: dict[str, str] | None,
) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=response_id,
        created=created,
        model=model,
        choices=[
            ChatChoice(
                index=i,
                message=AssistantMessage(content=g.completion),
                finish_reason=g.finish_reason,
            )
            for i, g in enumerate(records)
        ],
        usage=Usage.of(records),
        metadata=metadata,
    )


def _chunk(
    response_id: str, kind: str, created: int, model: str, choice: dict[str, Any]
) -> dict[str, Any]:
    """One SSE chunk, built as a plain dict (it is built for every message of every stream)."""
    return {"id": response_id, "object": kind, "created": created, "model": model,
            "choices": [choice]}  # fmt: skip


def metadata_filter(request: Request) -> dict[str, str] | None:
    """`metadata[key]=value` query parameters (as the openai client sends a metadata filter)."""
    pairs = {
        name[len("metadata[") : -1]: value
        for name, value in request.query_params.multi_items()
        if name.startswith("metadata[") and name.endswith("]")
    }
    if not pairs:
        return None
    try:
        check_metadata(pairs)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="metadata") from None
    return pairs


def record_id(response_id: str) -> str:
    """The history id behind an OpenAI response id (or a plain record id, unchanged)."""
    for prefix in ID_PREFIXES:
        if response_id.startswith(prefix):
            return response_id[len(prefix) :]
    return response_id


class OpenAIServing:
    def __init__(self, service: GenerationService) -> None:
        self.service = service
        self.created = int(time.time())

    # -- models ------------------------------------------------------------------------------
    def models(self) -> ModelListResponse:
        ids = self.service.args.model_ids
        return ModelListResponse(data=[ModelCard(id=i, created=self.created) for i in ids])

    def model(self, model_id: str) -> ModelCard:
        return ModelCard(id=self.service.catalog.spec(model_id).id, created=self.created)

    # -- completions -------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest) -> CompletionResponse | StreamingResponse:
        rid = new_id()
        response_id, requests = f"cmpl-{rid}", body.to_requests()
        if body.stream:

            def chunk(i: int, item: TextDelta | Generation, created: int) -> dict[str, Any]:
                choice: dict[str, Any] = {"index": i, "text": ""}
                if isinstance(item, TextDelta):
                    choice["text"] = item.text
                else:
                    choice["finish_reason"] = item.finish_reason
                return _chunk(response_id, "text_completion", created, body.model, choice)

            usage_chunk = {"id": response_id, "object": "text_completion", "choices": []}
            return await self._sse(requests, rid, body.context(), chunk, usage_chunk, body)
        records = await self.service.generate(requests, rid, body.context())
        return CompletionResponse(
            id=response_id,
            model=body.model,
            choices=[
                CompletionChoice(index=i, text=g.completion, finish_reason=g.finish_reason)
                for i, g in enumerate(records)
            ],
            usage=Usage.of(records),
            metadata=body.metadata,
        )

    # -- chat --------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest) -> ChatCompletionResponse | StreamingResponse:
        spec = self.service.catalog.spec(body.model)
        messages = body.message_dicts()
        template = spec.chat_template
        requests = body.to_requests(template.render(messages), list(template.stop))
        rid = new_id()
        response_id = f"chatcmpl-{rid}"
        if body.stream:
            started: set[int] = set()

            def chunk(i: int, item: TextDelta | Generation, created: int) -> dict[str, Any]:
                delta: dict[str, str] = {}
                if i not in started:  # a choice's first chunk names the role
                    started.add(i)
                    delta["role"] = "assistant"
                choice: dict[str, Any] = {"index": i, "delta": delta}
                if isinstance(item, TextDelta):
                    delta["content"] = item.text
                else:
                    choice["finish_reason"] = item.finish_reason
                return _chunk(response_id, "chat.completion.chunk", created, body.model, choice)

            usage_chunk = {"id": response_id, "object": "chat.completion.chunk", "choices": []}
            context = body.context(messages=messages)
            return await self._sse(requests, rid, context, chunk, usage_chunk, body)
        records = await self.service.generate(requests, rid, body.context(messages=messages))
        return _chat_response(response_id, int(time.time()), body.model, records, body.metadata)

    def stored_chat(self, record: Generation) -> ChatCompletionResponse:
        """A stored chat completion, as OpenAI's stored-completions API shows one."""
        created = int(record.created_at.timestamp())
        return _chat_response(
            f"chatcmpl-{record.id}", created, record.model, [record], record.metadata
        )

    def stored_chats(self, records: list[Generation], has_more: bool) -> ChatCompletionList:
        data = [self.stored_chat(r) for r in records]
        return ChatCompletionList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=has_more,
        )

    # -- streaming ---------------------------------------------------------------------------
    async def _sse(
        self,
        requests: list[GenerationRequest],
        rid: str,
        context: dict[str, Any],
        chunk: Callable[[int, TextDelta | Generation, int], dict[str, Any]],
        usage_chunk: dict[str, Any],
        body: CompletionRequest | ChatCompletionRequest,
    ) -> StreamingResponse:
        created = int(time.time())
        finals: list[Generation] = []

        def render(batch: list[Event]) -> str:
            finals.extend(item for _, item in batch if isinstance(item, Generation))
            return "".join(sse(chunk(index, item, created)) for index, item in batch)

        def usage() -> str:
            if not body.include_usage:
                return ""
            return sse({**usage_chunk, "created": created, "usage": Usage.of(finals).model_dump()})

        events = self.merged(requests, rid, context)
        return await sse_response(events, render, openai=True, tail=usage)

    async def merged(
        self, requests: list[GenerationRequest], rid: str, context: dict[str, Any]
    ) -> AsyncIterator[list[Event]]:
        """Every choice's stream, interleaved as they produce, in batches of what is ready
        (a choice's queued deltas merged into one); the first choice's record takes the
        response's id. Closing this stops every choice (the client went away)."""
        queue: asyncio.Queue[tuple[int, TextDelta | Generation | BaseException]] = asyncio.Queue()

        async def pump(i: int, request: GenerationRequest) -> None:
            try:
                name = rid if i == 0 else None
                async for item in self.service.stream(request, name, context):
                    queue.put_nowait((i, item))
            except Exception as exc:
                queue.put_nowait((i, exc))

        tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
        try:
            done = 0
            while done < len(tasks):
                ready = [await queue.get()]
                while not queue.empty():
                    ready.append(queue.get_nowait())
                for _, item in ready:
                    if isinstance(item, BaseException):
                        raise item
                    done += isinstance(item, Generation)
                yield merge_deltas(ready)
        finally:
            for task in tasks:
                task.cancel()
            # Held until they have wound down (each records what its choice produced).
            self.service.keep(asyncio.gather(*tasks, return_exceptions=True))
