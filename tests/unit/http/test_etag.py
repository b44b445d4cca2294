"""Conditional GETs: the ETag follows the body byte for byte; If-None-Match gives a bare 304."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from serve_app.http.etag import conditional_json, etag_matches, strong_etag


class Page(BaseModel):
    ids: list[str]
    rating: int | None = None


def test_etag_is_strong_and_follows_the_body() -> None:
    tag = strong_etag(b'{"ids":["a"]}')
    assert tag.startswith('"') and tag.endswith('"') and not tag.startswith("W/")
    assert tag == strong_etag(b'{"ids":["a"]}')
    assert tag != strong_etag(b'{"ids":["b"]}')


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        (None, False),
        ("", False),
        ('"abc"', True),
        ('W/"abc"', True),  # If-None-Match compares weakly
        ('"x", "abc"', True),
        ('"x","y"', False),
        ("*", True),
        ("abc", False),  # unquoted is not the same tag
    ],
)
def test_if_none_match(header: str | None, matches: bool) -> None:
    assert etag_matches(header, '"abc"') is matches


def test_conditional_json_200_then_304_then_200_after_a_change() -> None:
    page = Page(ids=["a", "b"])
    first = conditional_json(page, None)
    assert first.status_code == 200
    assert first.body == page.model_dump_json().encode()
    etag = first.headers["etag"]
    again = conditional_json(page, etag)
    assert again.status_code == 304 and again.body == b""
    assert again.headers["etag"] == etag
    changed = conditional_json(Page(ids=["a", "b"], rating=5), etag)  # feedback changes the page
    assert changed.status_code == 200 and changed.headers["etag"] != etag
