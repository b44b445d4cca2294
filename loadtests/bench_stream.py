"""Streaming benchmark: time to first token and inter-token latency of /v1/completions streams,
against raw prefill + one decode step and against the same route unstreamed, in one run.

    make bench-stream          # or: python loadtests/bench_stream.py [--duration 12]

1. Raw: the gpt2-124M stand-in (float32) in this process; `generate()` of 2 new tokens for one
   prompt is a prefill and one decode step, which is what a stream's first text waits for.
2. The service from configs/bench.yaml (cache off, unique prompts): closed-loop users at 1 and
   32 (greedy, 32 new tokens), unstreamed and streamed windows alternating: one pair at 1 user,
   `--pairs` at 32, whose throughput ratio is the median of the pairs' ratios.

Targets: TTFT p50 at 1 stream <= 1.3 x raw (prefill + one step); streamed tok/s at 32 streams
>= 0.95 x unstreamed tok/s at 32 users. Prints a table, writes bench-results/stream.json, and
exits non-zero when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtests"))

from bench_batching import RawModel, log, make_prompt, pct  # noqa: E402
from report import finish  # noqa: E402

from tests.conftest import start_app, stop_app  # noqa: E402

NEW_TOKENS = 32
LEVELS = (1, 32)
TTFT_TARGET = 1.3
STREAM_TARGET = 0.95


def raw_first_token_s(model: RawModel, reps: int = 7) -> float:
    """Median time of a prefill and one decode step for one prompt (generate 2 tokens)."""
    return statistics.median(model.run(1, 2) for _ in range(reps))


async def closed_loop(base_url: str, users: int, stream: bool, warmup_s: float, span_s: float):
    """`users` clients send one /v1/completions request at a time, measured in the window."""
    rng = random.Random(users * 2 + stream)
    done: list[dict] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=users + 4, max_keepalive_connections=users + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        window = (start + warmup_s, start + warmup_s + span_s)

        async def one() -> None:
            body = {
                "model": "gpt2",
                "prompt": make_prompt(rng),
                "max_tokens": NEW_TOKENS,
                "temperature": 0,
                "stream": stream,
                "stream_options": {"include_usage": True} if stream else None,
            }
            body = {k: v for k, v in body.items() if v is not None}
            sent = time.perf_counter()
            arrivals: list[float] = []
            tokens = 0
            if not stream:
                r = await client.post("/v1/completions", json=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:100]}")
                    return
                tokens = r.json()["usage"]["completion_tokens"]
            else:
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(str(r.status_code))
                        return
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        elif chunk["choices"] and chunk["choices"][0].get("text"):
                            arrivals.append(time.perf_counter())
            done.append({"sent": sent, "finished": time.perf_counter(), "tokens": tokens,
                         "arrivals": arrivals})  # fmt: skip

        async def user() -> None:
            while time.perf_counter() < window[1]:
                await one()

        await asyncio.gather(*(user() for _ in range(users)))
    tokens = 0.0
    for d in done:  # pro-rated by the share of each request's lifetime inside the window
        life = d["finished"] - d["sent"]
        overlap = min(d["finished"], window[1]) - max(d["sent"], window[0])
        if overlap > 0:
            tokens += d["tokens"] * overlap / life
    inside = [d for d in done if window[0] <= d["sent"] and d["finished"] <= window[1]]
    ttft = [d["arrivals"][0] - d["sent"] for d in inside if d["arrivals"]]
    itl = [b - a for d in inside for a, b in itertools.pairwise(d["arrivals"])]
    return {
        "users": users,
        "stream": stream,
        "requests": len(inside),
        "errors": len(errors),
        "tok_s": tokens / span_s,
        "latency_p50_s": pct([d["finished"] - d["sent"] for d in inside], 0.5),
        "ttft_p50_s": pct(ttft, 0.5) if ttft else None,
        "ttft_p99_s": pct(ttft, 0.99) if ttft else None,
        "itl_p50_s": pct(itl, 0.5) if itl else None,
        "itl_p99_s": pct(itl, 0.99) if itl else None,
    }


async def run_service(
    workdir: Path, duration_s: float, raw_s: dict[int, float], pairs: int
) -> list[dict]:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    proc, app = start_app(ROOT / "configs" / "bench.yaml", workdir, None)
    results = []
    try:
        async with httpx.AsyncClient(base_url=app.base_url, timeout=600) as client:
            body = {"model": "gpt2", "prompt": "warm up", "max_tokens": 4}
            (await client.post("/v1/completions", json=body)).raise_for_status()
        for users in LEVELS:
            warmup = min(raw_s[users], 8.0) + 2.0
            for stream in (False, True) * (pairs if users == 32 else 1):
                r = await closed_loop(app.base_url, users, stream, warmup, duration_s)
                results.append(r)
                ttft = "" if r["ttft_p50_s"] is None else (
                    f", TTFT p50 {r['ttft_p50_s'] * 1000:.0f} ms p99 "
                    f"{r['ttft_p99_s'] * 1000:.0f} ms, ITL p50 {r['itl_p50_s'] * 1000:.1f} ms "
                    f"p99 {r['itl_p99_s'] * 1000:.1f} ms"
                )  # fmt: skip
                log(
                    f"  {'streamed' if stream else 'plain   '} {users:>2} users: "
                    f"{r['tok_s']:6.1f} tok/s, p50 {r['latency_p50_s']:.2f} s ({r['requests']} "
                    f"req, {r['errors']} errors){ttft}"
                )
    finally:
        stop_app(proc)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds/window")
    parser.add_argument("--pairs", type=int, default=5, help="plain/streamed pairs at 32 users")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "stream.json")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-results" / "stream-app")
    ns = parser.parse_args()
    ns.workdir.mkdir(parents=True, exist_ok=True)
    threads = os.cpu_count() or 2

    log("1. raw generate(), gpt2-124M stand-in, float32")
    raw = RawModel(NEW_TOKENS, threads, "onednn")
    first_s = raw_first_token_s(raw)
    raw_s = {n: raw.measure_one(n, 2)["latency_s"] for n in LEVELS}
    log(f"  prefill + one decode step, 1 prompt: {first_s * 1000:.1f} ms")
    del raw
    log("2. service (configs/bench.yaml), /v1/completions")
    results = asyncio.run(run_service(ns.workdir, ns.duration, raw_s, ns.pairs))
    at32 = [r for r in results if r["users"] == 32]
    pair_ratios = [s["tok_s"] / p["tok_s"] for p, s in zip(at32[::2], at32[1::2], strict=True)]
    one = {r["stream"]: r for r in results if r["users"] == 1}

    ttft_ratio = one[True]["ttft_p50_s"] / first_s
    tok_ratio = statistics.median(pair_ratios)
    checks = [
        ("TTFT p50 at 1 stream / raw prefill + one step", ttft_ratio, f"<= {TTFT_TARGET}",
         ttft_ratio <= TTFT_TARGET),
        ("streamed / unstreamed tok/s at 32 users (median pair)", tok_ratio,
         f">= {STREAM_TARGET}",
         tok_ratio >= STREAM_TARGET),
    ]  # fmt: skip
    print()
    print("mode     users   tok/s  p50 s  TTFT p50  TTFT p99  ITL p50  ITL p99")
    for r in results:

        def ms(v: float | None) -> str:
            return "      -" if v is None else f"{v * 1000:6.0f}ms"

        print(
            f"{'stream' if r['stream'] else 'plain':8} {r['users']:>5} {r['tok_s']:7.1f} "
            f"{r['latency_p50_s']:6.2f} {ms(r['ttft_p50_s'])}  {ms(r['ttft_p99_s'])}  "
            f"{ms(r['itl_p50_s'])} {ms(r['itl_p99_s'])}"
        )
    print(f"\nraw prefill + one decode step: {first_s * 1000:.1f} ms")
    print(f"32 users, streamed / unstreamed tok/s by pair: {[round(r, 3) for r in pair_ratios]}\n")
    return finish(
        ns.out, checks, raw_first_token_s=first_s, pair_ratios_32=pair_ratios, windows=results
    )


if __name__ == "__main__":
    sys.exit(main())
