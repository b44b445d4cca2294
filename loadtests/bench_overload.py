"""Overload benchmark: what admission control keeps when ten times more users arrive than a
generator replica can batch, measured against the un-overloaded service in the same run.

    make bench-overload          # or: python loadtests/bench_overload.py [--duration 30]

The service from configs/bench.yaml (gpt2-124M stand-in, float32, cache off, one generator
replica: 32 rows decode, 64 wait). Closed-loop users send /generate (greedy, 32 new tokens,
unique prompts); a refused user waits what Retry-After says, as the openai client does. Windows
alternate: 32 users (the baseline), then 320 (10x), `--pairs` times; a prober reads /livez
five times a second throughout.

Tokens/s: each served request's tokens are spread evenly over its time at the server (sent to
answered) and the window keeps the share inside it. Counting whole requests at completion
would quantize the figure: under overload the queue admits rows 32 at a time and they finish
together, so a 30 s window holds 7 or 8 such waves (a 13% step) by chance of its edges.

Targets (medians over the pairs): accepted tok/s at 320 users >= 0.9 x at 32 users; refusals
answered in < 100 ms p99; /livez < 1 s p99 under overload. Prints a table with the CPU flags,
writes bench-results/overload.json, and exits non-zero when a target is missed.

The service runs behind its default front, Ray's HAProxy (configs/ray.env): HAProxy sends each
request straight to the Ingress replica's own HTTP port. `--proxy serve` measures the same
service behind Serve's Python HTTP proxy instead (`RAY_SERVE_ENABLE_HA_PROXY=0`, the front of
multi-node clusters, see docs/deployment.md). The harness gives each app a private directory
and free ports for HAProxy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtests"))

from bench_batching import log, make_prompt, pct  # noqa: E402
from bench_int8 import cpu_description  # noqa: E402
from report import finish  # noqa: E402

from tests.conftest import start_app, stop_app  # noqa: E402

NEW_TOKENS = 32
BASE_USERS = 32
OVERLOAD = 10
TOK_TARGET = 0.9
REFUSAL_P99_TARGET_S = 0.1
LIVEZ_P99_TARGET_S = 1.0
MAX_RETRY_WAIT_S = 60.0  # the longest Retry-After the service sends


def cpu_flags() -> str:
    cpu = cpu_description()
    return f"{cpu['model']}; {' '.join(cpu['flags']) or 'none'}"


def share(start: float, end: float, lo: float, hi: float) -> float:
    """The part of [start, end] inside [lo, hi]."""
    if end <= start:
        return 1.0 if lo <= end <= hi else 0.0
    return max(0.0, min(end, hi) - max(start, lo)) / (end - start)


async def window(base_url: str, users: int, warmup_s: float, span_s: float) -> dict:
    """`users` closed-loop clients; what happened inside the measured window counts (tokens
    by their share of each request's time at the server, see the module's docstring)."""
    rng = random.Random(users)
    served: list[tuple[float, int, float]] = []  # (answered at, tokens, latency)
    refused: list[float] = []  # refusal latencies
    livez: list[float] = []
    client_lag: list[float] = []
    errors: list[str] = []
    # aiohttp, not httpx: the load generator shares the cores with the service, and at 320
    # users httpx's pool spent up to half a core in the first seconds of a window.
    connector = aiohttp.TCPConnector(limit=users + 8, limit_per_host=users + 8)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as client:
        start = time.perf_counter()
        end = start + warmup_s + span_s
        lo, hi = start + warmup_s, end

        async def user() -> None:
            await asyncio.sleep(rng.random() * 2.0)  # spread the first arrivals
            while time.perf_counter() < end:
                body = {
                    "prompts": [make_prompt(rng)],
                    "max_new_tokens": NEW_TOKENS,
                    "temperature": 0,
                    "cache": False,
                }
                sent = time.perf_counter()
                try:
                    async with client.post("/generate", json=body) as r:
                        payload = await r.read()
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    errors.append(type(exc).__name__)
                    continue
                now = time.perf_counter()
                if r.status == 200:
                    tokens = json.loads(payload)[0]["usage"]["completion_tokens"]
                    served.append((now, tokens, now - sent))
                elif r.status == 503 and "retry-after" in r.headers:
                    if lo <= sent and now <= hi:
                        refused.append(now - sent)
                    wait = min(MAX_RETRY_WAIT_S, float(r.headers["retry-after"]))
                    await asyncio.sleep(wait * (0.5 + rng.random()))  # jittered, as clients do
                else:
                    errors.append(f"{r.status} {payload[:80]!r}")

        async def prober() -> None:
            while time.perf_counter() < end:
                sent = time.perf_counter()
                async with client.get("/livez") as r:
                    await r.read()
                if r.status == 200 and sent >= lo:
                    livez.append(time.perf_counter() - sent)
                await asyncio.sleep(0.2)

        async def lag_monitor() -> None:
            # The load generator shares the cores: how late its own event loop ran, so a slow
            # refusal can be told apart from a client that was late to read it.
            while time.perf_counter() < end:
                before = time.perf_counter()
                await asyncio.sleep(0.005)
                if before >= lo:
                    client_lag.append(time.perf_counter() - before - 0.005)

        await asyncio.gather(prober(), lag_monitor(), *(user() for _ in range(users)))
    inside = [(t, n, lat) for t, n, lat in served if lo <= t <= hi]
    return {
        "users": users,
        "tok_s": sum(n * share(t - lat, t, lo, hi) for t, n, lat in served) / span_s,
        "served": len(inside),
        "latency_p50_s": pct([lat for _, _, lat in inside], 0.5),
        "refused": len(refused),
        "refusal_p50_s": pct(refused, 0.5) if refused else None,
        "refusal_p99_s": pct(refused, 0.99) if refused else None,
        "livez_p99_s": pct(livez, 0.99),
        "livez_max_s": max(livez) if livez else None,
        "client_lag_p99_s": pct(client_lag, 0.99) if client_lag else None,
        "errors": len(errors),
        "error_samples": errors[:5],
    }


async def run(workdir: Path, duration_s: float, pairs: int, proxy: str) -> list[dict]:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Explicit either way, so the comparison holds whatever configs/ray.env chooses.
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1" if proxy == "haproxy" else "0"}
    proc, app = start_app(ROOT / "configs" / "bench.yaml", workdir, None, env=env)
    results = []
    try:
        async with aiohttp.ClientSession(app.base_url, raise_for_status=True) as client:
            body = {"prompts": ["warm up"], "max_new_tokens": 4}
            async with client.post("/generate", json=body) as r:
                await r.read()
        for _ in range(pairs):
            for users in (BASE_USERS, BASE_USERS * OVERLOAD):
                r = await window(app.base_url, users, 10.0, duration_s)
                results.append(r)
                refusal = (
                    ""
                    if r["refusal_p99_s"] is None
                    else f", {r['refused']} refused p99 {r['refusal_p99_s'] * 1000:.0f} ms"
                )
                log(
                    f"  {users:>3} users: {r['tok_s']:6.1f} tok/s, {r['served']} served, "
                    f"p50 {r['latency_p50_s']:.2f} s{refusal}, /livez p99 "
                    f"{r['livez_p99_s'] * 1000:.0f} ms, {r['errors']} errors"
                )
    finally:
        stop_app(proc)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds/window")
    parser.add_argument("--pairs", type=int, default=3, help="baseline/overload pairs")
    parser.add_argument(
        "--proxy", choices=("haproxy", "serve"), default="haproxy",
        help="Ray's HAProxy (the default front, configs/ray.env) or Serve's Python HTTP proxy",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "overload.json")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-results" / "overload-app")
    ns = parser.parse_args()
    ns.workdir.mkdir(parents=True, exist_ok=True)
    flags = cpu_flags()
    log(f"CPU: {flags}; {os.cpu_count()} cores; proxy: {ns.proxy}")
    results = asyncio.run(run(ns.workdir, ns.duration, ns.pairs, ns.proxy))
    base = results[0::2]
    over = results[1::2]
    ratios = [o["tok_s"] / b["tok_s"] for b, o in zip(base, over, strict=True)]
    refusal_p99 = [o["refusal_p99_s"] for o in over if o["refusal_p99_s"] is not None]
    tok_ratio = statistics.median(ratios)
    refusal = statistics.median(refusal_p99) if refusal_p99 else float("nan")
    livez = statistics.median(o["livez_p99_s"] for o in over)
    checks = [
        ("accepted tok/s at 320 users / at 32 users (median pair)", tok_ratio,
         f">= {TOK_TARGET}", tok_ratio >= TOK_TARGET),
        ("refusal latency p99 at 320 users (s, median)", refusal,
         f"< {REFUSAL_P99_TARGET_S}", refusal < REFUSAL_P99_TARGET_S),
        ("/livez p99 at 320 users (s, median)", livez,
         f"< {LIVEZ_P99_TARGET_S}", livez < LIVEZ_P99_TARGET_S),
    ]  # fmt: skip
    print(f"\nCPU: {flags}\nproxy: {ns.proxy}")
    print(
        "users   tok/s  served  p50 s  refused  refusal p50  refusal p99  livez p99  errors"
        "  client lag p99"
    )
    for r in results:
        p50 = "-" if r["refusal_p50_s"] is None else f"{r['refusal_p50_s'] * 1000:.0f} ms"
        p99 = "-" if r["refusal_p99_s"] is None else f"{r['refusal_p99_s'] * 1000:.0f} ms"
        print(
            f"{r['users']:>5} {r['tok_s']:7.1f} {r['served']:>7} {r['latency_p50_s']:6.2f} "
            f"{r['refused']:>8} {p50:>12} {p99:>12} {r['livez_p99_s'] * 1000:7.0f} ms "
            f"{r['errors']:>7} {r['client_lag_p99_s'] * 1000:12.0f} ms"
        )
    print(f"\naccepted tok/s ratio by pair: {[round(x, 3) for x in ratios]}\n")
    return finish(ns.out, checks, cpu=flags, proxy=ns.proxy, ratios=ratios, windows=results)


if __name__ == "__main__":
    sys.exit(main())
