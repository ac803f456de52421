"""The service against a bare FastAPI echo endpoint: same machine, server settings and load.

    .venv/bin/python benchmarks/echo.py --out docs/echo.json

Why: the brief asks for the service at ≥ 0.5× the throughput of a bare FastAPI echo endpoint
"on the same machine, same server settings and load generator", and for its p99 at half load
to be ≤ 3× the echo's p99 at the same load.

1. Servers. The service exactly as ``loadtests/run.py`` starts it (``start_everything``: a
   synthetic world through the public CLI — ``--world-users`` users, ``--world-items`` items,
   ``--epochs`` epoch(s), the default architecture, a flat index — an embedded redis-server,
   every user backfilled, then ``sessionrec serve`` with its defaults: micro-batching on,
   ``max_batch`` 64, ``max_wait_ms`` 2). The echo: ``benchmarks/echo_app.py`` under
   ``python -m uvicorn … --no-access-log --log-level warning`` — like ``sessionrec serve``
   (``uvicorn.run(app, host, port, log_config=None, access_log=False)``): one worker,
   uvicorn's default loop and parser (uvloop + httptools here), access log off. Both run for
   the whole benchmark; the idle one costs nothing measurable.
2. Load. The same generator for both: ``--concurrency`` keep-alive HTTP/1.1 connections
   (``benchmarks.serve.RawConnection``, ~0.1 ms of client CPU per request), the same request
   bodies ``{"user_id", "k"}``, users drawn Zipf-like (p ∝ 1/rank^``--zipf``) from the
   backfilled users in one seeded sequence. Responses are kept as bytes and parsed after each
   phase, so the client does the same work per request against both servers.
   *Phase 1, max throughput* (closed loop): one worker per connection posts the next body as
   soon as its previous answer arrives; ``--warmup`` requests (excluded), then ``--requests``
   measured — for at least ``--min-seconds`` (the bodies cycle, so a fast server is measured
   over more than a few CPU-clock ticks), capped at ``--time-cap`` s. → req/s, p50/p99.
   *Phase 2, half load* (open loop): requests are scheduled at a constant rate equal to half of
   the service's phase-1 throughput (the median over rounds) — the same rate for both servers —
   for ``--half-load-seconds``; each is sent on the first idle connection of the pool (the same
   ``--concurrency`` connections). Latency runs from the *scheduled* send time, so waiting for
   a connection, and the generator's own lateness (recorded separately as dispatch lag), count.
   Each server/phase pair runs ``--rounds`` times in ABBA order; figures are medians over rounds.
3. Accounting. CPU seconds (/proc) of the client, the server under test, redis-server and
   everything else on the machine over each measured phase, plus ``os.getloadavg()`` before
   and after and the busiest other processes: the two cores are shared. The client's garbage
   collector is off while it measures. A half-load run whose generator lag p99 exceeds
   max(10 ms, p99 / 4) is flagged: its p99 measures stalls of the machine, not the server.

Targets: service / echo throughput ≥ 0.5 (phase 1); service p99 / echo p99 ≤ 3 (phase 2).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
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
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.serve import (  # noqa: E402
    RawConnection,
    _cpu_model,
    _git,
    busy_seconds,
    cpu_seconds,
)
from loadtests.run import free_port, start_everything, stop_process, wait_ready  # noqa: E402

PATH = "/recommend/session"
TARGET_THROUGHPUT = 0.5
TARGET_P99 = 3.0
TIMING_FIELDS = ("total_ms", "queue_ms", "redis_ms", "compute_ms")
LATE_MS = 10.0  # generator dispatch lag p99 above this (and 1/4 of the p99) flags a half-load run
CLIENT_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=4000, help="measured requests, phase 1")
    p.add_argument("--warmup", type=int, default=400, help="warm-up requests before each phase")
    p.add_argument("--time-cap", type=float, default=60.0, help="seconds cap of a phase-1 run")
    p.add_argument(
        "--min-seconds",
        type=float,
        default=3.0,
        help="a phase-1 run lasts at least this long (bodies cycle): a fast server's CPU "
        "seconds are read in 10 ms ticks",
    )
    p.add_argument("--half-load-seconds", type=float, default=10.0, help="phase-2 duration")
    p.add_argument("--drain-cap", type=float, default=30.0, help="phase-2 wait for stragglers")
    p.add_argument("--concurrency", type=int, default=64, help="connections (= phase-1 workers)")
    p.add_argument("--rounds", type=int, default=3, help="ABBA rounds of each phase")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--zipf", type=float, default=1.0, help="user popularity exponent")
    p.add_argument("--world-users", type=int, default=2000)
    p.add_argument("--world-items", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/echo.json"))
    p.add_argument("--workdir", type=Path, help="kept if given; default: a temp dir, removed")
    args = p.parse_args(argv)
    if min(args.requests, args.concurrency, args.rounds) < 1 or args.half_load_seconds <= 0:
        p.error("--requests, --concurrency, --rounds and --half-load-seconds must be positive")
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- processes


def _proc_table() -> dict[int, tuple[int, float, str]]:
    """pid → (parent pid, CPU seconds, command) of every process we can read (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        head, tail = stat.rsplit(")", 1)
        fields = tail.split()
        name = cmd.strip() or head.split("(", 1)[1]
        out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, name)
    return out


def find_child(needles: tuple[str, ...]) -> int:
    """The pid of our child process whose command line contains every one of ``needles``."""
    me = os.getpid()
    for pid, (ppid, _, cmd) in _proc_table().items():
        if ppid == me and all(n in cmd for n in needles):
            return pid
    raise RuntimeError(f"no child process matching {needles}")


def start_echo(stack: ExitStack, log_path: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    out = log_path.open("w")
    stack.callback(out.close)
    cmd = [
        sys.executable, "-m", "uvicorn", "benchmarks.echo_app:app",
        "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    stack.callback(stop_process, proc)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, 60.0, path="/healthz", what="the echo server")
    return url, proc


class Meter:
    """CPU seconds of our processes and of everything else, load average, busiest others."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def __enter__(self) -> Meter:
        gc.collect()
        gc.disable()  # no collector pauses in the load generator while it measures
        self.load0 = os.getloadavg()
        self.table0 = _proc_table()
        self.busy0 = busy_seconds()
        self.cpu0 = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        gc.enable()
        cpu1 = {k: cpu_seconds(p) for k, p in self.pids.items()}
        busy1 = busy_seconds()
        table1 = _proc_table()
        self.load1 = os.getloadavg()
        self.cpu = {k: cpu1[k] - self.cpu0[k] for k in self.pids}
        ours = set(self.pids.values())
        others = []
        for pid, (_, s1, cmd) in table1.items():
            if pid in ours:
                continue
            s0 = self.table0[pid][1] if pid in self.table0 else 0.0
            if s1 - s0 > 0:
                others.append((s1 - s0, pid, cmd[:120]))
        others.sort(reverse=True)
        self.top_others = [
            {"pid": pid, "cpu_s": round(s, 2), "cmd": cmd} for s, pid, cmd in others[:3]
        ]
        self.other = max(0.0, busy1[0] - self.busy0[0] - sum(self.cpu.values()))
        self.steal = busy1[1] - self.busy0[1]

    def report(self, ok: int) -> dict:
        cpu_s = {k: round(v, 3) for k, v in self.cpu.items()}
        return {
            "cpu_s": cpu_s | {"other": round(self.other, 2)},
            "cpu_ms_per_request": {k: round(v * 1e3 / max(ok, 1), 3) for k, v in self.cpu.items()},
            "other_cores": round(self.other / self.wall, 2),
            "steal_cores": round(self.steal / self.wall, 2),
            "loadavg_before": [round(x, 2) for x in self.load0],
            "loadavg_after": [round(x, 2) for x in self.load1],
            "top_other_processes": self.top_others,
        }


# ----------------------------------------------------------------------------- load


async def closed_loop(
    conns: list[RawConnection], bodies: list[bytes], time_cap: float, min_seconds: float = 0.0
) -> dict:
    """One worker per connection posts the next body as soon as its previous answer is in,
    until every body is sent and ``min_seconds`` have passed (bodies cycle), or ``time_cap``."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    replies: list[tuple[bytes, bytes]] = []
    state = {"next": 0}
    started = time.perf_counter()
    deadline = started + time_cap
    min_end = started + min_seconds

    async def worker(conn: RawConnection) -> None:
        while (now := time.perf_counter()) < deadline:
            if state["next"] >= len(bodies) and now >= min_end:
                break
            body = bodies[state["next"] % len(bodies)]
            state["next"] += 1
            t0 = time.perf_counter()
            try:
                status, data = await conn.request("POST", PATH, body)
            except CLIENT_ERRORS as exc:
                statuses[f"error:{type(exc).__name__}"] += 1
                continue
            latencies.append(time.perf_counter() - t0)
            statuses[str(status)] += 1
            replies.append((body, data))

    await asyncio.gather(*(worker(c) for c in conns))
    return {
        "wall": time.perf_counter() - started,
        "latencies": latencies,
        "statuses": statuses,
        "replies": replies,
        "capped": state["next"] < len(bodies),
    }


async def open_loop(
    conns: list[RawConnection], bodies: list[bytes], rate: float, seconds: float, drain: float
) -> dict:
    """Constant-rate arrivals; each request goes out on the first idle connection. Latency is
    measured from the scheduled send time (connection wait and generator lateness included)."""
    n = max(1, int(rate * seconds))
    idle: asyncio.Queue = asyncio.Queue()
    for c in conns:
        idle.put_nowait(c)
    from_schedule: list[float] = []
    on_wire: list[float] = []
    lags: list[float] = []
    statuses: Counter = Counter()
    replies: list[tuple[bytes, bytes]] = []
    waited = {"n": 0}

    async def one(scheduled: float, body: bytes) -> None:
        if idle.empty():
            waited["n"] += 1
        conn = await idle.get()
        sent = time.perf_counter()
        try:
            status, data = await conn.request("POST", PATH, body)
        except CLIENT_ERRORS as exc:
            statuses[f"error:{type(exc).__name__}"] += 1
            return
        finally:
            idle.put_nowait(conn)
        done = time.perf_counter()
        from_schedule.append(done - scheduled)
        on_wire.append(done - sent)
        statuses[str(status)] += 1
        replies.append((body, data))

    tasks = []
    start = time.perf_counter() + 0.05
    for i in range(n):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(max(0.0, time.perf_counter() - scheduled))
        tasks.append(asyncio.create_task(one(scheduled, bodies[i % len(bodies)])))
    send_end = time.perf_counter()
    done, pending = await asyncio.wait(tasks, timeout=drain)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if pending:
        statuses["unanswered_after_drain"] += len(pending)
    return {
        "wall": time.perf_counter() - start,
        "schedule_s": send_end - start,
        "scheduled": n,
        "latencies": from_schedule,
        "on_wire": on_wire,
        "dispatch_lag": lags,
        "waited_for_connection": waited["n"],
        "statuses": statuses,
        "replies": replies,
        "unanswered": len(pending),
    }


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values) * 1000, q)), 2) if values else float("nan")


def check_replies(server: str, replies: list[tuple[bytes, bytes]], k: int) -> dict:
    """Parsed after the phase: the service's sources / item counts / batch sizes; the echo's
    faithfulness."""
    if server == "echo":
        return {"echo_mismatches": sum(json.loads(b) != json.loads(d) for b, d in replies)}
    sources: Counter = Counter()
    short, sizes, timings = 0, [], []
    for _, data in replies:
        out = json.loads(data)
        sources[out.get("source", "?")] += 1
        short += len(out.get("items", [])) != k
        t = out.get("timing", {})
        sizes.append(t.get("batch_size", 0))
        timings.append([t.get(f, np.nan) for f in TIMING_FIELDS])
    t_ms = np.asarray(timings, dtype=float).reshape(-1, len(TIMING_FIELDS))
    means = np.nanmean(t_ms, axis=0) if len(t_ms) else [np.nan] * len(TIMING_FIELDS)
    server_timing = {f: round(float(m), 2) for f, m in zip(TIMING_FIELDS, means, strict=True)}
    return {
        "sources": dict(sources),
        "answers_with_fewer_than_k_items": short,
        "batch_size_mean_per_request": round(float(np.mean(sizes)), 2) if sizes else 0.0,
        # the response's own ``timing`` (server side), mean over requests
        "server_timing_ms_mean": server_timing,
    }


async def run_closed(url: str, warm: list[bytes], bodies: list[bytes], args, pids: dict) -> tuple:
    host, port = url.removeprefix("http://").split(":")
    conns = [RawConnection(host, int(port)) for _ in range(args.concurrency)]
    try:
        await closed_loop(conns, warm, 30.0)
        with Meter(pids) as meter:
            phase = await closed_loop(conns, bodies, args.time_cap, args.min_seconds)
    finally:
        for c in conns:
            await c.close()
    return phase, meter


async def run_open(url: str, warm: list[bytes], bodies: list[bytes], rate: float, args, pids):
    host, port = url.removeprefix("http://").split(":")
    conns = [RawConnection(host, int(port)) for _ in range(args.concurrency)]
    try:
        await closed_loop(conns, warm, 30.0)
        with Meter(pids) as meter:
            phase = await open_loop(conns, bodies, rate, args.half_load_seconds, args.drain_cap)
    finally:
        for c in conns:
            await c.close()
    return phase, meter


def summarise(phase_name: str, server: str, rnd: int, phase: dict, meter: Meter, k: int) -> dict:
    ok = phase["statuses"].get("200", 0)
    wall = phase["wall"]
    res = {
        "phase": phase_name,
        "server": server,
        "round": rnd,
        "requests": int(sum(phase["statuses"].values())),
        "ok": ok,
        "non_200": int(sum(n for c, n in phase["statuses"].items() if c != "200")),
        "statuses": dict(phase["statuses"]),
        "wall_s": round(wall, 3),
        "throughput_rps": round(ok / wall, 1),
        "latency_ms": {
            "p50": _pct(phase["latencies"], 50),
            "p90": _pct(phase["latencies"], 90),
            "p99": _pct(phase["latencies"], 99),
            "max": _pct(phase["latencies"], 100),
        },
        **check_replies(server, phase["replies"], k),
        **meter.report(ok),
    }
    if phase_name == "max":
        res["capped_by_time"] = phase["capped"]
    else:
        res["offered_rps"] = round(phase["scheduled"] / phase["schedule_s"], 1)
        res["scheduled"] = phase["scheduled"]
        res["unanswered"] = phase["unanswered"]
        res["waited_for_connection"] = phase["waited_for_connection"]
        res["on_wire_latency_ms"] = {
            "p50": _pct(phase["on_wire"], 50),
            "p99": _pct(phase["on_wire"], 99),
        }
        res["dispatch_lag_ms"] = {
            "p50": _pct(phase["dispatch_lag"], 50),
            "p99": _pct(phase["dispatch_lag"], 99),
        }
        # The generator itself missed its schedule by a large share of the p99 it reports: that
        # p99 then measures stalls of the machine / the client, not the server.
        res["generator_late"] = res["dispatch_lag_ms"]["p99"] > max(
            LATE_MS, 0.25 * res["latency_ms"]["p99"]
        )
    server_key = "service" if server == "service" else "echo"
    res["server_cpu_ms_per_request"] = res["cpu_ms_per_request"][server_key]
    return res


def line(r: dict) -> str:
    lat, cpu = r["latency_ms"], r["cpu_ms_per_request"]
    extra = ""
    if r["phase"] == "half":
        extra = (
            f" offered {r['offered_rps']:.0f} req/s, dispatch lag p99 "
            f"{r['dispatch_lag_ms']['p99']} ms, waited for a connection "
            f"{r['waited_for_connection']}"
        )
    return (
        f"{r['phase']:>4} / {r['server']:<7} (round {r['round']}): {r['throughput_rps']:7.1f} "
        f"req/s  p50 {lat['p50']:.1f} ms  p99 {lat['p99']:.1f} ms  non-200 {r['non_200']}  "
        f"CPU ms/req server {r['server_cpu_ms_per_request']} redis {cpu['redis']} client "
        f"{cpu['client']}  other procs {r['other_cores']} cores  load {r['loadavg_after'][0]}"
        + extra
    )


# ----------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    lines = [
        "| phase | server | round | offered req/s | req/s | p50 ms | p99 ms | p99 on the wire ms "
        "| generator lag p99 ms | non-200 | server CPU ms/req | redis CPU ms/req "
        "| client CPU ms/req | other procs, cores | load avg (1 min) before → after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        half = r["phase"] == "half"
        offered = f"{r['offered_rps']:,.0f}" if half else "closed loop"
        wire = f"{r['on_wire_latency_ms']['p99']:.1f}" if half else "—"
        lag = f"{r['dispatch_lag_ms']['p99']:.1f}" if half else "—"
        cpu, lat = r["cpu_ms_per_request"], r["latency_ms"]
        lines.append(
            f"| {'half load' if half else 'max throughput'} | {r['server']} | {r['round']} "
            f"| {offered} | {r['throughput_rps']:,.0f} | {lat['p50']:.1f} | {lat['p99']:.1f} "
            f"| {wire} | {lag} | {r['non_200']} | {r['server_cpu_ms_per_request']:.2f}"
            f" | {cpu['redis']:.3f} | {cpu['client']:.2f} | {r['other_cores']:.2f} "
            f"| {r['loadavg_before'][0]:.2f} → {r['loadavg_after'][0]:.2f} |"
        )
    s = results["summary"]
    lines += [
        "",
        f"- Throughput (median of rounds): service {s['service_rps']:,.0f} req/s / echo "
        f"{s['echo_rps']:,.0f} req/s = **{s['throughput_ratio']:.3f}×** (target ≥ "
        f"{TARGET_THROUGHPUT:g}×: **{'met' if s['throughput_target_met'] else 'not met'}**)",
        f"- p99 at half load ({s['half_load_rps']:,.0f} req/s offered to both): service "
        f"{s['service_half_p99_ms']:.1f} ms / echo {s['echo_half_p99_ms']:.1f} ms = "
        f"**{s['p99_ratio']:.2f}×** (target ≤ {TARGET_P99:g}×: "
        f"**{'met' if s['p99_target_met'] else 'not met'}**)",
        f"- Diagnostic, p99 at half load from the actual send (no connection wait, no generator "
        f"lateness): service {s['service_half_p99_on_wire_ms']:.1f} ms / echo "
        f"{s['echo_half_p99_on_wire_ms']:.1f} ms = {s['p99_ratio_on_wire']:.2f}×",
    ]
    if s["half_load_runs_with_late_generator"]:
        lines.append(
            "- Half-load runs where the load generator missed its schedule (dispatch lag p99 > "
            f"max({LATE_MS:g} ms, p99 / 4)): {', '.join(s['half_load_runs_with_late_generator'])}"
            " — their p99 measures machine stalls, not the server"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    keep = args.workdir is not None
    root = args.workdir or Path(tempfile.mkdtemp(prefix="sessionrec-echo-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    load_at_start = os.getloadavg()
    try:
        with ExitStack() as stack:
            world = argparse.Namespace(
                world_users=args.world_users, world_items=args.world_items, epochs=args.epochs
            )
            t0 = time.perf_counter()
            service_url, users_file, _ = start_everything(world, root, stack)
            world_s = time.perf_counter() - t0
            service_port = service_url.rsplit(":", 1)[1]
            pids = {
                "client": os.getpid(),
                "service": find_child(("sessionrec", "serve", service_port)),
                "redis": find_child(("redis-server",)),
            }
            echo_url, echo_proc = start_echo(stack, root / "echo.log")
            pids["echo"] = echo_proc.pid
            log(f"world + service ready in {world_s:.0f} s ({service_url}); echo at {echo_url}")

            users = [u for u in users_file.read_text().splitlines() if u]
            order = np.random.default_rng(args.seed + 2).permutation(len(users))
            weights = 1.0 / np.arange(1, len(users) + 1) ** args.zipf
            draw = np.random.default_rng(args.seed + 3).choice(
                len(users), size=args.warmup + args.requests, p=weights / weights.sum()
            )
            bodies_all = [
                json.dumps({"user_id": users[order[i]], "k": args.k}).encode() for i in draw
            ]
            warm, bodies = bodies_all[: args.warmup], bodies_all[args.warmup :]
            urls = {"service": service_url, "echo": echo_url}

            def abba(rnd: int) -> list[str]:
                return ["echo", "service"] if rnd % 2 == 0 else ["service", "echo"]

            runs: list[dict] = []
            for rnd in range(args.rounds):
                for server in abba(rnd):
                    phase, meter = asyncio.run(run_closed(urls[server], warm, bodies, args, pids))
                    res = summarise("max", server, rnd + 1, phase, meter, args.k)
                    runs.append(res)
                    print(line(res), flush=True)

            def med(phase: str, server: str, f) -> float:
                return statistics.median(
                    f(r) for r in runs if r["phase"] == phase and r["server"] == server
                )

            service_rps = med("max", "service", lambda r: r["throughput_rps"])
            echo_rps = med("max", "echo", lambda r: r["throughput_rps"])
            rate = service_rps / 2
            log(f"half load: {rate:.0f} req/s (half the service's {service_rps:.0f}) to both")
            for rnd in range(args.rounds):
                for server in abba(rnd):
                    phase, meter = asyncio.run(
                        run_open(urls[server], warm[:200], bodies, rate, args, pids)
                    )
                    res = summarise("half", server, rnd + 1, phase, meter, args.k)
                    runs.append(res)
                    print(line(res), flush=True)

            service_p99 = med("half", "service", lambda r: r["latency_ms"]["p99"])
            echo_p99 = med("half", "echo", lambda r: r["latency_ms"]["p99"])
            service_wire = med("half", "service", lambda r: r["on_wire_latency_ms"]["p99"])
            echo_wire = med("half", "echo", lambda r: r["on_wire_latency_ms"]["p99"])
            late = [
                f"{r['server']} round {r['round']}"
                for r in runs
                if r["phase"] == "half" and r["generator_late"]
            ]
            summary = {
                "service_rps": service_rps,
                "echo_rps": echo_rps,
                "throughput_ratio": round(service_rps / echo_rps, 3),
                "throughput_target": f">= {TARGET_THROUGHPUT:g}",
                "throughput_target_met": service_rps / echo_rps >= TARGET_THROUGHPUT,
                "half_load_rps": round(rate, 1),
                "service_half_p99_ms": service_p99,
                "echo_half_p99_ms": echo_p99,
                "p99_ratio": round(service_p99 / echo_p99, 2),
                "p99_target": f"<= {TARGET_P99:g}",
                "p99_target_met": service_p99 / echo_p99 <= TARGET_P99,
                # from the actual send (no connection wait, no generator lateness): a diagnostic
                "service_half_p99_on_wire_ms": service_wire,
                "echo_half_p99_on_wire_ms": echo_wire,
                "p99_ratio_on_wire": round(service_wire / echo_wire, 2),
                "half_load_runs_with_late_generator": late,
                "server_cpu_ms_per_request_max_phase": {
                    s: med("max", s, lambda r: r["server_cpu_ms_per_request"])
                    for s in ("service", "echo")
                },
            }
        results = {
            "command": ".venv/bin/python benchmarks/echo.py " + " ".join(sys.argv[1:]),
            "git": _git(),
            "machine": machine(load_at_start),
            "world": {
                "users": args.world_users,
                "items": args.world_items,
                "epochs": args.epochs,
                "world_and_service_start_s": round(world_s, 1),
            },
            "load": {
                "concurrency": args.concurrency,
                "k": args.k,
                "zipf": args.zipf,
                "warmup": args.warmup,
                "requests": args.requests,
                "time_cap_s": args.time_cap,
                "min_seconds": args.min_seconds,
                "half_load_seconds": args.half_load_seconds,
                "rounds": args.rounds,
                "distinct_users_measured": len(set(draw[args.warmup :].tolist())),
            },
            "servers": {
                "service": "python -m sessionrec serve (defaults: max_batch 64, max_wait_ms 2; "
                "SESSIONREC_DEVICE=" + os.environ.get("SESSIONREC_DEVICE", "auto") + ")",
                "echo": "python -m uvicorn benchmarks.echo_app:app --no-access-log "
                "--log-level warning",
            },
            "runs": runs,
            "summary": summary,
            "elapsed_s": round(time.perf_counter() - t_start, 1),
        }
        print()
        print(markdown(results))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {args.out} ({results['elapsed_s']} s in all)")
        return 0
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def machine(load_at_start: tuple[float, float, float]) -> dict:
    import fastapi
    import uvicorn

    versions = {}
    for mod in ("uvloop", "httptools", "torch", "faiss"):
        try:
            versions[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            versions[mod] = None
    return {
        "cpus": os.cpu_count(),
        "processor": _cpu_model(),
        "python": platform.python_version(),
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        **versions,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "SESSIONREC_DEVICE")},
        "loadavg_at_start": [round(x, 2) for x in load_at_start],
        "note": "load generator, both servers and redis-server share the machine's cores",
    }


if __name__ == "__main__":
    sys.exit(main())
