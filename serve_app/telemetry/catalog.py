"""Every metric the service exports, in one table: name, kind, labels, buckets, help.

Plain data with no Ray import, so the Grafana dashboard's unit test can check each of its
queries against it. Names follow Prometheus: units in the name, and Ray's exporter adds the
`ray_` prefix and, for counters, the `_total` suffix (`gpt2serve_generation_tokens` is
scraped as `ray_gpt2serve_generation_tokens_total`). Labels are bounded: model, route,
tier; never a prompt, a key or a user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]
PREFIX = "ray_"  # added by Ray's metrics agent

_LATENCY_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SHORT_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def exported(self) -> set[str]:
        """The series names a scrape shows for it."""
        base = PREFIX + self.name
        if self.kind == "counter":
            return {base + "_total"}
        if self.kind == "histogram":
            return {base + "_bucket", base + "_sum", base + "_count"}
        return {base}


METRICS: tuple[MetricSpec, ...] = (
    # -- ingress: what a client sees -------------------------------------------------------
    MetricSpec("gpt2serve_request_duration_seconds", "histogram",
               "Time to answer a generation request, end to end at the ingress.",
               ("route", "model"), _LATENCY_S),
    MetricSpec("gpt2serve_time_to_first_token_seconds", "histogram",
               "Time from a streamed request to its first text.", ("route", "model"), _LATENCY_S),
    MetricSpec("gpt2serve_inter_token_latency_seconds", "histogram",
               "Time per token between a stream's messages.", ("model",), _SHORT_S),
    # -- generator: the decode loop ----------------------------------------------------------
    MetricSpec("gpt2serve_queue_time_seconds", "histogram",
               "Time from arrival at the decode loop to admission into a batch.", ("model",),
               _LATENCY_S),
    MetricSpec("gpt2serve_batch_size", "histogram", "Rows (sequences) in each decode step.",
               ("model",), _ROWS),
    MetricSpec("gpt2serve_decode_step_seconds", "histogram",
               "Duration of one decode step (one forward pass of the batch).", ("model",),
               _SHORT_S),
    MetricSpec("gpt2serve_num_running_sequences", "gauge",
               "Sequences decoding in this generator replica."),
    MetricSpec("gpt2serve_num_waiting_sequences", "gauge",
               "Sequences waiting for a place in a batch in this generator replica."),
    MetricSpec("gpt2serve_prompt_tokens", "counter", "Prompt tokens prefilled.", ("model",)),
    MetricSpec("gpt2serve_generation_tokens", "counter", "Tokens generated.", ("model",)),
    MetricSpec("gpt2serve_model_load_seconds", "histogram", "Time to load a model.",
               ("model",), (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120)),
    MetricSpec("gpt2serve_models_loaded", "counter", "Models loaded into a replica.",
               ("model",)),
    MetricSpec("gpt2serve_models_evicted", "counter",
               "Models evicted by the multiplexing LRU.", ("model",)),
    # -- response cache ----------------------------------------------------------------------
    MetricSpec("gpt2serve_cache_hits", "counter", "Prompts answered from cache.", ("tier",)),
    MetricSpec("gpt2serve_cache_misses", "counter", "Cache lookups that missed.", ("tier",)),
    MetricSpec("gpt2serve_cache_coalesced", "counter",
               "Prompts that waited for an identical one's generation.", ("tier",)),
    MetricSpec("gpt2serve_cache_redis_errors", "counter", "Failed Redis calls.", ("tier",)),
    MetricSpec("gpt2serve_cache_breaker_state", "gauge",
               "Redis circuit breaker: 0 closed, 1 half-open, 2 open."),
    MetricSpec("gpt2serve_cache_l1_entries", "gauge", "Entries in this replica's L1."),
    MetricSpec("gpt2serve_cache_l1_bytes", "gauge", "Estimated bytes in this replica's L1."),
    # -- persistence -------------------------------------------------------------------------
    MetricSpec("gpt2serve_persistence_commit_seconds", "histogram",
               "Time to commit one group of records.", (), _SHORT_S),
    MetricSpec("gpt2serve_persistence_rows_per_commit", "histogram",
               "Records in each committed group.", (), _ROWS),
    MetricSpec("gpt2serve_persistence_write_errors", "counter",
               "Group writes the database refused or failed."),
    MetricSpec("gpt2serve_requests_refused", "counter",
               "Requests refused at the door: overload (queue full), auth, rate limits.",
               ("reason",)),
    MetricSpec("gpt2serve_rate_limit_fail_open", "counter",
               "Requests let through unmetered because the rate limiter's Redis failed."),
)  # fmt: skip

BY_NAME = {m.name: m for m in METRICS}
