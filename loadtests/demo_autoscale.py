"""Autoscaling made visible: ramp load up and down on the local two-node cluster and plot users,
Generator replicas, p50 latency and tok/s over time (never collected by pytest).

    make demo-autoscale      # needs REDIS_URL and DATABASE_URL (PostgreSQL)

Starts a local cluster (deploy/local_cluster.py) unless `make cluster-up` already did, deploys
configs/cluster.yaml made machine-sized (a tiny model; see `small_cluster_config`), drives it
with a locust load shape, polls the replica count from Serve's REST API every 2 s, and writes
docs/img/autoscale.png and docs/autoscale.csv (5 s buckets).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import gevent
import yaml
from locust import HttpUser, LoadTestShape, constant, task
from locust.env import Environment

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from deploy.local_cluster import STATE_DIR, LocalCluster, free_port, small_cluster_config  # noqa: E402

# (until_s, users): up in steps, hold, down in steps, then idle long enough for the scale-in.
STAGES = [(30, 1), (60, 3), (90, 6), (150, 9), (180, 4), (200, 1), (330, 0)]
BUCKET_S = 5
MAX_NEW_TOKENS = 32
SAMPLES: list[tuple[float, float, int]] = []  # (finished at, latency s, completion tokens)
FAILURES: list[tuple[float, str]] = []  # (at, status and error type)


class RampShape(LoadTestShape):
    def tick(self) -> tuple[int, float] | None:
        elapsed = self.get_run_time()
        for until_s, users in STAGES:
            if elapsed < until_s:
                return users, 10
        return None


class DemoUser(HttpUser):
    wait_time = constant(0)

    @task
    def generate(self) -> None:
        body = {"prompts": [f"autoscale {time.time_ns()}"], "max_new_tokens": MAX_NEW_TOKENS}
        started = time.monotonic()
        with self.client.post("/generate", json=body, catch_response=True) as r:
            if r.status_code == 200:
                tokens = sum(rec["usage"]["completion_tokens"] for rec in r.json())
                SAMPLES.append((time.monotonic(), time.monotonic() - started, tokens))
            else:
                try:
                    kind = r.json()["error"]["type"]
                except (ValueError, KeyError, TypeError):
                    kind = "no JSON error"
                FAILURES.append((time.monotonic(), f"{r.status_code} {kind}"))
                r.failure(f"{r.status_code}")


def poll_replicas(cluster: LocalCluster, started: float, out: list[tuple[float, int]]) -> None:
    while True:
        try:
            out.append((time.monotonic() - started, len(cluster.running_replicas("Generator"))))
        except Exception:  # the dashboard is busy: skip this sample
            pass
        gevent.sleep(2)


def wait_healthy(base_url: str, timeout_s: float = 240) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=5).json().get("status") == "ok":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(2)
    raise SystemExit(f"the app at {base_url} did not become healthy in {timeout_s:.0f} s")


def buckets(started: float, users: list[tuple[float, int]], replicas: list[tuple[float, int]]):
    end = max([t for t, _ in users] + [t for t, _ in replicas] + [0.0])
    rows = []
    for lo in range(0, int(end) + 1, BUCKET_S):
        hi = lo + BUCKET_S
        done = [(lat, tok) for at, lat, tok in SAMPLES if lo <= at - started < hi]
        fails = sum(lo <= at - started < hi for at, _ in FAILURES)
        n_users = [u for t, u in users if lo <= t < hi]
        n_repl = [r for t, r in replicas if lo <= t < hi]
        rows.append(
            {
                "t_s": lo,
                "users": max(n_users, default=0),
                "generator_replicas": max(n_repl, default=""),
                "p50_ms": round(statistics.median(lat for lat, _ in done) * 1000) if done else "",
                "tok_s": round(sum(tok for _, tok in done) / BUCKET_S, 1),
                "requests": len(done),
                "errors": fails,
            }
        )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] for r in rows]
    fig, (top, mid, low) = plt.subplots(3, 1, sharex=True, figsize=(9, 7))
    top.step(t, [r["users"] for r in rows], where="post", label="users")
    top.step(
        t,
        [r["generator_replicas"] or None for r in rows],
        where="post",
        label="Generator replicas",
    )
    top.set_ylabel("count")
    top.legend(loc="upper right")
    mid.plot(t, [r["p50_ms"] or None for r in rows], color="tab:red")
    mid.set_ylabel("p50 latency (ms)")
    low.plot(t, [r["tok_s"] for r in rows], color="tab:green")
    low.set_ylabel("tok/s")
    low.set_xlabel("seconds")
    fig.suptitle("Generator autoscaling on two local raylets (tiny model, 2 shared cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "autoscale.png")
    parser.add_argument("--csv", type=Path, default=ROOT / "docs" / "autoscale.csv")
    opts = parser.parse_args()

    started_here = not (STATE_DIR / "cluster.json").exists()
    cluster = LocalCluster.fresh() if started_here else LocalCluster.load()
    if started_here:
        cluster.save()
        print(f"starting a local cluster in {cluster.temp_dir}")
        cluster.start()
    try:
        port = free_port()
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as cfg:
            yaml.safe_dump(small_cluster_config(port), cfg)
        cluster.serve("deploy", cfg.name)
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url)
        # Replicas from an earlier run must be gone: start from the minimum.
        while len(cluster.running_replicas("Generator")) > 1:
            time.sleep(2)

        env = Environment(user_classes=[DemoUser], shape_class=RampShape(), host=base_url)
        runner = env.create_local_runner()
        started = time.monotonic()
        replicas: list[tuple[float, int]] = []
        users: list[tuple[float, int]] = []
        poller = gevent.spawn(poll_replicas, cluster, started, replicas)
        runner.start_shape()
        while runner.state not in ("stopped", "ready") or time.monotonic() - started < 5:
            users.append((time.monotonic() - started, runner.user_count))
            gevent.sleep(1)
            if time.monotonic() - started > STAGES[-1][0] + 30:
                break
        runner.quit()
        poller.kill()
    finally:
        if started_here:
            cluster.destroy()
            (STATE_DIR / "cluster.json").unlink(missing_ok=True)

    rows = buckets(started, users, replicas)
    opts.csv.parent.mkdir(parents=True, exist_ok=True)
    with opts.csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, opts.png)
    peak = max((r for _, r in replicas), default=0)
    print(f"{'t_s':>5} {'users':>5} {'repl':>4} {'p50_ms':>7} {'tok/s':>7} {'err':>4}")
    for r in rows[::2]:
        print(
            f"{r['t_s']:>5} {r['users']:>5} {r['generator_replicas']!s:>4} "
            f"{r['p50_ms']!s:>7} {r['tok_s']:>7} {r['errors']:>4}"
        )
    final = replicas[-1][1] if replicas else "?"
    kinds = Counter(kind for _, kind in FAILURES)
    print(f"Generator replicas: 1 -> peak {peak} -> {final} at the end; errors: {dict(kinds)}")
    print(f"wrote {opts.png} and {opts.csv}")


if __name__ == "__main__":
    main()
