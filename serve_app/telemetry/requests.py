"""One JSON log line per HTTP request, under the request id that Ray Serve echoes in the
response's X-Request-Id (the client's own, when it sends one), and the request metrics that
need the route (`gpt2serve_request_duration_seconds`, time to first token).

The middleware puts a `RequestInfo` in a context variable; the request's own code (the
generation service) fills in what it learns (model, tokens, cache outcome, time to first
token). Prompt text is logged only with `log_prompts` set.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import FastAPI, Request

from serve_app.asgi import HTTPMiddleware
from serve_app.domain import Generation
from serve_app.telemetry.metrics import metric

logger = logging.getLogger("ray.serve").getChild(__name__)

_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_GENERATION_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")


@dataclass
class RequestInfo:
    request_id: str
    route: str
    model: str | None = None
    prompts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: int = 0  # prompts answered from cache
    ttft_ms: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    prompt_text: list[str] | None = None  # only with log_prompts
    key: str | None = None  # the API key's name (never the key)

    def answered(self, records: list[Generation], log_prompts: bool) -> None:
        """Note what was answered (called by the generation service)."""
        for g in records:
            self.model = g.model
            self.prompts += 1
            self.prompt_tokens += g.prompt_tokens
            self.completion_tokens += g.completion_tokens
            self.cached += g.cached
            if g.finish_reason:
                self.finish_reasons.append(g.finish_reason)
            if g.ttft_ms is not None and self.ttft_ms is None:
                self.ttft_ms = g.ttft_ms
            if log_prompts:
                self.prompt_text = [*(self.prompt_text or []), g.prompt]


current: ContextVar[RequestInfo | None] = ContextVar("request_info", default=None)


class RequestTelemetry:
    """What the generation service reports about the request it serves (`serving.Telemetry`)."""

    def __init__(self, log_prompts: bool = False) -> None:
        self.log_prompts = log_prompts

    def answered(self, records: list[Generation]) -> None:
        info = current.get()
        if info is not None:
            info.answered(records, self.log_prompts)

    def first_token(self, model: str, seconds: float) -> None:
        info = current.get()
        route = info.route if info else "unknown"
        metric("gpt2serve_time_to_first_token_seconds").observe(
            seconds, tags={"route": route, "model": model}
        )

    def token_gap(self, model: str, seconds_per_token: float) -> None:
        metric("gpt2serve_inter_token_latency_seconds").observe(
            seconds_per_token, tags={"model": model}
        )


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id")
    if given and _VALID_ID.match(given):
        return given
    try:  # Ray Serve's own id of this request (its access log shows it too)
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except Exception:
        rid = ""
    return rid if rid and _VALID_ID.match(rid) else uuid.uuid4().hex


def _route(request: Request) -> str:
    """The route's template (`/history/{generation_id}`): bounded, unlike the path."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def install_request_log(app: FastAPI) -> None:
    """Add the middleware (install it after the error handlers: it must see their answers)."""
    app.add_middleware(RequestLog)


class RequestLog(HTTPMiddleware):
    """The request's log line and duration metric. No X-Request-Id header is added: Ray
    Serve's proxy echoes the same id on every response."""

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        request = Request(scope)
        info = RequestInfo(_request_id(request), request.url.path)
        status = 500
        finished = False

        async def send_and_log(message: dict) -> None:
            # The line is written once the body (or stream) has gone.
            nonlocal status, finished
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True
                _finish(request, info, status, started)

        token = current.set(info)
        try:
            await self.app(scope, receive, send_and_log)
        finally:
            current.reset(token)
            if not finished:  # an exception, or a client gone mid-stream
                _finish(request, info, status, started)


def _finish(request: Request, info: RequestInfo, status: int, started: float) -> None:
    seconds = time.perf_counter() - started
    info.route = _route(request)
    if info.route in _GENERATION_ROUTES and info.model is not None:
        metric("gpt2serve_request_duration_seconds").observe(
            seconds, tags={"route": info.route, "model": info.model}
        )
    line = {
        "event": "request",
        "request_id": info.request_id,
        "method": request.method,
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
        **{k: v for k, v in asdict(info).items() if v not in (None, [], 0) and k != "request_id"},
    }
    logger.info(json.dumps(line, ensure_ascii=False))
