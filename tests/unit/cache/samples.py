"""A sample cached answer for the cache tests."""

from __future__ import annotations

from serve_app.domain import Generation


def value(text: str = "world") -> Generation:
    return Generation(
        model="tiny",
        prompt="hello",
        completion=text,
        prompt_tokens=2,
        completion_tokens=1,
        model_source="standin:tiny",
        model_revision="rev-1",
        finish_reason="length",
        params={"max_new_tokens": 1},
    )
