"""Headless load-test runner: starts what it can, runs locust, checks an SLO file.

    .venv/bin/python loadtests/run.py                       # everything from nothing, 60 s
    .venv/bin/python loadtests/run.py --smoke               # ~10 s, the `make test` smoke
    .venv/bin/python loadtests/run.py --host http://127.0.0.1:8000 \\
        --users-file users.txt --items-file items.txt        # against a running service

Without ``--host`` it builds a synthetic world through the public CLI (``sessionrec data
prepare`` → ``train`` → ``index build``), starts an embedded redis-server (unix socket under
the output directory), backfills every user (``sessionrec backfill``), starts ``sessionrec
serve`` on a free loopback port and waits for ``/readyz`` — then runs locust headless
(``loadtests/locustfile.py``), writes its CSV files and HTML report under ``--out``, prints
throughput, p50/p95/p99 and the failure ratio, and exits non-zero when a threshold of the SLO
file (TOML: ``max_failure_ratio``, ``max_p50_ms``, ``max_p95_ms``, ``max_p99_ms``,
``min_rps``; absent keys are not checked) is missed. Everything it started is stopped on exit.
Targets are loopback only unless you pass ``--host`` yourself; every run is bounded in time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        host, users_file, items_file = args.host, args.users_file, args.items_file
        if host is None:
            host, users_file, items_file = start_everything(args, out, stack)
        stats = run_locust(args, host, users_file, items_file, out)
    summary = summarise(stats)
    print_summary(summary, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    misses = check_slo(summary, tomllib.loads(args.slo.read_text()))
    for miss in misses:
        print(f"SLO MISSED: {miss}")
    if not misses:
        print(f"SLO met ({args.slo})")
    return 1 if misses else 0


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", help="a running service; default: start one from nothing")
    p.add_argument("--users-file", type=Path, help="backfilled user ids, one per line")
    p.add_argument("--items-file", type=Path, help="catalogue item ids, one per line")
    p.add_argument("--clients", type=int, default=64, help="concurrent locust users [64]")
    p.add_argument("--spawn-rate", type=float, default=32, help="locust users started per second")
    p.add_argument("--duration", default="60s", help="locust run time [60s]")
    p.add_argument("--slo", type=Path, default=HERE / "slo.toml", help="thresholds (TOML)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "loadtest")
    p.add_argument("--world-users", type=int, default=2000, help="synthetic users [2000]")
    p.add_argument("--world-items", type=int, default=2000, help="synthetic items [2000]")
    p.add_argument("--epochs", type=int, default=2, help="training epochs of the world [2]")
    p.add_argument(
        "--smoke", action="store_true", help="~10 s on a tiny world; SLO = zero failures"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.duration, args.clients, args.spawn_rate = "10s", 16, 16
        args.world_users, args.world_items, args.epochs = 300, 400, 1
        if args.slo == HERE / "slo.toml":
            args.slo = HERE / "smoke-slo.toml"
    if args.host is not None and not (args.users_file and args.items_file):
        p.error("--host needs --users-file and --items-file")
    return args


def sessionrec(*argv: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "sessionrec", *argv]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:])} failed:\n{result.stdout}\n{result.stderr}")


def start_everything(args, out: Path, stack: ExitStack) -> tuple[str, Path, Path]:
    from service.embedded import EmbeddedRedis
    from training.dataset import PreparedDataset

    world = out / "world"
    data, registry = world / "data", world / "artifacts"
    print(f"building a synthetic world in {world} ...", flush=True)
    sessionrec(
        "data",
        "prepare",
        "--source",
        "synthetic",
        "--out",
        str(data),
        "--users",
        str(args.world_users),
        "--items",
        str(args.world_items),
    )
    sessionrec(
        "train",
        "--data",
        str(data),
        "--registry",
        str(registry),
        "--promote",
        "--epochs",
        str(args.epochs),
        "--min-epochs",
        "1",
    )
    sessionrec("index", "build", "--registry", str(registry))
    redis = EmbeddedRedis(out / "redis")
    url = redis.start()
    stack.callback(redis.stop)
    env = {**os.environ, "SESSIONREC_REDIS_URL": url, "SESSIONREC_REGISTRY": str(registry)}
    print("backfilling users ...", flush=True)
    sessionrec("backfill", "--data", str(data), env=env)
    ds = PreparedDataset.load(data)
    users_file, items_file = out / "users.txt", out / "items.txt"
    users_file.write_text("\n".join(ds.user_ids) + "\n")
    items_file.write_text("\n".join(ds.item_ids) + "\n")
    port = free_port()
    log = (out / "service.log").open("w")
    stack.callback(log.close)
    service = subprocess.Popen(
        [sys.executable, "-m", "sessionrec", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env={**env, "SESSIONREC_LOG_LEVEL": "warning"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    stack.callback(stop_process, service)
    host = f"http://127.0.0.1:{port}"
    wait_ready(host, service, timeout=120)
    print(f"service ready at {host}", flush=True)
    return host, users_file, items_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(
    host: str, proc: subprocess.Popen, timeout: float, path: str = "/readyz", what="the service"
) -> None:
    """Poll ``GET path`` until a 200, under a deadline; fail at once if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} (see its log)")
        try:
            with urllib.request.urlopen(f"{host}{path}", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)  # polling readiness under a deadline
    raise SystemExit(f"{what} was not ready within {timeout} s")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def run_locust(args, host: str, users_file: Path, items_file: Path, out: Path) -> list[dict]:
    cmd = [
        sys.executable, "-m", "locust",
        "-f", str(HERE / "locustfile.py"),
        "--headless", "--only-summary",
        "--users", str(args.clients), "--spawn-rate", str(args.spawn_rate),
        "--run-time", args.duration, "--stop-timeout", "5",
        "--host", host,
        "--csv", str(out / "locust"), "--html", str(out / "report.html"),
        "--users-file", str(users_file), "--items-file", str(items_file),
        "--exit-code-on-error", "0",
    ]  # fmt: skip
    print(f"locust: {args.clients} clients for {args.duration} against {host}", flush=True)
    budget = _seconds(args.duration) + 120
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
    (out / "locust.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"locust failed ({result.returncode}); see {out / 'locust.log'}")
    with (out / "locust_stats.csv").open() as f:
        return list(csv.DictReader(f))


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(duration[:-1]) * units[duration[-1]] if duration[-1] in units else float(duration)


def summarise(rows: list[dict]) -> dict:
    def row(r):
        n = int(r["Request Count"])
        return {
            "requests": n,
            "failures": int(r["Failure Count"]),
            "failure_ratio": int(r["Failure Count"]) / n if n else 0.0,
            "rps": float(r["Requests/s"]),
            "p50_ms": float(r["50%"]),
            "p95_ms": float(r["95%"]),
            "p99_ms": float(r["99%"]),
        }

    total = next(r for r in rows if r["Name"] == "Aggregated")
    return {
        "total": row(total),
        "by_name": {r["Name"]: row(r) for r in rows if r["Name"] != "Aggregated"},
    }


def print_summary(summary: dict, out: Path) -> None:
    print(f"\n{'request':28} {'count':>8} {'fail':>6} {'rps':>8} {'p50':>7} {'p95':>7} {'p99':>7}")
    for name, r in [*summary["by_name"].items(), ("TOTAL", summary["total"])]:
        print(
            f"{name:28} {r['requests']:8d} {r['failures']:6d} {r['rps']:8.1f} "
            f"{r['p50_ms']:7.0f} {r['p95_ms']:7.0f} {r['p99_ms']:7.0f}"
        )
    t = summary["total"]
    print(
        f"\nRPS {t['rps']:.1f}  p50 {t['p50_ms']:.0f} ms  p95 {t['p95_ms']:.0f} ms  "
        f"p99 {t['p99_ms']:.0f} ms  failure ratio {t['failure_ratio']:.4f}"
    )
    print(f"CSV: {out}/locust_*.csv   HTML: {out}/report.html")


def check_slo(summary: dict, slo: dict) -> list[str]:
    t, misses = summary["total"], []
    checks = {
        "max_failure_ratio": ("failure_ratio", lambda got, lim: got <= lim),
        "max_p50_ms": ("p50_ms", lambda got, lim: got <= lim),
        "max_p95_ms": ("p95_ms", lambda got, lim: got <= lim),
        "max_p99_ms": ("p99_ms", lambda got, lim: got <= lim),
        "min_rps": ("rps", lambda got, lim: got >= lim),
    }
    unknown = set(slo) - set(checks)
    if unknown:
        misses.append(f"unknown SLO keys {sorted(unknown)}")
    for key, limit in slo.items():
        if key in checks:
            field, ok = checks[key]
            if not ok(t[field], limit):
                misses.append(f"{field} = {t[field]:g}, limit {key} = {limit:g}")
    if t["requests"] == 0:
        misses.append("no requests were made")
    return misses


if __name__ == "__main__":
    sys.exit(main())
