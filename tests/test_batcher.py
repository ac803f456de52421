"""MicroBatcher policy: immediate dispatch when idle, batching under load, bounds, errors, close.

Every test drives the batcher with a `Gate` handle whose batches block until the test releases
them, and every wait is bounded by `asyncio.timeout`, so no test depends on timing or can hang.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import pytest

from service.batcher import MicroBatcher, Overloaded

WAIT = 2.0  # upper bound for anything that should happen "at once"
HUGE = 60.0  # a max_wait_s no test may ever sit out


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(10):
            await main()

    asyncio.run(bounded())


async def wait_until(pred: Callable[[], bool], timeout: float = WAIT) -> None:
    """Yield to the loop until ``pred()`` holds; fails (TimeoutError) after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0)


class Gate:
    """A recording ``handle``: each call blocks until released; results are ``x * 10``."""

    def __init__(self, result: Callable[[list[int]], list[int]] | None = None) -> None:
        self.result = result or (lambda items: [x * 10 for x in items])
        self.batches: list[list[int]] = []
        self.active = 0
        self.peak = 0
        self.is_open = False
        self._events: list[asyncio.Event] = []

    async def __call__(self, items: list[int]) -> list[int]:
        event = asyncio.Event()
        if self.is_open:
            event.set()
        self.batches.append(list(items))
        self._events.append(event)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await event.wait()
        finally:
            self.active -= 1
        return self.result(items)

    def release(self, index: int) -> None:
        self._events[index].set()

    def open(self) -> None:
        """Release every batch, now and from now on."""
        self.is_open = True
        for event in self._events:
            event.set()

    async def wait_batches(self, n: int) -> None:
        await wait_until(lambda: len(self.batches) >= n)

    @property
    def items(self) -> list[int]:
        return [x for batch in self.batches for x in batch]


class Client:
    """Submits items as tasks and records which submissions have reached the queue.

    ``submit`` queues synchronously in its first step, so once an item is in ``sent`` it is in
    the queue, held by the collector, or in a batch; ``sent`` plus ``queued`` make waits exact.
    """

    def __init__(self, batcher: MicroBatcher[int, int]) -> None:
        self.batcher = batcher
        self.sent: list[int] = []
        self.tasks: dict[int, asyncio.Task[int]] = {}

    def spawn(self, *items: int) -> list[asyncio.Task[int]]:
        for item in items:
            self.tasks[item] = asyncio.create_task(self._submit(item))
        return [self.tasks[item] for item in items]

    async def _submit(self, item: int) -> int:
        self.sent.append(item)
        return await self.batcher.submit(item)

    async def settled(self, queued: int) -> None:
        """Every spawned item has been submitted and exactly ``queued`` wait in the queue."""
        await wait_until(
            lambda: len(self.sent) == len(self.tasks) and self.batcher.queued == queued
        )

    async def results(self, *items: int) -> list[int]:
        async with asyncio.timeout(WAIT):
            return list(await asyncio.gather(*(self.tasks[i] for i in items)))


def make(handle, **kw) -> MicroBatcher[int, int]:
    kw.setdefault("max_batch", 4)
    kw.setdefault("max_wait_s", HUGE)
    kw.setdefault("max_queue", 64)
    batcher: MicroBatcher[int, int] = MicroBatcher(handle, name="test", **kw)
    batcher.start()
    return batcher


async def closed(batcher: MicroBatcher) -> None:
    async with asyncio.timeout(WAIT):
        await batcher.close()


# ---- idle: no waiting


def test_lone_request_is_dispatched_at_once_despite_huge_max_wait():
    async def main():
        gate = Gate()
        gate.open()
        b = make(gate, max_batch=32, max_wait_s=HUGE)
        async with asyncio.timeout(WAIT):
            assert await b.submit(7) == 70
        assert gate.batches == [[7]]
        await closed(b)

    run(main)


def test_sequential_lone_requests_each_dispatched_at_once():
    async def main():
        gate = Gate()
        gate.open()
        b = make(gate, max_batch=32, max_wait_s=HUGE)
        for i in range(5):
            async with asyncio.timeout(WAIT):
                assert await b.submit(i) == i * 10
        assert gate.batches == [[0], [1], [2], [3], [4]]
        await closed(b)

    run(main)


# ---- under load: batches form


def test_batches_form_while_a_batch_is_running_and_results_map_to_callers():
    async def main():
        gate = Gate()
        b = make(gate, max_batch=4, max_wait_s=HUGE, max_inflight=1)
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        c.spawn(*range(1, 9))
        # the collector holds [1, 2, 3, 4] waiting for a slot; 5..8 stay queued
        await c.settled(queued=4)
        assert gate.batches == [[0]]
        gate.release(0)
        await gate.wait_batches(2)
        assert gate.batches[1] == [1, 2, 3, 4]
        gate.release(1)
        await gate.wait_batches(3)
        gate.release(2)
        assert await c.results(*range(9)) == [x * 10 for x in range(9)]
        assert gate.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
        await closed(b)

    run(main)


def test_each_caller_gets_the_result_for_its_own_item():
    async def main():
        # a handle whose result for x depends only on x: every caller must get its own result
        gate = Gate(result=lambda items: [x * x + 1 for x in items])
        b = make(gate, max_batch=5, max_wait_s=HUGE)
        c = Client(b)
        c.spawn(100)
        await gate.wait_batches(1)
        items = [9, 3, 7, 1, 5, 8, 2, 6, 4, 0]
        c.spawn(*items)
        await c.settled(queued=5)
        gate.open()
        assert await c.results(100, *items) == [x * x + 1 for x in [100, *items]]
        assert all(len(batch) <= 5 for batch in gate.batches)
        assert sorted(gate.items) == sorted([100, *items])
        await closed(b)

    run(main)


def test_max_batch_respected():
    async def main():
        gate = Gate()
        b = make(gate, max_batch=3, max_wait_s=HUGE, max_inflight=1)
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        c.spawn(*range(1, 10))
        await c.settled(queued=6)
        gate.open()
        assert await c.results(*range(10)) == [x * 10 for x in range(10)]
        assert gate.batches == [[0], [1, 2, 3], [4, 5, 6], [7, 8, 9]]
        await closed(b)

    run(main)


def test_max_batch_one_is_unbatched():
    async def main():
        gate = Gate()
        b = make(gate, max_batch=1, max_wait_s=HUGE)
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        c.spawn(1, 2, 3)
        await c.settled(queued=2)
        gate.open()
        assert await c.results(0, 1, 2, 3) == [0, 10, 20, 30]
        assert gate.batches == [[0], [1], [2], [3]]
        await closed(b)

    run(main)


def test_max_inflight_respected():
    async def main():
        gate = Gate()
        b = make(gate, max_batch=1, max_wait_s=0, max_inflight=2)
        c = Client(b)
        c.spawn(*range(6))
        await gate.wait_batches(2)
        # two batches running, the collector holds the third waiting for a slot, 3 queued
        await c.settled(queued=3)
        assert gate.active == 2 and len(gate.batches) == 2
        gate.release(0)
        await gate.wait_batches(3)
        await c.settled(queued=2)
        assert gate.active == 2 and len(gate.batches) == 3
        gate.open()
        assert await c.results(*range(6)) == [x * 10 for x in range(6)]
        assert gate.peak == 2
        assert gate.items == list(range(6))
        await closed(b)

    run(main)


def test_max_inflight_one_never_overlaps():
    async def main():
        gate = Gate()
        gate.open()
        b = make(gate, max_batch=2, max_wait_s=0, max_inflight=1)
        async with asyncio.timeout(WAIT):
            got = await asyncio.gather(*(b.submit(i) for i in range(20)))
        assert got == [x * 10 for x in range(20)]
        assert gate.peak == 1
        assert all(1 <= len(batch) <= 2 for batch in gate.batches)
        assert gate.items == list(range(20))
        await closed(b)

    run(main)


def test_partial_batch_dispatched_when_max_wait_elapses():
    async def main():
        gate = Gate()
        b = make(gate, max_batch=8, max_wait_s=0.05, max_inflight=2)
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        c.spawn(1)
        # batch 0 is still running, so the collector waits for company, then gives up
        await gate.wait_batches(2)
        assert loop.time() - t0 >= 0.04
        assert gate.batches == [[0], [1]]
        gate.open()
        assert await c.results(0, 1) == [0, 10]
        await closed(b)

    run(main)


def test_max_wait_zero_batch_is_whatever_is_queued():
    async def main():
        gate = Gate()
        b = make(gate, max_batch=10, max_wait_s=0, max_inflight=2)
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        c.spawn(1, 2)
        # batch 0 is running, yet [1, 2] goes straight out: max_wait 0 means no waiting
        await gate.wait_batches(2)
        assert gate.batches[1] == [1, 2]
        c.spawn(3, 4, 5)
        await c.settled(queued=0)  # both slots busy: the collector holds [3, 4, 5]
        gate.release(0)
        await gate.wait_batches(3)
        assert gate.batches[2] == [3, 4, 5]
        gate.open()
        assert await c.results(*range(6)) == [x * 10 for x in range(6)]
        await closed(b)

    run(main)


def test_max_wait_zero_collects_queued_items_behind_a_busy_slot():
    async def main():
        gate = Gate()
        b = make(gate, max_batch=10, max_wait_s=0, max_inflight=1)
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        c.spawn(1, 2)
        await c.settled(queued=0)  # collector holds [1, 2], waiting for the slot
        c.spawn(3, 4, 5)
        await c.settled(queued=3)
        gate.open()
        assert await c.results(*range(6)) == [x * 10 for x in range(6)]
        assert gate.batches == [[0], [1, 2], [3, 4, 5]]
        await closed(b)

    run(main)


# ---- bounds


def test_full_queue_raises_overloaded_at_once():
    async def main():
        gate = Gate()
        b = make(gate, max_batch=1, max_wait_s=HUGE, max_queue=3, max_inflight=1)
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        c.spawn(1)
        await c.settled(queued=0)  # the collector holds 1, waiting for the only slot
        c.spawn(2, 3, 4)
        await c.settled(queued=3)
        assert b.queued == 3
        async with asyncio.timeout(WAIT):
            with pytest.raises(Overloaded, match="full"):
                await b.submit(5)
        assert b.queued == 3
        gate.open()
        assert await c.results(0, 1, 2, 3, 4) == [0, 10, 20, 30, 40]
        assert 5 not in gate.items
        # room again once drained
        async with asyncio.timeout(WAIT):
            assert await b.submit(6) == 60
        await closed(b)

    run(main)


def test_overloaded_spawned_tasks_fail_and_others_succeed():
    async def main():
        gate = Gate()
        b = make(gate, max_batch=1, max_wait_s=HUGE, max_queue=2, max_inflight=1)
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        c.spawn(1)
        await c.settled(queued=0)
        tasks = c.spawn(2, 3, 4, 5)  # all four put before the collector can run: two fit
        async with asyncio.timeout(WAIT):
            done = await asyncio.gather(*tasks[2:], return_exceptions=True)
        assert all(isinstance(e, Overloaded) for e in done)
        gate.open()
        assert await c.results(0, 1, 2, 3) == [0, 10, 20, 30]
        await closed(b)

    run(main)


# ---- errors


def test_handle_exception_reaches_every_caller_and_batcher_keeps_working():
    class Boom(Exception):
        pass

    def result(items: list[int]) -> list[int]:
        if any(x < 0 for x in items):
            raise Boom(f"bad batch {items}")
        return [x * 10 for x in items]

    async def main():
        gate = Gate(result=result)
        b = make(gate, max_batch=3, max_wait_s=HUGE)
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        c.spawn(1, -1, 2, 3, 4, 5)
        await c.settled(queued=3)
        gate.open()
        async with asyncio.timeout(WAIT):
            got = await asyncio.gather(*c.tasks.values(), return_exceptions=True)
        assert gate.batches == [[0], [1, -1, 2], [3, 4, 5]]
        assert got[0] == 0 and got[4:] == [30, 40, 50]
        errors = got[1:4]
        assert all(isinstance(e, Boom) for e in errors)
        assert errors[0] is errors[1] is errors[2]
        async with asyncio.timeout(WAIT):
            assert await b.submit(6) == 60
        await closed(b)

    run(main)


def test_lone_request_gets_handle_exception():
    async def main():
        async def handle(items: list[int]) -> list[int]:
            raise ValueError("model failed")

        b = make(handle)
        async with asyncio.timeout(WAIT):
            with pytest.raises(ValueError, match="model failed"):
                await b.submit(1)
            with pytest.raises(ValueError, match="model failed"):
                await b.submit(2)
        await closed(b)

    run(main)


@pytest.mark.parametrize("wrong", [lambda items: [], lambda items: [0] * (len(items) + 1)])
def test_wrong_result_count_is_an_error_for_callers(wrong):
    def result(items: list[int]) -> list[int]:
        return wrong(items) if 99 in items else [x * 10 for x in items]

    async def main():
        gate = Gate(result=result)
        b = make(gate, max_batch=2, max_wait_s=HUGE)
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        c.spawn(99, 1, 2, 3)
        await c.settled(queued=2)
        gate.open()
        async with asyncio.timeout(WAIT):
            got = await asyncio.gather(*c.tasks.values(), return_exceptions=True)
        assert gate.batches == [[0], [99, 1], [2, 3]]
        assert got[0] == 0 and got[3:] == [20, 30]
        for e in got[1:3]:
            assert isinstance(e, RuntimeError)
            assert "results for 2" in str(e)
        async with asyncio.timeout(WAIT):
            assert await b.submit(4) == 40
        await closed(b)

    run(main)


# ---- cancelled callers


def test_cancelled_queued_caller_is_skipped():
    async def main():
        gate = Gate()
        b = make(gate, max_batch=2, max_wait_s=0, max_inflight=1)
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        c.spawn(1)
        await c.settled(queued=0)  # the collector holds [1], waiting for the slot
        c.spawn(2, 3, 4)
        await c.settled(queued=3)
        c.tasks[3].cancel()
        async with asyncio.timeout(WAIT):
            with pytest.raises(asyncio.CancelledError):
                await c.tasks[3]
        gate.open()
        assert await c.results(0, 1, 2, 4) == [0, 10, 20, 40]
        assert 3 not in gate.items
        assert gate.batches == [[0], [1], [2], [4]]
        await closed(b)

    run(main)


def test_batch_of_only_cancelled_callers_never_reaches_handle():
    async def main():
        gate = Gate()
        seen: list[int] = []
        b = make(gate, max_batch=2, max_wait_s=0, on_batch=lambda n, w: seen.append(n))
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        c.spawn(1)
        await c.settled(queued=0)
        c.spawn(2, 3, 4)
        await c.settled(queued=3)
        for item in (2, 3):  # the whole next batch gives up
            c.tasks[item].cancel()
        async with asyncio.timeout(WAIT):
            await asyncio.gather(c.tasks[2], c.tasks[3], return_exceptions=True)
        gate.open()
        assert await c.results(0, 1, 4) == [0, 10, 40]
        assert gate.batches == [[0], [1], [4]]
        assert seen == [1, 1, 1]
        await closed(b)

    run(main)


def test_caller_cancelled_while_its_batch_runs_does_not_break_the_batch():
    async def main():
        gate = Gate()
        b = make(gate, max_batch=4, max_wait_s=HUGE)
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        c.spawn(1, 2, 3, 4)
        await c.settled(queued=0)
        gate.release(0)
        await gate.wait_batches(2)
        c.tasks[2].cancel()
        async with asyncio.timeout(WAIT):
            await asyncio.gather(c.tasks[2], return_exceptions=True)
        gate.open()
        assert await c.results(0, 1, 3, 4) == [0, 10, 30, 40]
        assert c.tasks[2].cancelled()
        async with asyncio.timeout(WAIT):
            assert await b.submit(5) == 50
        await closed(b)

    run(main)


# ---- close


def test_close_flushes_queued_and_running_then_refuses_submissions():
    async def main():
        gate = Gate()
        b = make(gate, max_batch=4, max_wait_s=HUGE, max_inflight=1)
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        c.spawn(*range(1, 7))
        await c.settled(queued=2)  # [1..4] held by the collector, 5 and 6 queued
        closing = asyncio.Event()

        async def close() -> None:
            closing.set()  # close() marks the batcher closed in this same step
            await b.close()

        closer = asyncio.create_task(close())
        async with asyncio.timeout(WAIT):
            await closing.wait()
        with pytest.raises(Overloaded):
            await b.submit(100)
        assert not closer.done()
        gate.release(0)
        await gate.wait_batches(2)
        assert not closer.done()  # batch [1..4] still running
        gate.open()
        async with asyncio.timeout(WAIT):
            await closer
        # every result was delivered by the time close() returned
        assert all(t.done() for t in c.tasks.values())
        assert await c.results(*range(7)) == [x * 10 for x in range(7)]
        assert gate.batches == [[0], [1, 2, 3, 4], [5, 6]]
        assert 100 not in gate.items
        with pytest.raises(Overloaded):
            await b.submit(101)

    run(main)


def test_close_flushes_a_batch_the_collector_is_waiting_to_fill():
    async def main():
        gate = Gate()
        b = make(gate, max_batch=8, max_wait_s=HUGE, max_inflight=2)
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        c.spawn(1, 2)
        await c.settled(queued=0)  # collector holds [1, 2], waiting up to max_wait for more
        closer = asyncio.create_task(b.close())
        await gate.wait_batches(2)  # close() cuts the wait short
        assert gate.batches[1] == [1, 2]
        gate.open()
        async with asyncio.timeout(WAIT):
            await closer
        assert await c.results(0, 1, 2) == [0, 10, 20]

    run(main)


def test_close_waits_for_a_running_batch():
    async def main():
        gate = Gate()
        b = make(gate)
        c = Client(b)
        c.spawn(1)
        await gate.wait_batches(1)
        closer = asyncio.create_task(b.close())
        await wait_until(lambda: b.queued == 0 and gate.active == 1)
        for _ in range(20):  # give close() every chance to (wrongly) finish early
            await asyncio.sleep(0)
        assert not closer.done()
        gate.open()
        async with asyncio.timeout(WAIT):
            await closer
        assert c.tasks[1].done() and c.tasks[1].result() == 10

    run(main)


def test_close_idle_is_quick_and_idempotent():
    async def main():
        b = make(Gate())
        await closed(b)
        await closed(b)
        with pytest.raises(Overloaded):
            await b.submit(1)

    run(main)


def test_submit_before_start_and_close_before_start():
    async def main():
        b: MicroBatcher[int, int] = MicroBatcher(Gate(), max_batch=2, max_wait_s=0, max_queue=2)
        assert b.queued == 0
        with pytest.raises(Overloaded, match="not running"):
            await b.submit(1)
        await closed(b)  # a no-op

    run(main)


def test_start_twice_raises():
    async def main():
        b = make(Gate())
        with pytest.raises(RuntimeError, match="already started"):
            b.start()
        await closed(b)

    run(main)


# ---- observer


def test_on_batch_receives_size_and_non_negative_waits():
    calls: list[tuple[int, list[float]]] = []

    def observe(size: int, waits: Sequence[float]) -> None:
        calls.append((size, list(waits)))

    async def main():
        gate = Gate()
        b = make(gate, max_batch=3, max_wait_s=HUGE, on_batch=observe)
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        c.spawn(*range(1, 7))
        await c.settled(queued=3)
        gate.open()
        assert await c.results(*range(7)) == [x * 10 for x in range(7)]
        await closed(b)
        assert [len(batch) for batch in gate.batches] == [1, 3, 3]

    run(main)
    assert [size for size, _ in calls] == [1, 3, 3]
    for size, waits in calls:
        assert len(waits) == size
        assert all(isinstance(w, float) and w >= 0 for w in waits)


# ---- constructor


@pytest.mark.parametrize(
    "kw",
    [
        {"max_batch": 0},
        {"max_batch": -1},
        {"max_queue": 0},
        {"max_inflight": 0},
        {"max_wait_s": -0.001},
    ],
)
def test_constructor_rejects_bad_bounds(kw):
    args = {"max_batch": 4, "max_wait_s": 0.01, "max_queue": 8, "max_inflight": 1} | kw
    with pytest.raises(ValueError):
        MicroBatcher(Gate(), **args)


def test_constructor_accepts_minimal_bounds_without_a_loop():
    b = MicroBatcher(Gate(), max_batch=1, max_wait_s=0, max_queue=1, max_inflight=1)
    assert b.queued == 0
    assert (b.max_batch, b.max_wait_s, b.max_queue, b.max_inflight) == (1, 0, 1, 1)


# ---- regressions of bugs found in review (fixed in service/batcher.py)


def test_item_waiting_for_company_is_dispatched_when_the_model_goes_idle():
    async def main():
        gate = Gate()
        b = make(gate, max_batch=8, max_wait_s=HUGE, max_inflight=1)
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        c.spawn(1)
        await c.settled(queued=0)  # collector holds [1] and waits for company (batch 0 runs)
        gate.open()
        try:
            async with asyncio.timeout(0.5):
                assert await c.tasks[1] == 10  # the model is idle now: no reason to wait 60 s
        finally:
            await closed(b)

    run(main)


def test_caller_cancelled_while_batch_waits_for_a_slot_is_skipped():
    async def main():
        gate = Gate()
        b = make(gate, max_batch=2, max_wait_s=0, max_inflight=1)
        c = Client(b)
        c.spawn(0)
        await gate.wait_batches(1)
        c.spawn(1, 2)
        await c.settled(queued=0)  # [1, 2] collected, waiting for the slot
        c.tasks[2].cancel()
        async with asyncio.timeout(WAIT):
            await asyncio.gather(c.tasks[2], return_exceptions=True)
        gate.open()
        assert await c.results(0, 1) == [0, 10]
        await closed(b)
        assert 2 not in gate.items

    run(main)


def test_on_batch_error_does_not_strand_callers():
    def observe(size: int, waits: Sequence[float]) -> None:
        raise RuntimeError("metrics backend down")

    async def main():
        gate = Gate()
        gate.open()
        b = make(gate, on_batch=observe)
        try:
            async with asyncio.timeout(0.5):
                # a result or the observer's error are both fine; hanging is not
                await asyncio.gather(b.submit(1), return_exceptions=True)
        finally:
            await closed(b)

    run(main)


def test_handle_cancelled_error_does_not_strand_callers():
    async def main():
        async def handle(items: list[int]) -> list[int]:
            raise asyncio.CancelledError()

        b = make(handle)
        try:
            async with asyncio.timeout(0.5):
                await asyncio.gather(b.submit(1), return_exceptions=True)
        finally:
            await closed(b)

    run(main)
