"""Incremental serving step vs full recompute of the SessionRec interest vector.

    .venv/bin/python benchmarks/step.py --out docs/step.json

Why: the service answers a request from a per-user K/V cache (``prefill`` once, then one
``step`` per request) instead of re-running the model over the user's whole history. The
product brief asks for a ≥ T/4 speedup at history length T for a batch of 64 users
(T = 64, 256). This script measures that, on one seeded random-weight model (dim 64, 2 layers,
2 heads, W = 64, 10,000 items; timing does not depend on the weights) in eval mode under
``torch.inference_mode()``.

For each history length T and batch B, all users having T closed sessions of
``--items-per-session`` items each:

* full recompute, tokens given: ``forward`` over the (B, T, d) session tokens plus one query at
  position T. It processes all T sessions (banded mask), also when T > W: that is the cost of
  recomputing from the history, which is what the cache replaces;
* full recompute, from items: ``encode_sessions`` (item tower + pooling of every event) +
  ``pad_tokens`` + ``forward`` — what a recompute from a raw session log has to do;
* step: one ``step(query, cache, append=False)`` against a prefilled cache (the prefill is
  excluded: it runs once, when sessions close or a cache is rebuilt);
* append: one ``step(session_token, cache, append=True)`` on a full cache (closing a session;
  its K/V are appended and the oldest evicted). Encoding the closed session's items is not
  included.

The query token is encoded once outside every timing (both paths need it). Each figure is the
median wall time of ``--repeats`` calls after ``--warmup`` calls, the device synchronised
before each clock read. Before timing, the step's interest vector is checked against the
recompute's (and the post-append step against a recompute over T + 1 sessions); a max abs
difference above ``--tolerance`` aborts before timing, with exit status 1, writing nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from model_store.model import KVCache, ModelConfig, SessionRec, Sessions, pad_tokens

BASE_TIME = 1_700_000_000  # Unix seconds of the first session


class ParityError(RuntimeError):
    """The incremental step and the full recompute disagree: the timings would be meaningless."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--histories", type=int, nargs="+", default=[64, 256], help="T values")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="B values")
    p.add_argument("--items-per-session", type=int, default=20)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    p.add_argument("--out", type=Path, default=Path("docs/step.json"))
    return p.parse_args(argv)


def build_model(device: torch.device) -> SessionRec:
    config = ModelConfig(n_items=10_000, dim=64, n_layers=2, n_heads=2, window=64)
    return SessionRec(config).to(device).eval()


def make_sessions(
    batch: int, history: int, per_session: int, n_items: int, gen: torch.Generator
) -> Sessions:
    """``batch`` users × ``history`` sessions × ``per_session`` events, user-contiguous."""
    n = batch * history
    events = n * per_session
    items = torch.randint(1, n_items + 1, (events,), generator=gen)
    labels = (torch.rand(events, generator=gen) < 0.3).long()  # ~30 % engaged, rest shown
    segment = torch.arange(n).repeat_interleave(per_session)
    gap = torch.rand(n, generator=gen) * 86_400.0
    gap.view(batch, history)[:, 0] = -1.0  # first session of each user: no previous one
    start = BASE_TIME + 3_600 * torch.arange(history).repeat(batch)
    return Sessions(items, labels, segment, gap, start, n)


def to_device(s: Sessions, device: torch.device) -> Sessions:
    return Sessions(*(t.to(device) for t in s[:5]), s.n)


def make_queries(model: SessionRec, batch: int, history: int, gen: torch.Generator) -> Tensor:
    device = model.next_emb.device
    gap = (torch.rand(batch, generator=gen) * 3_600.0).to(device)
    start = torch.full((batch,), BASE_TIME + 3_600 * history, dtype=torch.long, device=device)
    return model.encode_queries(gap, start, context=None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> dict:
    """Wall time of one call in ms, warm-up calls excluded: median and quartiles."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    q1, _, q3 = statistics.quantiles(times, n=4) if repeats > 1 else (times[0], 0.0, times[0])
    return {"median": statistics.median(times), "q1": q1, "q3": q3}


def max_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


def parity(
    model: SessionRec, tokens: Tensor, lengths: Tensor, query: Tensor, cache: KVCache
) -> dict:
    """Max abs difference step vs recompute: before and after appending one more session."""
    qpos = lengths[:, None]
    full = model(tokens, lengths, query[:, None], qpos)[:, 0]
    inc, _ = model.step(query, cache, append=False)
    # Append the last session token again as a new (T+1)-th session, then query.
    extra = tokens[:, -1]
    _, grown = model.step(extra, cache, append=True)
    inc_after, _ = model.step(query, grown, append=False)
    longer = torch.cat([tokens, extra[:, None]], dim=1)
    full_after = model(longer, lengths + 1, query[:, None], qpos + 1)[:, 0]
    return {"query": max_diff(full, inc), "after_append": max_diff(full_after, inc_after)}


def bench_config(
    model: SessionRec, batch: int, history: int, args: argparse.Namespace, device: torch.device
) -> dict:
    gen = torch.Generator().manual_seed(args.seed + 1000 * history + batch)
    n_items = model.config.n_items
    raw = to_device(make_sessions(batch, history, args.items_per_session, n_items, gen), device)
    lengths = torch.full((batch,), history, dtype=torch.long, device=device)
    qpos = lengths[:, None]
    tokens = pad_tokens(model.encode_sessions(raw), lengths)  # (B, T, d)
    query = make_queries(model, batch, history, gen)  # (B, d)
    cache = model.prefill(tokens, lengths)
    new_session = tokens[:, -1]

    diffs = parity(model, tokens, lengths, query, cache)
    if not all(d <= args.tolerance for d in diffs.values()):  # a NaN fails too
        raise ParityError(
            f"step and full recompute disagree at T={history} B={batch}: "
            f"max abs diffs {diffs} exceed {args.tolerance:.0e}"
        )

    def full_tokens() -> Tensor:
        return model(tokens, lengths, query[:, None], qpos)

    def full_items() -> Tensor:
        encoded = pad_tokens(model.encode_sessions(raw), lengths)
        return model(encoded, lengths, query[:, None], qpos)

    def step() -> tuple[Tensor, KVCache]:
        return model.step(query, cache, append=False)

    def append() -> tuple[Tensor, KVCache]:
        return model.step(new_session, cache, append=True)

    spread = {
        name: time_ms(fn, args.repeats, args.warmup, device)
        for name, fn in (
            ("full_tokens_ms", full_tokens),
            ("full_items_ms", full_items),
            ("step_ms", step),
            ("append_ms", append),
        )
    }
    timed = {name: t["median"] for name, t in spread.items()}
    target = history / 4
    speed_tokens = timed["full_tokens_ms"] / timed["step_ms"]
    speed_items = timed["full_items_ms"] / timed["step_ms"]
    return {
        "T": history,
        "B": batch,
        "events": len(raw.items),
        **timed,
        "speedup_tokens": speed_tokens,
        "speedup_items": speed_items,
        "target": target,
        "target_met_tokens": speed_tokens >= target,
        "target_met_items": speed_items >= target,
        "max_abs_diff": diffs,
        "quartiles_ms": {name: [t["q1"], t["q3"]] for name, t in spread.items()},
    }


def print_line(row: dict) -> None:
    d = row["max_abs_diff"]
    print(
        f"T={row['T']:4d} B={row['B']:3d} events={row['events']:7d} "
        f"full(tokens)={row['full_tokens_ms']:8.3f}ms full(items)={row['full_items_ms']:8.3f}ms "
        f"step={row['step_ms']:7.3f}ms append={row['append_ms']:7.3f}ms "
        f"speedup={row['speedup_tokens']:6.1f}x/{row['speedup_items']:6.1f}x "
        f"target={row['target']:.0f}x diff={d['query']:.1e}/{d['after_append']:.1e}",
        flush=True,
    )


def yes_no(met: bool) -> str:
    return "**yes**" if met else "no"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| T | B | full recompute ms (tokens given) | full recompute ms (from items) | step ms "
        "| append ms | speedup (tokens / items) | T/4 target met? (tokens / items) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['T']} | {r['B']} | {r['full_tokens_ms']:.3f} | {r['full_items_ms']:.3f} "
            f"| {r['step_ms']:.3f} | {r['append_ms']:.3f} "
            f"| {r['speedup_tokens']:.1f}× / {r['speedup_items']:.1f}× "
            f"| {r['target']:.0f}×: {yes_no(r['target_met_tokens'])} / "
            f"{yes_no(r['target_met_items'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__} device={device} threads={threads}", flush=True)
    model = build_model(device)

    rows = []
    with torch.inference_mode():
        for history in args.histories:
            for batch in args.batches:
                try:
                    row = bench_config(model, batch, history, args, device)
                except ParityError as err:
                    print(f"REFUSED: {err}", file=sys.stderr)
                    sys.exit(1)
                print_line(row)
                rows.append(row)
    print(markdown_table(rows))

    out = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch_version": torch.__version__,
        "device": str(device),
        "threads": threads,
        "model": model.config.to_dict(),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
