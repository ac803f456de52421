"""Fault tests: real redis-server processes killed, slowed and restarted, model reloads and a
service process restart, each under a bounded load (loopback only, every wait a polled
condition under a deadline). The same scenarios at a larger scale: benchmarks/reliability.py;
what each test asserts and the measured figures: docs/RELIABILITY.md.

Load: ``drive`` runs a few asyncio workers over one ``httpx.AsyncClient`` against the real app
under uvicorn (``tests.servers.LiveServer``), each bounded by a request count and wall time,
recording every request's send/finish time, status and body; a scenario watches that record
live and injects its fault when a condition holds (e.g. "40 answers from state so far").
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import signal
import socket
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from service.settings import Settings
from service.state import decode_session
from service.store import RedisStateStore
from tests import servers
from tests.servers import (
    LiveServer,
    RedisProcess,
    build_registry,
    first_pong,
    free_port,
    run,
    wait_until,
)

K = 10
TOKEN = "fault-admin-token"
T0 = 1_760_000_000  # session end times of seeded users
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_registry(tmp_path_factory.mktemp("faults"))


def settings_for(registry_root: Path, redis_url: str, **kw) -> Settings:
    return Settings(
        redis_url=redis_url, registry=registry_root, log_sessions=64, admin_token=TOKEN, **kw
    )


# ----------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Hit:
    kind: str  # "recommend" | "close"
    sent: float  # time.monotonic()
    done: float
    status: int  # 0: the HTTP request itself failed (no answer)
    body: dict

    @property
    def source(self) -> str | None:
        return self.body.get("source")


async def drive(client, make, hits: list[Hit], stop: asyncio.Event, *, workers, requests, seconds):
    """``workers`` loops posting ``make(n) -> (kind, path, json)`` until ``stop`` is set,
    ``requests`` were sent in all, or ``seconds`` have passed. Appends to ``hits`` live."""
    counter = itertools.count()
    deadline = time.monotonic() + seconds

    async def worker():
        while not stop.is_set() and time.monotonic() < deadline:
            n = next(counter)
            if n >= requests:
                return
            kind, path, payload = make(n)
            sent = time.monotonic()
            try:
                r = await client.post(path, json=payload)
                status = r.status_code
                body = r.json() if r.content else {}
                if status == 503:
                    body["retry_after"] = r.headers.get("retry-after")
            except httpx.HTTPError as exc:
                status, body = 0, {"error": repr(exc)}
            hits.append(Hit(kind, sent, time.monotonic(), status, body))

    await asyncio.gather(*(worker() for _ in range(workers)))


async def until(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` (cheap, synchronous) under a deadline while the load runs."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)  # polling a condition under a deadline


def recommend_body(user: str, **extra) -> dict:
    return {"user_id": user, "k": K, **extra}


def session_body(user: str, sid: str, n: int, items: list[str]) -> dict:
    return {
        "user_id": user,
        "session_id": sid,
        "started_at": T0 + n * 3600,
        "ended_at": T0 + n * 3600 + 600,
        "items": [{"item_id": it, "label": i % 2} for i, it in enumerate(items)],
    }


def seed(client: httpx.Client, ds, prefix: str, n_users: int, n_sessions: int = 3) -> list[str]:
    users = [f"{prefix}{u}" for u in range(n_users)]
    for u, user in enumerate(users):
        for n in range(n_sessions):
            items = [ds.item_ids[(u * 7 + n * 3 + j) % ds.n_items] for j in range(4)]
            r = client.post("/sessions", json=session_body(user, f"s{n}", n, items))
            assert r.status_code == 200, r.text

    def from_state(user: str) -> bool:  # a busy machine may pass the Redis deadline once
        r = client.post("/recommend/session", json=recommend_body(user))
        assert r.status_code == 200, r.text
        return r.json()["source"] == "state"

    for user in users:
        wait_until(lambda u=user: from_state(u), 10, f"{user} served from state")
    return users


def logged_sessions(url: str, users: list[str]) -> dict[str, list[str]]:
    """Session ids in each user's raw log, read straight from Redis."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        keys = RedisStateStore(client, max_sessions=64).keys
        return {
            u: [decode_session(raw).session_id for raw in client.zrange(keys(u)[0], 0, -1)]
            for u in users
        }
    finally:
        client.close()


def non_200(hits: list[Hit]) -> list[tuple]:
    return [(h.kind, h.status, h.body) for h in hits if h.status != 200][:5]


# ----------------------------------------------------------------------------- Redis killed


def test_redis_sigkill_under_load_gives_no_5xx_degraded_answers_and_recovery_within_2s(
    world, tmp_path
):
    """8 workers post recommendations for seeded users. After 40 `state` answers Redis gets
    SIGKILL; after 40 `degraded` answers it is restarted on the same port (same AOF). Every
    answer is a 200 with k items, every request sent while Redis was down is `degraded`, and the
    first `state` answer arrives ≤ 2 s after Redis answers PING again."""
    ds, registry, _ = world
    redis_proc = RedisProcess(tmp_path / "redis").start()
    settings = settings_for(registry.root, redis_proc.url, redis_timeout_ms=200)
    hits: list[Hit] = []
    marks: dict[str, float] = {}

    async def scenario(server):
        stop = asyncio.Event()
        async with server.async_client() as c:
            users = itertools.cycle(seeded)
            load = asyncio.create_task(
                drive(
                    c,
                    lambda n: ("recommend", "/recommend/session", recommend_body(next(users))),
                    hits,
                    stop,
                    workers=8,
                    requests=2_000,
                    seconds=30,
                )
            )
            try:
                await until(lambda: sum(h.source == "state" for h in hits) >= 40, 15, "state")
                marks["kill"] = redis_proc.kill()
                await until(
                    lambda: sum(h.sent > marks["kill"] for h in hits) >= 40, 15, "outage answers"
                )
                marks["ready_503"] = (await c.get("/readyz")).status_code
                pong = asyncio.create_task(first_pong(redis_proc.port, 15))
                # Until this instant Redis is certainly down; the PING probe can notice it is
                # back only some milliseconds after it really is (the probe shares a busy loop).
                marks["restart"] = time.monotonic()
                await asyncio.to_thread(redis_proc.start)
                marks["back"] = await pong
                await until(
                    lambda: sum(h.source == "state" and h.sent > marks["back"] for h in hits) >= 40,
                    15,
                    "state answers after Redis returned",
                )
            finally:
                stop.set()
                await load

    try:
        with LiveServer(settings) as server:
            with server.client() as c:
                seeded = seed(c, ds, "k", 8)
            run(scenario(server))
    finally:
        redis_proc.stop()

    assert non_200(hits) == [], non_200(hits)
    assert all(len(h.body["items"]) == K for h in hits)
    outage = [h for h in hits if marks["kill"] < h.sent and h.done < marks["restart"]]
    assert len(outage) >= 40 and {h.source for h in outage} == {"degraded"}
    assert marks["ready_503"] == 503
    first_state = min(h.done for h in hits if h.sent > marks["kill"] and h.source == "state")
    recovery = first_state - marks["back"]
    sources = Counter(h.source for h in hits)
    print(f"\nredis kill: {len(hits)} answers {dict(sources)}, recovery {recovery * 1000:.0f} ms")
    assert recovery <= 2.0, f"first state answer {recovery:.3f} s after Redis answered PING"


# ----------------------------------------------------------------------------- AOF durability


def test_closes_acknowledged_before_a_redis_sigkill_survive_the_aof_restart(world, tmp_path):
    """8 workers close unique sessions for 16 users (AOF ``appendfsync always``, as
    RedisProcess runs it). Redis gets SIGKILL after 40 acknowledged closes; closes meanwhile get
    503 with Retry-After (never another 5xx). After the restart every close acknowledged with
    200 is in the log; posting the rest (8 at a time, a 503 retried up to 5 times: closes are
    idempotent) completes the set, with no duplicate and nothing else in the logs."""
    ds, registry, _ = world
    redis_proc = RedisProcess(tmp_path / "redis").start()
    settings = settings_for(registry.root, redis_proc.url, redis_timeout_ms=200)
    users = [f"a{u}" for u in range(16)]
    items = list(ds.item_ids[:40])
    closes = [
        session_body(u, f"{u}-s{n}", n, items[(i + n) % 37 : (i + n) % 37 + 3])
        for n in range(8)
        for i, u in enumerate(users)
    ]  # 128 closes, 8 per user
    hits: list[Hit] = []

    async def scenario(server):
        stop = asyncio.Event()
        async with server.async_client() as c:
            load = asyncio.create_task(
                drive(
                    c,
                    lambda n: ("close", "/sessions", closes[n]),
                    hits,
                    stop,
                    workers=8,
                    requests=len(closes),
                    seconds=30,
                )
            )
            try:
                await until(lambda: sum(h.status == 200 for h in hits) >= 40, 15, "40 closes")
                t_kill = redis_proc.kill()
                await until(lambda: sum(h.sent > t_kill for h in hits) >= 8, 15, "outage")
            finally:
                stop.set()
                await load
            await asyncio.to_thread(redis_proc.start)
            acknowledged = [h for h in hits if h.status == 200]
            lost = {
                (h.body["user_id"], h.body["session_id"]) for h in acknowledged
            } - logged_pairs()
            done = {(h.body["user_id"], h.body["session_id"]) for h in acknowledged}
            rest = [b for b in closes if (b["user_id"], b["session_id"]) not in done]
            slots = asyncio.Semaphore(8)

            async def post(body) -> list[int]:
                # as a client does: a 503 (Retry-After) is retried, at most 5 attempts; a
                # close is idempotent on session_id, so a retry never appends twice
                statuses = []
                async with slots:
                    while len(statuses) < 5 and (not statuses or statuses[-1] == 503):
                        statuses.append((await c.post("/sessions", json=body)).status_code)
                return statuses

            retried = await asyncio.gather(*(post(b) for b in rest))
            return acknowledged, lost, retried

    def logged_pairs() -> set[tuple[str, str]]:
        return {(u, s) for u, ids in logged_sessions(redis_proc.url, users).items() for s in ids}

    try:
        with LiveServer(settings) as server:
            acknowledged, lost, retried = run(scenario(server))
            logs = logged_sessions(redis_proc.url, users)
    finally:
        redis_proc.stop()

    refused = [h for h in hits if h.status != 200]
    print(
        f"\naof: {len(acknowledged)} acknowledged before/at the kill, {len(refused)} refused, "
        f"{len(retried)} posted after the restart ({sum(len(r) - 1 for r in retried)} "
        f"retries of a 503), lost {len(lost)}"
    )
    assert len(acknowledged) >= 40 and lost == set()
    assert refused and all(h.status == 503 and h.body.get("retry_after") for h in refused), [
        (h.status, h.body) for h in refused if h.status != 503
    ][:3]
    assert [r[-1] for r in retried] == [200] * len(retried), retried
    for user in users:  # exactly the posted sessions, each once, in time order
        assert logs[user] == [f"{user}-s{n}" for n in range(8)], (user, logs[user])


# ----------------------------------------------------------------------------- Redis slowed


def test_a_slow_redis_gives_degraded_answers_within_the_deadline(world, tmp_path):
    """``DEBUG SLEEP 2`` from a separate client blocks Redis for 2 s, far beyond
    ``SESSIONREC_REDIS_TIMEOUT_MS`` = 100. Every request sent once Redis is seen blocked and
    finished before the sleep can have ended is a 200 `degraded` answer in < 0.1 + 1.5 s; after
    the sleep the service serves from `state` again."""
    ds, registry, _ = world
    redis_proc = RedisProcess(tmp_path / "redis").start()
    timeout_s = 0.1
    settings = settings_for(registry.root, redis_proc.url, redis_timeout_ms=timeout_s * 1000)
    sleep_s = 2.0
    hits: list[Hit] = []
    marks: dict[str, float] = {}

    def debug_sleep():
        client = redis.Redis(port=redis_proc.port, socket_timeout=30)
        try:
            marks["sleep_sent"] = time.monotonic()
            client.execute_command("DEBUG", "SLEEP", sleep_s)
            marks["sleep_returned"] = time.monotonic()
        finally:
            client.close()

    def blocked() -> bool:
        """A raw PING on a new connection gets no answer within 50 ms (the kernel still
        accepts connections while the server's event loop sleeps)."""
        with socket.create_connection(("127.0.0.1", redis_proc.port), timeout=1) as probe:
            probe.sendall(b"PING\r\n")
            probe.settimeout(0.05)
            try:
                return not probe.recv(64).startswith(b"+PONG")
            except TimeoutError:
                return True

    async def scenario(server):
        stop = asyncio.Event()
        async with server.async_client() as c:
            users = itertools.cycle(seeded)
            load = asyncio.create_task(
                drive(
                    c,
                    lambda n: ("recommend", "/recommend/session", recommend_body(next(users))),
                    hits,
                    stop,
                    workers=4,
                    requests=400,
                    seconds=15,
                )
            )
            try:
                await until(lambda: sum(h.source == "state" for h in hits) >= 20, 15, "state")
                sleeper.start()
                marks["blocked"] = await asyncio.to_thread(
                    lambda: wait_until(blocked, 5, "redis blocked") and time.monotonic()
                )
                await until(lambda: "sleep_returned" in marks, sleep_s + 5, "the sleep to end")
                after = marks["sleep_returned"]
                await until(
                    lambda: sum(h.source == "state" and h.sent > after for h in hits) >= 20,
                    10,
                    "state answers after the sleep",
                )
            finally:
                stop.set()
                await load

    sleeper = threading.Thread(target=debug_sleep, daemon=True)
    try:
        with LiveServer(settings) as server:
            with server.client() as c:
                seeded = seed(c, ds, "z", 4)
            run(scenario(server))
    finally:
        if sleeper.is_alive():
            sleeper.join(timeout=sleep_s + 10)
        redis_proc.stop()

    assert non_200(hits) == [], non_200(hits)
    sleep_ends = marks["sleep_sent"] + sleep_s  # the earliest Redis can answer again
    during = [h for h in hits if h.sent >= marks["blocked"] and h.done <= sleep_ends]
    latencies = sorted(h.done - h.sent for h in during)
    print(
        f"\nslow redis: {len(during)} requests during the sleep, latency ms "
        f"median {statistics.median(latencies) * 1000:.0f} max {latencies[-1] * 1000:.0f}"
    )
    assert len(during) >= 5
    assert {h.source for h in during} == {"degraded"}
    assert latencies[-1] < timeout_s + 1.5, latencies[-5:]


# ----------------------------------------------------------------------------- reloads


def test_reload_under_load_drops_no_request_and_a_broken_artifact_is_refused(world, tmp_path):
    """6 workers post recommendations (seeded and cold users) and closes while six
    ``/admin/reload`` swap between two versions, each reload waiting for more answers first.
    No request fails (every one is a 200 with k items), answers come from both versions. Then a
    corrupted ``model.safetensors`` and a missing ``item_index.faiss`` are each refused with 422
    naming the file, and the old generation keeps serving (also under the load)."""
    ds, registry, versions = world
    copy = tmp_path / "artifacts"
    shutil.copytree(registry.root, copy)
    redis_proc = RedisProcess(tmp_path / "redis").start()
    settings = settings_for(copy, redis_proc.url, redis_timeout_ms=2000)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    hits: list[Hit] = []
    reloads: list[tuple[str, int, str]] = []
    marks: dict[str, float] = {}

    def make(n: int):
        if n % 10 == 9:
            user = f"rl{n % 4}"
            return "close", "/sessions", session_body(user, f"load-{n}", 10 + n, ds.item_ids[:3])
        user = seeded[n % len(seeded)] if n % 5 else f"cold{n}"
        return "recommend", "/recommend/session", recommend_body(user)

    async def reload(c, ref: str) -> httpx.Response:
        r = await c.post("/admin/reload", json={"model_ref": ref}, headers=auth, timeout=60)
        reloads.append((ref, r.status_code, r.text))
        return r

    async def scenario(server):
        stop = asyncio.Event()
        async with server.async_client() as c:
            load = asyncio.create_task(
                drive(c, make, hits, stop, workers=6, requests=3_000, seconds=40)
            )
            try:
                for i in range(6):
                    seen = len(hits)
                    await until(lambda s=seen: len(hits) >= s + 15, 15, "answers between reloads")
                    target, previous = versions[(i + 1) % 2], versions[i % 2]
                    r = await reload(c, target)
                    assert r.status_code == 200, r.text
                    assert r.json() == {"previous_version": previous, "model_version": target}
                weights = copy / versions[1] / "model.safetensors"
                intact = weights.read_bytes()
                broken = bytearray(intact)
                broken[len(broken) // 2] ^= 0xFF
                weights.write_bytes(bytes(broken))
                corrupt = await reload(c, versions[1])
                weights.write_bytes(intact)
                index = copy / versions[1] / "item_index.faiss"
                index.rename(index.with_suffix(".moved"))
                missing = await reload(c, versions[1])
                marks["refused"] = time.monotonic()
                model = (await c.get("/model")).json()["version"]
                seen = len(hits)
                await until(lambda: len(hits) >= seen + 30, 15, "answers after the refusals")
            finally:
                stop.set()
                await load
            return corrupt, missing, model

    try:
        with LiveServer(settings) as server:
            with server.client() as c:
                seeded = seed(c, ds, "r", 8)
            corrupt, missing, serving = run(scenario(server))
            metrics = httpx.get(f"{server.url}/metrics").text
    finally:
        redis_proc.stop()

    recs = [h for h in hits if h.kind == "recommend"]
    print(
        f"\nreload: {len(reloads)} reloads, {len(hits)} requests "
        f"({len(hits) - len(recs)} closes), failed {len(non_200(hits))}, "
        f"sources {dict(Counter(h.source for h in recs))}"
    )
    assert non_200(hits) == [], non_200(hits)
    assert all(len(h.body["items"]) == K for h in recs)
    assert {h.body["model_version"] for h in recs} == set(versions)
    assert "degraded" not in {h.source for h in recs}
    for response, file in ((corrupt, "model.safetensors"), (missing, "item_index.faiss")):
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert "reload refused" in detail and file in detail, detail
        assert f"still serving {versions[0]}" in detail
    assert serving == versions[0]
    after_refusals = [h for h in recs if h.sent > marks["refused"]]
    assert after_refusals and {h.body["model_version"] for h in after_refusals} == {versions[0]}
    assert 'sessionrec_reloads_total{result="refused"} 2.0' in metrics
    assert 'sessionrec_reloads_total{result="swapped"} 6.0' in metrics


# ----------------------------------------------------------------------------- service restart


class ServeProcess(servers.ServeProcess):
    """The real service process, watched for readiness during its start-up."""

    def watch_readiness(self, timeout: float = 90) -> list[tuple[float, str, int | None]]:
        """Poll ``/readyz`` every ~10 ms from the start until the first 200. Each observation
        is (seconds since start, lifespan phase read from the log just before, status; None =
        connection refused). The phase: ``importing`` (uvicorn not started yet), ``lifespan``
        (``Waiting for application startup.`` logged: loading and warming), ``started``
        (``Application startup complete.`` logged)."""
        with httpx.Client(base_url=self.url, timeout=2) as client:
            return self._watch(client, time.monotonic(), timeout)

    def _watch(self, client: httpx.Client, started: float, timeout: float):
        seen = []
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited ({self.proc.returncode}):\n{self.log()}")
            text = self.log()
            phase = (
                "started"
                if "Application startup complete" in text
                else "lifespan"
                if "Waiting for application startup" in text
                else "importing"
            )
            try:
                status = client.get("/readyz").status_code
            except httpx.TransportError:
                status = None
            seen.append((time.monotonic() - started, phase, status))
            if status == 200:
                return seen
            if time.monotonic() - started > timeout:
                raise AssertionError(f"not ready within {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.01)  # polling a condition under a deadline


def test_a_restarted_service_process_keeps_state_and_is_not_ready_until_warm(
    world, redis_url, tmp_path
):
    """``sessionrec serve`` as a real process (SESSIONREC_REDIS_URL, SESSIONREC_REGISTRY). Four
    users close sessions through it and get answers from `state`; it is SIGKILLed and started
    again on the same port, ``/readyz`` probed every ~10 ms from the start. While it imports,
    loads and warms, ``/readyz`` never answers: uvicorn opens the port only after the lifespan
    (load, verify, warm every bucket) has finished, so every probe before the first 200 is
    refused (no 503 can be observed: there is no listener yet), and when the first 200 comes the
    log already holds ``serving <version>`` (written after warm-up) and ``Application startup
    complete``. How many refused probes fell inside the lifespan is printed, not asserted (it
    lasts ~50 ms with this tiny model). Then the same users get the same items from `state` or
    `rebuilt`, their logs are intact, and a SIGTERM stops the process gracefully."""
    ds, registry, versions = world
    env = {
        "SESSIONREC_REDIS_URL": redis_url,
        "SESSIONREC_REGISTRY": str(registry.root),
        "SESSIONREC_LOG_SESSIONS": "64",
        "SESSIONREC_LOG_LEVEL": "info",
        "SESSIONREC_REDIS_TIMEOUT_MS": "2000",  # state, not deadlines, is under test here
    }
    port = free_port()
    first = ServeProcess(port, env, tmp_path / "first.log").start()
    try:
        first.watch_readiness()
        with httpx.Client(base_url=first.url, timeout=30) as c:
            users = seed(c, ds, "p", 4)
            ctx = {"context": {"timestamp": T0 + 86_400}}
            before = [c.post("/recommend/session", json=recommend_body(u, **ctx)) for u in users]
    finally:
        first.stop(signal.SIGKILL)
    assert [r.json()["source"] for r in before] == ["state"] * len(users)

    second = ServeProcess(port, env, tmp_path / "second.log").start()
    try:
        seen = second.watch_readiness()
        log_at_ready = second.log()
        with httpx.Client(base_url=second.url, timeout=30) as c:
            after = [c.post("/recommend/session", json=recommend_body(u, **ctx)) for u in users]
            ready = c.get("/readyz").json()
    finally:
        rc = second.stop(signal.SIGTERM)

    phases = Counter((phase, status) for _, phase, status in seen)
    print(f"\nrestart: ready after {seen[-1][0]:.2f} s; probes (phase, status): {dict(phases)}")
    assert seen[-1][2] == 200
    assert all(status is None for _, _, status in seen[:-1])  # port closed until warm
    assert f"serving {versions[0]} on " in log_at_ready
    assert "Application startup complete" in log_at_ready
    assert ready["ready"] and ready["warmed_up"] and ready["redis"]
    for b, a in zip(before, after, strict=True):
        assert a.status_code == 200 and a.json()["source"] in ("state", "rebuilt")
        assert [i["item_id"] for i in a.json()["items"]] == [
            i["item_id"] for i in b.json()["items"]
        ]
    assert logged_sessions(redis_url, users) == {u: ["s0", "s1", "s2"] for u in users}
    assert rc in (0, -signal.SIGTERM), rc  # uvicorn re-raises SIGTERM after a clean shutdown
    assert "Application shutdown complete" in second.log()
