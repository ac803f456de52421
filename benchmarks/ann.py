"""Flat vs IVF (tuned nprobe) vs HNSW on clustered synthetic item vectors.

    .venv/bin/python benchmarks/ann.py --n 1000000 --d 64 --queries 1000 --clusters 1000 \\
        --seed 0 --out docs/ann.json

Vectors and queries are draws from one seeded Gaussian mixture (unit-norm centres, isotropic
noise), L2-normalised; queries are held out from the catalogue. For each index: build time
(IVF includes training and nprobe tuning), queries/s through ``ItemIndex.search`` at batch 1
and 64 (warm-up excluded; CPU unless FAISS sees a GPU), recall@100 against exact search, and
the serialised index size. One line per config, then the Markdown table of docs/BENCHMARKS.md
(``markdown_table``, also used by ``benchmarks/report.py``); all figures land in ``--out`` with
the command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from index import IndexConfig, IndexKind, ItemIndex, build_index, exact_search, report

RECALL_TARGET = 0.95  # the brief: recall@100 ≥ 0.95 at ≥ 10× the flat index's QPS
SPEEDUP_TARGET = 10.0


def clustered(n: int, d: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """(n, d) float32 unit vectors from a Gaussian mixture; noise ≈ centre spread / 2."""
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 1 << 18):  # chunked: 1M × 64 stays well under a GiB
        m = min(1 << 18, n - start)
        x = centres[rng.integers(clusters, size=m)]
        x += (0.5 / np.sqrt(d)) * rng.standard_normal((m, d)).astype(np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("docs/ann.json"))
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    data = clustered(args.n + args.queries, args.d, args.clusters, rng)
    vectors, queries = data[: args.n], data[args.n :]
    ids = [str(i) for i in range(args.n)]
    exact, _ = exact_search(vectors, queries, args.k)

    configs = {
        "flat": IndexConfig(kind=IndexKind.FLAT, seed=args.seed),
        "ivf": IndexConfig(kind=IndexKind.IVF, tune_k=args.k, seed=args.seed),
        "hnsw": IndexConfig(
            kind=IndexKind.HNSW, hnsw_m=args.hnsw_m, ef_search=args.ef_search, seed=args.seed
        ),
    }
    results = []
    for name, config in configs.items():
        start = time.perf_counter()
        index = build_index(vectors, config)
        build_s = time.perf_counter() - start
        item_index = ItemIndex(index, ids, vectors)
        row = report(item_index, vectors, queries, args.k, batch_sizes=(1, 64), exact_rows=exact)
        row = {"config": name, "build_s": build_s, "nlist": item_index.meta.nlist, **row}
        results.append(row)
        print(
            f"{name:5s} n={args.n} d={args.d} build={build_s:7.2f}s "
            f"qps@1={row['qps']['1']:9.1f} qps@64={row['qps']['64']:9.1f} "
            f"recall@{args.k}={row['recall']:.4f} bytes={row['index_bytes'] / 2**20:.1f}MiB "
            f"nlist={row['nlist']} nprobe={row['nprobe']} ef={row['ef_search']} "
            f"gpu={row['on_gpu']}",
            flush=True,
        )
    out = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "faiss_version": faiss.__version__,
        "omp_threads": faiss.omp_get_max_threads(),
        "results": results,
    }
    print(markdown_table(out))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


def index_label(row: dict, args: dict) -> str:
    """The table's name for one config: its kind and the parameters that set its speed."""
    if row["config"] == "flat":
        return "flat (`IndexFlatIP`)"
    if row["config"] == "ivf":
        return f"IVF (nlist {row['nlist']}, nprobe {row['nprobe']})"
    if row["config"] == "hnsw":
        return f"HNSW (M {args['hnsw_m']}, efSearch {row['ef_search']})"
    return row["config"]


def markdown_table(out: dict) -> str:
    """One row per index from ``--out``'s dict; QPS ratios against the flat index. The ratio of
    the fastest index (batch 1) reaching recall ≥ ``RECALL_TARGET`` is bold."""
    rows = out["results"]
    flat = next((r for r in rows if r["config"] == "flat"), None)
    ok = [r for r in rows if r["config"] != "flat" and r["recall"] >= RECALL_TARGET]
    best = max(ok, key=lambda r: r["qps"]["1"])["config"] if ok and flat else None
    lines = [
        "| index | build | QPS batch 1 | QPS batch 64 | recall@100 | size "
        "| vs flat QPS (b1 / b64) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if flat is None:
            ratio = "—"
        elif r is flat:
            ratio = "1×"
        else:
            ratio = " / ".join(f"{r['qps'][b] / flat['qps'][b]:.0f}×" for b in ("1", "64"))
            ratio = f"**{ratio}**" if r["config"] == best else ratio
        lines.append(
            f"| {index_label(r, out['args'])} | {r['build_s']:.1f} s | {r['qps']['1']:,.0f} "
            f"| {r['qps']['64']:,.0f} | {r['recall']:.4f} | {r['index_bytes'] / 2**20:.0f} MiB "
            f"| {ratio} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
