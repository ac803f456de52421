"""Next-session retrieval metrics: one held-out target session per user, many positives.

For a user with positive set ``P`` (the engaged items of the target session) and a ranked
list ``topk`` (best first, distinct item indices):

- ``recall@k = |topk[:k] ∩ P| / |P|`` — the denominator is ``|P|``, not ``min(|P|, k)``, so a
  user with more than ``k`` positives cannot reach 1. This is the paper's next-session recall.
- ``ndcg@k = DCG@k / IDCG@k`` with binary gains and discount ``1 / log2(rank + 2)`` (rank from
  0). The ideal list puts ``min(|P|, k)`` hits first, so a full top-k of positives scores 1.
- ``hr@k = 1`` if any of ``topk[:k]`` is in ``P``, else 0.
- ``in_session_auc``: within one target session, the probability that a positive outscores a
  shown-but-not-engaged item (ties count 1/2); undefined (nan) when either side is empty, and
  such sessions are left out of the mean.

Negative entries in ``topk`` (``-1``) mark empty slots (catalogue exhausted) and never hit.
Metrics are per user; :class:`MetricAccumulator` averages them over users.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

KS = (10, 50, 100)
METRIC_NAMES = ("recall", "ndcg", "hr")


def retrieval_metrics(
    topk: np.ndarray, positives: list[np.ndarray], ks: Sequence[int] = KS
) -> dict[str, np.ndarray]:
    """Per-user ``recall@k``, ``ndcg@k`` and ``hr@k`` for each ``k`` in ``ks``.

    topk: (B, Kmax) ranked item indices, Kmax >= max(ks), -1 for empty slots.
    positives: B arrays of positive item indices (each non-empty; duplicates are ignored).
    Returns float64 arrays of shape (B,) keyed ``"recall@10"``, ``"ndcg@10"``, ``"hr@10"``, ...
    """
    topk = np.asarray(topk)
    if topk.ndim != 2:
        raise ValueError(f"topk must be 2-D (B, Kmax), got shape {topk.shape}")
    batch, kmax = topk.shape
    if len(positives) != batch:
        raise ValueError(f"got {len(positives)} positive sets for {batch} users")
    if not ks or max(ks) > kmax or min(ks) < 1:
        raise ValueError(f"ks {tuple(ks)} must be >= 1 and <= topk width {kmax}")
    pos_sets = [np.unique(np.asarray(p, dtype=np.int64)) for p in positives]
    if any(p.size == 0 for p in pos_sets):
        raise ValueError("every user needs at least one positive item")
    if any(p[0] < 0 for p in pos_sets):  # sorted by np.unique
        raise ValueError("positive item indices must be >= 0")

    hits = _hit_matrix(topk.astype(np.int64), pos_sets)  # (B, Kmax) bool
    n_pos = np.array([p.size for p in pos_sets], dtype=np.float64)  # (B,)
    discount = 1.0 / np.log2(np.arange(kmax, dtype=np.float64) + 2.0)  # (Kmax,)
    ideal = np.cumsum(discount)  # ideal[n - 1] = IDCG with n hits on top

    out: dict[str, np.ndarray] = {}
    for k in ks:
        h = hits[:, :k]
        n_hit = h.sum(axis=1).astype(np.float64)
        idcg = ideal[np.minimum(n_pos, k).astype(np.int64) - 1]
        out[f"recall@{k}"] = n_hit / n_pos
        out[f"ndcg@{k}"] = (h * discount[:k]).sum(axis=1) / idcg
        out[f"hr@{k}"] = (n_hit > 0).astype(np.float64)
    return out


def in_session_auc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """AUC of positives against shown negatives of one session; ties count 1/2.

    Returns nan when either side is empty.
    """
    pos = np.asarray(pos_scores, dtype=np.float64).ravel()
    neg = np.sort(np.asarray(neg_scores, dtype=np.float64).ravel())
    if pos.size == 0 or neg.size == 0:
        return math.nan
    below = np.searchsorted(neg, pos, side="left")  # negatives strictly below each positive
    not_above = np.searchsorted(neg, pos, side="right")
    wins = below.sum() + 0.5 * (not_above - below).sum()
    return float(wins / (pos.size * neg.size))


class MetricAccumulator:
    """Averages per-user metric arrays over batches, and per-session AUCs over sessions."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._users = 0
        self._auc_sum = 0.0
        self._auc_sessions = 0

    def add(self, metrics: dict[str, np.ndarray]) -> None:
        """Add one batch of per-user arrays (all the same length, same keys every batch)."""
        lengths = {np.asarray(v).shape[0] for v in metrics.values()}
        if len(lengths) > 1:
            raise ValueError(f"metric arrays differ in length: {sorted(lengths)}")
        if self._sums and metrics.keys() != self._sums.keys():
            raise ValueError(
                f"metric keys changed: had {sorted(self._sums)}, got {sorted(metrics)}"
            )
        for key, values in metrics.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(np.sum(values, dtype=np.float64))
        self._users += lengths.pop() if lengths else 0

    def add_auc(self, auc: float) -> None:
        """Add one session's AUC; nan (a session without positives or negatives) is skipped."""
        if math.isnan(auc):
            return
        self._auc_sum += auc
        self._auc_sessions += 1

    def result(self) -> dict[str, float | int | None]:
        """Means per metric, ``users``, ``auc`` (None without any AUC) and ``auc_sessions``."""
        out: dict[str, float | int | None] = {
            key: total / self._users for key, total in self._sums.items() if self._users
        }
        out["users"] = self._users
        out["auc"] = self._auc_sum / self._auc_sessions if self._auc_sessions else None
        out["auc_sessions"] = self._auc_sessions
        return out


def topk_scores(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``k`` best items per row, best first.

    scores: (B, N); exclude: optional bool (B, N), True for items that must not be returned.
    Column 0 (the padding item) is always excluded. Rows with fewer than ``k`` eligible items
    are filled with -1. Returns int64 (B, k).
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (B, N), got shape {tuple(scores.shape)}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k={k} must be in [1, {scores.shape[1]}] (the number of items)")
    mask = torch.zeros_like(scores, dtype=torch.bool)  # (B, N)
    if exclude is not None:
        if exclude.dtype != torch.bool or exclude.shape != scores.shape:
            raise ValueError("exclude must be a bool tensor shaped like scores")
        mask |= exclude
    mask[:, 0] = True
    masked = scores.masked_fill(mask, float("-inf"))  # (B, N)
    values, indices = torch.topk(masked, k, dim=1)  # (B, k)
    return indices.masked_fill(values == float("-inf"), -1)


def format_table(rows: dict[str, dict[str, float | None]], ks: Sequence[int] = KS) -> str:
    """A plain-text table: one row per model, columns recall/ndcg/hr @k and auc.

    Missing values (and ``auc`` of None) show as ``—``.
    """
    columns = [f"{m}@{k}" for m in METRIC_NAMES for k in ks] + ["auc"]
    header = ["model", *columns]
    body = [[name, *(_cell(metrics.get(c)) for c in columns)] for name, metrics in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def _hit_matrix(topk: np.ndarray, pos_sets: list[np.ndarray]) -> np.ndarray:
    """(B, Kmax) bool: is ``topk[b, j]`` a positive of user b? Vectorized via (user, item) keys."""
    batch = topk.shape[0]
    n_items = int(max(topk.max(initial=0), max(int(p.max()) for p in pos_sets))) + 1
    user = np.arange(batch, dtype=np.int64)
    pos_keys = np.concatenate([b * n_items + p for b, p in zip(user, pos_sets, strict=True)])
    topk_keys = user[:, None] * n_items + topk  # (B, Kmax)
    return np.isin(topk_keys, pos_keys) & (topk >= 0)


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4f}"
