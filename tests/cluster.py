"""A local 3-master Redis Cluster on loopback ports for the scale-out tests:
three ``redis-server --cluster-enabled yes`` (no persistence, own temp dir)
joined by ``redis-cli --cluster create``, torn down on exit."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.cluster import key_slot

from common.embedded_redis import EmbeddedRedis
from tests.conftest import wait_until


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """Ports whose cluster bus port (port + 10000) is free as well."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20_000, 30_000)
        if port not in ports and _free(port) and _free(port + 10_000):
            ports.append(port)
    return ports


def cluster_ok(port: int, nodes: int) -> bool:
    client = redis.Redis(port=port, socket_timeout=5)
    try:
        info = client.cluster("info")  # parsed into a dict by redis-py
    except redis.RedisError:
        return False
    finally:
        client.close()
    return bool(
        info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == nodes
    )


def replica_synced(port: int) -> bool:
    """True for a master, or a replica whose link to its master is up
    (a replica that never synced does not take over when its master dies)."""
    client = redis.Redis(port=port, socket_timeout=5)
    try:
        info = client.info("replication")
    finally:
        client.close()
    return bool(info["role"] == "master" or info.get("master_link_status") == "up")


@dataclass
class LocalCluster:
    url: str  # redis+cluster:// naming every node
    nodes: dict[int, EmbeddedRedis]  # port -> its server

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot now."""
        slot = key_slot(key.encode())
        client = redis.Redis(port=next(iter(self.nodes)), socket_timeout=5)
        try:
            for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        finally:
            client.close()
        raise AssertionError(f"no master serves slot {slot}")


@contextmanager
def local_cluster(directory: Path, masters: int = 3, replicas: int = 0) -> Iterator[LocalCluster]:
    """Start ``masters`` masters with ``replicas`` replicas each (a short
    cluster-node-timeout, so a failover takes seconds)."""
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        raise RuntimeError("redis-cli is missing (it ships with the Debian package redis-server)")
    count = masters * (1 + replicas)
    ports = cluster_ports(count)
    nodes: dict[int, EmbeddedRedis] = {}
    with ExitStack() as stack:
        for port in ports:
            node_dir = directory / f"node-{port}"
            node_dir.mkdir(parents=True)
            node = EmbeddedRedis(
                port=port,
                directory=node_dir,
                extra_args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                            "--cluster-node-timeout", "2000"),
            )  # fmt: skip
            node.start()
            stack.callback(node.stop)
            nodes[port] = node
        subprocess.run(
            [redis_cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        for port in ports:
            wait_until(lambda p=port: cluster_ok(p, count), 60, f"cluster node {port} to agree")
            wait_until(lambda p=port: replica_synced(p), 60, f"replica {port} to sync")
        yield LocalCluster("redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports), nodes)
