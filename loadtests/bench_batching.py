"""Dynamic-batching benchmark: the service against raw transformers `generate()`, in one run.

    make bench          # concurrency 1,4,8,16,32,64; batching on and off; dtypes; mixed lengths
    make bench-quick    # the targets only: 1 and 32 users, shorter windows (< 5 minutes)
    .venv/bin/python loadtests/bench_batching.py --help

1. Raw: the gpt2-124M-architecture stand-in in this process, `model.generate()` (greedy, fp32,
   exactly N new tokens) at several batch sizes on the kernels the service loads (`kernels:
   onednn`, see serve_app/generation/kernels.py) and, in the full run, on stock transformers/PyTorch
   kernels too (`kernels: stock`, what the issue measured). The service is not running.
2. Service: `serve run configs/bench.yaml` (cache off, unique prompts), closed-loop users at
   each concurrency level from the highest down; after the 32-user float32 windows, dtypes
   (int8, and bfloat16 where the CPU has native bf16) and mixed `max_new_tokens` (8/16/32/64)
   at 32 users. A dtype whose lone 8-token request takes more than 4x float32's gets no
   32-user window: the report gives the lone-request ratio instead. At 1 and 32 users,
   `gpt2-int8` is also paired with CTranslate2 int8, which runs in a process of its own and
   sleeps through the service's windows (`bench_int8.py`, which also measures int8's accuracy
   and memory before the service starts). Tokens/s pro-rates completion tokens over the
   measurement window (after a warm-up); latency is client-side end to end. At 1 and 32
   users, the levels the targets name, each service window comes right after a raw
   `generate()` run at batch = users made with every process of the service stopped
   (SIGSTOP), so raw has the machine to itself seconds before the window it is compared with;
   `--pairs` such pairs, and the targets take the median pair's ratio.
3. The same levels with batching off (`max_batch_size: 1`, applied live through `user_config`),
   from the lowest up, so each level's on and off windows are close together in time.
4. Full run only: raw `generate()` at batch 1 and 32 in this process while the service is up
   and idle, as context: the ratios against it split the gap into what the idle cluster's
   presence costs and what serving requests costs. Never the baseline.
5. Raw `generate()` again, service stopped. The fastest raw run of all at each batch size
   (before or after, either kernels) sizes the windows and gives report-only ratios; the
   baseline of the targets is the paired raw run, on the same oneDNN kernels as the service,
   so they measure the serving path against the same matmuls, not the kernels' speed-up.

`--isa avx2` (or `avx512`, `avx512_vnni`) emulates a CPU without the instruction sets above it,
for this process, CTranslate2 and the service alike (`device.library_isa_env`): e.g. the AVX2
int8 path on an AVX-512 machine. The real CPU's flags are printed beside the cap.

Every raw run and service window also reports the CPU steal of its span (/proc/stat): the share
of the machine a shared VM's hypervisor gave to other guests, the usual reason for a slow window.

Prints a table with the issue's target ratios, writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtests.bench_int8 import (  # noqa: E402
    Ct2Model,
    accuracy,
    cap_isa,
    cpu_description,
    int8_checks,
    memory,
    print_int8_report,
)
from serve_app.models.device import ISA_CAPS, cpu_flags, missing_native_bf16  # noqa: E402
from tests.conftest import descendants, start_app, stop_app  # noqa: E402  (the same harness as the tests)

WORDS = (
    "river stone garden engine market silver quiet window morning story lantern harbor "
    "paper orange winter signal forest bridge candle velvet thunder meadow copper island"
).split()


STARTED = time.monotonic()


def log(message: str) -> None:
    """A progress line, stamped with the seconds since the run started."""
    print(f"[{time.monotonic() - STARTED:5.0f} s] {message}", flush=True)


def make_prompt(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=10)) + f" {uuid.uuid4().hex[:4]}"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def cpu_ticks() -> list[int]:
    """Machine-wide CPU time from /proc/stat (user, nice, system, idle, iowait, irq, softirq,
    steal, ...), in clock ticks; empty where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return []


def steal_share(before: list[int], after: list[int]) -> float | None:
    """Share of the machine's CPU time the hypervisor gave to other guests between two
    `cpu_ticks()` readings. On a shared VM this is what makes a window slow for no reason of its
    own (seen in this project's benchmark runs: 0-44% of a window), so every window reports it."""
    if len(before) < 8 or len(after) < 8:
        return None
    delta = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(delta[:8])
    return round(delta[7] / total, 3) if total > 0 else None


def fmt_steal(value: float | None) -> str:
    return "steal n/a" if value is None else f"steal {100 * value:4.1f}%"


# -- 1. raw generate() -------------------------------------------------------------------------
class RawModel:
    """The gpt2-124M stand-in loaded in this process, timed with plain `model.generate()`
    (greedy, exactly `new_tokens` new tokens)."""

    def __init__(self, new_tokens: int, threads: int, kernels: str) -> None:
        import torch

        from serve_app.config import AppArgs, ModelSpec, resolve_args
        from serve_app.models.loading import load_model
        from serve_app.models.resolve import prepare_model

        torch.set_num_threads(threads)
        spec = ModelSpec(id="gpt2", architecture="gpt2", seed=0, kernels=kernels)
        standin_dir = Path(resolve_args(AppArgs(models=[spec])).standin_dir)
        info = prepare_model(spec, standin_dir, 1.0, True)
        self.loaded = load_model(spec, info, standin_dir)
        if self.loaded.kernels != kernels:
            log(f"  ({kernels} kernels unavailable here: raw runs on {self.loaded.kernels})")
        self.loaded.tokenizer.padding_side = "left"
        self.new_tokens = new_tokens
        self.rng = random.Random(0)
        self.run(1, 4)  # warm-up

    def run(self, batch: int, n: int) -> float:
        import torch

        tok = self.loaded.tokenizer
        enc = tok([make_prompt(self.rng) for _ in range(batch)], return_tensors="pt", padding=True)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.loaded.model.generate(
                **enc,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=self.loaded.eos_token_id,
            )
        elapsed = time.perf_counter() - started
        assert out.shape[1] - enc["input_ids"].shape[1] == n
        return elapsed

    def measure_one(self, batch: int, reps: int) -> dict:
        ticks = cpu_ticks()
        latency = statistics.median(self.run(batch, self.new_tokens) for _ in range(reps))
        return {
            "latency_s": latency,
            "tok_s": batch * self.new_tokens / latency,
            "kernels": self.loaded.kernels,
            "steal": steal_share(ticks, cpu_ticks()),
        }

    def measure(self, batch_sizes: list[int], reps: int, label: str = "") -> dict:
        results = {}
        for batch in batch_sizes:
            r = results[batch] = self.measure_one(batch, reps)
            log(
                f"  raw generate(){label} {r['kernels']:>6} batch {batch:>3}: "
                f"{r['tok_s']:7.1f} tok/s, {r['latency_s']:6.2f} s, {fmt_steal(r['steal'])}"
            )
        return results


def measure_raw(
    batch_sizes: list[int], new_tokens: int, reps: int, threads: int, kernels: str
) -> dict:
    """One pass over `batch_sizes` on a model loaded for it and dropped afterwards."""
    return RawModel(new_tokens, threads, kernels).measure(batch_sizes, reps)


@contextmanager
def frozen(root: int) -> Iterator[None]:
    """Stop every process of the service (SIGSTOP) for the block, then let them go on.

    Raw `generate()` then has the machine to itself, as with the service stopped, but a few
    seconds from the service window it is compared with: on a shared VM whose speed drifts by
    tens of percent within minutes (CPU steal), a baseline measured minutes earlier or later
    decides the ratio more than the service does. The app answers normally after a freeze
    (checked: three 12 s freezes of the tiny app, each followed by a 200 and a healthy /healthz).
    """
    pids = [root, *descendants(root)]
    stopped = []
    try:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            except ProcessLookupError:
                pass
        yield
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


# -- 2. service under closed-loop load ----------------------------------------------------------
async def wait_idle(client: httpx.AsyncClient, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        gen = (await client.get("/stats")).json().get("generator", {})
        if gen.get("queued", 1) == 0 and gen.get("active_rows", 1) == 0:
            return
        await asyncio.sleep(0.5)
    raise RuntimeError("generator did not drain")


async def closed_loop(
    base_url: str,
    users: int,
    warmup_s: float,
    duration_s: float,
    model: str = "gpt2",
    lengths: list[int] | None = None,
    new_tokens: int = 32,
    drain_s: float = 60.0,
) -> dict:
    """`users` clients each send one request at a time; measure inside [warmup, warmup+duration]."""
    rng = random.Random(users)
    done: list[tuple[float, float, int, int]] = []  # (finished_at, latency, tokens, max_new)
    errors: list[str] = []
    limits = httpx.Limits(max_connections=users + 8, max_keepalive_connections=users + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=900, limits=limits) as client:
        await wait_idle(client)
        start = time.perf_counter()
        window = (start + warmup_s, start + warmup_s + duration_s)

        async def user() -> None:
            deck: list[int] = []
            while time.perf_counter() < window[1]:
                # Mixed lengths in equal parts, each user's in a shuffled order: a fixed cycle
                # keeps 32 closed-loop users in step, and a short window then saw no 16-token
                # request finish at all.
                if lengths and not deck:
                    deck = rng.sample(lengths, len(lengths))
                budget = deck.pop() if lengths else new_tokens
                body = {"prompts": [make_prompt(rng)], "max_new_tokens": budget, "model": model}
                sent = time.perf_counter()
                r = await client.post("/generate", json=body)
                finished = time.perf_counter()
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:120]}")
                    continue
                tokens = r.json()[0]["usage"]["completion_tokens"]
                done.append((finished, finished - sent, tokens, budget))

        async def window_ticks() -> tuple[list[int], list[int]]:
            await asyncio.sleep(max(0.0, window[0] - time.perf_counter()))
            opened = cpu_ticks()
            await asyncio.sleep(max(0.0, window[1] - time.perf_counter()))
            return opened, cpu_ticks()

        ticks = asyncio.create_task(window_ticks())
        tasks = [asyncio.create_task(user()) for _ in range(users)]
        # Users stop sending at the window's end; requests in flight still finish (they overlap
        # the window) unless that takes longer than `drain_s`.
        _, late = await asyncio.wait(tasks, timeout=window[1] - time.perf_counter() + drain_s)
        for t in late:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        steal = steal_share(*await ticks)
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        await wait_idle(client)
    # Closed-loop users fall into lock-step rounds; counting whole requests that finish inside
    # the window would quantise throughput to whole rounds. Each request's tokens are instead
    # pro-rated by how much of its lifetime lies inside the window.
    tokens = 0.0
    for finished, latency, n, _ in done:
        sent = finished - latency
        overlap = min(finished, window[1]) - max(sent, window[0])
        if overlap > 0:
            tokens += n * overlap / latency
    inside = [d for d in done if window[0] <= d[0] <= window[1]]
    latencies = [d[1] for d in inside]
    result = {
        "users": users,
        "requests": len(inside),
        "tok_s": tokens / duration_s,
        "p50_s": pct(latencies, 0.50),
        "p95_s": pct(latencies, 0.95),
        "errors": len(errors),
        "abandoned": len(late),
        "steal": steal,
    }
    if lengths:
        result["by_length"] = {
            n: {
                "requests": len([d for d in inside if d[3] == n]),
                "p50_s": pct([d[1] for d in inside if d[3] == n], 0.5),
            }
            for n in lengths
        }
    if errors:
        log(f"    {len(errors)} errors, e.g. {errors[0]}")
    return result


def dashboard_url(log: Path) -> str:
    # Ray colours the address (ANSI escapes between "at " and the URL).
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))
    match = re.search(r"dashboard at (?:http://)?([\d.]+:\d+)", text)
    return f"http://{match.group(1)}" if match else "http://127.0.0.1:8265"


def set_max_batch_size(cfg_path: Path, log: Path, value: int) -> None:
    """Change the generator's user_config live, as an operator would (`serve deploy`)."""
    spec = yaml.safe_load(cfg_path.read_text())
    for dep in spec["applications"][0]["deployments"]:
        if dep["name"] == "Generator":
            dep["user_config"]["max_batch_size"] = value
    cfg_path.write_text(yaml.safe_dump(spec))
    serve_bin = Path(sys.executable).parent / "serve"
    subprocess.run(
        [str(serve_bin), "deploy", str(cfg_path), "-a", dashboard_url(log)],
        check=True,
        capture_output=True,
    )


async def current_max_batch(base_url: str) -> int:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        return (await client.get("/stats")).json()["generator"].get("max_batch_size", -1)


PAIRED_LEVELS = (1, 32)  # the levels the targets compare with raw generate()
PROBE_TOKENS = 8  # a lone request per dtype before its 32-user window
QUICK_MAX_WINDOW_S = 12.0  # --quick: windows no longer than this (unless --duration is)
SKIP_SLOWER_THAN = 4.0  # times float32's lone request: the dtype's 32-user window is skipped


async def lone_latency(
    base_url: str, model: str, new_tokens: int, enough_s: float = float("inf")
) -> float:
    """Seconds for one request alone on the service: the faster of two, or the first if it
    already took longer than `enough_s`."""
    rng = random.Random(model)
    best = float("inf")
    async with httpx.AsyncClient(base_url=base_url, timeout=900) as client:
        await wait_idle(client)
        for _ in range(2):
            body = {"prompts": [make_prompt(rng)], "max_new_tokens": new_tokens, "model": model}
            sent = time.perf_counter()
            (await client.post("/generate", json=body)).raise_for_status()
            best = min(best, time.perf_counter() - sent)
            if best > enough_s:
                break
    return best


async def paired_windows(
    app,
    proc,
    raw_model,
    users: int,
    pairs: int,
    warmup: float,
    duration: float,
    model: str = "gpt2",
) -> list[dict]:
    """A baseline run at batch = `users` with the service frozen (raw `generate()`, or
    CTranslate2 for `gpt2-int8`), then a service window of `model` right after it, `pairs`
    times: each ratio compares two measurements seconds apart."""
    rows = []
    for i in range(pairs):
        with frozen(proc.pid):
            raw = raw_model.measure_one(users, 1)
        await asyncio.sleep(1.0)  # the thawed cluster catches up on its timers
        svc = await closed_loop(
            app.base_url, users, warmup, duration, model=model, new_tokens=raw_model.new_tokens
        )
        pair = {
            "raw": raw,
            "service": svc,
            "tok_ratio": svc["tok_s"] / raw["tok_s"],
            "p50_ratio": svc["p50_s"] / raw["latency_s"],
        }
        rows.append(pair)
        log(
            f"  pair {i + 1}/{pairs}, {model}, {users:>2} users: {raw['kernels']} (frozen) "
            f"{raw['tok_s']:6.1f} tok/s, {raw['latency_s']:5.2f} s, {fmt_steal(raw['steal'])} | "
            f"service {svc['tok_s']:6.1f} tok/s, p50 {svc['p50_s']:5.2f} s, "
            f"{fmt_steal(svc['steal'])} | ratios {pair['tok_ratio']:.3f}, {pair['p50_ratio']:.3f}"
        )
    return rows


async def run_service(args, raw: dict, raw_model: RawModel, ct2, workdir: Path) -> dict:
    out: dict = {"on": {}, "off": {}, "dtype": {}, "dtype_skipped": {}, "mixed": None, "pairs": {}}
    out["int8_pairs"] = {}
    # A private cluster on loopback, started and stopped by this run: no dashboard token, so
    # `serve deploy` can change user_config live as an operator would.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    config = ROOT / "configs" / "bench.yaml"
    models = yaml.safe_load(config.read_text())["applications"][0]["args"]["models"]
    if not missing_native_bf16(cpu_flags()):  # bfloat16 is refused on CPUs without it
        models.append({**models[0], "id": "gpt2-bf16", "dtype": "bfloat16"})
    dtype_models = [m["id"] for m in models if m["id"] != "gpt2"]
    proc, app = start_app(config, workdir, None, models=models)
    cfg_path = workdir / "serve_config.yaml"
    try:
        async with httpx.AsyncClient(base_url=app.base_url, timeout=600) as client:
            for model in ("gpt2", *dtype_models):  # load (and warm) every model
                body = {"prompts": ["warm up"], "max_new_tokens": 4, "model": model}
                (await client.post("/generate", json=body)).raise_for_status()

        def windows(users: int, batching: bool) -> tuple[float, float]:
            ref = raw.get(min(users, 32)) or raw[max(raw)]
            # Batching on, the first round of `users` rows must finish before the window opens.
            # Off, rows run one at a time from the first request on: one row's time suffices.
            first_answers = ref["latency_s"] if batching else raw[1]["latency_s"]
            warmup = min(first_answers, 8.0 if args.quick else 20.0) + 2.0
            span = max(args.duration, 2.5 * ref["latency_s"])
            if args.quick:  # tokens are pro-rated, so part of a round still counts
                span = min(span, max(args.duration, QUICK_MAX_WINDOW_S))
            return warmup, span

        # On from the highest level down, then off from the lowest up: each level's on and off
        # windows sit as close together in time as the live switch allows, so machine drift
        # over the run does not decide an on/off comparison (at 1 user both are the same path).
        # The dtype and mixed-length windows follow the 32-user float32 windows they are
        # compared with.
        for users in sorted(args.levels, reverse=True):
            w, d = windows(users, True)
            if users in PAIRED_LEVELS:
                rows = await paired_windows(app, proc, raw_model, users, args.pairs, w, d)
                out["pairs"][users] = rows
                # The table, the plot and on/off use the pair with the median throughput
                # (the upper one of two).
                r = sorted((p["service"] for p in rows), key=lambda x: x["tok_s"])[len(rows) // 2]
            else:
                r = await closed_loop(app.base_url, users, w, d, new_tokens=args.new_tokens)
            out["on"][users] = r
            if users in PAIRED_LEVELS and ct2 is not None:
                out["int8_pairs"][users] = await paired_windows(
                    app, proc, ct2, users, args.pairs, w, d, model="gpt2-int8"
                )
            log(
                f"  service, batching on,  {users:>2} users: {r['tok_s']:7.1f} tok/s, "
                f"p50 {r['p50_s']:6.2f} s, p95 {r['p95_s']:6.2f} s ({r['requests']} req), "
                f"{fmt_steal(r['steal'])}"
            )
            if users != 32:
                continue
            fp32_lone = await lone_latency(app.base_url, "gpt2", PROBE_TOKENS)
            bar = SKIP_SLOWER_THAN * fp32_lone
            for model in dtype_models:
                # Twice the bar on a first request is decisive: no second one (6 s in bf16).
                lone = await lone_latency(app.base_url, model, PROBE_TOKENS, enough_s=2 * bar)
                if lone > bar:
                    # E.g. bfloat16 on a CPU without AVX-512: emulated, minutes per 32-user
                    # round, so the window would only time out.
                    out["dtype_skipped"][model] = {"lone_s": lone, "float32_lone_s": fp32_lone}
                    log(
                        f"  service, {model:>9}: a lone {PROBE_TOKENS}-token request took "
                        f"{lone:.2f} s against {fp32_lone:.2f} s in float32: "
                        "32-user window skipped"
                    )
                    continue
                r = await closed_loop(
                    app.base_url, 32, w, d, model=model, new_tokens=args.new_tokens
                )
                out["dtype"][model] = r
                log(
                    f"  service, {model:>9}, 32 users: {r['tok_s']:7.1f} tok/s, "
                    f"p50 {r['p50_s']:6.2f} s, {fmt_steal(r['steal'])}"
                )
            r = await closed_loop(app.base_url, 32, w, d * 1.5, lengths=[8, 16, 32, 64])
            out["mixed"] = r
            per = ", ".join(f"{n}: p50 {v['p50_s']:.2f} s" for n, v in r["by_length"].items())
            log(
                f"  service, mixed lengths, 32 users: {r['tok_s']:7.1f} useful tok/s ({per}), "
                f"{fmt_steal(r['steal'])}"
            )

        set_max_batch_size(cfg_path, app.log, 1)
        for _ in range(60):
            if await current_max_batch(app.base_url) == 1:
                break
            await asyncio.sleep(1)
        else:
            raise RuntimeError("batching-off user_config was not applied")
        for users in sorted(args.levels):
            w, d = windows(users, False)
            # Batching off, throughput is steady (one row at a time): a short drain suffices.
            r = await closed_loop(
                app.base_url, users, w, d, new_tokens=args.new_tokens, drain_s=10.0
            )
            out["off"][users] = r
            log(
                f"  service, batching off, {users:>2} users: {r['tok_s']:7.1f} tok/s, "
                f"p50 {r['p50_s']:6.2f} s ({r['requests']} req), {fmt_steal(r['steal'])}"
            )

        # Context, never the baseline: the same raw generate() with the idle cluster beside it.
        # Ray's processes wake up about 0.18 cores' worth while idle, and on 2 cores every
        # wake-up stalls the other torch thread at its next barrier; this splits the gap to raw
        # into what the cluster's presence costs and what serving requests costs.
        out["raw_beside"] = (
            {}
            if args.quick  # context only: the full run measures it
            else raw_model.measure([1, 32], 2, label=" beside the idle service,")
        )
    finally:
        # The app's state is not needed any more: a short grace before SIGKILL. Runs of the
        # fifth session waited the full 60 s here for a shutdown that never finished.
        stop_app(proc, timeout_s=15)
    return out


# -- report ---------------------------------------------------------------------------------------
def report(raw: dict, raw_stock: dict, svc: dict, args) -> dict:
    on, off = svc["on"], svc["off"]
    checks = []

    def check(name: str, value: float, target: str, ok: bool) -> None:
        checks.append({"check": name, "value": round(value, 3), "target": target, "ok": ok})

    # The targets are judged on the pairs: the median over pairs of (service window / raw run
    # seconds before it, service frozen). The ratios against the fastest raw run of the whole
    # invocation, the judge before pairs existed, are reported beside them.
    pairs = svc.get("pairs", {})

    def paired(users: int, key: str) -> float | None:
        rows = pairs.get(users)
        return statistics.median(p[key] for p in rows) if rows else None

    if 32 in on and 32 in raw:
        tput = on[32]["tok_s"] / raw[32]["tok_s"]
        lat = on[32]["p50_s"] / raw[32]["latency_s"]
        ptput, plat = paired(32, "tok_ratio"), paired(32, "p50_ratio")
        if ptput is not None:
            check(
                "32 users: service tok/s / raw b32 (paired median)", ptput, ">= 0.85", ptput >= 0.85
            )
            check("32 users: service p50 / raw b32 latency (paired)", plat, "<= 1.25", plat <= 1.25)
        check("32 users: service tok/s / fastest raw batch-32", tput, "report", True)
        check("32 users: service p50 / fastest raw batch-32 latency", lat, "report", True)
        if 32 in raw_stock:  # what the kernels add on top: the raw, stock transformers
            stock = on[32]["tok_s"] / raw_stock[32]["tok_s"]
            check("32 users: service tok/s / stock raw batch-32", stock, "report", True)
    if 1 in on and 1 in raw:
        lat1 = on[1]["p50_s"] / raw[1]["latency_s"]
        plat1 = paired(1, "p50_ratio")
        if plat1 is not None:
            check(
                "1 user: service p50 / raw b1 latency (paired median)",
                plat1,
                "<= 1.10",
                plat1 <= 1.10,
            )
        check("1 user: service p50 / fastest raw batch-1 latency", lat1, "report", True)
    beside = svc.get("raw_beside", {})
    if 32 in on and 32 in beside:
        ratio = on[32]["tok_s"] / beside[32]["tok_s"]
        check("32 users: service tok/s / raw b32 beside idle service", ratio, "report", True)
    if 1 in on and 1 in beside:
        ratio = on[1]["p50_s"] / beside[1]["latency_s"]
        check("1 user: service p50 / raw b1 beside idle service", ratio, "report", True)
    windows = [*on.values(), *off.values(), *svc["dtype"].values()]
    windows += [p["service"] for rows in pairs.values() for p in rows]
    windows += [p["service"] for rows in svc.get("int8_pairs", {}).values() for p in rows]
    for c in int8_checks(svc.get("int8_pairs", {}), svc.get("accuracy"), svc.get("memory")):
        check(*c)
    if svc.get("mixed"):
        windows.append(svc["mixed"])
    steals = [r["steal"] for r in windows if r.get("steal") is not None]
    if steals:
        check("highest CPU steal in a service window", max(steals), "report", True)
    for users in args.levels:
        if users in on and users in off:
            ratio = on[users]["tok_s"] / max(off[users]["tok_s"], 1e-9)
            check(f"{users} users: batching on / off tok/s", ratio, ">= 1.0", ratio >= 1.0)
    for model, lone in svc.get("dtype_skipped", {}).items():
        # No 32-user figure: the lone-request ratio is what there is.
        speedup = lone["float32_lone_s"] / lone["lone_s"]
        check(f"{model} / float32, lone request (32 users skipped)", speedup, "report", True)
    # Speed-ups over float32 are reported: int8's targets are against CTranslate2 (above), and
    # bfloat16 is a choice only where the CPU has native bf16.
    if 32 in on:
        for model, result in svc["dtype"].items():
            speedup = result["tok_s"] / on[32]["tok_s"]
            check(f"32 users: {model} / float32 tok/s", speedup, "report", True)
    mixed = svc.get("mixed")
    if mixed:
        bl = mixed["by_length"]
        ratio = bl[8]["p50_s"] / bl[64]["p50_s"]
        check("mixed lengths: p50(8 tokens) / p50(64 tokens)", ratio, "report", True)

    cpu = cpu_description()
    print(f"\nCPU: {cpu['model']}, {cpu['cores']} cores, kernels for {cpu['isa']}")
    print(f"flags: {' '.join(cpu['flags'])}")
    if cpu["isa_max"]:
        print(f"instruction sets capped at {cpu['isa_max']} (--isa): an emulation on this CPU")
    print_int8_report(svc.get("accuracy"), svc.get("memory"))
    print("\nraw = fastest raw generate() run at batch = users; stock = stock kernels")
    print(
        "\nusers | raw tok/s | stock tok/s | on tok/s | on p50 s | on p95 s | off tok/s | off p50 s"
    )
    for users in args.levels:
        r, st = raw.get(users, {}), raw_stock.get(users, {})
        a, b = on.get(users, {}), off.get(users, {})
        print(
            f"{users:>5} | {r.get('tok_s', float('nan')):>9.1f} | "
            f"{st.get('tok_s', float('nan')):>11.1f} | {a.get('tok_s', 0):>8.1f} | "
            f"{a.get('p50_s', 0):>8.2f} | {a.get('p95_s', 0):>8.2f} | {b.get('tok_s', 0):>9.1f} | "
            f"{b.get('p50_s', 0):>9.2f}"
        )
    print("\nTarget check" + " " * 44 + "| value  | target  | ok")
    for c in checks:
        verdict = "PASS" if c["ok"] else "FAIL"
        print(f"{c['check']:<56}| {c['value']:<6} | {c['target']:<7} | {verdict}")
    return {"checks": checks}


def plot(raw: dict, raw_stock: dict, svc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, series, style in (
        ("batching on", svc["on"], "o-"),
        ("batching off", svc["off"], "s--"),
    ):
        xs = sorted(series)
        ax1.plot(xs, [series[x]["tok_s"] for x in xs], style, label=name)
        ax2.plot(xs, [series[x]["p50_s"] for x in xs], style, label=f"{name} p50")
    for name, series, style in (
        ("raw generate()", raw, "k:"),
        ("raw generate(), stock kernels", raw_stock, "x:"),
        ("raw generate() beside the idle service", svc.get("raw_beside", {}), "+:"),
    ):
        if not series:  # not measured in --quick
            continue
        xs = sorted(series)
        ax1.plot(xs, [series[x]["tok_s"] for x in xs], style, label=f"{name} at batch = users")
        ax2.plot(xs, [series[x]["latency_s"] for x in xs], style, label=f"{name} latency")
    for ax, title, ylabel in ((ax1, "Throughput", "tokens/s"), (ax2, "Latency", "seconds")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent users (closed loop)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("gpt2-124M stand-in, fp32, 32 new tokens, 2 CPU cores")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def json_safe(value):
    """NaN (a figure with no samples, e.g. a skipped window) as null: strict JSON has no NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the targets only (1 and 32 users), shorter windows, no report-only context",
    )
    parser.add_argument("--levels", type=int, nargs="+", help="concurrency levels")
    parser.add_argument("--duration", type=float, help="measurement window per level, seconds")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--pairs",
        type=int,
        help="frozen-service raw run + service window pairs at 1 and 32 users (default 2 quick, 3)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--no-int8",
        dest="int8",
        action="store_false",
        help="skip gpt2-int8 against CTranslate2, accuracy and memory",
    )
    parser.add_argument(
        "--isa",
        choices=sorted(ISA_CAPS),
        help="emulate a CPU without the instruction sets above this one: caps PyTorch, fbgemm, "
        "oneDNN, MKL and CTranslate2 here and in the service, and the service's kernel "
        "choice (env CPU_ISA_MAX); e.g. avx2 on an AVX-512 machine",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "batching.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench-results" / "batching.png")
    args = parser.parse_args()
    cap_isa(args.isa)  # before anything imports torch or ctranslate2
    # Quick: the levels the targets name. On this project's slower machines the windows,
    # which scale with raw latency, took --quick to 399-471 s with 8 users as well.
    args.levels = args.levels or ([1, 32] if args.quick else [1, 4, 8, 16, 32, 64])
    args.duration = args.duration or (10.0 if args.quick else 40.0)
    args.pairs = args.pairs or (2 if args.quick else 3)

    log("1. raw generate()")
    sizes = sorted(set(args.levels) | {1, 32})
    # Quick: one raw run per size. The targets are judged on the paired raw runs; these size
    # the windows and give report-only ratios.
    reps = 1 if args.quick else 3
    # Stock kernels only give context (a report line, never the baseline when slower): the
    # full run times them; quick skips them (17 s of a 399 s --quick run on a slow machine).
    raw_stock = (
        {} if args.quick else measure_raw(sizes, args.new_tokens, reps, args.threads, "stock")
    )
    # The service's kernels stay loaded here for the whole run: the paired raw runs, the raw
    # runs beside the idle service and after it all use this one model.
    raw_model = RawModel(args.new_tokens, args.threads, "onednn")
    raw_before = raw_model.measure(sizes, reps)
    log("2. service (configs/bench.yaml)")
    workdir = Path(os.environ.get("BENCH_WORKDIR", ROOT / "bench-results" / "run"))
    workdir.mkdir(parents=True, exist_ok=True)
    ct2 = None
    if args.int8:
        log("   int8: accuracy against float32, memory per replica, CTranslate2 baseline")
        acc, mem = accuracy(), memory()
        print_int8_report(acc, mem)
        try:
            ct2 = Ct2Model(
                args.new_tokens,
                args.threads,
                workdir.parent / "ct2",
                make_prompt,
                cpu_ticks,
                steal_share,
            )
            cap = ct2.isa_env.get("CT2_FORCE_CPU_ISA")
            where = f"pid {ct2.pid}" + (f", CT2_FORCE_CPU_ISA={cap}" if cap else "")
            log(f"  CTranslate2 {ct2.compute_type} in its own process ({where})")
        except ImportError:
            log("  ctranslate2 is not installed (pip install -e '.[dev]'): no int8 baseline")
    try:
        svc = asyncio.run(run_service(args, raw_before, raw_model, ct2, workdir))
    finally:
        if ct2 is not None:
            ct2.close()
    if args.int8:
        svc["accuracy"], svc["memory"] = acc, mem
    log("3. raw generate() again, service stopped")
    raw_after = raw_model.measure([1, 32], 1 if args.quick else 2)
    # The machine may have been busier during one raw run than another: the ratios use the
    # fastest (hardest) baseline of all, and the drift says how noisy the run was.
    raw = {}
    for b in sizes:
        runs = [r[b] for r in (raw_stock, raw_before, raw_after) if b in r]
        raw[b] = dict(max(runs, key=lambda r: r["tok_s"]))
    drift = {b: round(v["tok_s"] / raw_before[b]["tok_s"], 3) for b, v in raw_after.items()}
    log(f"  raw drift (after / before tok/s): {drift}")
    if any(abs(d - 1) > 0.15 for d in drift.values()):
        log(
            "  WARNING: the raw baseline moved by more than 15% during the run: the machine "
            "was busy; ratios are less reliable"
        )
    checks = report(raw, raw_stock, svc, args)
    results = {
        "machine": {**cpu_description(), "threads": args.threads},
        "new_tokens": args.new_tokens,
        "levels": args.levels,
        "duration_s": args.duration,
        "raw": raw,
        "raw_stock": raw_stock,
        "raw_before": raw_before,
        "raw_after": raw_after,
        "raw_drift": drift,
        "service": svc,
        **checks,
        "elapsed_s": round(time.monotonic() - STARTED, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(results), indent=2, default=str))
    plot(raw, raw_stock, svc, args.plot)
    print(f"\nwrote {args.out} and {args.plot} in {results['elapsed_s']} s")


if __name__ == "__main__":
    main()
