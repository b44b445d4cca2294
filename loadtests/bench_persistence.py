"""Persistence benchmark: write throughput through the Persistence deployment, and history pages
on a 1,000,000-row table. Prints a table with the targets and writes JSON.

    make bench-persistence            # or: .venv/bin/python loadtests/bench_persistence.py

1. Writes. A local Ray cluster runs the real `Persistence` deployment (the app's default options)
   on a fresh SQLite file (WAL, synchronous=FULL) on disk. 64 writer tasks in the driver each
   record one row at a time, back to back, for `--seconds`, through the ingress's own client
   (`HandleBackend.record`). Three modes, side by side in the same run, each on a fresh file:
   - `per_row`, the baseline: group commit off at both levels. Every row is its own handle call
     and its own transaction (one fsync each): a deployment that commits each row on its own.
   - `group`, the product: rows of concurrent callers share a handle call (ingress side) and
     the deployment commits everything pending in one transaction (`group_commit: true`).
   - `per_txn`, for reference: shared handle calls, but `group_commit: false` commits every row
     alone. It isolates what the transaction grouping alone buys.
   Every acknowledged id is then checked to be in the file with the text the writer got.
2. History. A 1,000,000-row table (migrated by the app's Alembic scripts, then bulk-loaded; kept
   in --workdir and reused) serves pages of 50, newest first: the first page and a page near the
   end (via a cursor), unfiltered and filtered by user, model and time window. Each case is
   timed through the Persistence deployment and directly on the Store.

Never collected by pytest; no timed assertions anywhere. Targets are checked here, in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import time
import uuid
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serve_app.domain import Generation  # noqa: E402
from serve_app.storage.store import Store, encode_cursor  # noqa: E402

TARGET_ROWS_PER_S = 2000
TARGET_RATIO = 10.0
TARGET_PAGE_P50_MS = 20.0
PAGE = 50
MODELS = [("gpt2", 0.60), ("distilgpt2", 0.25), ("gpt2-medium", 0.10), ("tiny-a", 0.05)]
USERS = 1000


# (name, group commit in the deployment, rows of concurrent callers share a handle call)
WRITE_MODES = (
    ("per_row", False, False),  # the baseline: every row its own call and its own transaction
    ("per_txn", False, True),  # reference: shared calls, but every row its own transaction
    ("group", True, True),  # the product: group commit at both levels
)


def _row(writer: int, n: int) -> Generation:
    prompt = f"writer {writer} prompt {n} {uuid.uuid4().hex[:8]}"
    return Generation(
        prompt=prompt,
        completion=" and then the model went on for a while" * 3,
        model="gpt2",
        model_source="openai-community/gpt2",
        model_revision="607a30d",
        params={"max_new_tokens": 32, "temperature": 0.0},
        user_id=f"user-{writer:04d}",
        cached=False,
        prompt_tokens=9,
        completion_tokens=32,
        latency_ms=41.5,
    )


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ------------------------------------------------------------------------------------ writes


def _deploy(name: str, url: str, user_config: dict[str, Any]):
    from ray import serve

    from serve_app.app import DEFAULT_DEPLOYMENT_OPTIONS
    from serve_app.storage.persistence import Persistence

    options = {**DEFAULT_DEPLOYMENT_OPTIONS["Persistence"], "user_config": user_config}
    return serve.run(Persistence.options(**options).bind(url), name=name, route_prefix=None)


async def _write_load(handle, writers: int, seconds: float, coalesce_calls: bool) -> dict[str, Any]:
    from serve_app.http.ingress import HandleBackend

    # The ingress's own path to the deployment: concurrent requests share a handle call, unless
    # `coalesce_calls` is off (then every row is its own call).
    backend = HandleBackend(generator=None, store=handle, write_timeout_s=30.0)  # type: ignore[arg-type]
    backend.recorder.configure(backend.recorder.max_rows, group=coalesce_calls)
    await backend.record([_row(9999, 0)])  # warm: replica up, schema migrated
    latencies: list[float] = []
    acked: list[tuple[str, str]] = []
    deadline = time.perf_counter() + seconds

    async def writer(w: int) -> None:
        n = 0
        while time.perf_counter() < deadline:
            row = _row(w, n)
            started = time.perf_counter()
            [stored] = await backend.record([row])
            latencies.append((time.perf_counter() - started) * 1000)
            acked.append((stored.id, stored.generated_text))
            n += 1

    started = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    elapsed = time.perf_counter() - started
    stats = await handle.stats.remote()
    client = backend.recorder.stats()
    return {
        "rows": len(acked),
        "seconds": round(elapsed, 3),
        "rows_per_s": round(len(acked) / elapsed, 1),
        "call_p50_ms": round(_pct(latencies, 0.50), 2),
        "call_p99_ms": round(_pct(latencies, 0.99), 2),
        "rows_per_transaction": stats["mean_rows_per_write"],
        "largest_transaction": stats["largest_group"],
        "transaction_ms": stats["mean_write_ms"],
        "handle_calls": client["writes"],
        "rows_per_handle_call": client["mean_rows_per_write"],
        "handle_call_ms": client["mean_write_ms"],
        "_acked": acked,
    }


def _check_acked(db: Path, acked: list[tuple[str, str]]) -> int:
    """Every acknowledged id is in the file with the text the writer was given."""
    with closing(sqlite3.connect(db)) as conn:
        stored = dict(conn.execute("SELECT id, generated_text FROM generations"))
    missing = [i for i, text in acked if stored.get(i) != text]
    if missing:
        raise SystemExit(f"{len(missing)} acknowledged rows are missing, e.g. {missing[:3]}")
    return len(acked)


def bench_writes(workdir: Path, writers: int, seconds: float) -> dict[str, Any]:
    from ray import serve

    results: dict[str, Any] = {}
    for mode, group, coalesce in WRITE_MODES:
        db = _fresh(workdir / f"writes-{mode}.db")
        name = f"bench-persistence-{mode}"
        handle = _deploy(
            name, f"sqlite+aiosqlite:///{db}", {"group_commit": group, "max_rows_per_commit": 1024}
        )
        result = asyncio.run(_write_load(handle, writers, seconds, coalesce))
        serve.delete(name)
        result["verified_rows"] = _check_acked(db, result.pop("_acked"))
        results[mode] = result
        print(
            f"  {mode:16s} {result['rows_per_s']:>9.1f} rows/s  "
            f"{result['rows_per_transaction']:>6} rows/txn  p50 {result['call_p50_ms']} ms  "
            f"txn {result['transaction_ms']} ms  handle call {result['handle_call_ms']} ms "
            f"({result['rows_per_handle_call']} rows)",
            flush=True,
        )
    results["ratio"] = round(results["group"]["rows_per_s"] / results["per_row"]["rows_per_s"], 1)
    results["ratio_vs_per_txn"] = round(
        results["group"]["rows_per_s"] / results["per_txn"]["rows_per_s"], 1
    )
    results["in_process"] = asyncio.run(_in_process(workdir, writers, min(seconds, 5.0)))
    return results


async def _in_process(workdir: Path, writers: int, seconds: float) -> dict[str, Any]:
    """For reference, not a target: the same committer on the Store in this process, no Ray, so
    the table shows what the database allows and what the handle round trip costs."""
    out: dict[str, Any] = {}
    for mode, group in (("per_row", False), ("group", True)):
        db = _fresh(workdir / f"writes-inproc-{mode}.db")
        out[mode] = await _in_process_mode(db, writers, seconds, group)
    out["ratio"] = round(out["group"]["rows_per_s"] / out["per_row"]["rows_per_s"], 1)
    return out


async def _in_process_mode(db: Path, writers: int, seconds: float, group: bool) -> dict[str, Any]:
    from serve_app.storage.group_commit import GroupCommitter

    store = Store(f"sqlite+aiosqlite:///{db}")
    await store.start()
    committer = GroupCommitter(store.insert_many, group=group)
    deadline = time.perf_counter() + seconds

    async def writer(w: int) -> int:
        n = 0
        while time.perf_counter() < deadline:
            await committer.submit([_row(w, n)])
            n += 1
        return n

    started = time.perf_counter()
    done = sum(await asyncio.gather(*(writer(w) for w in range(writers))))
    elapsed = time.perf_counter() - started
    await store.close()
    stats = committer.stats()
    return {
        "rows_per_s": round(done / elapsed, 1),
        "rows_per_transaction": stats["mean_rows_per_write"],
        "transaction_ms": stats["mean_write_ms"],
    }


def _fresh(db: Path) -> Path:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    return db


# ----------------------------------------------------------------------------------- history


def _uuid7(ms: int, rng: random.Random) -> str:
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rng.getrandbits(12) << 64
    value |= 0b10 << 62 | rng.getrandbits(62)
    return str(uuid.UUID(int=value))


def build_table(db: Path, rows: int) -> float:
    """Migrate with the app's scripts, then bulk-load `rows` rows spread over 90 days."""
    _fresh(db)
    _migrate(db)
    rng = random.Random(7)
    names, weights = zip(*MODELS, strict=True)
    end = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
    step = timedelta(days=90) / rows
    at = end - timedelta(days=90)
    started = time.perf_counter()
    insert = (
        "INSERT INTO generations (id, created_at, prompt, generated_text, model_name, "
        "model_source, model_revision, params, user_id, cached, prompt_tokens, "
        "completion_tokens, latency_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA synchronous=OFF")  # a fixture, not a system of record
        chunk = 50_000
        for start in range(0, rows, chunk):
            batch = []
            for i in range(start, min(rows, start + chunk)):
                at += step
                ms = int(at.replace(tzinfo=timezone.utc).timestamp() * 1000)
                prompt = f"prompt number {i} about the sea"
                batch.append(
                    (
                        _uuid7(ms, rng),
                        at.strftime("%Y-%m-%d %H:%M:%S.%f"),  # SQLAlchemy's SQLite format
                        prompt,
                        prompt + " and the waves kept coming back to the shore" * 4,
                        rng.choices(names, weights)[0],
                        "openai-community/gpt2",
                        "607a30d",
                        '{"max_new_tokens": 32, "temperature": 0.0}',
                        None if rng.random() < 0.1 else f"user-{rng.randrange(USERS):04d}",
                        int(rng.random() < 0.3),
                        8,
                        32,
                        40.0,
                    )
                )
            with conn:
                conn.executemany(insert, batch)
            print(f"  loaded {start + len(batch):,} rows", end="\r", flush=True)
    print()
    return time.perf_counter() - started


def _migrate(db: Path) -> None:
    store = Store(f"sqlite+aiosqlite:///{db}")
    asyncio.run(store.start())
    asyncio.run(store.close())


def _table_ready(db: Path, rows: int) -> bool:
    if not db.exists():
        return False
    with closing(sqlite3.connect(db)) as conn:
        try:
            return conn.execute("SELECT count(*) FROM generations").fetchone()[0] == rows
        except sqlite3.Error:
            return False


def _cursors_near_the_end(db: Path, where: str, args: tuple, n: int) -> list[str]:
    """Cursors after which at most a page or two remain: the deepest pages of that walk."""
    with closing(sqlite3.connect(db)) as conn:
        oldest = conn.execute(
            f"SELECT created_at, id FROM generations WHERE {where} "
            "ORDER BY created_at ASC, id ASC LIMIT ?",
            (*args, PAGE + 10 + n),
        ).fetchall()
    found = oldest[PAGE + 10 :] or oldest[-1:]
    return [encode_cursor(datetime.fromisoformat(at), row_id) for at, row_id in found]


def _history_cases(db: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    rng = random.Random(11)
    users = [f"user-{rng.randrange(USERS):04d}" for _ in range(20)]
    with closing(sqlite3.connect(db)) as conn:
        newest = conn.execute("SELECT max(created_at) FROM generations").fetchone()[0]
    mid = datetime.fromisoformat(newest) - timedelta(days=45)
    deep_user = [
        {"user_id": u, "cursor": _cursors_near_the_end(db, "user_id = ?", (u,), 1)[0]}
        for u in users
    ]
    return [
        ("first page", [{}]),
        (
            "deep page (~row 999,950)",
            [{"cursor": c} for c in _cursors_near_the_end(db, "1", (), 20)],
        ),
        ("user_id, first page", [{"user_id": u} for u in users]),
        ("user_id, deep page", deep_user),
        ("model, first page", [{"model": "distilgpt2"}]),
        (
            "model, deep page",
            [
                {"model": "distilgpt2", "cursor": c}
                for c in _cursors_near_the_end(db, "model_name = ?", ("distilgpt2",), 20)
            ],
        ),
        ("since/until (1 day), first page", [{"since": mid, "until": mid + timedelta(days=1)}]),
        ("user_id + model, first page", [{"user_id": u, "model": "gpt2"} for u in users]),
        (
            "user_id + model, deep page",
            [
                {
                    "user_id": u,
                    "model": "gpt2",
                    "cursor": _cursors_near_the_end(
                        db, "user_id = ? AND model_name = ?", (u, "gpt2"), 1
                    )[0],
                }
                for u in users
            ],
        ),
    ]


async def _time_queries(call, variants: list[dict[str, Any]], queries: int) -> dict[str, Any]:
    for i in range(10):  # warm-up: connections, page cache
        await call(variants[i % len(variants)])
    times = []
    sizes = set()
    for i in range(queries):
        started = time.perf_counter()
        items, _ = await call(variants[i % len(variants)])
        times.append((time.perf_counter() - started) * 1000)
        sizes.add(len(items))
    return {
        "p50_ms": round(statistics.median(times), 2),
        "p95_ms": round(_pct(times, 0.95), 2),
        "page_sizes": sorted(sizes),
    }


def bench_history(db: Path, queries: int) -> dict[str, Any]:
    from ray import serve

    url = f"sqlite+aiosqlite:///{db}"
    cases = _history_cases(db)
    handle = _deploy("bench-persistence-history", url, {"group_commit": True})

    async def via_deployment(kw: dict[str, Any]):
        return await handle.history.remote(PAGE, **kw)

    async def run_all() -> dict[str, Any]:
        store = Store(url)
        await store.start()

        async def via_store(kw: dict[str, Any]):
            return await store.history(PAGE, **kw)

        out = {}
        try:
            for name, variants in cases:
                out[name] = {
                    "deployment": await _time_queries(via_deployment, variants, queries),
                    "store": await _time_queries(via_store, variants, queries),
                }
                d, s = out[name]["deployment"], out[name]["store"]
                print(
                    f"  {name:32s} deployment p50 {d['p50_ms']:6.2f} ms  "
                    f"store p50 {s['p50_ms']:6.2f} ms",
                    flush=True,
                )
        finally:
            await store.close()
        return out

    try:
        return asyncio.run(run_all())
    finally:
        serve.delete("bench-persistence-history")


# -------------------------------------------------------------------------------------- main


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-results" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "persistence.json")
    parser.add_argument("--skip-writes", action="store_true")
    parser.add_argument("--skip-history", action="store_true")
    ns = parser.parse_args()
    ns.workdir.mkdir(parents=True, exist_ok=True)

    import ray
    from ray import serve

    from tests.conftest import apply_ray_env

    apply_ray_env(os.environ)  # the cluster environment `make run` uses
    # Replicas import serve_app from this checkout, as the driver does.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    serve.start(proxy_location="Disabled")
    report: dict[str, Any] = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {k: str(v) for k, v in vars(ns).items()},
    }
    try:
        if not ns.skip_writes:
            print(f"Writes: {ns.writers} writers x {ns.seconds:g} s per mode", flush=True)
            report["writes"] = bench_writes(ns.workdir, ns.writers, ns.seconds)
        if not ns.skip_history:
            db = ns.workdir / f"history-{ns.rows}.db"
            if _table_ready(db, ns.rows):
                print(f"History: reusing {db}")
                report["table_build_s"] = None
                _migrate(db)  # a table from an older checkout gets the newest indexes
            else:
                print(f"History: building {ns.rows:,} rows in {db}", flush=True)
                report["table_build_s"] = round(build_table(db, ns.rows), 1)
            report["history"] = bench_history(db, ns.queries)
    finally:
        try:
            serve.shutdown()
        except RuntimeError as exc:  # handles bound to the sections' asyncio.run loops, now closed
            print(f"serve.shutdown: {exc} (ignored)")
        ray.shutdown()

    rows: list[tuple[str, str, str, str]] = []
    if "writes" in report:
        w = report["writes"]
        rows += [
            (
                "per-row commit, rows/s",
                f"{w['per_row']['rows_per_s']:.0f}",
                "baseline",
                f"{w['per_row']['rows_per_transaction']} rows/txn",
            ),
            (
                "group commit, rows/s",
                f"{w['group']['rows_per_s']:.0f}",
                f">= {TARGET_ROWS_PER_S}",
                _verdict(w["group"]["rows_per_s"] >= TARGET_ROWS_PER_S),
            ),
            (
                "group / per-row",
                f"{w['ratio']:.1f}x",
                f">= {TARGET_RATIO:g}x",
                _verdict(w["ratio"] >= TARGET_RATIO),
            ),
            (
                "  reference: shared calls, per-row txns",
                f"{w['per_txn']['rows_per_s']:.0f} rows/s",
                "-",
                f"group is {w['ratio_vs_per_txn']:.1f}x",
            ),
        ]
    if "writes" in report:
        ref = report["writes"]["in_process"]
        rows.append(
            (
                "  reference: same, in-process, no Ray",
                f"{ref['per_row']['rows_per_s']:.0f} vs {ref['group']['rows_per_s']:.0f} rows/s",
                "-",
                f"{ref['ratio']:.1f}x",
            )
        )
    for name, result in report.get("history", {}).items():
        d, s = result["deployment"], result["store"]
        rows.append(
            (
                f"history {name}",
                f"{d['p50_ms']:.2f} / {d['p95_ms']:.2f} ms (store {s['p50_ms']:.2f})",
                f"p50 <= {TARGET_PAGE_P50_MS:g} ms",
                _verdict(d["p50_ms"] <= TARGET_PAGE_P50_MS),
            )
        )
    widths = [max(len(r[i]) for r in [("metric", "value", "target", ""), *rows]) for i in range(4)]
    print()
    for r in [("metric", "value", "target", "result"), *rows]:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)))
    report["all_targets_met"] = all(r[3] != "FAIL" for r in rows)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {ns.out}")
    return 0 if report["all_targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
