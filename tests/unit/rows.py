"""Sample records for the persistence tests."""

from __future__ import annotations

from serve_app.store import NewGeneration


def make_row(i: int, user_id: str | None = None, model: str = "gpt2") -> NewGeneration:
    return NewGeneration(
        prompt=f"prompt {i}",
        generated_text=f"text {i}",
        model_name=model,
        model_source="openai-community/gpt2",
        model_revision="607a30d",
        params={"temperature": 0.7, "max_new_tokens": 16, "i": i},
        user_id=user_id,
        cached=i % 2 == 0,
        prompt_tokens=3 + i,
        completion_tokens=16,
        latency_ms=12.5 + i,
    )
