"""The service end to end: micro-batching on vs off, and Redis bytes per user.

    .venv/bin/python benchmarks/serve.py --out docs/serve.json

Why: the brief asks for ≥ 3× the throughput with micro-batching on vs off at 64 concurrent
clients, and for the per-user Redis cost of the state (raw session log + K/V cache) against the
raw K/V payload. One seeded run measures both, side by side, against real processes:

1. World. ``training.loaders.prepare("synthetic", n_users=2000, n_items=5000,
   sessions_per_user=20)``; one SessionRec of the default architecture (dim 64, 2 layers,
   2 heads, W = 64) trained for 1 epoch and promoted; a flat FAISS index added to the artifact
   (the calls of ``tests/servers.py::build_registry``). A real redis-server
   (``tests.servers.RedisProcess``: loopback, AOF on); every user backfilled into db 0 with
   ``service.backfill.backfill`` (fp32 K/V, the service default).
2. Throughput. For each config — batched (``max_batch`` 64, ``max_wait_ms`` 2) and unbatched
   (``max_batch`` 1) — ``sessionrec serve`` runs in its own process (``SESSIONREC_*`` env;
   polled on ``GET /readyz`` under a deadline; terminated after). Against each server the load
   generator (this process) runs two clients, one after the other: ``httpx`` (one
   ``httpx.AsyncClient``, ``max_connections`` = ``--concurrency``) and ``raw`` (one
   keep-alive HTTP/1.1 connection per worker over asyncio streams, ~0.1 ms of client CPU per
   request where httpx spends ~6 ms: with httpx the *client* saturates first). Each runs
   ``--concurrency`` workers posting ``POST /recommend/session {"user_id", "k": 50}``, users
   drawn Zipf-like (p ∝ 1/rank^``--zipf``) from the backfilled users in one pre-drawn seeded
   sequence shared by every run; ``--warmup`` requests first (excluded), then ``--requests``
   measured, each phase also capped in wall time. Recorded: throughput, client-side
   p50/p95/p99 latency, batch size (``timing.batch_size`` of each response), non-200 count,
   the ``source`` histogram, the server's own ``timing`` means, and CPU seconds of the
   client, the server and Redis over the measured phase (/proc): all three share the cores.
   ``--rounds`` pairs run in ABBA order. Two diagnostics: ``GET /healthz`` driven the same
   way (the per-request HTTP floor of the server), and ``Runner.recommend`` timed in-process
   at batch 1 and 64 (the model step + index search alone: what batching can buy at most).
3. Redis bytes. ``MEMORY USAGE <key> SAMPLES 0`` of each key, ``STRLEN`` of the K/V string
   and the encodings, for: ``--sample`` backfilled users; ``--full-users`` users built with
   exactly ``log_sessions`` = 129 sessions (the log full, the K/V cache full at W = 64);
   ``--long-users`` users built with ``--long-sessions`` sessions (log trimmed to 129, the
   idempotency id set to its 4 · 129 cap). Built users' sessions are dataset sessions re-timed
   (items per session as in the data) loaded through the backfill's own calls. Each once with
   fp32 K/V (db 0) and once with fp16 (db 1, ``kv_storage="float16"`` → ``state_store``
   writes fp16). One more user's 129 sessions are closed over HTTP (``POST /sessions``) on the
   batched server: a check that the service's write path stores the same bytes.

Raw K/V payload of a user = n_layers · n_heads · n · head_dim · 2 (K and V) · bytes per value,
n = cached sessions (≤ W). The server's ``compute_ms`` includes waiting for its single compute
thread when batches overlap (``max_inflight_batches`` 4), so it bounds the step from above.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import redis  # noqa: E402

from service.state import KVDType, SessionRecord, decode_kv  # noqa: E402
from tests.servers import RedisProcess, free_port, wait_until  # noqa: E402

USER_SAMPLE_SEED_OFFSET = 1
FULL_USER_PREFIX = "full"
LONG_USER_PREFIX = "long"
LOG_SESSIONS = 129  # the service default: n_layers · W + 1 for the default model
BASE_TIME = 1_700_000_000
TARGET_RATIO = 3.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=3000, help="measured requests per config")
    p.add_argument("--warmup", type=int, default=300, help="warm-up requests per config")
    p.add_argument("--concurrency", type=int, default=64, help="client workers = connections")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--zipf", type=float, default=1.0, help="user popularity exponent")
    p.add_argument("--time-cap", type=float, default=90.0, help="seconds per measured phase")
    p.add_argument("--rounds", type=int, default=2, help="config pairs, ABBA order")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--sessions-per-user", type=float, default=20.0)
    p.add_argument("--sample", type=int, default=200, help="users whose Redis bytes are read")
    p.add_argument("--full-users", type=int, default=8, help="users built with 129 sessions")
    p.add_argument("--long-users", type=int, default=2, help="users built with --long-sessions")
    p.add_argument("--long-sessions", type=int, default=600, help="> 4 · 129: ids set full too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/serve.json"))
    p.add_argument("--workdir", type=Path, help="kept if given; default: a temp dir, removed")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- world


def build_world(root: Path, args: argparse.Namespace):
    """Synthetic data → one default-architecture SessionRec (1 epoch, promoted) → flat index."""
    from index import IndexConfig, IndexKind, add_index_to_artifact, build_index
    from model_store.registry import Registry
    from model_store.store import read_item_vectors
    from training.config import TrainConfig
    from training.loaders import prepare
    from training.pipeline import train_and_save

    t0 = time.perf_counter()
    ds = prepare(
        "synthetic",
        root / "data",
        seed=args.seed,
        n_users=args.users,
        n_items=args.items,
        sessions_per_user=args.sessions_per_user,
    )
    log(f"prepared {ds.n_users} users, {ds.n_sessions} sessions ({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    registry = Registry(root / "artifacts")
    cfg = TrainConfig(epochs=1, min_epochs=1, val_users=200, seed=args.seed)
    trained = train_and_save(
        ds, cfg, registry, data_path=root / "data", promote=True, progress=False
    )
    artifact = registry.open(trained.version)
    add_index_to_artifact(
        artifact.root, build_index(read_item_vectors(artifact), IndexConfig(kind=IndexKind.FLAT))
    )
    log(f"trained {trained.version} + flat index ({time.perf_counter() - t0:.1f} s)")
    return ds, root / "artifacts", trained.version


def full_user_records(ds, prefix: str, n_users: int, n_sessions: int, seed: int) -> dict:
    """``n_users`` users × ``n_sessions`` sessions drawn from the dataset's sessions (so items
    per session are as in the data), re-timed a day apart, oldest first."""
    rng = np.random.default_rng(seed + 7)
    out = {}
    for u in range(n_users):
        records = []
        for i, s in enumerate(rng.integers(0, ds.n_sessions, size=n_sessions)):
            items, labels = ds.session(int(s))
            start = BASE_TIME + i * 86_400
            records.append(
                SessionRecord(
                    session_id=f"s{i}",
                    started_at=start,
                    ended_at=start + 600,
                    items=tuple(ds.item_ids[j - 1] for j in items),
                    labels=tuple(int(x) for x in labels),
                )
            )
        out[f"{prefix}{u:03d}"] = records
    return out


async def load_state(url: str, registry: Path, ds, users, records: dict, kv: str):
    """Backfill ``users`` (dataset indices; None = all, [] = none) into ``url`` with K/V stored
    as ``kv``, then ``records`` (user → sessions) through the calls the backfill makes
    (append_many → get_many → Runner.rebuild → put_kv_many). Returns (report, generation)."""
    from service.app import redis_client, state_store
    from service.backfill import backfill
    from service.runner import Runner, load_generation
    from service.settings import Settings

    s = Settings(
        redis_url=url,
        registry=registry,
        kv_storage=kv,
        redis_timeout_ms=60_000,  # long pipelines: a generous deadline, as the CLI's backfill
        log_sessions=LOG_SESSIONS,
        device="cpu",
    )
    gen = load_generation(s.registry, s.model_ref, device="cpu", log_sessions=s.log_sessions)
    client = redis_client(s, url)
    try:
        store = state_store(s, client)
        report = None
        if users is None or len(users):
            report = await backfill(ds, store, gen, users, progress=True)
        if records:
            pairs = [(u, r) for u, recs in records.items() for r in recs]
            await store.append_many(pairs)
            states = await store.get_many(list(records))
            kvs = Runner(max_batch=len(states)).rebuild(
                gen, [x.sessions for x in states], [x.seq for x in states]
            )
            ok = await store.put_kv_many([(x.user_id, k) for x, k in zip(states, kvs, strict=True)])
            if not all(ok):
                raise RuntimeError("a full-window user's cache write was refused")
        return report, gen
    finally:
        await client.aclose()


# ----------------------------------------------------------------------------- server


class ServeProcess:
    """``sessionrec serve`` in its own process, ready when ``GET /readyz`` answers 200."""

    def __init__(self, registry: Path, redis_url: str, env: dict, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.cmd = [
            sys.executable,
            "-m",
            "sessionrec",
            "serve",
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("--registry", str(registry), "--redis-url", redis_url),
        ]
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONREC_")}
        self.env = {**inherited, "SESSIONREC_LOG_LEVEL": "warning", **env}  # defaults + env
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServeProcess:
        self._log = open(self.log_path, "wb")  # closed in __exit__
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
        )

        def ready():
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"sessionrec serve exited ({self.proc.returncode}):\n{tail}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        t0 = time.perf_counter()
        try:
            wait_until(ready, 120, "sessionrec serve to be ready", interval=0.1)
        except BaseException:
            self.__exit__()
            raise
        self.ready_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds every process on the machine has used, seconds stolen by the hypervisor),
    all cores, from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- load


class RawConnection:
    """One keep-alive HTTP/1.1 connection over asyncio streams: the cheapest client Python
    has, so the server, not the load generator, is what runs out of CPU."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"{method} {path} HTTP/1.1\r\nhost: {self.host}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        try:
            self.writer.write(head.encode() + body)
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
            data = await self.reader.readexactly(int(headers["content-length"]))
        except Exception:
            await self.close()
            raise
        if headers.get("connection") == "close":
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


async def run_phase(
    senders: list, bodies: list[bytes], time_cap: float, path: str = "/recommend/session"
) -> dict:
    """One worker per sender posts ``bodies`` in order until all are sent or ``time_cap``.
    A sender is ``async (path, body) -> (status, bytes)``."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    sources: Counter = Counter()
    batch_sizes: list[int] = []
    timings: list[tuple[float, float, float, float]] = []
    state = {"next": 0}
    started = time.perf_counter()
    deadline = started + time_cap

    async def worker(send) -> None:
        while state["next"] < len(bodies) and time.perf_counter() < deadline:
            body = bodies[state["next"]]
            state["next"] += 1
            t0 = time.perf_counter()
            try:
                status, data = await send(path, body)
            except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                statuses[f"error:{type(exc).__name__}"] += 1
                continue
            latencies.append(time.perf_counter() - t0)
            statuses[str(status)] += 1
            if status == 200 and path == "/recommend/session":
                out = json.loads(data)
                sources[out["source"]] += 1
                t = out["timing"]
                batch_sizes.append(int(t["batch_size"]))
                timings.append((t["total_ms"], t["queue_ms"], t["redis_ms"], t["compute_ms"]))

    await asyncio.gather(*(worker(send) for send in senders))
    return {
        "wall": time.perf_counter() - started,
        "latencies": latencies,
        "statuses": statuses,
        "sources": sources,
        "batch_sizes": batch_sizes,
        "timings": timings,
        "capped": state["next"] < len(bodies),
    }


async def drive(
    kind: str, url: str, warm: list[bytes], bodies: list[bytes], args, pids: dict, path: str
) -> dict:
    """Warm-up phase, then the measured phase with CPU seconds of every process around it."""
    host, port = url.removeprefix("http://").split(":")
    if kind == "httpx":
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=None)
        client = httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0)
        headers = {"content-type": "application/json"}

        async def send(p: str, body: bytes) -> tuple[int, bytes]:
            if body:
                r = await client.post(p, content=body, headers=headers)
            else:
                r = await client.get(p)
            return r.status_code, r.content

        senders = [send] * args.concurrency
        close = [client.aclose]
    else:
        conns = [RawConnection(host, int(port)) for _ in range(args.concurrency)]

        def sender(c: RawConnection):
            async def send(p: str, body: bytes) -> tuple[int, bytes]:
                return await c.request("POST" if body else "GET", p, body)

            return send

        senders = [sender(c) for c in conns]
        close = [c.close for c in conns]
    try:
        await run_phase(senders, warm, 30.0, path)
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        busy0 = busy_seconds()
        phase = await run_phase(senders, bodies, args.time_cap, path)
        busy1 = busy_seconds()
        cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    finally:
        for c in close:
            await c()
    phase["cpu_s"] = {name: cpu1[name] - cpu0[name] for name in pids}
    # Everything else on the machine over the phase (other users of the shared cores).
    phase["cpu_s"]["other"] = max(0.0, busy1[0] - busy0[0] - sum(phase["cpu_s"].values()))
    phase["cpu_s"]["steal"] = busy1[1] - busy0[1]
    return phase


def summarise(name: str, client: str, phase: dict, settings: dict) -> dict:
    lat = np.asarray(phase["latencies"]) * 1000
    ok = phase["statuses"].get("200", 0)
    sizes = np.asarray(phase["batch_sizes"] or [0], dtype=float)
    wall = phase["wall"]
    non200 = sum(n for code, n in phase["statuses"].items() if code != "200")
    return {
        "config": name,
        "client": client,
        "settings": settings,
        "requests": int(sum(phase["statuses"].values())),
        "ok": ok,
        "non_200": non200,
        "statuses": dict(phase["statuses"]),
        "capped_by_time": phase["capped"],
        "wall_s": round(wall, 3),
        "throughput_rps": round(ok / wall, 1),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 2),
            "p95": round(float(np.percentile(lat, 95)), 2),
            "p99": round(float(np.percentile(lat, 99)), 2),
            "mean": round(float(lat.mean()), 2),
        },
        # Request-weighted: the mean over requests of the size of the batch each was in.
        "batch_size_mean_per_request": round(float(sizes.mean()), 2),
        # Per batch: Σ 1/b over requests counts batches (exact up to the batches that straddle
        # the start and end of the phase).
        "batch_size_mean_per_batch": round(float(len(sizes) / (1 / np.maximum(sizes, 1)).sum()), 2),
        "sources": dict(phase["sources"]),
        "server_timing_ms": _server_timing(phase["timings"], sizes),
        "cpu_s": {k: round(v, 2) for k, v in phase["cpu_s"].items()},
        "other_cores": round(phase["cpu_s"]["other"] / wall, 2),
        "steal_cores": round(phase["cpu_s"]["steal"] / wall, 2),
        "cpu_ms_per_request": {
            k: round(v * 1000 / max(ok, 1), 3) for k, v in phase["cpu_s"].items()
        },
    }


def _server_timing(timings: list, sizes: np.ndarray) -> dict:
    """Means of the response's ``timing`` (server side). ``compute_per_request`` spreads each
    batch's model step + index search over the requests it served."""
    if not timings:
        return {}
    t = np.asarray(timings)
    return {
        "total": round(float(t[:, 0].mean()), 2),
        "queue": round(float(t[:, 1].mean()), 2),
        "redis_per_batch": round(float(t[:, 2].mean()), 2),
        "compute_per_batch": round(float(t[:, 3].mean()), 2),
        "compute_per_request": round(float((t[:, 3] / sizes).mean()), 3),
    }


def figure_line(r: dict) -> str:
    lat = r["latency_ms"]
    cpu = r["cpu_ms_per_request"]
    return (
        f"{r['config']:>9} / {r['client']:<5}: {r['throughput_rps']:7.1f} req/s  "
        f"p50 {lat['p50']:.1f} ms  p95 {lat['p95']:.1f} ms  p99 {lat['p99']:.1f} ms  "
        f"batch {r['batch_size_mean_per_batch']} (per request {r['batch_size_mean_per_request']})"
        f"  non-200 {r['non_200']}  sources {r['sources']}  CPU ms/req client {cpu['client']} "
        f"server {cpu['server']} redis {cpu['redis']}  other processes "
        f"{r['other_cores']} cores, steal {r['steal_cores']} cores"
    )


def runner_only(gen, r: redis.Redis, user_ids: list[str], k: int, repeats: int) -> dict:
    """``Runner.recommend`` alone (model step + index search, no HTTP, no Redis) at batch 1 and
    at batch 64 on real cached states: what batching can buy when nothing else costs."""
    from service.runner import RecommendJob, Runner

    runner = Runner(max_batch=64)
    runner.warm(gen)
    now = int(time.time())
    jobs = [
        RecommendJob(now=now, k=k, kv=decode_kv(r.get(f"sr:{{{u}}}:kv"))) for u in user_ids[:64]
    ]
    times: dict[int, list[float]] = {1: [], 64: []}
    for i in range(repeats):  # interleaved, so both sizes see the same interference
        for b in (1, 64):
            t0 = time.perf_counter()
            runner.recommend(gen, jobs[i % 64 : i % 64 + 1] if b == 1 else jobs)
            times[b].append(time.perf_counter() - t0)
    out = {}
    for b, ts in times.items():
        med, low = statistics.median(ts) * 1000, min(ts) * 1000
        out[f"batch_{b}"] = {
            "ms_per_call": round(med, 3),
            "ms_per_call_min": round(low, 3),
            "ms_per_request": round(med / b, 4),
        }
    out["per_request_speedup"] = round(
        out["batch_1"]["ms_per_request"] / out["batch_64"]["ms_per_request"], 1
    )
    return out


# ----------------------------------------------------------------------------- bytes


def user_bytes(r: redis.Redis, user: str) -> dict:
    tag = f"sr:{{{user}}}"
    keys = {name: f"{tag}:{name}" for name in ("log", "ids", "seq", "kv")}
    mem = {name: int(r.memory_usage(key, samples=0) or 0) for name, key in keys.items()}
    raw_kv = r.get(keys["kv"])
    kv = decode_kv(raw_kv)
    dtype = KVDType(_kv_dtype_code(raw_kv))
    L, H, n, Dh = kv.k.shape
    return {
        "user": user,
        "sessions_in_log": int(r.zcard(keys["log"])),
        "ids": int(r.zcard(keys["ids"])),
        "cached_sessions": int(n),
        "memory_usage": mem,
        "total": sum(mem.values()),
        "kv_strlen": int(r.strlen(keys["kv"])),
        "log_member_bytes": sum(len(m) for m in r.zrange(keys["log"], 0, -1)),
        "raw_kv_payload": int(L * H * n * Dh * 2 * dtype.numpy.itemsize),
        "encoding": {
            "log": r.object("encoding", keys["log"]).decode(),
            "ids": r.object("encoding", keys["ids"]).decode(),
            "kv": r.object("encoding", keys["kv"]).decode(),
        },
    }


def _kv_dtype_code(raw: bytes) -> int:
    """The dtype byte of an encoded KVState (header, model version, log_seq, last_ended_at)."""
    (n,) = np.frombuffer(raw[8:10], dtype="<u2")
    return raw[10 + int(n) + 16]


def bytes_summary(rows: list[dict], label: str, dtype: str) -> dict:
    def mean(f):
        return round(statistics.fmean(f(x) for x in rows), 1)

    raw = mean(lambda x: x["raw_kv_payload"])
    kv_mem = mean(lambda x: x["memory_usage"]["kv"])
    total = mean(lambda x: x["total"])
    log_mem = mean(lambda x: x["memory_usage"]["log"])
    return {
        "users": label,
        "kv_dtype": dtype,
        "n_users": len(rows),
        "sessions_in_log": _dist([x["sessions_in_log"] for x in rows]),
        "ids": _dist([x["ids"] for x in rows]),
        "cached_sessions": _dist([x["cached_sessions"] for x in rows]),
        "memory_usage_mean": {
            k: mean(lambda x, k=k: x["memory_usage"][k]) for k in ("log", "ids", "seq", "kv")
        },
        "total_mean": total,
        "kv_strlen_mean": mean(lambda x: x["kv_strlen"]),
        "log_member_bytes_mean": mean(lambda x: x["log_member_bytes"]),
        "raw_kv_payload_mean": raw,
        "kv_key_over_raw": round(kv_mem / raw, 3),
        "total_over_raw": round(total / raw, 3),
        "log_over_kv_key": round(log_mem / kv_mem, 3),
        "encodings": dict(
            Counter(f"log={x['encoding']['log']} ids={x['encoding']['ids']}" for x in rows)
        ),
    }


def _dist(values: list[int]) -> dict:
    a = np.asarray(values)
    return {
        "min": int(a.min()),
        "p50": float(np.median(a)),
        "mean": round(float(a.mean()), 1),
        "max": int(a.max()),
    }


def zset_probe(r: redis.Redis, sizes=(128, 129, 4 * LOG_SESSIONS)) -> dict:
    """MEMORY USAGE of an id set like the store's (members ``s0`` …, scores 1 …) at sizes
    around Redis's listpack limit (``zset-max-*-entries``, 128 by default)."""
    out = {}
    for n in sizes:
        r.delete("probe:ids")
        r.zadd("probe:ids", {f"s{i}": i + 1 for i in range(n)})
        out[str(n)] = {
            "memory_usage": int(r.memory_usage("probe:ids", samples=0)),
            "encoding": r.object("encoding", "probe:ids").decode(),
        }
    r.delete("probe:ids")
    return out


async def post_sessions(url: str, user: str, records: list[SessionRecord]) -> Counter:
    """Close ``records`` one by one over HTTP, in order; returns the ``cache`` histogram."""
    out: Counter = Counter()
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        for rec in records:
            body = {
                "user_id": user,
                "session_id": rec.session_id,
                "started_at": rec.started_at,
                "ended_at": rec.ended_at,
                "items": [
                    {"item_id": i, "label": lab}
                    for i, lab in zip(rec.items, rec.labels, strict=True)
                ],
            }
            r = await client.post("/sessions", json=body)
            r.raise_for_status()
            out[r.json()["cache"]] += 1
    return out


async def check_sources(url: str, users: list[str], k: int) -> Counter:
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        out: Counter = Counter()
        for u in users:
            r = await client.post("/recommend/session", json={"user_id": u, "k": k})
            r.raise_for_status()
            out[r.json()["source"]] += 1
    return out


# ----------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    """Both tables of docs/BENCHMARKS.md from ``--out``'s dict (what the script prints)."""
    return throughput_markdown(results) + "\n\n" + bytes_markdown(results)


def throughput_markdown(results: dict) -> str:
    """The batched / unbatched table and its summary bullets."""
    t = results["throughput"]
    lines = [
        "| config | client | req/s | p50 ms | p95 ms | p99 ms | mean batch (per batch / per "
        "request) | non-200 | sources | CPU ms/req client / server / redis | other procs / steal, "
        "cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(t["runs"], key=lambda r: (r["client"] != "raw", r["config"], r["round"])):
        lat, cpu = r["latency_ms"], r["cpu_ms_per_request"]
        src = ", ".join(f"{k} {v:,}" for k, v in r["sources"].items()) or "—"
        lines.append(
            f"| {r['config']} (round {r['round']}) | {r['client']} | {r['throughput_rps']:,.0f} "
            f"| {lat['p50']:.1f} | {lat['p95']:.1f} | {lat['p99']:.1f} "
            f"| {r['batch_size_mean_per_batch']:.1f} / {r['batch_size_mean_per_request']:.1f} "
            f"| {r['non_200']} | {src} "
            f"| {cpu['client']:.2f} / {cpu['server']:.2f} / {cpu['redis']:.2f} "
            f"| {r['other_cores']:.2f} / {r['steal_cores']:.2f} |"
        )
    lines.append("")
    for client, v in t["by_client"].items():
        lines.append(
            f"- {client} client: batched {v['batched_rps']:,.0f} req/s / unbatched "
            f"{v['unbatched_rps']:,.0f} req/s = **{v['ratio']:.2f}×** (target ≥ {TARGET_RATIO:g}×:"
            f" {'met' if v['target_met'] else 'not met'})"
        )
    f = results.get("http_floor")
    if f:
        lines.append(
            f"- HTTP floor (`GET /healthz`, raw client, batched server): "
            f"{f['throughput_rps']:,.0f} req/s, server CPU "
            f"{f['cpu_ms_per_request']['server']:.2f} ms/req"
        )
    st = results.get("runner_only")
    if st:
        lines.append(
            f"- `Runner.recommend` alone (step + flat search, no HTTP/Redis): batch 1 "
            f"{st['batch_1']['ms_per_call']:.2f} ms, batch 64 {st['batch_64']['ms_per_call']:.2f} "
            f"ms = {st['batch_64']['ms_per_request']:.3f} ms/request "
            f"({st['per_request_speedup']:g}× cheaper per request)"
        )
    return "\n".join(lines)


def bytes_markdown(results: dict) -> str:
    """The Redis bytes-per-user table."""
    lines = [
        "| users | K/V | sessions in log (min/p50/max) | ids | cached n | log | ids | seq | kv "
        "| total | raw K/V | kv key / raw | total / raw | log / kv key |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in results["bytes"]["summaries"]:
        m, s, c, i = b["memory_usage_mean"], b["sessions_in_log"], b["cached_sessions"], b["ids"]
        lines.append(
            f"| {b['users']} ({b['n_users']}) | {b['kv_dtype']} | {s['min']}/{s['p50']:g}/"
            f"{s['max']} | {i['p50']:g} | {c['min']}–{c['max']} | {m['log']:,.0f} "
            f"| {m['ids']:,.0f} | {m['seq']:,.0f} | {m['kv']:,.0f} | {b['total_mean']:,.0f} "
            f"| {b['raw_kv_payload_mean']:,.0f} | {b['kv_key_over_raw']:.2f} "
            f"| {b['total_over_raw']:.2f} | {b['log_over_kv_key']:.2f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

CONFIGS = {
    "batched": {"SESSIONREC_MAX_BATCH": "64", "SESSIONREC_MAX_WAIT_MS": "2"},
    "unbatched": {"SESSIONREC_MAX_BATCH": "1"},
}
CLIENTS = ("raw", "httpx")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    keep = args.workdir is not None
    root = args.workdir or Path(tempfile.mkdtemp(prefix="sessionrec-serve-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    redis_proc = None
    try:
        import faiss
        import torch

        torch.manual_seed(args.seed)
        git_info = _git()
        ds, registry, version = build_world(root, args)
        redis_proc = RedisProcess(root / "redis").start()
        url0 = redis_proc.url  # db 0: fp32 K/V (what the servers read)
        url1 = url0.removesuffix("/0") + "/1"  # db 1: fp16 K/V, for the bytes comparison only
        r0 = redis.Redis.from_url(url0)
        r1 = redis.Redis.from_url(url1)
        redis_info = r0.info("server")
        allocator = r0.info("memory")["mem_allocator"]
        log_sessions = LOG_SESSIONS

        rng = np.random.default_rng(args.seed + USER_SAMPLE_SEED_OFFSET)
        sample = np.sort(rng.choice(ds.n_users, size=min(args.sample, ds.n_users), replace=False))
        full = full_user_records(ds, FULL_USER_PREFIX, args.full_users, log_sessions, args.seed)
        long = full_user_records(ds, LONG_USER_PREFIX, args.long_users, args.long_sessions, 1)
        http_user, http_records = next(
            iter(full_user_records(ds, "fullhttp", 1, log_sessions, 2).items())
        )
        built = {**full, **long}

        mem0 = int(r0.info("memory")["used_memory"])
        t0 = time.perf_counter()
        report, gen = asyncio.run(load_state(url0, registry, ds, None, {}, "float32"))
        backfill_s = time.perf_counter() - t0
        mem_after = int(r0.info("memory")["used_memory"])
        asyncio.run(load_state(url0, registry, ds, [], built, "float32"))
        log(
            f"backfilled {report.users} users (fp32, db 0): {report.sessions} sessions, "
            f"{report.caches} caches in {backfill_s:.1f} s; + {len(built)} built users"
        )
        asyncio.run(load_state(url1, registry, ds, sample, built, "float16"))
        log(f"backfilled {len(sample)} sample + {len(built)} built users (fp16, db 1)")
        cfg = gen.config

        # ---- throughput: one seeded Zipf-like request sequence, shared by every run
        users = [ds.user_ids[u] for u in range(ds.n_users)]
        order = np.random.default_rng(args.seed + 2).permutation(len(users))
        weights = 1.0 / np.arange(1, len(users) + 1) ** args.zipf
        draw = np.random.default_rng(args.seed + 3).choice(
            len(users), size=args.warmup + args.requests, p=weights / weights.sum()
        )

        def body(i: int) -> bytes:
            return json.dumps({"user_id": users[order[i]], "k": args.k}).encode()

        warm = [body(i) for i in draw[: args.warmup]]
        bodies = [body(i) for i in draw[args.warmup :]]
        distinct = len(set(draw[args.warmup :].tolist()))
        top_share = float(weights[0] / weights.sum())
        plan = []
        for rnd in range(args.rounds):
            pair = ["batched", "unbatched"] if rnd % 2 == 0 else ["unbatched", "batched"]
            plan += [(rnd + 1, name) for name in pair]
        runs: list[dict] = []
        http_check: dict = {}
        floor: dict = {}
        for rnd, name in plan:
            env = {**CONFIGS[name], "SESSIONREC_DEVICE": "cpu"}
            with ServeProcess(registry, url0, env, root / f"serve-{name}-{rnd}.log") as srv:
                log(f"{name} (round {rnd}): server ready in {srv.ready_s:.1f} s")
                pids = {"client": os.getpid(), "server": srv.proc.pid, "redis": redis_proc.proc.pid}
                for client in CLIENTS:
                    phase = asyncio.run(
                        drive(client, srv.url, warm, bodies, args, pids, "/recommend/session")
                    )
                    res = summarise(name, client, phase, CONFIGS[name])
                    res["round"] = rnd
                    res["server_ready_s"] = round(srv.ready_s, 1)
                    runs.append(res)
                    print(figure_line(res), flush=True)
                if name == "batched" and not http_check:
                    empty = [b""] * len(bodies)
                    phase = asyncio.run(
                        drive("raw", srv.url, empty[: args.warmup], empty, args, pids, "/healthz")
                    )
                    floor = summarise("healthz", "raw", phase, {})
                    print(figure_line(floor), flush=True)
                    http_check["built_users_sources"] = dict(
                        asyncio.run(check_sources(srv.url, list(built), args.k))
                    )
                    http_check["post_sessions_cache"] = dict(
                        asyncio.run(post_sessions(srv.url, http_user, http_records))
                    )
                    http_check["after_post_source"] = dict(
                        asyncio.run(check_sources(srv.url, [http_user], args.k))
                    )
                    log(f"HTTP checks: {http_check}")

        by_client = {}
        for client in CLIENTS:

            def med(name: str, client: str = client) -> float:
                return statistics.median(
                    r["throughput_rps"]
                    for r in runs
                    if r["config"] == name and r["client"] == client
                )

            ratio = med("batched") / med("unbatched")
            by_client[client] = {
                "batched_rps": med("batched"),
                "unbatched_rps": med("unbatched"),
                "ratio": round(ratio, 2),
                "target_met": ratio >= TARGET_RATIO,
            }

        step = runner_only(gen, r0, [users[i] for i in order[:64]], args.k, 60)
        print(
            f"runner only: batch 1 {step['batch_1']['ms_per_call']} ms/call, batch 64 "
            f"{step['batch_64']['ms_per_call']} ms/call = {step['batch_64']['ms_per_request']} "
            f"ms/request → {step['per_request_speedup']}× per request",
            flush=True,
        )

        # ---- bytes
        def rows(r: redis.Redis, names) -> list[dict]:
            return [user_bytes(r, u) for u in names]

        sample_ids = [ds.user_ids[u] for u in sample]
        per_user = {
            "fp32_sample": rows(r0, sample_ids),
            "fp16_sample": rows(r1, sample_ids),
            "fp32_full": rows(r0, full),
            "fp16_full": rows(r1, full),
            "fp32_long": rows(r0, long),
            "fp16_long": rows(r1, long),
            "fp32_post_sessions": rows(r0, [http_user]),
        }
        long_label = f"{args.long_sessions} sessions (log and ids capped at {log_sessions})"
        r2 = redis.Redis.from_url(url0.removesuffix("/0") + "/2")  # db 2: scratch
        probe = zset_probe(r2)
        r2.close()
        print(f"id-set probe (db 2): {probe}", flush=True)
        summaries = [
            bytes_summary(per_user["fp32_sample"], "synthetic sample", "float32"),
            bytes_summary(per_user["fp16_sample"], "synthetic sample", "float16"),
            bytes_summary(per_user["fp32_full"], "129 sessions", "float32"),
            bytes_summary(per_user["fp16_full"], "129 sessions", "float16"),
            bytes_summary(per_user["fp32_post_sessions"], "129 via POST /sessions", "float32"),
            bytes_summary(per_user["fp32_long"], long_label, "float32"),
            bytes_summary(per_user["fp16_long"], long_label, "float16"),
        ]
        for b in summaries:
            m = b["memory_usage_mean"]
            print(
                f"bytes {b['users']} {b['kv_dtype']}: log {m['log']:,.0f} ids {m['ids']:,.0f} "
                f"seq {m['seq']:,.0f} kv {m['kv']:,.0f} (strlen {b['kv_strlen_mean']:,.0f}) "
                f"total {b['total_mean']:,.0f} raw K/V {b['raw_kv_payload_mean']:,.0f} → "
                f"kv/raw {b['kv_key_over_raw']} total/raw {b['total_over_raw']} "
                f"log/kv {b['log_over_kv_key']}",
                flush=True,
            )

        results = {
            "command": ".venv/bin/python benchmarks/serve.py " + " ".join(sys.argv[1:]),
            "git": git_info,
            "machine": {
                "cpus": os.cpu_count(),
                "processor": _cpu_model(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "faiss": faiss.__version__,
                "redis_server": redis_info["redis_version"],
                "redis_allocator": allocator,
                "httpx": httpx.__version__,
                "note": "load generator, server and redis-server share the machine's cores",
            },
            "world": {
                "users": ds.n_users,
                "items": args.items,
                "sessions": ds.n_sessions,
                "model_version": version,
                "model": {
                    "dim": cfg.dim,
                    "n_layers": cfg.n_layers,
                    "n_heads": cfg.n_heads,
                    "head_dim": cfg.head_dim,
                    "window": cfg.window,
                },
                "index": gen.index.kind.value,
                "log_sessions": log_sessions,
                "backfill_s": round(backfill_s, 1),
                "backfill_sessions": report.sessions,
                "used_memory_delta_per_backfilled_user_fp32": round(
                    (mem_after - mem0) / report.users, 1
                ),
            },
            "throughput": {
                "concurrency": args.concurrency,
                "k": args.k,
                "warmup": args.warmup,
                "requests": args.requests,
                "time_cap_s": args.time_cap,
                "zipf": args.zipf,
                "top_user_share": round(top_share, 4),
                "distinct_users_measured": distinct,
                "runs": runs,
                "by_client": by_client,
                "target": f"batched / unbatched throughput >= {TARGET_RATIO:g}x",
            },
            "http_floor": floor,
            "runner_only": step,
            "http_checks": http_check,
            "bytes": {
                "summaries": summaries,
                "id_set_probe": probe,
                # every built user; the sample's users only in the summaries
                "per_user": {k: v for k, v in per_user.items() if "sample" not in k},
            },
            "elapsed_s": round(time.perf_counter() - t_start, 1),
        }
        r0.close()
        r1.close()
        print()
        print(markdown(results))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {args.out} ({results['elapsed_s']} s in all)")
        return 0
    finally:
        if redis_proc is not None:
            redis_proc.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _git() -> dict:
    """The commit measured, and whether the serving code differed from it."""
    repo = Path(__file__).resolve().parents[1]

    def git(*cmd: str) -> str:
        try:
            out = subprocess.run(
                ["git", *cmd], cwd=repo, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip()

    dirty = git("status", "--porcelain", "--", "service", "sessionrec", "model_store", "index")
    return {"commit": git("rev-parse", "HEAD"), "serving_code_dirty": bool(dirty)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
