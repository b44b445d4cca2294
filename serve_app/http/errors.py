"""One place that turns exceptions into HTTP answers with a stable JSON body:
`{"error": {"type": ..., "message": ...}}`. Never a traceback, never a 200 for a failure."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.errors import ServeError

logger = logging.getLogger("ray.serve").getChild(__name__)


def error_response(status: int, error_type: str, message: str, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"type": error_type, "message": message}
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(status_code=status, content={"error": body})


def as_serve_error(exc: BaseException) -> ServeError | None:
    """Find the meaningful error, also when Ray wrapped a replica's exception."""
    for candidate in (exc, getattr(exc, "cause", None)):
        if isinstance(candidate, ServeError):
            return candidate
    return None


def serve_error_response(exc: ServeError) -> JSONResponse:
    return error_response(exc.status_code, exc.error_type, exc.message, **exc.details)


def unexpected_error_response(request: Request, exc: Exception) -> JSONResponse:
    """An error no handler took: a wrapped ServeError keeps its meaning, anything else is a
    logged 500 that says nothing about the internals."""
    known = as_serve_error(exc)
    if known is not None:
        return serve_error_response(known)
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error")


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str, list]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "invalid_json", "request body is not valid JSON", []
    details = [
        {
            "loc": [str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": e.get("type"),
        }
        for e in errors
    ]
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(p for p in first["loc"] if p != "body") or "request"
    return 422, "validation_error", f"{where}: {first['msg']}", details


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, error_type, message, details = _validation_message(exc)
        return error_response(status, error_type, message, details=details or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        return error_response(exc.status_code, error_type, str(exc.detail))

    @app.exception_handler(ServeError)
    async def _serve(_: Request, exc: ServeError) -> JSONResponse:
        return serve_error_response(as_serve_error(exc) or exc)

    @app.exception_handler(Exception)  # backs up the middleware below
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected_error_response(request, exc)

    @app.middleware("http")
    async def _response_time(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:  # Starlette re-raises unhandled errors through middleware
            if await _client_gone(request):
                # The client went away (its timeout, a closed connection) and the request was
                # cancelled: nobody reads an answer, and no server error happened to log.
                logger.info("client disconnected: %s %s", request.method, request.url.path)
                return Response(status_code=499)
            response = unexpected_error_response(request, exc)
        response.headers["X-Response-Time"] = f"{(time.perf_counter() - started) * 1000:.2f}ms"
        return response


async def _client_gone(request: Request) -> bool:
    try:
        return await request.is_disconnected()
    except Exception:  # Ray Serve cancels the request's receive channel along with it
        return True
