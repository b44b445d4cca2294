"""The base of the Ingress's middlewares: pure ASGI, not Starlette's BaseHTTPMiddleware, which
runs the rest of the app in a task of its own behind memory streams (a cost every request pays,
a 503 refusal included, and with two of them nested, "No response returned" 500s under load)."""

from __future__ import annotations

from typing import Any


class HTTPMiddleware:
    """Sees HTTP requests (`http`); other scopes (lifespan) pass straight through. Subclasses
    live at module level: Ray pickles the FastAPI app with its middleware."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        raise NotImplementedError
