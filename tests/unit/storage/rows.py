"""Sample records for the persistence tests."""

from __future__ import annotations

from serve_app.domain import Generation


def make_row(i: int, user_id: str | None = None, model: str = "gpt2") -> Generation:
    return Generation(
        model=model,
        prompt=f"prompt {i}",
        completion=f" text {i}",
        prompt_tokens=3 + i,
        completion_tokens=16,
        model_source="openai-community/gpt2",
        model_revision="607a30d",
        params={"temperature": 0.7, "max_new_tokens": 16, "i": i},
        user_id=user_id,
        cached=i % 2 == 0,
        latency_ms=12.5 + i,
        finish_reason=None,
    )
