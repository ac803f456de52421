"""The recommender: state store + micro-batcher + runner, joined by one short step.

A recommendation batch is: read the users' cached state (one pipelined Redis round trip) →
pick each user's rung of the degradation ladder → run the batch on the compute worker
(incremental step, rebuilds, top-k) → write rebuilt caches back → respond. The ladder
(``Source``):

``state``       the K/V cache is of this model version and reflects the whole log: one step.
``rebuilt``     the cache is missing, stale (the log moved on) or of another model version:
                rebuilt from the raw log (a second round trip), used, and written back
                (compare-and-set, so a newer log is never overwritten).
``cold_start``  the user has no history: the query token alone (time of day + context).
``degraded``    Redis failed or passed ``redis_timeout_ms``: a cold-start answer, never a 5xx.
                The Redis client reconnects by itself, so the next batch after Redis returns
                is served from state again without a restart.

Closing a session (``close_session``) appends it to the raw log atomically (the Lua script in
`service.store`; idempotent on ``session_id``) and then brings the cache up to date through a
second micro-batcher: when the cache reflects the log just before this session and the session
is the newest, its token runs through the layers once and its K/V is appended; otherwise (a
concurrent close, an out-of-order session, another model version) the cache is rebuilt from
the log. The log is the source of truth: if the cache update cannot happen now, the session is
still stored and the next recommendation rebuilds.

A generation is captured per batch, so ``reload`` swaps model + index + id map atomically
between batches; in-flight batches finish on the generation they started with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

from redis.exceptions import RedisClusterException, RedisError

from service.batcher import MicroBatcher
from service.metrics import Metrics
from service.runner import (
    AppendJob,
    Generation,
    GenerationError,
    Recommendation,
    RecommendJob,
    Runner,
    load_generation,
)
from service.schemas import CacheUpdate, RecommendRequest, SessionRequest, Source
from service.settings import Settings
from service.state import KVState, SessionRecord
from service.store import AppendResult, CachedState, RedisStateStore

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreUnavailable(Exception):
    """A write or delete could not reach Redis in time; the caller should retry."""


class _RedisDown(Exception):
    pass


@dataclass(frozen=True)
class RecommendOutcome:
    source: Source
    result: Recommendation
    model_version: str
    queue_s: float
    redis_s: float
    compute_s: float
    batch_size: int


@dataclass(frozen=True)
class CloseOutcome:
    appended: AppendResult
    cache: CacheUpdate
    unknown_items: list[str]
    model_version: str


@dataclass(frozen=True)
class _Rec:
    req: RecommendRequest
    now: int
    submitted: float


@dataclass(frozen=True)
class _Close:
    user_id: str
    record: SessionRecord
    seq: int


class Recommender:
    """Owns the batchers, the compute worker and the current generation. Constructors
    assign; ``start`` warms the first generation and starts the batchers."""

    def __init__(self, settings: Settings, store: RedisStateStore, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.runner = Runner(settings.max_batch)
        self.generation: Generation | None = None
        self.warmed = False
        self._redis_timeout = settings.redis_timeout_ms / 1000
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="sessionrec-compute")
        self._reload_lock = asyncio.Lock()
        self._recs: MicroBatcher[_Rec, RecommendOutcome] = MicroBatcher(
            self._recommend_batch,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue,
            max_inflight=settings.max_inflight_batches,
            on_batch=self._observer("recommend"),
            name="recommend",
        )
        self._closes: MicroBatcher[_Close, CacheUpdate] = MicroBatcher(
            self._update_caches,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue,
            max_inflight=settings.max_inflight_batches,
            on_batch=self._observer("close"),
            name="close",
        )

    # ---- lifecycle

    async def start(self, generation: Generation) -> None:
        await self._warm(generation)
        self._set_generation(generation)
        self.warmed = True
        self._recs.start()
        self._closes.start()

    async def stop(self) -> None:
        await self._recs.close()
        await self._closes.close()
        self._compute.shutdown(wait=True)

    async def reload(self, model_ref: str) -> tuple[str, str]:
        """Load, verify and warm ``model_ref``, then swap it in; on any failure the current
        generation keeps serving and the error propagates. Returns (previous, new) versions."""
        async with self._reload_lock:
            s = self.settings
            try:
                # Loading (file reads, checksums, deserialising) happens off the compute thread
                # so serving goes on; the new objects are not shared with it until the swap.
                generation = await asyncio.to_thread(
                    load_generation,
                    s.registry,
                    model_ref,
                    device=s.device.value,
                    log_sessions=s.log_sessions,
                )
                await self._warm(generation)
            except Exception as exc:
                self.metrics.reloads.labels("refused").inc()
                if isinstance(exc, GenerationError):
                    raise
                raise GenerationError(
                    f"model {model_ref!r} failed to load or warm up: {exc}"
                ) from exc
            previous = self.generation.version if self.generation else ""
            self._set_generation(generation)
            self.metrics.reloads.labels("swapped").inc()
            log.info("generation %s → %s", previous, generation.version)
            return previous, generation.version

    async def _warm(self, generation: Generation) -> None:
        """Warm every bucket, one compute job each, so serving batches interleave with a
        reload's warm-up instead of queueing behind all of it."""
        for bucket in self.runner.buckets:
            await self._on_compute(self.runner.warm_bucket, generation, bucket)
        await self._on_compute(self.runner.warm_state_paths, generation)

    async def redis_ok(self) -> bool:
        try:
            await self._redis("ping", self.store.client.ping())
        except _RedisDown:
            return False
        return True

    # ---- recommendations

    async def recommend(self, req: RecommendRequest) -> RecommendOutcome:
        ctx = req.context
        now = int(ctx.timestamp.timestamp() if ctx and ctx.timestamp else time.time())
        self.metrics.queue_depth.set(self._recs.queued)
        return await self._recs.submit(_Rec(req, now, time.perf_counter()))

    async def _recommend_batch(self, recs: list[_Rec]) -> list[RecommendOutcome]:
        gen = self.generation
        assert gen is not None
        started = time.perf_counter()
        users = list(dict.fromkeys(r.req.user_id for r in recs))
        heads: dict[str, CachedState] | None
        logs: dict | None = {}
        try:
            heads = {
                h.user_id: h for h in await self._redis("get_kv", self.store.get_kv_many(users))
            }
        except _RedisDown:
            heads = None
        if heads is not None:
            stale = [u for u, h in heads.items() if h.seq and not _current(h, gen)]
            if stale:
                try:
                    logs = {
                        s.user_id: s
                        for s in await self._redis(
                            "get_log", self.store.get_many(stale, last=gen.history + 1)
                        )
                    }
                except _RedisDown:
                    logs = None
        sources, jobs = [], []
        for r in recs:
            source, job = self._job(r, gen, heads, logs)
            sources.append(source)
            jobs.append(job)
        read_done = time.perf_counter()
        results = await self._on_compute(self.runner.recommend, gen, jobs)
        computed = time.perf_counter()
        await self._write_back(gen, recs, results)
        done = time.perf_counter()
        redis_s = (read_done - started) + (done - computed)
        outcomes = []
        for r, source, result in zip(recs, sources, results, strict=True):
            self.metrics.recommendations.labels(source.value).inc()
            outcomes.append(
                RecommendOutcome(
                    source,
                    result,
                    gen.version,
                    queue_s=started - r.submitted,
                    redis_s=redis_s,
                    compute_s=computed - read_done,
                    batch_size=len(recs),
                )
            )
        return outcomes

    def _job(
        self,
        r: _Rec,
        gen: Generation,
        heads: dict[str, CachedState] | None,
        logs: dict | None,
    ) -> tuple[Source, RecommendJob]:
        req = r.req
        ctx_items = tuple(i.item_id for i in req.context.items) if req.context else ()
        ctx_labels = tuple(i.label for i in req.context.items) if req.context else ()
        exclude = tuple(req.exclude) + (ctx_items if req.exclude_seen else ())
        job = RecommendJob(
            now=r.now, k=req.k, context_items=ctx_items, context_labels=ctx_labels, exclude=exclude
        )
        if heads is None:
            return Source.DEGRADED, job
        head = heads[req.user_id]
        if head.seq == 0:
            return Source.COLD_START, job
        if _current(head, gen):
            return Source.STATE, replace(job, kv=head.kv)
        if logs is None:
            return Source.DEGRADED, job
        state = logs[req.user_id]
        if state.seq == 0 or not state.sessions:  # forgotten or expired meanwhile
            return Source.COLD_START, job
        return Source.REBUILT, replace(job, sessions=tuple(state.sessions), log_seq=state.seq)

    async def _write_back(
        self, gen: Generation, recs: list[_Rec], results: list[Recommendation]
    ) -> None:
        writes = {
            r.req.user_id: res.rebuilt for r, res in zip(recs, results, strict=True) if res.rebuilt
        }
        if not writes:
            return
        try:
            ok = await self._redis("put_kv", self.store.put_kv_many(list(writes.items())))
        except _RedisDown:
            self.metrics.cache_updates.labels("deferred").inc(len(writes))
            return
        for written in ok:
            self.metrics.cache_updates.labels("rebuilt" if written else "superseded").inc()

    # ---- closed sessions

    async def close_session(self, req: SessionRequest) -> CloseOutcome:
        """Store a closed session (idempotent on session_id), then update the user's cache."""
        gen = self.generation
        assert gen is not None
        ended = int(req.ended_at.timestamp())
        started = int(req.started_at.timestamp()) if req.started_at else ended
        record = SessionRecord(
            req.session_id,
            started,
            ended,
            tuple(i.item_id for i in req.items),
            tuple(i.label for i in req.items),
        )
        try:
            appended = await self._redis("append", self.store.append_session(req.user_id, record))
        except _RedisDown as exc:
            raise StoreUnavailable(
                "state store unavailable: the session may not be stored; retry the same "
                "request (closes are idempotent on session_id)"
            ) from exc
        self.metrics.sessions.labels("appended" if appended.appended else "duplicate").inc()
        cache = CacheUpdate.UNCHANGED
        if appended.appended:
            try:
                async with asyncio.timeout(self.settings.request_timeout_ms / 1000):
                    cache = await self._closes.submit(_Close(req.user_id, record, appended.seq))
            except Exception as exc:  # the session is stored; the next read rebuilds
                log.warning("user %s: cache update deferred: %s", req.user_id, exc)
                cache = CacheUpdate.DEFERRED
        return CloseOutcome(appended, cache, gen.unknown(record.items), gen.version)

    async def _update_caches(self, closes: list[_Close]) -> list[CacheUpdate]:
        gen = self.generation
        assert gen is not None
        by_user: dict[str, list[_Close]] = {}
        for c in closes:
            by_user.setdefault(c.user_id, []).append(c)
        try:
            heads = await self._redis("get_kv", self.store.get_kv_many(list(by_user)))
        except _RedisDown:
            return self._count([CacheUpdate.DEFERRED] * len(closes))
        status: dict[str, CacheUpdate] = {}
        appends: list[tuple[str, AppendJob]] = []
        rebuild: list[str] = []
        for head in heads:
            mine = by_user[head.user_id]
            kv = head.kv
            if _current(head, gen):
                status[head.user_id] = CacheUpdate.CURRENT
            elif len(mine) == 1 and _appendable(kv, head.seq, mine[0], gen):
                appends.append((head.user_id, AppendJob(kv, mine[0].record, head.seq)))
            else:
                rebuild.append(head.user_id)
        logs = []
        if rebuild:
            try:
                logs = await self._redis(
                    "get_log", self.store.get_many(rebuild, last=gen.history + 1)
                )
            except _RedisDown:
                status.update(dict.fromkeys(rebuild, CacheUpdate.DEFERRED))
            logs = [s for s in logs if s.seq]  # forgotten or expired meanwhile: nothing to do
        if appends or logs:
            states = await self._on_compute(
                _append_and_rebuild, self.runner, gen, [j for _, j in appends], logs
            )
            users = [u for u, _ in appends] + [s.user_id for s in logs]
            kinds = [CacheUpdate.APPENDED] * len(appends) + [CacheUpdate.REBUILT] * len(logs)
            writes = list(zip(users, states, strict=True))
            try:
                ok = await self._redis("put_kv", self.store.put_kv_many(writes))
            except _RedisDown:
                ok = [False] * len(writes)
            for user_id, kind, written in zip(users, kinds, ok, strict=True):
                # not written: a newer close moved the log on; its own update follows
                status[user_id] = kind if written else CacheUpdate.DEFERRED
        return self._count([status.get(c.user_id, CacheUpdate.DEFERRED) for c in closes])

    def _count(self, statuses: list[CacheUpdate]) -> list[CacheUpdate]:
        for s in statuses:
            self.metrics.cache_updates.labels(s.value).inc()
        return statuses

    # ---- users

    async def forget(self, user_id: str) -> bool:
        try:
            return await self._redis("delete", self.store.delete_user(user_id))
        except _RedisDown as exc:
            raise StoreUnavailable(
                "state store unavailable: the user was not deleted; retry"
            ) from exc

    # ---- plumbing

    async def _redis(self, op: str, call: Awaitable[T]) -> T:
        """One Redis call under the deadline; any failure is counted and becomes _RedisDown."""
        try:
            async with asyncio.timeout(self._redis_timeout):
                return await call
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            self.metrics.redis_errors.labels(op).inc()
            log.warning("redis %s failed: %s", op, exc.__class__.__name__)
            raise _RedisDown(op) from exc

    async def _on_compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)

    def _set_generation(self, generation: Generation) -> None:
        self.generation = generation
        self.metrics.generation.info({"version": generation.version})

    def _observer(self, name: str):
        sizes = self.metrics.batch_size.labels(name)
        waits = self.metrics.queue_wait_seconds.labels(name)

        def observe(size: int, queue_waits) -> None:
            sizes.observe(size)
            for w in queue_waits:
                waits.observe(w)

        return observe


def _current(head: CachedState, gen: Generation) -> bool:
    """The cache is this generation's, has its shape, and reflects the whole log."""
    kv = head.kv
    return (
        kv is not None
        and kv.model_version == gen.version
        and kv.log_seq == head.seq
        and gen.fits(kv)
    )


def _appendable(kv: KVState | None, seq: int, close: _Close, gen: Generation) -> bool:
    """The cache reflects the log just before this close, and the session is the newest."""
    return (
        kv is not None
        and kv.model_version == gen.version
        and gen.fits(kv)
        and close.seq == seq
        and kv.log_seq == seq - 1
        and close.record.ended_at > kv.last_ended_at
    )


def _append_and_rebuild(runner: Runner, gen: Generation, appends, logs) -> list:
    states = runner.append(gen, appends)
    states += runner.rebuild(gen, [s.sessions for s in logs], [s.seq for s in logs])
    return states
