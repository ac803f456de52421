"""benchmarks/quality.py and quality_report.py: which runs the suite makes, and what the report
says about a set of results. No training here: results are small hand-made JSON files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import quality
from benchmarks.quality_report import report
from training.config import TrainConfig


def args(**overrides) -> argparse.Namespace:
    base = dict(
        datasets=["synthetic", "globo"],
        only=list(quality.KINDS),
        seeds=[0, 1, 2],
        tuning_seeds=[0],
        ablation_seeds=[0],
        globo_users=5000,
    )
    return argparse.Namespace(**{**base, **overrides})


@pytest.fixture
def globo_present(monkeypatch):
    monkeypatch.setattr(quality, "_has_data", lambda name: name == "globo")


def test_suite_lists_every_run_once_with_settings_that_reproduce_it(globo_present):
    runs = quality.experiments(args())
    keys = [r["key"] for r in runs]
    assert len(keys) == len(set(keys))
    main = [r for r in runs if r["key"].startswith("main/")]
    assert len(main) == 2 * 2 * 3  # datasets × models × seeds
    # Tuning variants spell out every knob of the first default, so a later change of
    # TrainConfig's defaults cannot change what an old row means.
    tuning = [r for r in runs if r["key"].startswith("tuning/")]
    assert {r["data"] for r in tuning} == {"synthetic", "globo"}  # Taobao and MIND are absent
    for r in tuning:
        assert set(quality.V1) <= set(r["train"])
        TrainConfig(**r["train"])  # every spec is a valid config
    # Globo has no shown negatives: only the context ablation applies.
    globo = {r["key"] for r in runs if r["key"].startswith("ablation/globo/")}
    assert globo == {"ablation/globo/no-context/s0"}
    scaling = [r for r in runs if r["key"].startswith("scaling/")]
    assert sorted(r["train"].get("user_fraction", 1.0) for r in scaling)[:2] == [0.125, 0.25]


def test_taobao_gap_ablation_runs_on_the_2h_dataset_under_the_taobao_name(monkeypatch):
    monkeypatch.setattr(quality, "_has_data", lambda name: name == "taobao")
    runs = {r["key"]: r for r in quality.experiments(args(datasets=["taobao"]))}
    assert runs["ablation/taobao/gap-2h/s0"]["data"] == "taobao-gap2h"


def _result(key: str, recall: float, ndcg: float, **config) -> dict:
    metrics = {f"{m}@{k}": recall if m != "ndcg" else ndcg for m in ("recall", "ndcg", "hr")
               for k in (10, 50, 100)}  # fmt: skip
    return {
        "spec": {"key": key},
        "config": {"dim": 64, **config},
        "test": {**metrics, "users": 100, "auc": 0.6},
        "popularity": {k: v / 10 for k, v in metrics.items()},
        "epochs": 12,
        "train_seconds": 60.0,
        "seconds_per_epoch": 5.0,
        "peak_rss_mb": 900.0,
    }


def test_report_tables_gains_and_variants_from_results(tmp_path: Path):
    root = tmp_path / "quality"
    results = [
        _result("main/taobao/sessionrec/s0", 0.040, 0.020),
        _result("main/taobao/sessionrec/s1", 0.050, 0.030),
        _result("main/taobao/sasrec/s0", 0.030, 0.010),
        _result("tuning/taobao/v1-default/s0", 0.040, 0.020),
        _result("tuning/taobao/qt-none/s0", 0.050, 0.025),
        _result("ablation/taobao/alpha-0/s0", 0.036, 0.018),
        _result("scaling/synthetic/data-0.5/s0", 0.3, 0.2, user_fraction=0.5),
    ]
    for r in results:
        path = root / f"{r['spec']['key']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    (root / "reference").mkdir()
    recent = {f"{m}@{k}": 0.18 for m in ("recall", "ndcg", "hr") for k in (10, 50, 100)}
    (root / "reference" / "taobao.json").write_text(json.dumps({"recent-items": recent}))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "BENCHMARKS.md").write_text(
        "# B\n\nbefore\n\n<!-- quality:begin -->\nold\n<!-- quality:end -->\n\nafter\n"
    )

    report(root, docs)

    doc = (docs / "BENCHMARKS.md").read_text()
    assert "before" in doc and "after" in doc and "old" not in doc
    # Mean ± sample std over the two seeds; SASRec's one seed alone; the reference row.
    assert "| SessionRec | 2 | " in doc and "0.0450 ± 0.0071" in doc
    assert "| SASRec-style | 1 | " in doc
    assert "| user's recent items † | – | 0.1800" in doc
    # Gains against the item-level model: recall 0.045 / 0.030 = +50 %, ndcg +150 %.
    assert "recall@50 +50% (met), ndcg@50 +150% (met)" in doc
    # Tuning rows relative to v1, ablation rows relative to the main default (0.045).
    assert "| qt-none | 0.0500 / 0.0250 (+25%), n=1 |" in doc
    assert "| alpha-0 | 0.0360 / 0.0180 / 0.600 (-20%), n=1 |" in doc
    summary = json.loads((docs / "quality.json").read_text())
    assert summary["scaling"]["synthetic: data-0.5"]["fraction"]["mean"] == 0.5
    assert (docs / "img" / "quality.png").stat().st_size > 0
