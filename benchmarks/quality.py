"""Next-session quality with seeds, ablations, scaling and training cost — resumable.

    .venv/bin/python benchmarks/quality.py                      # everything (hours on 2 cores)
    .venv/bin/python benchmarks/quality.py --only main --datasets synthetic taobao
    .venv/bin/python benchmarks/quality.py --report             # tables + plots from results

Every training run is one subprocess (``quality.py run SPEC``): it trains one model with the
project's own trainer, evaluates it on the TEST split under the shared protocol, and writes
``runs/bench/quality/<key>.json`` with the test metrics, epochs, seconds per epoch and its
peak RSS. The driver skips runs whose file exists, so an interrupted suite resumes where it
stopped and ``--report`` can render partial results. Experiments:

* ``main`` — SessionRec vs the SASRec-style model (same budget: ``TrainConfig`` defaults, the
  same epochs cap, early stopping rule, batch, negatives) vs popularity, seeds 0-2, on every
  dataset present (real ones from ``../shared/datasets``, skipped with a note when absent).
* ``ablation`` — on Taobao (no session id in the data): ISE negatives off, rank-loss
  α ∈ {0, 0.01, 0.1} (default 0.05), query context off, session gap 2 h instead of 30 min;
  seed 0 (``--ablation-seeds`` for more).
* ``scaling`` — synthetic data: model width (dim 16-128) and training-data fraction.

Dataset sizes are fixed here (a Globo sample of 5,000 users; all of the Taobao and MIND
subsets) so the suite fits a few CPU hours; ``--globo-users`` changes it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "runs" / "bench" / "quality"
SEEDS = (0, 1, 2)
REAL = ("taobao", "mind", "globo")


def dataset_specs(args) -> dict[str, dict]:
    """name → prepare() arguments."""
    specs = {
        "synthetic": {"source": "synthetic", "n_users": 2000, "n_items": 2000},
        "taobao": {"source": "taobao"},
        "mind": {"source": "mind"},
        "globo": {"source": "globo", "max_users": args.globo_users},
        "taobao-gap2h": {"source": "taobao", "gap_seconds": 7200},
    }
    return specs


def experiments(args) -> list[dict]:
    """Every run of the suite as a spec; ``key`` names its result file."""
    runs = []
    present = [d for d in args.datasets if d == "synthetic" or _has_data(d)]
    if "main" in args.only:
        for d in present:
            for seed in args.seeds:
                for model in ("sessionrec", "sasrec"):
                    runs.append({"key": f"main/{d}/{model}/s{seed}", "data": d, "seed": seed,
                                 "train": {"model": model}})  # fmt: skip
    if "ablation" in args.only and _has_data("taobao"):
        # One seed per variant (the 3-seed spread of the default is in the main table).
        variants = {
            "no-ise-negatives": {"use_negatives": False},
            "alpha-0": {"rank_alpha": 0.0},
            "alpha-0.01": {"rank_alpha": 0.01},
            "alpha-0.1": {"rank_alpha": 0.1},
            "no-context": {"use_context": False},
        }
        for seed in args.ablation_seeds:
            for name, change in variants.items():
                runs.append({"key": f"ablation/taobao/{name}/s{seed}", "data": "taobao",
                             "seed": seed, "train": {"model": "sessionrec", **change}})  # fmt: skip
            runs.append({"key": f"ablation/taobao/gap-2h/s{seed}", "data": "taobao-gap2h",
                         "seed": seed, "train": {"model": "sessionrec"}})  # fmt: skip
    if "scaling" in args.only:
        for dim in (16, 32, 64, 128):
            runs.append({"key": f"scaling/synthetic/dim-{dim}/s0", "data": "synthetic", "seed": 0,
                         "train": {"model": "sessionrec", "dim": dim}})  # fmt: skip
        for frac in (0.125, 0.25, 0.5, 1.0):
            runs.append({"key": f"scaling/synthetic/data-{frac}/s0", "data": "synthetic",
                         "seed": 0, "fraction": frac,
                         "train": {"model": "sessionrec"}})  # fmt: skip
    return runs


def _has_data(name: str) -> bool:
    from training.loaders import datasets_dir

    folder = {"taobao": "taobao_userbehavior_subset", "mind": "mind_small_subset",
              "globo": "globo_news_clicks"}[name]  # fmt: skip
    return (datasets_dir() / folder).exists()


# ----------------------------------------------------------------------------- one run


def prepared(name: str, args) -> Path:
    """Prepare each dataset once (cached under runs/bench/data)."""
    from training.loaders import prepare

    out = ROOT / "runs" / "bench" / "data" / name
    if not (out / "meta.json").exists():
        spec = dict(dataset_specs(args)[name])
        prepare(spec.pop("source"), out, **spec)
    return out


def run_one(spec: dict, args) -> dict:
    import numpy as np
    import torch

    from model_store.registry import Registry
    from training.config import TrainConfig
    from training.dataset import PreparedDataset, Split
    from training.evaluate import evaluate
    from training.pipeline import train_and_save
    from training.tasks import PopularityScorer

    torch.set_num_threads(args.threads)
    ds = PreparedDataset.load(prepared(spec["data"], args))
    fraction = spec.get("fraction", 1.0)
    if fraction < 1.0:  # train on a fraction of the users, evaluate on all
        ds = _subsample_training(ds, fraction, seed=spec["seed"])
    cfg = TrainConfig(**{**spec["train"], "seed": spec["seed"], "device": "cpu"})
    registry = Registry(OUT / "artifacts" / spec["key"].replace("/", "_"))
    started = time.perf_counter()
    trained = train_and_save(ds, cfg, registry, progress=False)
    wall = time.perf_counter() - started
    history = trained.metrics["history"]
    result = {
        "spec": spec,
        "config": cfg.to_dict(),
        "test": trained.metrics["test"],
        "best_epoch": trained.metrics["best_epoch"],
        "epochs": len(history),
        "train_seconds": trained.metrics["train_seconds"],
        "seconds_per_epoch": float(np.median([h["seconds"] for h in history])),
        "wall_seconds": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "dataset": ds.meta.get("counts"),
        "popularity": evaluate(PopularityScorer(ds), ds, Split.TEST),
    }
    return result


def _subsample_training(ds, fraction: float, seed: int):
    """Drop the training sessions of a random (1 - fraction) of the users that have no
    held-out session; held-out users keep everything, so the test set is unchanged."""
    import numpy as np

    from training.dataset import Split

    rng = np.random.default_rng(seed)
    held = np.zeros(ds.n_users, dtype=bool)
    held[ds.sess_user[ds.sess_split != Split.TRAIN]] = True
    candidates = np.flatnonzero(~held)
    drop = set(rng.choice(candidates, int(len(candidates) * (1 - fraction)), replace=False))
    return _select_users(ds, [u for u in range(ds.n_users) if u not in drop])


def _select_users(ds, users: list[int]):
    import numpy as np

    from training.dataset import PreparedDataset

    sess = np.concatenate([np.arange(ds.user_offsets[u], ds.user_offsets[u + 1]) for u in users])
    ev = np.concatenate([np.arange(ds.sess_offsets[s], ds.sess_offsets[s + 1]) for s in sess])
    counts = np.array([ds.user_offsets[u + 1] - ds.user_offsets[u] for u in users])
    sess_len = np.diff(ds.sess_offsets)[sess]
    remap = {u: i for i, u in enumerate(users)}
    return PreparedDataset(
        meta={**ds.meta, "counts": {**ds.meta.get("counts", {}), "n_users": len(users)}},
        user_ids=[ds.user_ids[u] for u in users],
        item_ids=ds.item_ids,
        category_ids=ds.category_ids,
        item_category=ds.item_category,
        user_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        sess_user=np.array([remap[int(u)] for u in ds.sess_user[sess]], dtype=np.int32),
        sess_start=ds.sess_start[sess],
        sess_end=ds.sess_end[sess],
        sess_split=ds.sess_split[sess],
        sess_offsets=np.concatenate([[0], np.cumsum(sess_len)]).astype(np.int64),
        ev_item=ds.ev_item[ev],
        ev_label=ds.ev_label[ev],
    )


# ----------------------------------------------------------------------------- driver


def drive(args) -> int:
    runs = experiments(args)
    missing = [d for d in args.datasets if d != "synthetic" and not _has_data(d)]
    for d in missing:
        print(f"skipped {d}: ../shared/datasets has no such dataset here")
    todo = [r for r in runs if not (OUT / f"{r['key']}.json").exists()]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to go", flush=True)
    for i, spec in enumerate(todo, 1):
        started = time.perf_counter()
        cmd = [sys.executable, __file__, "run", json.dumps(spec), "--threads", str(args.threads),
               "--globo-users", str(args.globo_users)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        took = time.perf_counter() - started
        if proc.returncode != 0:
            print(f"[{i}/{len(todo)}] {spec['key']}: FAILED in {took:.0f} s\n{proc.stderr[-2000:]}")
            continue
        r = json.loads((OUT / f"{spec['key']}.json").read_text())
        t = r["test"]
        print(
            f"[{i}/{len(todo)}] {spec['key']}: recall@50 {t['recall@50']:.4f} "
            f"ndcg@50 {t['ndcg@50']:.4f} auc {_or_nan(t.get('auc')):.3f} "
            f"epochs {r['epochs']} ({r['seconds_per_epoch']:.1f} s/epoch) {took:.0f} s",
            flush=True,
        )
    return 0


def _or_nan(x) -> float:
    """AUC is None where no target session has shown negatives (Globo: clicks only)."""
    return float("nan") if x is None else float(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", nargs="?", default="drive", choices=["drive", "run"])
    p.add_argument("spec", nargs="?", help="run: the JSON spec")
    p.add_argument("--datasets", nargs="+", default=["synthetic", *REAL])
    p.add_argument("--only", nargs="+", default=["main", "ablation", "scaling"])
    p.add_argument("--globo-users", type=int, default=5_000)
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="main table")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", action="store_true", help="only render tables and plots")
    p.add_argument("--no-report", action="store_true", help="only run, render nothing")
    args = p.parse_args(argv)
    if args.command == "run":
        spec = json.loads(args.spec)
        result = run_one(spec, args)
        path = OUT / f"{spec['key']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=float))
        return 0
    if not args.report:
        drive(args)
    if args.no_report:
        return 0
    from benchmarks.quality_report import report

    report(OUT, ROOT / "docs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
