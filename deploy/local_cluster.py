"""A two-node Ray cluster on this one machine: a head raylet and a worker raylet, for the
cluster test and the autoscaling demo (`make cluster-up`, `make cluster-deploy`,
`make cluster-down`).

    python deploy/local_cluster.py up      # start both nodes, write data/cluster/cluster.json
    python deploy/local_cluster.py deploy configs/cluster.yaml
    python deploy/local_cluster.py down    # stop exactly the processes this cluster started

Everything is private to this cluster: its own `--temp-dir` (so no /tmp/ray/ray_current_cluster
is left for a later `serve run` to join), free ports for every listener, and stopping by pid,
never `ray stop` (which stops every Ray cluster of the machine). The worker node gets the
custom resource `worker_node` and its HTTP proxy its own port (two proxies on one host cannot
share one). Replicas and daemons inherit the environment of `ray start`: REDIS_URL,
DATABASE_URL, PYTHONPATH and configs/ray.env reach them from there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = Path("data/cluster")
RAY = str(Path(sys.executable).parent / "ray")
SERVE = str(Path(sys.executable).parent / "serve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _process_tree() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@dataclass
class Node:
    node_manager_port: int
    object_manager_port: int
    metrics_export_port: int
    agent_listen_port: int
    agent_grpc_port: int
    runtime_env_agent_port: int

    @classmethod
    def with_free_ports(cls) -> Node:
        return cls(*(free_port() for _ in range(6)))

    def args(self) -> list[str]:
        return [
            f"--node-manager-port={self.node_manager_port}",
            f"--object-manager-port={self.object_manager_port}",
            f"--metrics-export-port={self.metrics_export_port}",
            f"--dashboard-agent-listen-port={self.agent_listen_port}",
            f"--dashboard-agent-grpc-port={self.agent_grpc_port}",
            f"--runtime-env-agent-port={self.runtime_env_agent_port}",
        ]


@dataclass
class LocalCluster:
    """Ports, paths and how to start and stop the two nodes; saved as JSON between commands."""

    temp_dir: str
    gcs_port: int
    dashboard_port: int
    client_port: int
    worker_proxy_port: int
    head: Node
    worker: Node
    head_cpus: float = 2
    worker_cpus: float = 2
    env_overrides: dict[str, str] = field(default_factory=dict)

    @classmethod
    def fresh(cls, head_cpus: float = 2, worker_cpus: float = 2) -> LocalCluster:
        # Short: Ray's socket paths live under it and a unix socket path has 107 bytes at most.
        temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
        return cls(
            temp_dir=temp_dir,
            gcs_port=free_port(),
            dashboard_port=free_port(),
            client_port=free_port(),
            worker_proxy_port=free_port(),
            head=Node.with_free_ports(),
            worker=Node.with_free_ports(),
            head_cpus=head_cpus,
            worker_cpus=worker_cpus,
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.pop("RAY_ADDRESS", None)
        env.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only cluster of our own
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Serve's Python proxy on every node, whatever configs/ray.env says: behind Ray 2.60's
        # HAProxy, losing a node under load dropped client connections without a response.
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
        env.update(self.env_overrides)
        return env

    def _ray(self, args: list[str], env: dict[str, str]) -> None:
        result = subprocess.run(
            [RAY, "start", *args], env=env, capture_output=True, text=True, timeout=180
        )
        if result.returncode != 0:
            raise RuntimeError(f"ray start {args[0]} failed:\n{result.stdout}\n{result.stderr}")

    def start(self, base_env: dict[str, str] | None = None) -> None:
        env = self.environment(base_env)
        common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        common += ["--object-store-memory=200000000", f"--temp-dir={self.temp_dir}"]
        self._ray(
            [
                "--head",
                f"--port={self.gcs_port}",
                f"--dashboard-port={self.dashboard_port}",
                "--dashboard-host=127.0.0.1",
                "--include-dashboard=true",
                f"--ray-client-server-port={self.client_port}",
                f"--num-cpus={self.head_cpus:g}",
                *common,
                *self.head.args(),
            ],
            env,
        )
        # Serve binds every proxy to http_options.port; on one host the worker's needs another.
        worker_env = {**env, "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(self.worker_proxy_port)}
        self._ray(
            [
                f"--address={self.address}",
                f"--num-cpus={self.worker_cpus:g}",
                '--resources={"worker_node": 1}',
                *common,
                *self.worker.args(),
            ],
            worker_env,
        )

    def pids(self) -> list[int]:
        """Every process of this cluster: those naming its temp dir, and all below them."""
        mark = self.temp_dir.encode()
        tree = _process_tree()
        roots = [pid for pids in tree.values() for pid in pids if mark in _cmdline(pid)]
        out, todo = set(), list(roots)
        while todo:
            pid = todo.pop()
            if pid not in out and pid != os.getpid():
                out.add(pid)
                todo.extend(tree.get(pid, []))
        return sorted(out)

    def raylet_pid(self, node: Node) -> int:
        flag = f"--node_manager_port={node.node_manager_port}".encode()
        for pid in self.pids():
            cmd = _cmdline(pid)
            if b"raylet" in cmd.split(b"\0", 1)[0] and flag in cmd:
                return pid
        raise LookupError(f"no raylet with {flag.decode()}")

    def stop(self, timeout_s: float = 20) -> None:
        pids = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.2)
            pids = [p for p in pids if _alive(p)]
            if not pids:
                break

    def destroy(self) -> None:
        """Stop every process, then remove the temp dir (logs included)."""
        self.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def serve(self, *args: str, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            [SERVE, *args, f"--address={self.dashboard_url}"],
            env=self.environment(env),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"serve {args[0]} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def serve_details(self) -> dict:
        """Serve's REST API: applications, their status and message, replicas and nodes."""
        url = f"{self.dashboard_url}/api/serve/applications/"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)

    def running_replicas(self, deployment: str) -> list[dict]:
        """The deployment's RUNNING replicas (with their `node_id`), from Serve's REST API."""
        (app,) = self.serve_details()["applications"].values()
        replicas = app["deployments"].get(deployment, {}).get("replicas", [])
        return [r for r in replicas if r["state"] == "RUNNING"]

    def save(self, state_dir: Path = STATE_DIR) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "cluster.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, state_dir: Path = STATE_DIR) -> LocalCluster:
        data = json.loads((state_dir / "cluster.json").read_text())
        data["head"], data["worker"] = Node(**data["head"]), Node(**data["worker"])
        return cls(**data)


def small_cluster_config(port: int, target_ongoing_requests: float = 2) -> dict:
    """configs/cluster.yaml sized for two raylets sharing two cores: a tiny stand-in model,
    fractional CPUs per replica, at most 3 Generator replicas scaling out at
    `target_ongoing_requests` (a tiny model never queues 24 requests a replica). The
    autoscaling delays and everything else stay as shipped."""
    spec = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    spec["http_options"] = {"host": "127.0.0.1", "port": port}
    app = spec["applications"][0]
    app["args"]["models"] = [{"id": "tiny-a", "architecture": "tiny", "seed": 1}]
    app["args"]["default_model"] = "tiny-a"
    app["args"]["generator"]["torch_threads"] = 1
    for deployment in app["deployments"]:
        if deployment["name"] == "Generator":
            deployment["ray_actor_options"] = {"num_cpus": 0.5}
            deployment["autoscaling_config"].update(
                max_replicas=3, target_ongoing_requests=target_ongoing_requests
            )
        else:
            deployment["ray_actor_options"] = {"num_cpus": 0.1}
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "deploy", "status"])
    parser.add_argument("config", nargs="?", default="configs/cluster.yaml")
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR)
    parser.add_argument("--head-cpus", type=float, default=2)
    parser.add_argument("--worker-cpus", type=float, default=2)
    opts = parser.parse_args()
    state = opts.state_dir / "cluster.json"
    if opts.command == "up":
        if state.exists() and LocalCluster.load(opts.state_dir).pids():
            sys.exit(f"a cluster from {state} is running: make cluster-down first")
        cluster = LocalCluster.fresh(opts.head_cpus, opts.worker_cpus)
        cluster.save(opts.state_dir)
        try:
            cluster.start()
        except Exception:
            cluster.destroy()
            raise
        print(f"head {cluster.address}, dashboard {cluster.dashboard_url}")
        print(f"worker node proxy port {cluster.worker_proxy_port}; state in {state}")
        return
    if not state.exists():
        sys.exit(f"no local cluster recorded in {state}: make cluster-up first")
    cluster = LocalCluster.load(opts.state_dir)
    if opts.command == "down":
        cluster.destroy()
        state.unlink()
        print(f"stopped; removed {cluster.temp_dir}")
    elif opts.command == "deploy":
        print(cluster.serve("deploy", opts.config), end="")
    else:
        print(cluster.serve("status"), end="")


if __name__ == "__main__":
    main()
