"""Real processes for service tests: a restartable redis-server, a live uvicorn server, and a
tiny trained model registry. Everything waits on readiness under a deadline, never a sleep."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from service.app import create_app
from service.embedded import redis_server_binary
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)  # polling a condition under a deadline


class RedisProcess:
    """redis-server on a fixed loopback port with AOF, so it can be stopped and restarted with
    its data (the fault tests' Redis)."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        import redis

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.data_dir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited during start-up")
            try:
                return client.ping()
            except redis.ConnectionError:
                return False

        wait_until(up, 10, "redis-server to answer PING")
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def kill(self) -> float:
        """SIGKILL (no shutdown, no AOF flush beyond fsync policy); returns once the process
        is gone, as a ``time.monotonic()`` instant."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        return time.monotonic()


async def first_pong(port: int, timeout: float) -> float:
    """Probe the port with a raw ``PING`` every ~5 ms; returns when the first ``+PONG`` was
    *sent* (Redis answers PING at most one probe interval earlier). A Redis still loading its
    AOF answers ``-LOADING``, which does not count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sent = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"PING\r\n")
                line = await asyncio.wait_for(reader.readline(), 1.0)
            finally:
                writer.close()
            if line.startswith(b"+PONG"):
                return sent
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.005)  # polling a condition under a deadline
    raise AssertionError(f"redis on port {port} did not answer PING within {timeout} s")


class ServeProcess:
    """``python -m sessionrec serve`` as a real process on a fixed port, configured only by the
    given SESSIONREC_* env (inherited ones are dropped), its output in a log file."""

    def __init__(self, port: int, env: dict, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONREC_")}
        self.env = {**inherited, **env}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sessionrec", "serve", "--port", str(self.port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal it (SIGTERM: a graceful shutdown), wait, kill as a fallback; the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        return self.proc.returncode


class LiveServer:
    """The real app under uvicorn on a loopback port, in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.app = create_app(settings)
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_until(
            lambda: self.server.started or not self.thread.is_alive(), 60, "uvicorn to start"
        )
        if not self.server.started:
            raise RuntimeError("the service failed to start (see the log above)")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)

    def async_client(self, **kw) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30, **kw)

    @property
    def recommender(self):
        return self.app.state.recommender


def run(coro):
    return asyncio.run(coro)


def build_registry(root: Path, *, versions: int = 2):
    """A tiny synthetic dataset and ``versions`` trained SessionRec models (the first
    promoted), each with a flat FAISS index. Window 4 and 2 layers: receptive field 8, so
    histories of 10-20 sessions exercise eviction and the receptive-field cut."""
    from index import IndexConfig, add_index_to_artifact, build_index
    from model_store.registry import Registry
    from model_store.store import read_item_vectors
    from training.config import TrainConfig
    from training.loaders import prepare
    from training.pipeline import train_and_save

    ds = prepare("synthetic", root / "data", n_users=120, n_items=300, sessions_per_user=14.0)
    registry = Registry(root / "artifacts")
    names = []
    for seed in range(versions):
        cfg = TrainConfig(
            dim=32,
            window=4,
            epochs=1,
            min_epochs=1,
            n_negatives=128,
            val_users=40,
            dropout=0.0,
            seed=seed,
            max_items=12,  # below the longest sessions: the serving cap is exercised too
        )
        trained = train_and_save(
            ds, cfg, registry, data_path=root / "data", promote=seed == 0, progress=False
        )
        artifact = registry.open(trained.version)
        add_index_to_artifact(
            artifact.root, build_index(read_item_vectors(artifact), IndexConfig())
        )
        names.append(trained.version)
    return ds, registry, names
