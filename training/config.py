"""Training configuration: one frozen dataclass, saved into every artifact's config.json.

Kept free of torch so the command line can show its defaults without importing it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MODEL_KINDS = ("sessionrec", "sasrec")
LOSS_WEIGHTS = ("positive", "session")


@dataclass(frozen=True)
class TrainConfig:
    model: str = "sessionrec"  # sessionrec | sasrec
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.1
    window: int = 64  # W: sessions per token's attention band and K/V cache
    use_negatives: bool = True  # ISE pools shown negatives
    use_context: bool = True  # query token carries request context
    # Time features of the query token: gap+hour | gap | none. The gap is what tells a news
    # model whether the user is coming back to the same stories (Globo test Recall@50 0.55 with
    # it, 0.32 without; docs/BENCHMARKS.md, "What was tried").
    query_time: str = "gap+hour"
    temperature: float = 0.05
    epochs: int = 40
    batch_size: int = 64  # users per step
    lr: float = 5e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    n_negatives: int = 1024  # sampled catalogue negatives per step
    rank_alpha: float = 0.05  # α of the in-session rank loss
    # Retrieval loss averaged per positive, or per target session ("session": each session's
    # positives share one unit of weight, like the per-user metrics). SessionRec only.
    loss_weight: str = "positive"
    reveal_prob: float = 0.25  # chance a target reveals a prefix of itself as query context
    # "extra": a revealing query is added beside the target's plain query, which keeps every
    # target; "replace" (the first default) trades the plain query for it, so a quarter of the
    # targets lost their revealed items and the plain query trained on fewer sessions.
    reveal_mode: str = "extra"
    # History sessions per sequence; None = n_layers·window, the model's exact receptive
    # field (see `history_sessions`).
    max_sessions: int | None = None
    max_items: int = 50  # events pooled per session
    max_len: int = 200  # SASRec: positives per sequence
    patience: int = 5  # epochs without a better validation Recall@50 ...
    min_epochs: int = 10  # ... counted only after this many (validation is ~0 at first)
    val_users: int = 2000  # validation users sampled for early stopping (0 = all)
    time_budget_s: float | None = None  # stop after this much training time
    user_fraction: float = 1.0  # train on a seeded sample of this share of the training users
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        if not 0.0 < self.user_fraction <= 1.0:
            raise ValueError(f"user_fraction must be in (0, 1], got {self.user_fraction}")
        if self.loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"loss_weight must be one of {LOSS_WEIGHTS}, got {self.loss_weight!r}")
        if self.model not in MODEL_KINDS:
            raise ValueError(f"model must be one of {MODEL_KINDS}, got {self.model!r}")
        if self.max_sessions is not None and self.max_sessions < self.receptive_field:
            raise ValueError(
                f"max_sessions={self.max_sessions} is shorter than the model's receptive field "
                f"n_layers·window = {self.receptive_field}: training and evaluation would see "
                "less history than the cached serving path"
            )

    @property
    def receptive_field(self) -> int:
        """Sessions an interest vector depends on: each of the n_layers banded-attention layers
        reaches ``window`` sessions further back, so older sessions change nothing."""
        return self.n_layers * self.window

    @property
    def history_sessions(self) -> int:
        """Sessions of history each training sequence / evaluation query gets."""
        return self.max_sessions if self.max_sessions is not None else self.receptive_field

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
