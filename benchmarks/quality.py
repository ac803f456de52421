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
* ``tuning`` — "make it win": each change tried against the first default (``V1``) on
  Taobao, MIND and synthetic data, seed 0 (``--tuning-seeds`` for more); see ``TUNING``.
* ``ablation`` — one change at a time against the current default, on every dataset where it
  means something: ISE negatives off, rank-loss α ∈ {0, 0.01, 0.1} (default 0.05), query
  context off, and on Taobao (no session id in the data) a 2 h session gap instead of 30 min;
  seed 0 (``--ablation-seeds`` for more).
* ``reference`` (always, no training) — popularity, popularity over impression sessions only
  and the user's recent items, per dataset.
* ``scaling`` — synthetic data: model width (dim 16-128) and the share of users whose sessions
  are training targets (``user_fraction``; every user still has its history at evaluation).

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
KINDS = ("main", "tuning", "ablation", "scaling")


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


# The first default (v1): the query token carries the gap and hour of the request, and a
# quarter of the training targets are *replaced* by a query that reveals a prefix of them.
V1 = {"query_time": "gap+hour", "reveal_mode": "replace", "reveal_prob": 0.25,
      "use_context": True, "loss_weight": "positive", "rank_alpha": 0.05}  # fmt: skip

# "Make it win": each change tried against V1, spelled out in full so the runs mean the same
# whatever TrainConfig's defaults are later. Seed 0 unless --tuning-seeds says otherwise.
TUNING = {
    "v1-default": {},
    "reveal-0": {"reveal_prob": 0.0},
    "no-context": {"use_context": False},
    "no-context-reveal-0": {"use_context": False, "reveal_prob": 0.0},
    "qt-gap": {"query_time": "gap"},
    "qt-none": {"query_time": "none"},
    "reveal-extra": {"reveal_mode": "extra"},
    "extra-qt-none": {"reveal_mode": "extra", "query_time": "none"},
    "extra-qt-gap": {"reveal_mode": "extra", "query_time": "gap"},
    "sess-weight": {"loss_weight": "session"},
    # Not the same budget as the SASRec-style model (which early-stops by epoch 20 everywhere):
    # a diagnostic of whether SessionRec is under-trained at the 40-epoch cap.
    "epochs-80": {"epochs": 80},
}
TUNING_DATASETS = ("taobao", "mind", "synthetic", "globo")

# Ablations of the current default, on every dataset where they mean something: no shown
# negatives in Globo (the ISE and rank-loss switches change nothing there) and session ids
# everywhere but Taobao (the gap rule only cuts Taobao's sessions).
ABLATIONS = {
    "no-ise-negatives": {"use_negatives": False},
    "alpha-0": {"rank_alpha": 0.0},
    "alpha-0.01": {"rank_alpha": 0.01},
    "alpha-0.1": {"rank_alpha": 0.1},
    "no-context": {"use_context": False},
}
NEEDS_NEGATIVES = {"no-ise-negatives", "alpha-0", "alpha-0.01", "alpha-0.1"}


def experiments(args) -> list[dict]:
    """Every run of the suite as a spec; ``key`` names its result file."""
    runs = []
    present = [d for d in args.datasets if d == "synthetic" or _has_data(d)]

    def add(kind: str, name: str, variant: str, seed: int, train: dict, **extra) -> None:
        key = f"{kind}/{name}/{variant}/s{seed}"
        runs.append({"key": key, "data": name, "seed": seed, "train": train, **extra})

    if "main" in args.only:
        for d in present:
            for seed in args.seeds:
                for model in ("sessionrec", "sasrec"):
                    add("main", d, model, seed, {"model": model})
    if "tuning" in args.only:
        for seed in args.tuning_seeds:
            for d in (d for d in TUNING_DATASETS if d in present):
                for name, change in TUNING.items():
                    add("tuning", d, name, seed, {"model": "sessionrec", **V1, **change})
    if "ablation" in args.only:
        for seed in args.ablation_seeds:
            for d in present:
                for name, change in ABLATIONS.items():
                    if d == "globo" and name in NEEDS_NEGATIVES:
                        continue
                    add("ablation", d, name, seed, {"model": "sessionrec", **change})
            if "taobao" in present:
                # Same users, sessions cut on a 2 h gap instead of 30 min.
                add("ablation", "taobao", "gap-2h", seed, {"model": "sessionrec"},
                    data="taobao-gap2h")  # fmt: skip
    if "scaling" in args.only:
        for dim in (16, 32, 64, 128):
            add("scaling", "synthetic", f"dim-{dim}", 0, {"model": "sessionrec", "dim": dim})
        for frac in (0.125, 0.25, 0.5, 1.0):
            train = {"model": "sessionrec", "user_fraction": frac}
            add("scaling", "synthetic", f"data-{frac}", 0, train)
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


def references(args) -> None:
    """Scorers that need no training, once per dataset (``reference/<dataset>.json``):
    popularity, popularity over impression sessions only (where the data has shown
    negatives), and the user's own recent items (how much of a dataset is re-engagement)."""
    from training.dataset import PreparedDataset, Split
    from training.evaluate import evaluate
    from training.tasks import PopularityScorer, RecentItemsScorer

    for d in (d for d in args.datasets if d == "synthetic" or _has_data(d)):
        path = OUT / "reference" / f"{d}.json"
        if path.exists():
            continue
        ds = PreparedDataset.load(prepared(d, args))
        scorers = {"popularity": PopularityScorer(ds), "recent-items": RecentItemsScorer(ds)}
        if (ds.ev_label == 0).any():
            scorers["impression-popularity"] = PopularityScorer(ds, impressions_only=True)
        result = {name: evaluate(s, ds, Split.TEST) for name, s in scorers.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=float))
        print(f"reference {d}: " + ", ".join(
            f"{n} R@50 {r['recall@50']:.4f}" for n, r in result.items()), flush=True)  # fmt: skip


# ----------------------------------------------------------------------------- driver


def drive(args) -> int:
    runs = experiments(args)
    missing = [d for d in args.datasets if d != "synthetic" and not _has_data(d)]
    for d in missing:
        print(f"skipped {d}: ../shared/datasets has no such dataset here")
    references(args)
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
    p.add_argument("--only", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--globo-users", type=int, default=5_000)
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="main table")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tuning-seeds", type=int, nargs="+", default=[0])
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
