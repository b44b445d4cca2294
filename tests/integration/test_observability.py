"""Metrics scraped from Ray's metrics agent after real traffic, and the per-request log line
with its request id, on the session app (configs/tiny.yaml)."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import descendants

pytestmark = pytest.mark.integration


def agent_ports(root: int) -> set[int]:
    """The listening ports of this cluster's dashboard agent (Ray's metrics agent runs in it)."""
    ports: set[int] = set()
    for pid in [root, *descendants(root)]:
        try:
            proc = psutil.Process(pid)
            if "DashboardAgent" not in " ".join(proc.cmdline()) + proc.name():
                continue
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        ports |= {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}
    return ports


def scrape(root: int) -> dict[tuple[str, tuple], float]:
    """Every sample of every `ray_gpt2serve_*` series, summed over replicas."""
    samples: dict[tuple[str, tuple], float] = {}
    for port in agent_ports(root):
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=3).text
        except httpx.HTTPError:
            continue
        if "ray_" not in text:
            continue
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("ray_gpt2serve_"):
                    keep = ("model", "tier", "route", "le")
                    key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k in keep)))
                    samples[key] = samples.get(key, 0.0) + s.value
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_traffic_moves_the_exported_metrics(tiny_app, client):
    prompt = f"metrics {uuid.uuid4().hex[:8]}"
    body = {"prompts": [prompt], "max_new_tokens": 6, "model": "tiny-b"}
    assert client.post("/generate", json=body).status_code == 200  # a miss
    assert client.post("/generate", json=body).status_code == 200  # an L1 hit
    stream = {"model": "tiny-b", "prompt": prompt + " again", "max_tokens": 6, "stream": True}
    with client.stream("POST", "/v1/completions", json=stream) as r:
        assert r.status_code == 200
        r.read()

    wanted = {
        "generated tokens": lambda s: total(
            s, "ray_gpt2serve_generation_tokens_total", model="tiny-b"
        ),
        "prompt tokens": lambda s: total(s, "ray_gpt2serve_prompt_tokens_total", model="tiny-b"),
        "l1 hit": lambda s: total(s, "ray_gpt2serve_cache_hits_total", tier="l1"),
        "miss": lambda s: total(s, "ray_gpt2serve_cache_misses_total", tier="all"),
        "ttft": lambda s: total(s, "ray_gpt2serve_time_to_first_token_seconds_count"),
        "request duration": lambda s: total(
            s, "ray_gpt2serve_request_duration_seconds_count", route="/generate"
        ),
        "decode steps": lambda s: total(s, "ray_gpt2serve_batch_size_count", model="tiny-b"),
        "commits": lambda s: total(s, "ray_gpt2serve_persistence_rows_per_commit_count"),
    }  # fmt: skip
    deadline = time.monotonic() + 90  # Ray's agent exports every few seconds
    moved: dict[str, float] = {}
    while time.monotonic() < deadline:
        samples = scrape(tiny_app.pid)
        moved = {name: read(samples) for name, read in wanted.items()}
        if all(v > 0 for v in moved.values()):
            break
        time.sleep(2)
    assert all(v > 0 for v in moved.values()), moved
    assert moved["generated tokens"] >= 6


def log_line(app, request_id: str) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for text in app.log.read_text(errors="replace").splitlines():
            if f'"request_id": "{request_id}"' in text:
                return json.loads(text[text.index("{") :])
        time.sleep(0.5)
    raise AssertionError(f"no request log line for {request_id}")


def test_each_request_logs_one_json_line_with_its_echoed_id(tiny_app, client):
    rid = f"test-{uuid.uuid4().hex[:12]}"
    secret = f"do not log me {uuid.uuid4().hex[:8]}"
    r = client.post(
        "/generate",
        json={"prompts": [secret], "max_new_tokens": 3},
        headers={"X-Request-Id": rid},
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    made = client.get("/livez").headers["x-request-id"]  # one is made when none is sent
    line = log_line(tiny_app, rid)
    assert log_line(tiny_app, made)["route"] == "/livez"
    assert line["event"] == "request" and line["status"] == 200
    assert line["route"] == "/generate" and line["model"] == "tiny-a"
    assert line["completion_tokens"] >= 1 and line["duration_ms"] > 0
    assert secret not in tiny_app.log.read_text(errors="replace")  # prompts stay out of logs
