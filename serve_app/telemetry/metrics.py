"""The catalog's metrics as Ray metrics (`ray.serve.metrics`), exported by Ray's metrics agent
on every node; created once per process, on first use."""

from __future__ import annotations

import functools
from typing import Any

from ray.serve import metrics as ray_metrics

from serve_app.telemetry.catalog import BY_NAME


@functools.cache
def metric(name: str) -> Any:
    spec = BY_NAME[name]
    if spec.kind == "counter":
        return ray_metrics.Counter(spec.name, spec.help, spec.labels or None)
    if spec.kind == "gauge":
        return ray_metrics.Gauge(spec.name, spec.help, spec.labels or None)
    return ray_metrics.Histogram(spec.name, spec.help, list(spec.buckets), spec.labels or None)
