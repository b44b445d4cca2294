"""A generator replica's metrics (`telemetry.catalog`), fed by the decode loop (as the
scheduler's observer, on the decode thread: every call is cheap) and the model loader."""

from __future__ import annotations

from serve_app.telemetry.metrics import metric


class GeneratorMetrics:
    def admitted(self, model_id: str, queue_wait_s: float, prompt_tokens: int) -> None:
        tags = {"model": model_id}
        metric("gpt2serve_queue_time_seconds").observe(queue_wait_s, tags=tags)
        metric("gpt2serve_prompt_tokens").inc(prompt_tokens, tags=tags)

    def stepped(self, model_id: str, rows: int, seconds: float) -> None:
        tags = {"model": model_id}
        metric("gpt2serve_batch_size").observe(rows, tags=tags)
        metric("gpt2serve_decode_step_seconds").observe(seconds, tags=tags)

    def finished(self, model_id: str, completion_tokens: int) -> None:
        if completion_tokens:
            metric("gpt2serve_generation_tokens").inc(completion_tokens, tags={"model": model_id})

    def occupancy(self, running: int, waiting: int) -> None:
        metric("gpt2serve_num_running_sequences").set(running)
        metric("gpt2serve_num_waiting_sequences").set(waiting)

    def model_loaded(self, model_id: str, seconds: float) -> None:
        metric("gpt2serve_model_load_seconds").observe(seconds, tags={"model": model_id})
        metric("gpt2serve_models_loaded").inc(tags={"model": model_id})

    def model_evicted(self, model_id: str) -> None:
        metric("gpt2serve_models_evicted").inc(tags={"model": model_id})

    def refused(self, reason: str) -> None:
        metric("gpt2serve_requests_refused").inc(tags={"reason": reason})
