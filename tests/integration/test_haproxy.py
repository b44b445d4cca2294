"""The optional HAProxy deployment (docs/deployment.md, "Behind HAProxy"): with
RAY_SERVE_ENABLE_HA_PROXY=1 an HAProxy of the app's own answers on the config's HTTP port and
the service behaves as behind Serve's Python proxy: generations, JSON errors, health.

Module-scoped, and named to run before test_http_api.py, so this app is gone before the
session app starts."""

from pathlib import Path

import pytest

from tests.conftest import ROOT, descendant_commands, start_app, stop_app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def haproxy_app(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("haproxy")
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    proc, app = start_app(ROOT / "configs" / "tiny.yaml", workdir, None, env=env)
    try:
        yield proc, app
    finally:
        stop_app(proc)


def test_haproxy_serves_the_app(haproxy_app):
    proc, app = haproxy_app
    # HAProxy really is in front: its process runs a config of this app's own (not Ray's
    # shared default path) that binds the app's port.
    haproxies = [
        cmd.split(b"\0") for cmd in descendant_commands(proc.pid).values() if b"/haproxy\0" in cmd
    ]
    (config,) = {Path(args[args.index(b"-f") + 1].decode()) for args in haproxies}
    assert not str(config).startswith("/tmp/haproxy-serve/")
    port = app.base_url.rsplit(":", 1)[1]
    assert f":{port}" in config.read_text()
    with app.client() as client:
        assert client.get("/livez").status_code == 200
        health = client.get("/healthz")
        answer = client.post("/generate", json={"prompts": ["behind haproxy"], "max_new_tokens": 4})
        bad = client.post("/generate", json={"prompts": ["x"], "temperature": 99})
    assert health.status_code == 200 and health.json()["generator"]["status"] == "ok"
    assert answer.status_code == 200
    assert 0 < answer.json()[0]["usage"]["completion_tokens"] <= 4
    assert bad.status_code == 422
    assert bad.headers["content-type"].startswith("application/json")
    assert bad.json()["error"]["type"]
