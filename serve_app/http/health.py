"""What GET /healthz answers, from what each dependency reported: pure, so it is unit-tested."""

from __future__ import annotations

from typing import Any

REQUIRED = ("generator", "database")  # without them no request can be answered
_FINE = ("ok", "disabled")


def readiness(parts: dict[str, dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): 503 naming what is down when a required part is; else 200, with
    "degraded" when an optional part (Redis: the cache) is down."""
    down = [name for name, part in parts.items() if part.get("status") not in _FINE]
    if any(name in REQUIRED for name in down):
        return 503, {"status": "unavailable", "down": down, **parts}
    if down:
        return 200, {"status": "degraded", "down": down, **parts}
    return 200, {"status": "ok", **parts}
