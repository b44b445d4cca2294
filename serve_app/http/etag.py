"""Conditional GETs for history: a strong `ETag` over the exact body, `If-None-Match` -> 304.

History pages change only when rows arrive on them or feedback is given, so a client polling a
page gets a bodyless 304 while nothing it would see has changed. Pure logic plus one Starlette
response; no Ray import.
"""

from __future__ import annotations

import hashlib

from pydantic import BaseModel
from starlette.responses import Response

__all__ = ["conditional_json", "etag_matches", "strong_etag"]

# A cache may keep a page but must revalidate it on every use: that costs a 304, never a stale page.
_CACHE_CONTROL = "private, no-cache"


def strong_etag(body: bytes) -> str:
    """A quoted strong entity tag: byte-identical bodies, and only those, share it."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 `If-None-Match`: `*`, or a comma-separated list compared weakly (W/ ignored)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    opaque = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == opaque for tag in if_none_match.split(","))


def conditional_json(model: BaseModel, if_none_match: str | None) -> Response:
    """200 with the JSON body and its ETag, or 304 with only the ETag if the client has it."""
    body = model.model_dump_json().encode()
    etag = strong_etag(body)
    headers = {"ETag": etag, "Cache-Control": _CACHE_CONTROL}
    if etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(content=body, media_type="application/json", headers=headers)
