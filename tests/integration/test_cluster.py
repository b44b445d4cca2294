"""configs/cluster.yaml on a real two-node Ray cluster (two raylets on this machine), with a
shared Redis and PostgreSQL: replicas on both nodes, a proxy on each, the Generator scaling out
under load, the worker node's raylet SIGKILLed mid-load, zero acknowledged rows lost, and the
Generator scaling back in once idle.

Marked `cluster`; needs PostgreSQL (TEST_POSTGRES_URL), as CI provides. The config is the
shipped one made machine-sized (`small_cluster_config`): 6 clients of a tiny model ask for 3
Generator replicas.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import yaml

from deploy.local_cluster import LocalCluster, small_cluster_config
from tests.conftest import (
    POSTGRES_URL,
    ROOT,
    RunningApp,
    apply_ray_env,
    free_port,
    private_postgres_database,
)
from tests.integration.test_durability import _wait, stored_texts

pytestmark = [
    pytest.mark.integration,
    pytest.mark.cluster,
    pytest.mark.skipif(
        not POSTGRES_URL, reason="needs PostgreSQL shared by both nodes: set TEST_POSTGRES_URL"
    ),
]
STARTUP_TIMEOUT_S = 240
RECOVERY_LIMIT_S = 60
DOWNSCALE_LIMIT_S = 180
CLIENTS = 6


class ClusterApp(RunningApp):
    def __init__(self, cluster: LocalCluster, port: int, database_url: str) -> None:
        super().__init__(f"http://127.0.0.1:{port}", Path(), None, Path(), database_url)
        self.cluster = cluster

    def replicas(self, deployment: str) -> list[dict]:
        return self.cluster.running_replicas(deployment)

    def replica_nodes(self, deployment: str) -> set[str]:
        return {r["node_id"] for r in self.replicas(deployment)}

    def nodes(self) -> dict[str, dict]:
        r = httpx.get(f"{self.cluster.dashboard_url}/api/v0/nodes", timeout=10)
        return {n["node_id"]: n for n in r.json()["data"]["result"]["result"]}


@pytest.fixture(scope="module")
def cluster_app(tmp_path_factory, redis_server) -> Iterator[ClusterApp]:
    workdir = tmp_path_factory.mktemp("cluster")
    with ExitStack() as stack:
        database_url = stack.enter_context(private_postgres_database("test_cluster"))
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        env.update(REDIS_URL=redis_server.url, DATABASE_URL=database_url, HF_HUB_OFFLINE="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        apply_ray_env(env)
        cluster = LocalCluster.fresh(head_cpus=2, worker_cpus=2)
        stack.callback(cluster.destroy)
        cluster.start(env)
        port = free_port()
        config = workdir / "cluster.yaml"
        # A target of 1 makes the 6 clients ask for all 3 replicas, so the scale-out reaches the
        # worker node whichever node the first added replica lands on.
        config.write_text(yaml.safe_dump(small_cluster_config(port, target_ongoing_requests=1)))
        cluster.serve("deploy", str(config), env=env)
        app = ClusterApp(cluster, port, database_url)
        _wait(lambda: _healthy(app.base_url), STARTUP_TIMEOUT_S, "the app on the cluster")
        yield app


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/healthz", timeout=5).json()["status"] == "ok"
    except (httpx.HTTPError, ValueError, KeyError):
        return False


class TimedLoad:
    """Clients sending unique prompts back to back; every outcome kept with its time, transport
    errors included (a status the test never saw is a failure too)."""

    def __init__(self, app: ClusterApp, clients: int) -> None:
        self.app = app
        self.outcomes: list[tuple[float, int | str, list[dict]]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(k,)) for k in range(clients)]

    def _run(self, k: int) -> None:
        with self.app.client() as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                body = {"prompts": [f"node loss {k} {n} {uuid.uuid4().hex}"], "max_new_tokens": 8}
                try:
                    r = client.post("/generate", json=body)
                    outcome = (r.status_code, r.json() if r.status_code == 200 else [])
                except httpx.HTTPError as exc:
                    outcome = (type(exc).__name__, [])
                with self.lock:
                    self.outcomes.append((time.monotonic(), *outcome))

    def statuses_since(self, t: float) -> list[int | str]:
        with self.lock:
            return [status for at, status, _ in self.outcomes if at >= t]

    def answered(self) -> dict[str, str]:
        with self.lock:
            recs = [rec for _, status, recs in self.outcomes if status == 200 for rec in recs]
        return {rec["id"]: rec["generated_text"] for rec in recs}

    def __enter__(self) -> TimedLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=150)


def test_replicas_on_both_nodes_and_a_proxy_on_each(cluster_app: ClusterApp) -> None:
    nodes = cluster_app.nodes()
    assert len(nodes) == 2 and all(n["state"] == "ALIVE" for n in nodes.values())
    # The app answers once one replica of each deployment runs; the second may still start.
    for deployment in ("Ingress", "Persistence"):
        _wait(
            lambda d=deployment: cluster_app.replica_nodes(d) == set(nodes),
            90,
            f"{deployment} replicas on both nodes",
        )
    worker_proxy = f"http://127.0.0.1:{cluster_app.cluster.worker_proxy_port}"
    # Serve starts a node's proxy and hands it the routes after the head's app is up: wait.
    _wait(lambda: _healthy(worker_proxy), 60, "the worker node's proxy to serve the app")
    health = httpx.get(f"{cluster_app.base_url}/healthz", timeout=5).json()
    assert health["redis"]["mode"] == "external"
    assert health["database"]["backend"] == "postgresql"


def test_node_loss_under_load_and_autoscaling(cluster_app: ClusterApp) -> None:
    """Scale out under load; SIGKILL the worker raylet; only 200 or 503 meanwhile, the head
    serves everything again within 60 s, every acknowledged row is in PostgreSQL; idle, the
    Generator scales back in to one replica within about 3 minutes."""
    cluster = cluster_app.cluster
    head = next(i for i, n in cluster_app.nodes().items() if n["is_head_node"])

    with TimedLoad(cluster_app, CLIENTS) as load:
        _wait(lambda: len(cluster_app.replicas("Generator")) >= 2, 90, "a Generator scale-out")
        # Serve's SPREAD placement is best effort: the first added replica may join the initial
        # one on its node, the next goes to the other. The worker must hold one when it dies.
        _wait(
            lambda: len(cluster_app.replica_nodes("Generator")) == 2,
            90,
            "the scaled-out Generator on both nodes",
        )
        peak = len(cluster_app.replicas("Generator"))
        _wait(lambda: len(load.answered()) >= 30, 60, "answers before the node dies")

        killed_at = time.monotonic()
        os.kill(cluster.raylet_pid(cluster.worker), signal.SIGKILL)

        def recovered() -> bool:
            recent = load.statuses_since(time.monotonic() - 5)
            every_deployment_on_head = all(
                cluster_app.replica_nodes(d) == {head}
                for d in ("Ingress", "Persistence", "Generator")
            )
            return every_deployment_on_head and len(recent) >= 5 and set(recent) == {200}

        _wait(recovered, RECOVERY_LIMIT_S + 30, "the service back on the head node")
        recovery_s = time.monotonic() - killed_at
        # Still under load, the lost capacity comes back on the head: scale-in is measurable.
        _wait(lambda: len(cluster_app.replicas("Generator")) >= 2, 90, "a scale-out on the head")
    assert not any(t.is_alive() for t in load.threads), "a client request hung"

    statuses = [status for _, status, _ in load.outcomes]
    assert set(statuses) <= {200, 503}, sorted({str(s) for s in statuses})
    assert recovery_s <= RECOVERY_LIMIT_S, f"back on the head node after {recovery_s:.0f} s"
    answered = load.answered()
    stored = stored_texts(cluster_app, list(answered))
    missing = sorted(set(answered) - set(stored))
    assert not missing, f"{len(missing)} acknowledged rows are not in PostgreSQL: {missing[:5]}"
    assert stored == answered

    idle_from = time.monotonic()
    _wait(lambda: len(cluster_app.replicas("Generator")) == 1, DOWNSCALE_LIMIT_S, "a scale-in")
    print(
        f"cluster: Generator on {peak} replicas across both nodes; worker node killed, back on "
        f"the head in {recovery_s:.0f} s; {len(answered)} rows acknowledged and stored, "
        f"{statuses.count(503)} requests got 503; scaled in to 1 after "
        f"{time.monotonic() - idle_from:.0f} s idle"
    )


def test_a_deploy_without_redis_fails_with_a_message_naming_it(cluster_app, tmp_path) -> None:
    """Runs last: it replaces the application. REDIS_URL blanked for the app (its
    runtime_env), so `multi_node` must refuse to build it and say why in `serve status`."""
    spec = small_cluster_config(free_port())
    spec["applications"][0]["runtime_env"] = {"env_vars": {"REDIS_URL": ""}}
    config = tmp_path / "no_redis.yaml"
    config.write_text(yaml.safe_dump(spec))
    cluster_app.cluster.serve("deploy", str(config))

    def failed() -> dict | None:
        (app,) = cluster_app.cluster.serve_details()["applications"].values()
        return app if app["status"] == "DEPLOY_FAILED" else None

    _wait(failed, 120, "the deploy to fail")
    message = failed()["message"]
    assert "multi_node is set" in message and "REDIS_URL" in message, message
