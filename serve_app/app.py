"""The application graph, wired in one place.

`serve run serve_config.yaml` imports `serve_app.app:build_app` and passes the YAML `args:`
block, which Ray validates into `AppArgs` (this module must not use postponed annotations for
that). Deployment defaults live here; the YAML `deployments:` section overrides them.
"""

from typing import Any

from ray.serve import Application

from serve_app.cache.redis_host import RedisHost
from serve_app.config import AppArgs, BatchingConfig, PersistenceTuning, resolve_args
from serve_app.generation.generator import Generator
from serve_app.http.ingress import Ingress
from serve_app.storage.persistence import Persistence
from serve_app.storage.preflight import check_database

# On a 2-core box the ingress and the store are I/O-bound; the generator gets the CPU.
DEFAULT_DEPLOYMENT_OPTIONS: dict[str, dict[str, Any]] = {
    "Ingress": {
        "num_replicas": 1,
        # High: the ingress is async and cheap per request; a lower bound would queue even
        # /livez in the proxy behind a burst. Overload is refused by the generator instead.
        "max_ongoing_requests": 1024,
        "ray_actor_options": {"num_cpus": 0.1},
    },
    "Generator": {
        # One replica already batches everything it holds; a second one on the same cores only
        # splits batches, so it is added when a replica is well past a full batch.
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 48,
        },
        # Above max_batch_size + max_queued_requests (32 + 64): a replica can only batch
        # requests it has been sent, and it refuses the excess itself, fast, with Retry-After.
        "max_ongoing_requests": 128,
        # Ray's own queue in front of the replicas (all at max_ongoing_requests, or starting):
        # bounded too, so overload is refused at once (503) instead of waiting unboundedly.
        "max_queued_requests": 64,
        "ray_actor_options": {"num_cpus": 0.8},
        "user_config": BatchingConfig().model_dump(),
        "health_check_period_s": 10,
    },
    # Only when no Redis is configured: the one embedded redis-server all Ingress replicas share.
    "RedisHost": {"num_replicas": 1},
    "Persistence": {
        "num_replicas": 1,  # SQLite has one writer; group commit makes one replica enough
        "max_ongoing_requests": 512,
        "ray_actor_options": {"num_cpus": 0.1},
        "user_config": PersistenceTuning().model_dump(),
    },
}


def build_app(args: AppArgs) -> Application:
    args = resolve_args(args)
    check_database(args.database_url)  # unusable: DEPLOY_FAILED naming why, no replicas
    generator = Generator.options(**DEFAULT_DEPLOYMENT_OPTIONS["Generator"]).bind(args)
    store = Persistence.options(**DEFAULT_DEPLOYMENT_OPTIONS["Persistence"]).bind(
        args.database_url, args.persistence
    )
    redis_host = None
    if args.needs_redis and args.redis_url is None:
        redis_host = RedisHost.options(**DEFAULT_DEPLOYMENT_OPTIONS["RedisHost"]).bind()
    ingress = Ingress.options(**DEFAULT_DEPLOYMENT_OPTIONS["Ingress"])
    return ingress.bind(args, generator, store, redis_host)
