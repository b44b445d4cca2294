"""With no Redis configured the app starts its own real redis-server and caches through it.

Module-scoped, and named to run before test_http_api.py, so this second app is gone before
the session app starts (two Ray clusters at once would crowd a 2-core machine)."""

import uuid

import pytest

from tests.conftest import ROOT, start_app, stop_app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded_app(tmp_path_factory):
    proc, app = start_app(ROOT / "configs" / "tiny.yaml", tmp_path_factory.mktemp("embedded"), None)
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
