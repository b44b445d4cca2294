"""A realistic traffic mix against a running app (never collected by pytest).

    make load HOST=http://127.0.0.1:8000 USERS=16 TIME=60s
    # or: .venv/bin/locust -f loadtests/locustfile.py --headless -u 16 -r 16 -t 60s \
    #         --host http://127.0.0.1:8000

Mix per user: mostly new prompts (cache misses that reach the model), some repeats of popular
prompts (cache hits after the first), a few history reads. Environment knobs: MODELS (comma
list, default: the app's default model), MAX_NEW_TOKENS (default 32).
"""

from __future__ import annotations

import os
import random
import uuid

from locust import HttpUser, between, task

POPULAR = [
    "Once upon a time",
    "The weather today is",
    "In a shocking finding, scientists discovered",
    "The best way to learn programming is",
    "My favourite recipe starts with",
]
WORDS = "river stone garden engine market silver quiet window morning story lantern".split()
MODELS = [m for m in os.environ.get("MODELS", "").split(",") if m]
MAX_NEW_TOKENS = int(os.environ.get("MAX_NEW_TOKENS", "32"))


def fresh_prompt() -> str:
    return " ".join(random.choices(WORDS, k=6)) + f" {uuid.uuid4().hex[:6]}"


class GenerationUser(HttpUser):
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.user_id = f"locust-{uuid.uuid4().hex[:8]}"

    def _generate(self, prompts: list[str], name: str) -> None:
        body: dict = {"prompts": prompts, "max_new_tokens": MAX_NEW_TOKENS, "user_id": self.user_id}
        if MODELS:
            body["model"] = random.choice(MODELS)
        with self.client.post("/generate", json=body, name=name, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif len(r.json()) != len(prompts):
                r.failure("wrong number of records")

    @task(14)
    def unique_prompt(self) -> None:
        self._generate([fresh_prompt()], "/generate [unique]")

    @task(2)
    def several_prompts(self) -> None:
        self._generate([fresh_prompt() for _ in range(3)], "/generate [3 unique]")

    @task(4)
    def popular_prompt(self) -> None:
        self._generate([random.choice(POPULAR)], "/generate [repeat]")

    @task(2)
    def history(self) -> None:
        self.client.get("/history", params={"user_id": self.user_id, "limit": 20}, name="/history")
