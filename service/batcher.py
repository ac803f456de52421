"""Micro-batching: many concurrent requests → few model steps. Pure asyncio policy, no torch.

A request calls ``submit(item)`` and awaits its result. One collector task takes the first
queued item, then keeps taking until the batch holds ``max_batch`` items or ``max_wait``
seconds have passed since it took the first — whichever comes first; with ``max_wait = 0`` a
batch is whatever is already queued. When no batch is running the collector does not wait at
all: an idle service answers a lone request at once, and batches form only under load, while
earlier batches are busy (so the wait costs no latency that the queue would not cost anyway).
The batch is handed to ``handle`` (the recommender's step) in its own task, so the next batch
is collected while this one is between Redis and the model; at most ``max_inflight`` batches
run at once, after which the collector waits (and the queue absorbs the burst).

Bounds: the queue holds at most ``max_queue`` items; ``submit`` beyond that raises
`Overloaded` at once instead of letting latency grow without limit. A caller that gives up
(its task is cancelled, e.g. by a request deadline) leaves a cancelled future behind; the
collector skips it, so an abandoned request costs no model work. ``max_batch = 1`` is the
unbatched path (used by the benchmark of batching on vs off).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

BatchObserver = Callable[[int, Sequence[float]], None]  # (batch size, queue waits in seconds)


log = logging.getLogger(__name__)
_IDLE = object()  # sentinel of _next_or_idle


class Overloaded(Exception):
    """The queue is full (or the batcher is closed): shed this request now."""


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    queued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[T, R]):
    """Collects submitted items into batches for one async ``handle(items) -> results``.

    ``handle`` must return one result per item, in order; if it raises, every caller of that
    batch gets the exception. Constructors assign; ``start()`` starts the collector.
    """

    def __init__(
        self,
        handle: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        max_inflight: int = 1,
        on_batch: BatchObserver | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_inflight < 1 or max_wait_s < 0:
            raise ValueError("max_batch, max_queue, max_inflight must be >= 1, max_wait_s >= 0")
        self.handle = handle
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_inflight = max_inflight
        self.on_batch = on_batch
        self.name = name
        self._queue: asyncio.Queue[_Pending[T, R] | None] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._collector: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._idle = asyncio.Event()  # set while no batch is running
        self._idle.set()
        self._closed = False

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        if self._collector is not None:
            raise RuntimeError(f"{self.name} already started")
        self._queue = asyncio.Queue(self.max_queue)
        self._slots = asyncio.Semaphore(self.max_inflight)
        self._collector = asyncio.create_task(self._collect(), name=f"{self.name}-collector")

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result."""
        if self._queue is None or self._closed:
            raise Overloaded(f"{self.name} is not running")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(item, future))
        except asyncio.QueueFull:
            raise Overloaded(f"{self.name} queue is full ({self.max_queue} waiting)") from None
        return await future

    async def close(self) -> None:
        """Stop taking items, finish what is queued and running, then stop the collector."""
        if self._collector is None or self._closed:
            return
        self._closed = True
        assert self._queue is not None
        await self._queue.put(None)  # type: ignore[arg-type]  # sentinel: flush and stop
        await self._collector
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    # ---- collector

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            if first is None:
                return
            batch, stop = [first], False
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if self._queue.empty():
                    if not self._running:  # the model is idle: waiting would only add latency
                        break
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    nxt = await self._next_or_idle(remaining)
                    if nxt is _IDLE:  # the running batches finished: go now
                        break
                else:
                    nxt = self._queue.get_nowait()
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            await self._dispatch(batch)
            if stop:
                return

    async def _next_or_idle(self, timeout: float):
        """The next queued entry, or ``_IDLE`` once no batch is running, or ``_IDLE`` after
        ``timeout`` — whichever comes first."""
        assert self._queue is not None
        get = asyncio.ensure_future(self._queue.get())
        idle = asyncio.ensure_future(self._idle.wait())
        try:
            await asyncio.wait({get, idle}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            if not get.done():
                get.cancel()  # an item not yet taken stays in the queue
        if get.done() and not get.cancelled():
            return get.result()
        return _IDLE

    async def _dispatch(self, batch: list[_Pending[T, R]]) -> None:
        assert self._slots is not None
        await self._slots.acquire()
        # Filtered after the slot is ours: under overload, callers give up while we wait.
        batch = [p for p in batch if not p.future.done()]
        if not batch:
            self._slots.release()
            return
        task = asyncio.create_task(self._run(batch), name=f"{self.name}-batch")
        self._running.add(task)
        self._idle.clear()
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        if not self._running:
            self._idle.set()

    async def _run(self, batch: list[_Pending[T, R]]) -> None:
        assert self._slots is not None
        try:
            if self.on_batch is not None:
                now = time.perf_counter()
                try:
                    self.on_batch(len(batch), [now - p.queued_at for p in batch])
                except Exception:  # an observer must never strand callers
                    log.exception("%s: on_batch observer failed", self.name)
            try:
                results = await self.handle([p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)}")
            except (Exception, asyncio.CancelledError) as exc:  # to every caller of the batch
                error = exc
                if isinstance(exc, asyncio.CancelledError):
                    error = RuntimeError(f"{self.name}: the batch was cancelled")
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(error)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            for p, result in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(result)
        finally:
            self._slots.release()
