"""deploy/kuberay/rayservice.yaml, checked without a Kubernetes cluster: the fields the RayService
CRD (ray.io/v1) requires and their types, a serveConfigV2 that Ray's own schema and the app's
AppArgs accept and that matches configs/cluster.yaml, and pods that can hold what Serve asks for.

(kubeconform is not installable here from PyPI or Debian, and the CRD's schema is not vendored:
these are the checks that would catch the mistakes it would.)"""

import re
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.config import AppArgs, EnvSettings, MissingSharedServiceError, resolve_args

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def ray_service() -> dict:
    (service,) = [d for d in documents() if d["kind"] == "RayService"]
    return service


def serve_config() -> dict:
    return yaml.safe_load(ray_service()["spec"]["serveConfigV2"])


def test_every_document_is_a_named_kubernetes_object() -> None:
    for doc in documents():
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), doc.get("kind")
        assert DNS_1123.match(doc["metadata"]["name"]), doc["metadata"]["name"]
        assert doc["metadata"]["namespace"] == "serve-gpt2"
    assert ray_service()["apiVersion"] == "ray.io/v1"


def test_redis_and_postgres_are_external_services() -> None:
    services = {d["metadata"]["name"]: d for d in documents() if d["kind"] == "Service"}
    assert set(services) == {"redis", "postgres"}
    for service in services.values():
        assert service["spec"]["type"] == "ExternalName" and service["spec"]["externalName"]


def test_serve_config_is_valid_for_ray_and_matches_cluster_yaml() -> None:
    config = serve_config()
    ServeDeploySchema.model_validate(config)  # Ray's own schema for serve deploy / KubeRay
    shipped = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    assert config["applications"] == shipped["applications"]


def test_app_args_demand_the_shared_services_the_pods_get() -> None:
    args = AppArgs.model_validate(serve_config()["applications"][0]["args"])
    with pytest.raises(MissingSharedServiceError):
        resolve_args(args, EnvSettings())
    env = EnvSettings(REDIS_URL="redis://redis:6379/0", DATABASE_URL="postgresql+asyncpg://p/g")
    assert resolve_args(args, env).redis_url == "redis://redis:6379/0"


def pod_groups() -> list[dict]:
    cluster = ray_service()["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def test_groups_have_the_fields_the_crd_requires() -> None:
    cluster = ray_service()["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    for group in cluster["workerGroupSpecs"]:
        assert DNS_1123.match(group["groupName"])
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for group in pod_groups():
        # rayStartParams is a map of strings in the CRD: a bare number is rejected.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers)


def test_every_pod_reaches_redis_and_postgres_and_requests_its_ray_cpus() -> None:
    for group in pod_groups():
        (container,) = group["template"]["spec"]["containers"]
        assert {"secretRef": {"name": "serve-gpt2-backends"}} in container["envFrom"]
        cpus = group["rayStartParams"]["num-cpus"]
        assert container["resources"]["requests"]["cpu"] == cpus
        assert container["resources"]["limits"]["cpu"] == cpus


def test_the_worker_groups_can_hold_max_replicas_generators() -> None:
    deployments = {d["name"]: d for d in serve_config()["applications"][0]["deployments"]}
    generator = deployments["Generator"]
    per_replica = generator["ray_actor_options"]["num_cpus"]
    workers = ray_service()["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    capacity = sum(
        g["maxReplicas"] * (float(g["rayStartParams"]["num-cpus"]) // per_replica) for g in workers
    )
    assert capacity >= generator["autoscaling_config"]["max_replicas"]
