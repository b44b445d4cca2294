"""The cap on request bodies, so a client cannot make the ingress read or parse 20 MB to be
told its prompt is too long: a body over the cap, declared in Content-Length or found while it
arrives, is a 413 in the usual JSON shape before anything parses it.

(FastAPI's own `max_body_size` answers a declared oversize in plain text, and a handler cannot
change that, so this middleware does the whole job.)
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from serve_app.asgi import HTTPMiddleware
from serve_app.http.errors import OPENAI_PREFIX, error_body

DEFAULT_MAX_BODY_BYTES = 1 << 20


def limit_body(app: FastAPI, max_body_bytes: int) -> None:
    """Set the cap (the Ingress replica's constructor does, from its settings)."""
    app.state.max_body_bytes = max_body_bytes


class BodyLimit(HTTPMiddleware):
    """Reads the body up to the cap, then hands it on whole."""

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        cap = getattr(scope["app"].state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > cap:
            await _too_large(scope, receive, send, cap)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > cap:
                await _too_large(scope, receive, send, cap)
                return
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> dict:
            # The body once, then the real channel (a stream watches it for a disconnect).
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


async def _too_large(scope: dict, receive: Any, send: Any, cap: int) -> None:
    openai = scope["path"].startswith(OPENAI_PREFIX)
    message = f"the request body is larger than {cap} bytes"
    body = error_body(openai, 413, "payload_too_large", message)
    await JSONResponse(body, status_code=413)(scope, receive, send)
