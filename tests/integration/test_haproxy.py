"""The HTTP front (docs/deployment.md): by default (configs/ray.env) an HAProxy of the app's own
answers on the config's HTTP port; with RAY_SERVE_ENABLE_HA_PROXY=0, as deploy/local_cluster
runs it, Serve's Python proxy does. Either way the service behaves the same: generations,
JSON errors, health.

Module-scoped apps, and named to run before test_http_api.py, so they are gone before the
session app starts."""

from pathlib import Path

import pytest

from tests.conftest import ROOT, descendant_commands, start_app, stop_app

pytestmark = pytest.mark.integration

FRONTS = {"default": {}, "python-proxy": {"RAY_SERVE_ENABLE_HA_PROXY": "0"}}


@pytest.fixture(scope="module", params=list(FRONTS))
def front_app(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(request.param)
    env = FRONTS[request.param]
    proc, app = start_app(ROOT / "configs" / "tiny.yaml", workdir, None, env=env)
    try:
        yield request.param, proc, app
    finally:
        stop_app(proc)


def haproxy_configs(pid: int) -> set[Path]:
    """The config file of every HAProxy process below `serve run`."""
    haproxies = [
        cmd.split(b"\0") for cmd in descendant_commands(pid).values() if b"/haproxy\0" in cmd
    ]
    return {Path(args[args.index(b"-f") + 1].decode()) for args in haproxies}


def test_the_front_serves_the_app(front_app):
    front, proc, app = front_app
    configs = haproxy_configs(proc.pid)
    if front == "default":
        # HAProxy really is in front: it runs a config of this app's own (not Ray's shared
        # default path) that binds the app's port.
        (config,) = configs
        assert not str(config).startswith("/tmp/haproxy-serve/")
        port = app.base_url.rsplit(":", 1)[1]
        assert f":{port}" in config.read_text()
    else:
        assert not configs
    with app.client() as client:
        assert client.get("/livez").status_code == 200
        health = client.get("/healthz")
        answer = client.post("/generate", json={"prompts": ["behind a front"], "max_new_tokens": 4})
        bad = client.post("/generate", json={"prompts": ["x"], "temperature": 99})
    assert health.status_code == 200 and health.json()["generator"]["status"] == "ok"
    assert answer.status_code == 200
    assert 0 < answer.json()[0]["usage"]["completion_tokens"] <= 4
    assert bad.status_code == 422
    assert bad.headers["content-type"].startswith("application/json")
    assert bad.json()["error"]["type"]
