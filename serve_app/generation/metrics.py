"""Ray metrics (dashboard / Prometheus) of a generator replica, fed by the decode loop and the
model loader."""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram


class GeneratorMetrics:
    """Ray metrics (dashboard / Prometheus) fed by the decode loop and the model loader."""

    def __init__(self) -> None:
        self.rows = Histogram(
            "generator_batch_rows",
            description="Rows (requests) in each decode step.",
            boundaries=[1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128],
            tag_keys=("model",),
        )
        self.queue_wait = Histogram(
            "generator_queue_wait_ms",
            description="Time from arrival at the decode loop to admission into a batch.",
            boundaries=[1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
            tag_keys=("model",),
        )
        self.step_ms = Histogram(
            "generator_step_ms",
            description="Duration of one decode step (one forward pass of the batch).",
            boundaries=[5, 10, 20, 40, 80, 160, 320, 640],
            tag_keys=("model",),
        )
        self.tokens = Counter(
            "generator_tokens_generated", description="Completion tokens.", tag_keys=("model",)
        )
        self.load_s = Histogram(
            "generator_model_load_s",
            description="Time to load a model into a replica.",
            boundaries=[0.1, 0.5, 1, 2, 5, 10, 30, 60],
            tag_keys=("model",),
        )
        self.evictions = Counter(
            "generator_model_evictions",
            description="Models evicted by the multiplexing LRU.",
            tag_keys=("model",),
        )

    def admitted(self, model_id: str, queue_wait_s: float) -> None:
        self.queue_wait.observe(queue_wait_s * 1000, tags={"model": model_id})

    def stepped(self, model_id: str, rows: int, seconds: float) -> None:
        self.rows.observe(rows, tags={"model": model_id})
        self.step_ms.observe(seconds * 1000, tags={"model": model_id})

    def finished(self, model_id: str, completion_tokens: int) -> None:
        self.tokens.inc(completion_tokens, tags={"model": model_id})

    def model_loaded(self, model_id: str, seconds: float) -> None:
        self.load_s.observe(seconds, tags={"model": model_id})

    def model_evicted(self, model_id: str) -> None:
        self.evictions.inc(tags={"model": model_id})
