"""Cache benchmark: cache hits against the app's `GET /healthz` and the bare request path.

    make bench-cache                         # starts configs/tiny.yaml itself, then measures
    python loadtests/bench_cache.py --url http://127.0.0.1:8000   # against a running app

Closed-loop clients (each sends its next request when the last one is answered) measure
requests/s and latency percentiles at 1 and 32 clients for:

- `GET /healthz`: the issue's baseline ("the same app's GET /healthz"). It reads the breaker
  and pings Redis, the store and the generator, the probe the issue asks to report degraded
  Redis.
- `POST /generate` answered from cache: the same prompt every time. Besides the L1 lookup, a
  hit commits its own history row through the Persistence deployment before it is answered.
- `GET /livez`, the stricter reference: no downstream call at all, so it is the Ray Serve
  request path itself (proxy -> ingress replica -> back). A hit cannot come near it at one
  client: its durable row costs one more handle round trip and a commit.

Baseline and hits alternate over `--rounds`; ratios are taken within each round (same machine
state) and the median round is reported. Then 32 clients send one new deterministic prompt at
once, and `/stats` must show exactly one generation. Prints a table, writes JSON.
Never collected by pytest (not under tests/, no test_ names).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
TARGET_RPS_RATIO = 0.80  # hits/s at 32 clients >= 0.80 x GET /healthz req/s
TARGET_P50_RATIO = 1.30  # hit p50 at 1 client <= 1.3 x GET /healthz p50
HIT_BODY = {"prompts": ["The cache benchmark prompt"], "max_new_tokens": 16}


@dataclass
class Run:
    name: str
    clients: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    client_cpu: float  # this process's CPU time / wall time (1.0 = one core busy)


async def closed_loop(
    session: aiohttp.ClientSession,
    name: str,
    method: str,
    url: str,
    body: dict | None,
    clients: int,
    seconds: float,
    warmup_s: float,
) -> Run:
    latencies: list[float] = []
    recording = False

    async def client(stop_at: float) -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            async with session.request(method, url, json=body) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{method} {url}: HTTP {response.status}")
            if recording:
                latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(client(time.perf_counter() + warmup_s) for _ in range(clients)))
    recording = True
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(wall0 + seconds) for _ in range(clients)))
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return Run(
        name,
        clients,
        len(latencies),
        round(wall, 2),
        round(len(latencies) / wall, 1),
        round(pct(0.50), 2),
        round(pct(0.95), 2),
        round(pct(0.99), 2),
        round(cpu / wall, 2),
    )


async def stampede(session: aiohttp.ClientSession, base: str, clients: int) -> dict:
    """`clients` identical new deterministic requests released at the same instant."""
    body = {"prompts": [f"stampede {uuid.uuid4().hex}"], "max_new_tokens": 64}
    before = await get_json(session, f"{base}/stats")
    go = asyncio.Event()

    async def one() -> dict:
        await go.wait()
        async with session.post(f"{base}/generate", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"stampede: HTTP {response.status}")
            return (await response.json())[0]

    tasks = [asyncio.create_task(one()) for _ in range(clients)]
    await asyncio.sleep(0.2)  # every client is parked on the event
    go.set()
    records = await asyncio.gather(*tasks)
    after = await get_json(session, f"{base}/stats")
    return {
        "clients": clients,
        "generations": after["generations"] - before["generations"],
        "coalesced": after["cache"]["coalesced"] - before["cache"]["coalesced"],
        "cache_hits": after["cache"]["hits"] - before["cache"]["hits"],
        "answered_uncached": sum(not r["cached"] for r in records),
        "distinct_texts": len({r["generated_text"] for r in records}),
    }


async def get_json(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url) as response:
        response.raise_for_status()
        return await response.json()


async def measure(base: str, seconds: float, warmup_s: float, rounds: int) -> dict:
    connector = aiohttp.TCPConnector(limit=64, limit_per_host=64)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async with session.post(f"{base}/generate", json=HIT_BODY) as response:
            response.raise_for_status()  # warms the cache entry every hit below reads
        runs: list[Run] = []
        for _ in range(rounds):
            for clients in (1, 32):
                for name, method, path, body in (
                    ("livez", "GET", "/livez", None),
                    ("cache_hit", "POST", "/generate", HIT_BODY),
                    ("healthz", "GET", "/healthz", None),
                ):
                    run = await closed_loop(
                        session, name, method, base + path, body, clients, seconds, warmup_s
                    )
                    runs.append(run)
                    print(
                        f"  {name:<10} {clients:>2} clients: {run.rps:7.1f} req/s "
                        f"p50 {run.p50_ms:6.2f} ms",
                        file=sys.stderr,
                    )
        single_flight = await stampede(session, base, 32)
        stats = await get_json(session, f"{base}/stats")
    return {"runs": runs, "single_flight": single_flight, "cache_stats": stats["cache"]}


def summarize(runs: list[Run], rounds: int) -> dict:
    def pick(name: str, clients: int) -> list[Run]:
        return [r for r in runs if r.name == name and r.clients == clients]

    def ratio_per_round(num: str, den: str, clients: int, field: str) -> float:
        pairs = zip(pick(num, clients), pick(den, clients), strict=True)
        return round(statistics.median(getattr(a, field) / getattr(b, field) for a, b in pairs), 3)

    table = {}
    for name in ("livez", "cache_hit", "healthz"):
        for clients in (1, 32):
            rs = pick(name, clients)
            table[f"{name}@{clients}"] = {
                "rps": statistics.median(r.rps for r in rs),
                "p50_ms": statistics.median(r.p50_ms for r in rs),
                "p95_ms": statistics.median(r.p95_ms for r in rs),
                "client_cpu": statistics.median(r.client_cpu for r in rs),
            }
    return {
        "rounds": rounds,
        "medians": table,
        "ratios": {
            "hit_rps_32_vs_livez": ratio_per_round("cache_hit", "livez", 32, "rps"),
            "hit_p50_1_vs_livez": ratio_per_round("cache_hit", "livez", 1, "p50_ms"),
            "hit_rps_32_vs_healthz": ratio_per_round("cache_hit", "healthz", 32, "rps"),
            "hit_p50_1_vs_healthz": ratio_per_round("cache_hit", "healthz", 1, "p50_ms"),
        },
    }


def report(summary: dict, single_flight: dict) -> bool:
    med, ratios = summary["medians"], summary["ratios"]
    print(f"\nCache benchmark (median of {summary['rounds']} rounds)\n")
    print(
        f"{'endpoint':<22}{'clients':>8}{'req/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'bench CPU':>11}"
    )
    labels = {
        "livez": "GET /livez (bare)",
        "cache_hit": "POST /generate, hit",
        "healthz": "GET /healthz (baseline)",
    }
    for key, row in med.items():
        name, clients = key.split("@")
        print(
            f"{labels[name]:<22}{clients:>8}{row['rps']:>10.1f}{row['p50_ms']:>10.2f}"
            f"{row['p95_ms']:>10.2f}{row['client_cpu']:>10.0%}"
        )
    checks = [
        (
            "hits req/s @32 / /healthz req/s @32",
            ratios["hit_rps_32_vs_healthz"],
            f">= {TARGET_RPS_RATIO}",
            ratios["hit_rps_32_vs_healthz"] >= TARGET_RPS_RATIO,
        ),
        (
            "hit p50 @1 / /healthz p50 @1",
            ratios["hit_p50_1_vs_healthz"],
            f"<= {TARGET_P50_RATIO}",
            ratios["hit_p50_1_vs_healthz"] <= TARGET_P50_RATIO,
        ),
        (
            "32 same new prompts: generations",
            single_flight["generations"],
            "== 1",
            single_flight["generations"] == 1 and single_flight["answered_uncached"] == 1,
        ),
    ]
    print(f"\n{'target':<40}{'measured':>10}  {'wanted':<8} result")
    for name, value, wanted, ok in checks:
        print(f"{name:<40}{value:>10}  {wanted:<8} {'met' if ok else 'MISSED'}")
    print(
        f"\nfor reference, against GET /livez (the bare request path): req/s ratio @32 "
        f"{ratios['hit_rps_32_vs_livez']}, p50 ratio @1 {ratios['hit_p50_1_vs_livez']}"
    )
    print(f"single-flight: {single_flight}")
    return all(ok for *_, ok in checks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running app; default: start configs/tiny.yaml")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured time per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured time per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "cache.json")
    args = parser.parse_args()

    proc = None
    base = args.url
    if base is None:
        sys.path.insert(0, str(ROOT))
        from serve_app.cache.embedded_redis import EmbeddedRedis
        from tests.conftest import start_app, stop_app

        redis = EmbeddedRedis().__enter__()
        workdir = Path(tempfile.mkdtemp(prefix="bench-cache-"))
        print(f"starting configs/tiny.yaml in {workdir} ...", file=sys.stderr)
        proc, app = start_app(ROOT / "configs" / "tiny.yaml", workdir, redis.url)
        base = app.base_url
    try:
        result = asyncio.run(measure(base.rstrip("/"), args.seconds, args.warmup, args.rounds))
    finally:
        if proc is not None:
            stop_app(proc)
            redis.stop()
    summary = summarize(result["runs"], args.rounds)
    met = report(summary, result["single_flight"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                **summary,
                "single_flight": result["single_flight"],
                "targets_met": met,
                "runs": [asdict(r) for r in result["runs"]],
                "cache_stats": result["cache_stats"],
                "url": args.url or "started configs/tiny.yaml",
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.out}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
