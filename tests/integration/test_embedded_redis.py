"""With no Redis configured the app starts one real redis-server (its RedisHost deployment),
and every Ingress replica caches through it: one generation per deterministic request across
replicas, and the cache outlives the Ingress replicas.

Module-scoped, and named to run before test_http_api.py, so this second app is gone before
the session app starts (two Ray clusters at once would crowd a 2-core machine)."""

import os
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from tests.conftest import ROOT, start_app, stop_app
from tests.integration.test_durability import _wait, replica_pids

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded_app(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("embedded")
    spec = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    spec["applications"][0]["deployments"].append({"name": "Ingress", "num_replicas": 2})
    config = workdir / "two_ingress.yaml"
    config.write_text(yaml.safe_dump(spec))
    proc, app = start_app(config, workdir, None)
    try:
        yield app
    finally:
        stop_app(proc)


def test_embedded_redis_serves_the_cache(embedded_app):
    with embedded_app.client() as client:
        health = client.get("/healthz").json()
        assert health["redis"] == {"status": "ok", "mode": "embedded", "breaker": "closed"}
        body = {"prompts": [f"embedded {uuid.uuid4().hex}"], "max_new_tokens": 4}
        first = client.post("/generate", json=body).json()[0]
        second = client.post("/generate", json=body).json()[0]
        # no admin token configured: invalidation is switched off, whatever the caller sends
        denied = client.delete("/cache", headers={"authorization": "Bearer anything"})
    assert first["cached"] is False and second["cached"] is True
    assert first["generated_text"] == second["generated_text"]
    assert denied.status_code == 403
    assert denied.json()["error"]["type"] == "forbidden"


def test_ingress_replicas_share_one_embedded_redis_that_outlives_them(embedded_app):
    """Two Ingress replicas: identical requests sent together generate once. Then every Ingress
    replica is killed (their in-process L1s die with them): the new replicas still answer
    from the cache, which only a Redis outside them can hold."""
    assert len(replica_pids(embedded_app, "Ingress")) == 2
    assert len(replica_pids(embedded_app, "RedisHost")) == 1
    body = {"prompts": [f"shared {uuid.uuid4().hex}"], "max_new_tokens": 6}

    def send(_: int) -> dict:
        with embedded_app.client() as client:  # a connection each: the proxy spreads them
            r = client.post("/generate", json=body)
            assert r.status_code == 200, r.text
            return r.json()[0]

    with ThreadPoolExecutor(8) as pool:
        records = list(pool.map(send, range(16)))
    assert [r["cached"] for r in records].count(False) == 1
    assert len({r["generated_text"] for r in records}) == 1

    old = replica_pids(embedded_app, "Ingress")
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    _wait(lambda: len(replica_pids(embedded_app, "Ingress") - old) == 2, 90, "new Ingress replicas")
    with embedded_app.client() as client:
        _wait(lambda: client.get("/livez").status_code == 200, 60, "the new Ingress replicas")
        after = [client.post("/generate", json=body).json()[0] for _ in range(4)]
        health = client.get("/healthz").json()
    assert all(r["cached"] for r in after), after
    assert {r["generated_text"] for r in after} == {records[0]["generated_text"]}
    assert health["redis"]["mode"] == "embedded"


def test_ingress_follows_a_replaced_redis_host(embedded_app):
    """The RedisHost replica dies with its server; Serve starts another on a new port, and the
    Ingress replicas ask for the new address once their connection fails."""
    (old,) = replica_pids(embedded_app, "RedisHost")
    os.kill(old, signal.SIGKILL)
    _wait(lambda: replica_pids(embedded_app, "RedisHost") - {old}, 90, "a new RedisHost replica")
    with embedded_app.client() as client:

        def redis_ok() -> bool:
            return client.get("/healthz").json()["redis"]["status"] == "ok"

        _wait(redis_ok, 60, "the cache on the new redis-server")
        # The old server is gone, so every replica answering "ok" talks to the new one.
        _wait(lambda: all(redis_ok() for _ in range(10)), 30, "every replica reconnected")
        body = {"prompts": [f"moved {uuid.uuid4().hex}"], "max_new_tokens": 4}
        first, second = (client.post("/generate", json=body).json()[0] for _ in range(2))
    assert (first["cached"], second["cached"]) == (False, True)
