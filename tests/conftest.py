"""Shared fixtures. Integration fixtures start real things: a redis-server the tests own, and
the real application under `serve run` on a free port, driven over HTTP."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from serve_app.cache.embedded_redis import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 240
# Set (e.g. by .ci/run when a server answers) to also run the persistence tests on PostgreSQL.
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL")
needs_postgres = pytest.mark.skipif(not POSTGRES_URL, reason="TEST_POSTGRES_URL not set")


async def _postgres_admin(sql: str) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url

    base = make_url(POSTGRES_URL)
    conn = await asyncpg.connect(
        host=base.host,
        port=base.port or 5432,
        user=base.username,
        password=base.password,
        database=base.database,
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def private_postgres_database(prefix: str) -> Iterator[str]:
    """A database of its own on the TEST_POSTGRES_URL server, dropped afterwards, so parallel
    runs and other suites never collide; yields its SQLAlchemy URL."""
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    asyncio.run(_postgres_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server owned by the test session (never the machine's 6379)."""
    with EmbeddedRedis() as server:
        yield server


class RunningApp:
    def __init__(
        self,
        base_url: str,
        db_path: Path,
        redis_url: str | None,
        log: Path,
        database_url: str = "",
        pid: int = 0,
    ) -> None:
        self.base_url = base_url
        self.db_path = db_path  # the SQLite file, unless database_url names another database
        self.redis_url = redis_url
        self.log = log
        self.database_url = database_url
        self.pid = pid  # of `serve run`; Ray's processes are its descendants

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=120, **kwargs)


def apply_ray_env(env: MutableMapping[str, str]) -> None:
    """Add the local Ray cluster's environment from configs/ray.env to `env`, as `make run`
    does: a value `env` already holds wins."""
    for line in (ROOT / "configs" / "ray.env").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            env.setdefault(key.strip(), value.strip())


def haproxy_env() -> dict[str, str]:
    """The environment that isolates one cluster's HAProxy (RAY_SERVE_ENABLE_HA_PROXY=1): its
    files in a directory of its own; its stats and metrics ports, its replicas' direct HTTP
    ports and its fallback proxy's ports free ones. Ray's defaults are shared paths under /tmp
    and fixed ports, which a second cluster on the host fails to bind or, for the fallback
    proxy, sends to the first one's. The directory is short (Ray adds the node id to it, and
    a unix socket's path is at most 97 bytes for HAProxy)."""
    files = Path(tempfile.mkdtemp(prefix="hap-", dir="/tmp"))
    direct = free_port()
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(files / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(files / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(files),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(files / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(direct),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(direct + 100),
        # HAProxy's backup server: Serve's Python proxy on a fixed port (8500), where another
        # cluster's answers whenever this one's Ingress is marked down.
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
    }


# HAProxy's private directory per `serve run` pid, removed by stop_app.
_HAPROXY_FILES: dict[int, Path] = {}


# The app's own settings: a test sets them explicitly, never inherits them.
_APP_ENV = (
    "REDIS_URL",
    "DATABASE_URL",
    "RAY_ADDRESS",
    "CACHE_ADMIN_TOKEN",
    "API_KEYS",
    "ADMIN_API_KEYS",
    "RATE_LIMIT",
)


def start_app(
    config: Path,
    workdir: Path,
    redis_url: str | None,
    database_url: str | None = None,
    env: dict[str, str] | None = None,
    **overrides,
) -> tuple:
    """`serve run` a copy of `config` on a free HTTP port and wait until it is healthy;
    returns (process, app).

    The database is a fresh SQLite file in `workdir` unless `database_url` names another;
    `env` adds environment variables (API_KEYS, RATE_LIMIT, ...)."""
    proc, app = launch_app(config, workdir, redis_url, database_url, env, **overrides)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stop_app(proc)
            raise RuntimeError(f"serve run exited early:\n{app.log.read_text()[-4000:]}")
        try:
            r = httpx.get(f"{app.base_url}/healthz", timeout=5)
            body = r.json()
            last = body
            if (
                r.status_code == 200
                and body["generator"]["status"] == "ok"
                and (body["database"]["status"] == "ok")
            ):
                return proc, app
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(1)
    stop_app(proc)
    raise RuntimeError(
        f"app not healthy in {STARTUP_TIMEOUT_S}s ({last}):\n{app.log.read_text()[-4000:]}"
    )


def launch_app(
    config: Path,
    workdir: Path,
    redis_url: str | None,
    database_url: str | None = None,
    env: dict[str, str] | None = None,
    **overrides,
) -> tuple:
    """`serve run` a copy of `config` on a free HTTP port, without waiting for it."""
    extra_env = env or {}
    spec = yaml.safe_load(config.read_text())
    port = free_port()
    spec["http_options"] = {"host": "127.0.0.1", "port": port}
    app_args = spec["applications"][0]["args"]
    if redis_url and "cache" not in overrides and "cache" in app_args:
        # Apps of several modules share the session's redis-server: each gets a key prefix
        # of its own, so one app's entries never show up in another's assertions.
        cache = app_args["cache"]
        overrides["cache"] = {**cache, "prefix": f"{cache.get('prefix', 'app')}-{workdir.name}"}
    app_args.update(overrides)
    db_path = workdir / "app.db"
    cfg = workdir / "serve_config.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k not in _APP_ENV}
    env.update(extra_env)
    env["DATABASE_URL"] = database_url or f"sqlite+aiosqlite:///{db_path}"
    env["HF_HUB_OFFLINE"] = "1"
    env["RAY_ADDRESS"] = "local"  # a private cluster, never one the developer is running
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    apply_ray_env(env)
    files = None
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        isolation = haproxy_env()
        env.update(isolation)
        files = Path(isolation["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
    if redis_url:
        env["REDIS_URL"] = redis_url
    log = workdir / "serve.log"
    serve_bin = Path(sys.executable).parent / "serve"
    proc = subprocess.Popen(
        [str(serve_bin), "run", str(cfg)],
        cwd=workdir,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    if files:
        _HAPROXY_FILES[proc.pid] = files
    app = RunningApp(
        f"http://127.0.0.1:{port}", db_path, redis_url, log, env["DATABASE_URL"], proc.pid
    )
    return proc, app


def descendants(root: int) -> list[int]:
    """Every process below `root` (for `serve run`: Ray's daemons and the replicas), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def descendant_commands(root: int) -> dict[int, bytes]:
    """The command line (NUL-separated, as /proc has it) of every process below `root`; a
    process gone meanwhile is left out."""
    commands = {}
    for pid in descendants(root):
        try:
            commands[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
    return commands


def stop_app(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # serve run shuts Serve and its local Ray down
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    files = _HAPROXY_FILES.pop(proc.pid, None)
    if files:
        shutil.rmtree(files, ignore_errors=True)


ADMIN_TOKEN = "test-admin-token"  # enables DELETE /cache on the session app


@pytest.fixture(scope="session")
def tiny_app(tmp_path_factory, redis_server):
    """The real app from configs/tiny.yaml, started once per test session."""
    workdir = tmp_path_factory.mktemp("tiny-app")
    config = ROOT / "configs" / "tiny.yaml"
    cache = yaml.safe_load(config.read_text())["applications"][0]["args"]["cache"]
    proc, app = start_app(
        config, workdir, redis_server.url, cache={**cache, "admin_token": ADMIN_TOKEN}
    )
    try:
        yield app
    finally:
        stop_app(proc)
