"""The FastAPI application: ``create_app(settings)`` and its lifespan.

Nothing heavy happens at import time. The lifespan, in order: start the embedded Redis when no
``redis_url`` is set → open the Redis pool and load the Lua scripts (a Redis that is down at
boot is tolerated: the service starts, answers ``degraded`` and is not ready) → load and verify
the generation (a model that cannot be served stops the start-up: there is nothing to answer
with) → warm every batch bucket → serve. Shutdown reverses it, finishing queued work first.
"""

from __future__ import annotations

import gc
import logging
from contextlib import AsyncExitStack, asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from service.embedded import EmbeddedRedis
from service.metrics import Metrics
from service.middleware import RequestIdFilter, ServiceMiddleware
from service.recommender import Recommender
from service.routes import admin, ops, recommend, sessions, users
from service.runner import load_generation
from service.settings import KVStorage, Settings
from service.state import KVDType
from service.store import RedisStateStore

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service app. ``settings=None`` reads them from the environment (``SESSIONREC_*``)."""
    s = settings if settings is not None else Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.settings = s
        async with AsyncExitStack() as cleanup:  # whatever started is stopped, in reverse
            url = s.redis_url
            if url is None:
                embedded = EmbeddedRedis(s.data_dir)
                url = embedded.start()
                cleanup.callback(embedded.stop)
                log.info("embedded redis-server at %s (data in %s)", url, s.data_dir)
            client = redis_client(s, url)
            cleanup.push_async_callback(client.aclose)
            store = state_store(s, client)
            try:
                await store.load_scripts()
            except (RedisError, RedisClusterException, OSError) as exc:
                log.warning("redis unavailable at start-up (%s); serving degraded", exc)
            if s.torch_threads:
                torch.set_num_threads(s.torch_threads)  # process-wide; the compute thread's
            generation = load_generation(
                s.registry, s.model_ref, device=s.device.value, log_sessions=s.log_sessions
            )
            recommender = Recommender(s, store, metrics)
            cleanup.push_async_callback(recommender.stop)
            await recommender.start(generation)
            app.state.recommender = recommender
            # What is alive now (libraries, model, index, warm-up caches) lives as long as the
            # process: freeze it out of the cyclic GC, whose full collections otherwise walk it
            # all under load (~130 ms pauses every ~0.6 s, Redis calls passing their deadline:
            # docs/RELIABILITY.md). Refcounting still frees frozen objects (a replaced
            # generation holds no reference cycles).
            gc.collect()
            gc.freeze()
            cleanup.callback(gc.unfreeze)
            log.info(
                "serving %s on %s (index %s)",
                generation.version,
                generation.device,
                generation.index.kind.value,
            )
            yield

    app = FastAPI(
        title="sessionrec",
        summary="Next-session retrieval: one incremental SessionRec step over Redis state.",
        version="0.1.0",
        lifespan=lifespan,
        telemetry={"tracing": s.otel, "metrics": s.otel, "logs": s.otel},
    )
    for module in (recommend, sessions, users, ops, admin):
        app.include_router(module.router)
    app.add_exception_handler(RequestValidationError, validation_error)

    app.add_middleware(ServiceMiddleware, metrics=metrics, max_body_bytes=s.max_body_bytes)
    return app


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422, except that an input of bytes that are not UTF-8 (a body sent with a
    non-JSON content type) is echoed with escapes: FastAPI's encoder would fail on it (a 500)."""
    detail = jsonable_encoder(exc.errors(), custom_encoder={bytes: _lossy})
    return JSONResponse({"detail": detail}, status_code=422)


def _lossy(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


def redis_client(s: Settings, url: str) -> Redis | RedisCluster:
    """An asyncio client whose every call is bounded: pool waits, connects and reads all time
    out at ``redis_timeout_ms``; one immediate retry rides over a dropped connection."""
    timeout = s.redis_timeout_ms / 1000
    common = dict(
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
    )
    if s.redis_cluster:
        return RedisCluster.from_url(url, max_connections=s.redis_pool_size, **common)
    pool = BlockingConnectionPool.from_url(
        url, max_connections=s.redis_pool_size, timeout=timeout, **common
    )
    return Redis(connection_pool=pool)


def state_store(s: Settings, client: Redis | RedisCluster) -> RedisStateStore:
    dtype = KVDType.FLOAT16 if s.kv_storage is KVStorage.FLOAT16 else KVDType.FLOAT32
    return RedisStateStore(
        client, max_sessions=s.log_sessions, ttl_seconds=s.ttl_seconds or None, kv_dtype=dtype
    )


def configure_logging(level: str) -> None:
    """Process-wide logging for ``sessionrec serve``: every line carries the request id."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
