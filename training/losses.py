"""Training losses: sampled softmax with log-Q correction, and the in-session rank loss.

``L = L_retrieval + α·L_rank`` (SessionRec §3.3).

- Retrieval: every positive of the target session is scored against ``M`` negatives drawn
  once per batch from the catalogue with probability Q(i) ∝ count(i)^0.75 (mixed with a little
  uniform mass so every item can be drawn). Logits are cosine / τ minus log(M·Q(i)) — the
  log-Q correction that makes the sampled softmax an unbiased stand-in for the full one
  (Yi et al., RecSys 2019). Sampled items that are positives of the same query ("accidental
  hits") are masked out.
- Rank: each positive of the target session against each shown-but-not-engaged item of that
  same session, pairwise logistic, averaged per session then over sessions. It sharpens the
  decision the user actually made among the items on the screen.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class NegativeSampler:
    """Draws catalogue negatives from a smoothed unigram distribution over items 1..N."""

    def __init__(self, counts: np.ndarray, *, power: float = 0.75, uniform: float = 0.05):
        # counts: (N+1,) positives per item index; index 0 (padding) is never drawn.
        weights = counts.astype(np.float64) ** power
        weights[0] = 0.0
        probs = weights / max(weights.sum(), 1e-12)
        flat = np.zeros_like(probs)
        flat[1:] = 1.0 / (len(probs) - 1)
        probs = (1.0 - uniform) * probs + uniform * flat
        self.probs = torch.from_numpy(probs).float()
        self.log_probs = torch.log(self.probs.clamp(min=1e-30))

    def sample(self, m: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.multinomial(self.probs, m, replacement=True, generator=generator)


def sampled_softmax(
    users: Tensor,  # (Qn, d) normalised query outputs
    pos_query: Tensor,  # (P,) which query each positive belongs to
    pos_vecs: Tensor,  # (P, d) normalised positive item vectors
    pos_items: Tensor,  # (P,)
    neg_vecs: Tensor,  # (M, d) normalised sampled negatives
    neg_items: Tensor,  # (M,)
    log_q: Tensor,  # (N+1,) log sampling probability per item
    temperature: float,
    *,
    per_query: bool = False,
) -> Tensor:
    """-log softmax(pos | pos + M sampled negatives), log-Q corrected, averaged over positives
    — or, with ``per_query``, over each query's positives first and then over queries, so every
    target session weighs the same whatever its number of positives (the weighting of the
    per-user Recall/NDCG the model is evaluated on)."""
    m = neg_items.shape[0]
    correction = torch.log(torch.tensor(float(m), device=users.device))
    u = users[pos_query]  # (P, d)
    pos_logit = (u * pos_vecs).sum(-1) / temperature - (log_q[pos_items] + correction)  # (P,)
    neg_logit = u @ neg_vecs.T / temperature - (log_q[neg_items] + correction)[None]  # (P, M)
    neg_logit = neg_logit.masked_fill(_accidental_hits(pos_query, pos_items, neg_items), -1e9)
    logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)
    nll = -F.log_softmax(logits, dim=1)[:, 0]  # (P,)
    if not per_query:
        return nll.mean()
    counts = torch.bincount(pos_query).to(nll.dtype)  # positives per query
    return (nll / counts[pos_query]).sum() / (counts > 0).sum()


def pairwise_rank(
    pos_scores: Tensor,  # (P,) logits of the target positives
    pos_query: Tensor,  # (P,)
    neg_scores: Tensor,  # (N,) logits of the shown negatives of the same sessions
    neg_query: Tensor,  # (N,)
    n_queries: int,
) -> Tensor:
    """Pairwise logistic loss of positives over shown negatives within each query's session."""
    if not pos_scores.numel() or not neg_scores.numel():
        return pos_scores.new_zeros(())
    pos_pad, pos_mask = _pad_by_query(pos_scores, pos_query, n_queries)  # (Qn, Pmax)
    neg_pad, neg_mask = _pad_by_query(neg_scores, neg_query, n_queries)  # (Qn, Nmax)
    pair_mask = pos_mask[:, :, None] & neg_mask[:, None, :]  # (Qn, Pmax, Nmax)
    losses = F.softplus(neg_pad[:, None, :] - pos_pad[:, :, None])
    per_query = (losses * pair_mask).sum((1, 2)) / pair_mask.sum((1, 2)).clamp(min=1)
    has_pairs = pair_mask.any(dim=2).any(dim=1)
    if not has_pairs.any():
        return pos_scores.new_zeros(())
    return per_query[has_pairs].mean()


def _accidental_hits(pos_query: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
    """(P, M) True where a sampled negative is any positive of the same query."""
    n_queries = int(pos_query.max()) + 1 if pos_query.numel() else 0
    hits = (pos_items[:, None] == neg_items[None, :]).float()  # (P, M)
    per_query = hits.new_zeros(n_queries, neg_items.shape[0]).index_add_(0, pos_query, hits)
    return per_query[pos_query] > 0


def _pad_by_query(values: Tensor, query: Tensor, n_queries: int) -> tuple[Tensor, Tensor]:
    """Ragged values grouped by query → (n_queries, max_count) padded values and mask."""
    counts = torch.bincount(query, minlength=n_queries)
    width = int(counts.max())
    order = torch.argsort(query, stable=True)
    sorted_q = query[order]
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(len(query), device=query.device) - starts[sorted_q]
    padded = values.new_zeros(n_queries, width)
    mask = torch.zeros(n_queries, width, dtype=torch.bool, device=query.device)
    padded[sorted_q, col] = values[order]
    mask[sorted_q, col] = True
    return padded, mask
