"""The application graph, wired in one place.

`serve run serve_config.yaml` imports `serve_app.app:build_app` and passes the YAML `args:`
block, which Ray validates into `AppArgs` (this module must not use postponed annotations for
that). Deployment defaults live here; the YAML `deployments:` section overrides them.
"""

from typing import Any

from ray.serve import Application

from serve_app.config import AppArgs, BatchingConfig, PersistenceTuning, resolve_args
from serve_app.generation.generator import Generator
from serve_app.http.ingress import Ingress
from serve_app.storage.persistence import Persistence

# On a 2-core box the ingress and the store are I/O-bound; the generator gets the CPU.
DEFAULT_DEPLOYMENT_OPTIONS: dict[str, dict[str, Any]] = {
    "Ingress": {
        "num_replicas": 1,
        "max_ongoing_requests": 256,
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
        # Must exceed max_batch_size: a replica can only batch requests it has been sent.
        "max_ongoing_requests": 96,
        "ray_actor_options": {"num_cpus": 0.8},
        "user_config": BatchingConfig().model_dump(),
        "health_check_period_s": 10,
    },
    "Persistence": {
        "num_replicas": 1,  # SQLite has one writer; group commit makes one replica enough
        "max_ongoing_requests": 512,
        "ray_actor_options": {"num_cpus": 0.1},
        "user_config": PersistenceTuning().model_dump(),
    },
}


def build_app(args: AppArgs) -> Application:
    args = resolve_args(args)
    generator = Generator.options(**DEFAULT_DEPLOYMENT_OPTIONS["Generator"]).bind(args)
    store = Persistence.options(**DEFAULT_DEPLOYMENT_OPTIONS["Persistence"]).bind(
        args.database_url, args.persistence
    )
    return Ingress.options(**DEFAULT_DEPLOYMENT_OPTIONS["Ingress"]).bind(args, generator, store)
