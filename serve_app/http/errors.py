"""One place that turns exceptions into HTTP answers with a stable JSON body. Never a traceback,
never a path, never a 200 for a failure.

Two shapes, chosen by route: the service's own `{"error": {"type": ..., "message": ...}}`, and
under /v1 OpenAI's `{"error": {"message", "type", "param", "code"}}`, so that the openai client
raises its usual exceptions (`NotFoundError`, `BadRequestError`, ...). Errors after a stream has
started are sent as an SSE event with the same body (`sse_error`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.asgi import HTTPMiddleware
from serve_app.errors import ServeError

logger = logging.getLogger("ray.serve").getChild(__name__)

OPENAI_PREFIX = "/v1/"
# OpenAI's error types by status, and its codes for this service's error types.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
_OPENAI_CODES = {"unknown_model": "model_not_found", "prompt_too_long": "context_length_exceeded"}


def error_body(
    openai: bool, status: int, error_type: str, message: str, **details: Any
) -> dict[str, Any]:
    if openai:
        return {
            "error": {
                "message": message,
                "type": _OPENAI_TYPES.get(status, "server_error"),
                "param": details.get("param"),
                "code": _OPENAI_CODES.get(error_type, error_type),
            }
        }
    body: dict[str, Any] = {"type": error_type, "message": message}
    body.update({k: v for k, v in details.items() if v is not None and k != "param"})
    return {"error": body}


def error_headers(details: dict[str, Any]) -> dict[str, str]:
    """Headers an error carries in its details: `retry_after_s` (overload, rate limits) becomes
    Retry-After in whole seconds, `headers` (the rate limit's x-ratelimit-*) are sent as is."""
    headers = dict(details.get("headers") or {})
    if details.get("retry_after_s") is not None:
        headers["Retry-After"] = str(max(1, math.ceil(float(details["retry_after_s"]))))
    return headers


def error_response(
    request: Request, status: int, error_type: str, message: str, **details: Any
) -> JSONResponse:
    openai = request.url.path.startswith(OPENAI_PREFIX)
    if openai and status == 422:
        status = 400  # OpenAI answers invalid parameters with a 400
    headers = error_headers(details)
    details.pop("headers", None)
    return JSONResponse(
        status_code=status,
        content=error_body(openai, status, error_type, message, **details),
        headers=headers or None,
    )


def as_serve_error(exc: BaseException) -> ServeError | None:
    """Find the meaningful error, also when Ray wrapped a replica's exception."""
    for candidate in (exc, getattr(exc, "cause", None)):
        if isinstance(candidate, ServeError):
            return candidate
    return None


def sse_error(exc: BaseException, openai: bool) -> str:
    """An error that happened after a stream started, as its last SSE event."""
    known = as_serve_error(exc)
    if known is None:
        logger.error("stream failed: %r", exc)
        known = ServeError("internal server error")
    status, error_type = known.status_code, known.error_type
    body = error_body(openai, status, error_type, known.message, **known.details)
    return f"data: {json.dumps(body)}\n\n"


def serve_error_response(request: Request, exc: ServeError) -> JSONResponse:
    return error_response(request, exc.status_code, exc.error_type, exc.message, **exc.details)


def unexpected_error_response(request: Request, exc: Exception) -> JSONResponse:
    """An error no handler took: a wrapped ServeError keeps its meaning, anything else is a
    logged 500 that says nothing about the internals."""
    known = as_serve_error(exc)
    if known is not None:
        return serve_error_response(request, known)
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(request, 500, "internal_error", "internal server error")


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str, dict[str, Any]]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "invalid_json", "request body is not valid JSON", {}
    details = [
        {
            "loc": [str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": e.get("type"),
        }
        for e in errors
    ]
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # A field refused by a model validator names itself (protocol.UnsupportedFieldError).
    param = getattr((first.get("ctx") or {}).get("error"), "param", None) or (
        loc[0] if loc else None
    )
    where = ".".join(loc) or param or "request"
    message = f"{where}: {first.get('msg', 'invalid request')}"
    return 422, "validation_error", message, {"details": details or None, "param": param}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, error_type, message, details = _validation_message(exc)
        return error_response(request, status, error_type, message, **details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        return error_response(request, exc.status_code, error_type, str(exc.detail))

    @app.exception_handler(ServeError)
    async def _serve(request: Request, exc: ServeError) -> JSONResponse:
        return serve_error_response(request, as_serve_error(exc) or exc)

    @app.exception_handler(Exception)  # backs up the middleware below
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected_error_response(request, exc)

    app.add_middleware(ResponseTime)


class ResponseTime(HTTPMiddleware):
    """`X-Response-Time` on every answer, and the answer to an error no handler took (a JSON
    500 that shows no internals, or a 499 when the client has gone)."""

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        answering = False

        async def send_timed(message: dict) -> None:
            nonlocal answering
            if message["type"] == "http.response.start":
                answering = True
                took = f"{(time.perf_counter() - started) * 1000:.2f}ms".encode()
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-response-time", took)],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        except Exception as exc:  # Starlette re-raises unhandled errors through middleware
            if answering:  # part of the answer has gone: nothing else can be said
                raise
            request = Request(scope, receive)
            if await _client_gone(request):
                # The client went away (its timeout, a closed connection) and the request was
                # cancelled: nobody reads an answer, and no server error happened to log.
                logger.info("client disconnected: %s %s", request.method, request.url.path)
                response: Response = Response(status_code=499)
            else:
                response = unexpected_error_response(request, exc)
            await response(scope, receive, send_timed)


async def _client_gone(request: Request) -> bool:
    try:
        return await request.is_disconnected()
    except Exception:  # Ray Serve cancels the request's receive channel along with it
        return True
