"""The offline jobs behind the CLI: train → save to the registry, evaluate models side by side,
and the demo that does all of it on synthetic data."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model_store.registry import Registry
from model_store.store import LoadedModel, open_model, read_item_vectors, save_model
from training.dataset import PreparedDataset, Split
from training.evaluate import evaluate
from training.metrics import format_table
from training.tasks import PopularityScorer, RecentItemsScorer
from training.train import TrainConfig, build_task, resolve_device, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedVersion:
    version: str
    kind: str
    metrics: dict


def dataset_fingerprint(ds: PreparedDataset) -> str:
    """sha256 over the ids, sessions, events and split: two datasets with the same fingerprint
    hold the same sessions in the same split, so a model's TEST sessions stay unseen."""
    h = hashlib.sha256()
    for ids in (ds.user_ids, ds.item_ids):
        h.update(json.dumps(ids).encode())
    for array in (ds.user_offsets, ds.sess_offsets, ds.sess_split, ds.ev_item, ds.ev_label):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def dataset_summary(ds: PreparedDataset, path: Path | None) -> dict:
    return {
        "fingerprint": dataset_fingerprint(ds),
        "path": str(path) if path else None,
        "source": ds.meta.get("source"),
        "counts": ds.meta.get("counts"),
        "params": ds.meta.get("params"),
    }


def train_and_save(
    ds: PreparedDataset,
    cfg: TrainConfig,
    registry: Registry,
    *,
    data_path: Path | None = None,
    promote: bool = False,
    progress: bool = True,
) -> TrainedVersion:
    """Train, evaluate the best epoch on VAL and TEST, and write a registry version."""
    result = train(cfg, ds, progress=progress)
    task = build_task(cfg, result.model, ds, resolve_device(cfg.device))
    test = evaluate(task, ds, Split.TEST, progress=progress, desc="test")
    metrics = {
        "val": result.val_metrics,
        "test": test,
        "best_epoch": result.best_epoch,
        "train_seconds": result.train_seconds,
        "history": result.history,
    }
    version = save_model(
        registry,
        result.model,
        kind=cfg.model,
        train_config=cfg.to_dict(),
        data=dataset_summary(ds, data_path),
        item_ids=ds.item_ids,
        metrics=metrics,
        promote=promote,
    )
    return TrainedVersion(version, cfg.model, metrics)


def check_compatible(loaded: LoadedModel, ds: PreparedDataset) -> None:
    """A model is evaluated only on the exact prepared dataset it was trained on: a different
    split of the same log could put its training sessions into TEST."""
    trained_on = loaded.config.get("data", {}).get("fingerprint")
    if trained_on is not None and trained_on != dataset_fingerprint(ds):
        raise ValueError(
            f"model {loaded.version} was trained on a different prepared dataset "
            f"(fingerprint {trained_on[:12]}…, this one {dataset_fingerprint(ds)[:12]}…): "
            "evaluate it on the dataset it was trained on"
        )
    if loaded.item_ids != ds.item_ids:
        raise ValueError(
            f"model {loaded.version} was trained on a different item catalogue "
            f"({len(loaded.item_ids)} items) than this dataset ({ds.n_items} items): "
            "evaluate it on the prepared dataset it was trained on"
        )


def evaluate_models(
    ds: PreparedDataset,
    registry: Registry | None,
    refs: list[str],
    *,
    split: Split = Split.TEST,
    baselines: bool = True,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, dict]:
    """One row per model (``kind@version``) plus the popularity and recent-items baselines,
    all under the same protocol."""
    rows: dict[str, dict] = {}
    if baselines:
        rows["popularity"] = evaluate(PopularityScorer(ds), ds, split)
        rows["recent-items"] = evaluate(RecentItemsScorer(ds), ds, split)
    if refs and registry is None:
        raise ValueError("evaluating registry models needs a registry directory")
    for ref in refs:
        loaded = open_model(registry.root, ref, device=resolve_device(device))
        check_compatible(loaded, ds)
        cfg = TrainConfig(**{**loaded.config["train"], "device": device})
        task = build_task(cfg, loaded.model, ds, resolve_device(device))
        rows[f"{loaded.kind}@{loaded.version}"] = evaluate(
            task, ds, split, progress=progress, desc=loaded.kind
        )
    return rows


def write_results(path: Path, rows: dict[str, dict], *, split: Split, ds: PreparedDataset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"split": split.name.lower(), "dataset": dataset_summary(ds, None), "rows": rows}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default))


def run_demo(
    workdir: Path,
    *,
    epochs: int = 8,
    n_users: int = 2000,
    n_items: int = 2000,
    progress: bool = True,
) -> str:
    """Synthetic data → SessionRec and SASRec-style models → side-by-side table (returned);
    the promoted SessionRec version also gets its FAISS item index."""
    from index import IndexConfig, add_index_to_artifact, build_index
    from training.loaders import prepare

    data_dir, registry = workdir / "data" / "synthetic", Registry(workdir / "artifacts")
    ds = prepare("synthetic", data_dir, n_users=n_users, n_items=n_items)
    log.info("prepared synthetic data at %s: %s", data_dir, ds.meta["counts"])
    refs = []
    for kind in ("sessionrec", "sasrec"):
        trained = train_and_save(
            ds,
            TrainConfig(model=kind, epochs=epochs),
            registry,
            data_path=data_dir,
            promote=kind == "sessionrec",
            progress=progress,
        )
        refs.append(trained.version)
    current = registry.open("current")
    meta = add_index_to_artifact(
        current.root, build_index(read_item_vectors(current), IndexConfig())
    )
    log.info("built a %s index over %d items for %s", meta.kind, meta.n, current.version)
    rows = evaluate_models(ds, registry, refs, progress=progress)
    write_results(workdir / "results.json", rows, split=Split.TEST, ds=ds)
    return format_table(rows)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
