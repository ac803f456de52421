"""The embedded redis-server: real processes on a unix socket, AOF persistence, one per dir."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from service.embedded import EmbeddedRedis, EmbeddedRedisError, redis_server_binary


@pytest.fixture
def server(tmp_path: Path):
    """A started EmbeddedRedis on tmp_path/data, always stopped afterwards."""
    emb = EmbeddedRedis(tmp_path / "data")
    emb.start()
    yield emb
    emb.stop()


def client_for(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def gone(pid: int) -> bool:
    """True once pid has exited (a zombie nobody reaps counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rpartition(")")[2].split()[0] == "Z"


def poll_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.02)  # polling a condition under a deadline


def wait_exit(pid: int, timeout: float = 10.0) -> None:
    """Poll until a process that is not our child has gone, under a deadline."""
    poll_until(lambda: gone(pid), timeout, f"exit of pid {pid}")


def lock_is_free(lock_path: Path) -> bool:
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops the probe's own lock at once
    return True


def test_binary_is_executable():
    path = redis_server_binary()
    assert os.path.isfile(path) and os.access(path, os.X_OK)


def test_init_assigns_only(tmp_path: Path):
    emb = EmbeddedRedis(tmp_path / "never")
    assert not emb.running
    assert not (tmp_path / "never").exists()
    with pytest.raises(EmbeddedRedisError, match="not started"):
        _ = emb.url
    emb.stop()  # stopping a never-started server is a no-op


def test_start_ping_set_then_data_survives_restart(tmp_path: Path):
    data_dir = tmp_path / "data"
    emb = EmbeddedRedis(data_dir)
    url = emb.start()
    try:
        assert url == f"unix://{data_dir.resolve() / 'redis.sock'}"
        assert emb.running and emb.url == url
        sock = data_dir / "redis.sock"
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o700
        client = client_for(url)
        assert client.ping()
        assert client.set("k", "v1")
        config = client.config_get("*")
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "everysec"
        assert config["save"] == ""
        assert config["port"] == "0"  # no TCP listener at all
        client.close()
    finally:
        emb.stop()
    assert not emb.running
    assert not (data_dir / "redis.sock").exists()
    assert (data_dir / "appendonly.aof").stat().st_size > 0
    assert (data_dir / "redis.log").stat().st_size > 0

    again = EmbeddedRedis(data_dir)
    with again:
        client = client_for(again.url)
        assert client.get("k") == b"v1"
        client.close()
    assert not again.running


def test_url_works_with_the_asyncio_client(server: EmbeddedRedis):
    async def roundtrip() -> bytes | None:
        client = aioredis.Redis.from_url(server.url)
        try:
            await client.set("a", "1")
            return await client.get("a")
        finally:
            await client.aclose()

    assert asyncio.run(roundtrip()) == b"1"


def test_second_server_on_same_dir_is_refused(server: EmbeddedRedis):
    with pytest.raises(EmbeddedRedisError, match="already in use") as info:
        EmbeddedRedis(server.data_dir).start()
    assert str(server.data_dir) in str(info.value)
    assert str(server.pid) in str(info.value)
    client = client_for(server.url)  # the first one is untouched
    assert client.ping()
    client.close()


def test_orphaned_server_of_a_dead_parent_keeps_the_dir_locked(tmp_path: Path):
    """The parent dies without stopping Redis: the orphan still holds the data-dir lock."""
    data_dir = tmp_path / "data"
    script = (
        "import os, sys\n"
        "from service.embedded import EmbeddedRedis\n"
        "emb = EmbeddedRedis(sys.argv[1])\n"
        "emb.start()\n"
        "print(emb.pid, flush=True)\n"
        "os._exit(0)\n"  # no stop(): the server is orphaned
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(data_dir)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    orphan = int(out.stdout.split()[0])
    try:
        with pytest.raises(EmbeddedRedisError, match="already in use") as info:
            EmbeddedRedis(data_dir).start()
        assert f"pid {orphan}" in str(info.value)
    finally:
        os.kill(orphan, signal.SIGTERM)  # Redis flushes the AOF and exits
        wait_exit(orphan)
        # A dying multi-threaded process can look like a zombie while its other threads
        # still hold its files: wait for the lock itself to be released.
        poll_until(lambda: lock_is_free(data_dir / "redis.lock"), 10, "release of the lock")
    with EmbeddedRedis(data_dir) as emb:  # lock released and socket gone with the orphan
        client = client_for(emb.url)
        assert client.ping()
        client.close()


def test_foreign_server_on_the_socket_is_refused(tmp_path: Path):
    """A redis-server not started by us that answers on data_dir/redis.sock."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    sock = data_dir / "redis.sock"
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--unixsocket", str(sock), "--save", ""],
        cwd=data_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(unix_socket_path=str(sock), socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)  # polling a readiness condition under a deadline
        client.close()
        emb = EmbeddedRedis(data_dir)
        with pytest.raises(EmbeddedRedisError, match="already in use") as info:
            emb.start()
        assert str(data_dir) in str(info.value)
        assert not emb.running
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("kind", ["plain-file", "dead-socket"])
def test_stale_socket_file_is_removed(tmp_path: Path, kind: str):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    sock_path = data_dir / "redis.sock"
    if kind == "plain-file":
        sock_path.write_bytes(b"")
    else:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(sock_path))  # bound, never listening, closed: what a crash leaves
    assert sock_path.exists()
    with EmbeddedRedis(data_dir) as emb:
        client = client_for(emb.url)
        assert client.ping()
        client.close()


def test_server_killed_behind_our_back(tmp_path: Path):
    data_dir = tmp_path / "data"
    emb = EmbeddedRedis(data_dir)
    emb.start()
    pid = emb.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while emb.running:
        assert time.monotonic() < deadline
        time.sleep(0.02)  # polling an exit condition under a deadline
    emb.stop()  # reaps, removes the socket the killed server left, frees the dir
    assert not (data_dir / "redis.sock").exists()
    with EmbeddedRedis(data_dir) as again:
        client = client_for(again.url)
        assert client.ping()
        client.close()


def test_long_data_dir_uses_a_temp_socket_dir(tmp_path: Path):
    data_dir = tmp_path / ("long dir " + "x" * 60) / ("y" * 60)
    assert len(str(data_dir / "redis.sock")) > 110
    emb = EmbeddedRedis(data_dir)
    url = emb.start()
    try:
        assert url.startswith("unix://")
        sock = Path(redis.connection.parse_url(url)["path"])
        assert sock.parent != data_dir.resolve()
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        client = client_for(url)
        assert client.set("long", "yes")
        client.close()
    finally:
        emb.stop()
    assert not sock.parent.exists()  # the private temp dir is cleaned up
    with pytest.raises(EmbeddedRedisError, match="already in use"):
        with EmbeddedRedis(data_dir), EmbeddedRedis(data_dir):
            pass  # the lock file protects long paths, where no socket is in data_dir
    with EmbeddedRedis(data_dir) as again:
        client = client_for(again.url)
        assert client.get("long") == b"yes"
        client.close()


def test_stop_is_idempotent(server: EmbeddedRedis):
    pid = server.pid
    assert pid is not None and server.running
    server.stop()
    assert not server.running
    server.stop()
    assert not server.running
    assert server.pid is None
    wait_exit(pid, timeout=1)  # already reaped by stop: gone right away


def test_restart_same_object(tmp_path: Path):
    emb = EmbeddedRedis(tmp_path / "data")
    with emb:
        client = client_for(emb.url)
        client.set("x", "1")
        client.close()
        with pytest.raises(EmbeddedRedisError, match="already started"):
            emb.start()
    with emb:
        client = client_for(emb.url)
        assert client.get("x") == b"1"
        client.close()
    assert not emb.running


def test_context_manager_stops_the_server(tmp_path: Path):
    with EmbeddedRedis(tmp_path / "data") as emb:
        assert emb.running
        pid = emb.pid
        url = emb.url
    assert not emb.running
    assert pid is not None
    wait_exit(pid, timeout=1)
    with pytest.raises(redis.ConnectionError):
        client_for(url).ping()


def test_context_manager_stops_on_error(tmp_path: Path):
    with pytest.raises(ValueError):
        with EmbeddedRedis(tmp_path / "data") as emb:
            raise ValueError("boom")
    assert not emb.running


def test_startup_failure_reports_the_log_tail(tmp_path: Path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # A garbage AOF makes redis-server exit while loading it at startup.
    (data_dir / "appendonly.aof").write_bytes(b"this is not an AOF\r\n")
    emb = EmbeddedRedis(data_dir)
    with pytest.raises(EmbeddedRedisError, match="during startup") as info:
        emb.start()
    message = str(info.value)
    assert str(data_dir) in message and "redis.log" in message
    assert "AOF" in message or "append only" in message.lower()
    assert not emb.running
    # The failed start released everything: the dir is usable once the AOF is gone.
    (data_dir / "appendonly.aof").unlink()
    with EmbeddedRedis(data_dir) as again:
        assert again.running
