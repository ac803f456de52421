"""The training loop shared by SessionRec and the SASRec-style baseline.

AdamW with a short linear warm-up, gradient clipping, seeded numpy/torch generators, a tqdm bar
with the running loss, and early stopping on validation Recall@50 (the best epoch's weights are
restored). Runs on CUDA when present, CPU otherwise. Both models get the same budget: the same
epochs (and optional wall-clock budget), batch size, negatives, dimension, layers and heads.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from model_store.model import ModelConfig, SessionRec
from model_store.sasrec import SASRec, SASRecConfig
from training.batching import BatchConfig, eval_users
from training.config import TrainConfig
from training.dataset import PreparedDataset, Split
from training.evaluate import evaluate
from training.tasks import SASRecTask, SessionRecTask

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: torch.nn.Module
    config: TrainConfig
    best_epoch: int
    val_metrics: dict
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def build_model(cfg: TrainConfig, ds: PreparedDataset) -> torch.nn.Module:
    common = dict(
        n_items=ds.n_items,
        n_categories=ds.n_categories,
        dim=cfg.dim,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        dropout=cfg.dropout,
        temperature=cfg.temperature,
    )
    if cfg.model == "sasrec":
        model = SASRec(SASRecConfig(**common, max_len=cfg.max_len))
    else:
        model = SessionRec(
            ModelConfig(
                **common,
                window=cfg.window,
                use_negatives=cfg.use_negatives,
                use_context=cfg.use_context,
                query_time=cfg.query_time,
            )
        )
    with torch.no_grad():
        model.item_tower.item_category.copy_(torch.from_numpy(ds.item_category.astype(np.int64)))
    return model


def build_task(cfg: TrainConfig, model: torch.nn.Module, ds: PreparedDataset, device):
    if cfg.model == "sasrec":
        return SASRecTask(model, ds, n_negatives=cfg.n_negatives, device=device)
    batch = BatchConfig(cfg.history_sessions, cfg.max_items, cfg.reveal_prob, cfg.reveal_mode)
    return SessionRecTask(
        model,
        ds,
        batch,
        rank_alpha=cfg.rank_alpha,
        n_negatives=cfg.n_negatives,
        per_session=cfg.loss_weight == "session",
        device=device,
    )


def train(cfg: TrainConfig, ds: PreparedDataset, *, progress: bool = True) -> TrainResult:
    """Train one model on the dataset's TRAIN sessions; early-stop on VAL Recall@50."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = resolve_device(cfg.device)
    model = build_model(cfg, ds).to(device)
    task = build_task(cfg, model, ds, device)
    if cfg.user_fraction < 1.0:  # scaling runs: less training data, same evaluation users
        keep = max(1, round(len(task.users) * cfg.user_fraction))
        task.users = np.sort(rng.choice(task.users, keep, replace=False))
    if not len(task.users):
        raise ValueError("the dataset has no training targets (no user has a positive session)")
    val = eval_users(ds, Split.VAL)
    if cfg.val_users and len(val) > cfg.val_users:
        val = np.sort(rng.choice(val, cfg.val_users, replace=False))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(task.users) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    )
    # Early stopping needs a validation Recall@50: users with a VAL session and >= 50 items.
    early_stopping = len(val) > 0 and ds.n_items >= 50
    if not early_stopping:
        log.warning(
            "no validation signal (%d VAL users, %d items): training all %d epochs and keeping "
            "the last weights",
            len(val),
            ds.n_items,
            cfg.epochs,
        )
    best = (-1.0, 0, copy.deepcopy(model.state_dict()), {})
    history: list[dict] = []
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        running, n = 0.0, 0
        bar = tqdm(
            task.batches(cfg.batch_size, rng),
            total=steps_per_epoch,
            disable=None if progress else True,
            desc=f"{cfg.model} epoch {epoch}/{cfg.epochs}",
            leave=False,
        )
        for batch in bar:
            loss, parts = task.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running, n = running + loss.item(), n + 1
            bar.set_postfix(loss=f"{running / n:.4f}", **{k: f"{v:.3f}" for k, v in parts.items()})
        epoch_s = time.perf_counter() - t0
        model.eval()
        metrics = evaluate(task, ds, Split.VAL, users=val) if len(val) else {}
        # Without a validation metric the newest epoch counts as the best.
        score = float(metrics["recall@50"]) if early_stopping else float(epoch)
        history.append(
            {
                "epoch": epoch,
                "loss": running / max(n, 1),
                "seconds": epoch_s,
                "steps": n,
                "val": metrics,
            }  # fmt: skip
        )
        log.info(
            "%s epoch %d loss %.4f val recall@50 %.4f (%.1fs)",
            cfg.model,
            epoch,
            running / max(n, 1),
            metrics.get("recall@50", float("nan")),
            epoch_s,
        )
        if score > best[0]:
            best = (score, epoch, copy.deepcopy(model.state_dict()), metrics)
        elif epoch >= cfg.min_epochs and epoch - best[1] >= cfg.patience:
            break
        if cfg.time_budget_s is not None and time.perf_counter() - started > cfg.time_budget_s:
            break
    model.load_state_dict(best[2])
    model.eval()
    return TrainResult(model, cfg, best[1], best[3], history, time.perf_counter() - started)
