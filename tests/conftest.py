"""Shared fixtures: a real redis-server process on a free loopback port."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from service.embedded import redis_server_binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    import random

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 50_000)
        try:
            for p in (port, port + 10_000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture
def redis_url(tmp_path: Path):
    """A fresh redis-server for one test; waits for PING with a deadline, never a sleep."""
    import redis

    port = free_port()
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("redis-server did not start within 10 s") from None
            time.sleep(0.02)  # polling a readiness condition under a deadline
    client.close()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def redis_cluster_url(tmp_path: Path):
    """A real 3-primary Redis Cluster from redis-server binaries, on loopback ports."""
    import redis

    binary = redis_server_binary()
    cli = str(Path(binary).with_name("redis-cli"))
    ports = [free_cluster_port() for _ in range(3)]
    procs = []
    for port in ports:
        node_dir = tmp_path / str(port)
        node_dir.mkdir()
        procs.append(
            subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(node_dir),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        for port in ports:
            _wait_ping(redis.Redis(port=port), procs)
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        for port in ports:
            node = redis.Redis(port=port)
            # redis-py parses CLUSTER INFO into a dict of str → str
            while node.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise RuntimeError("cluster did not reach state ok within 20 s")
                time.sleep(0.05)  # polling a readiness condition under a deadline
            node.close()
        yield f"redis://127.0.0.1:{ports[0]}"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


def _wait_ping(client, procs, timeout: float = 10.0) -> None:
    import redis

    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            client.close()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("redis-server did not start in time") from None
            time.sleep(0.02)  # polling a readiness condition under a deadline
