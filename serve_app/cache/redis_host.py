"""The RedisHost deployment: one embedded redis-server for the whole application.

Used only when no Redis is configured. Every Ingress replica asks this deployment for the URL,
so they share one cache (entries, single-flight, invalidation) instead of one each, and the
cache outlives any Ingress replica. Being a deployment of the app, it shows in the dashboard and
goes away with `serve shutdown` / the application. The server listens on loopback only: it is
for one machine; a multi-node cluster names a real Redis (`configs/cluster.yaml` requires it).
"""

from __future__ import annotations

from ray import serve

from serve_app.cache.embedded_redis import EmbeddedRedis


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=1000,
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=5,
)
class RedisHost:
    def __init__(self, maxmemory: str = "256mb") -> None:
        self.server = EmbeddedRedis(maxmemory)
        self.server.start()

    async def url(self) -> str:
        return self.server.url

    def check_health(self) -> None:
        """A redis-server that died fails the check: Serve replaces this replica, whose new
        server the Ingress replicas find by asking `url` again."""
        process = self.server.process
        if process is None or process.poll() is not None:
            raise RuntimeError("the embedded redis-server has exited")

    def __del__(self) -> None:
        if getattr(self, "server", None) is not None:
            self.server.stop()
