"""The next-session evaluation protocol, shared by every model.

For each user with a held-out session of the split: the scorer sees the sessions before it and
scores the full catalogue; the held-out session's positives are the relevant set. Nothing is
excluded from the ranking — items a user engaged with before may well come back, and every
model is judged on the same rule. In-session AUC ranks the held-out session's positives
against the items that were shown in it but not engaged with (datasets with negatives only).
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from training.batching import eval_users
from training.dataset import PreparedDataset, Split
from training.metrics import KS, MetricAccumulator, in_session_auc, retrieval_metrics, topk_scores
from training.tasks import Scorer


def evaluate(
    scorer: Scorer,
    ds: PreparedDataset,
    split: Split,
    *,
    users: np.ndarray | None = None,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "evaluate",
) -> dict[str, float | int | None]:
    """Recall/NDCG/HR@{10,50,100} and in-session AUC over the split's held-out sessions."""
    users = eval_users(ds, split) if users is None else users
    target = _target_sessions(ds, split)
    acc = MetricAccumulator()
    kmax = min(max(KS), ds.n_items)
    ks = tuple(k for k in KS if k <= kmax) or (kmax,)  # a tiny catalogue: K = its size
    for i in tqdm(
        range(0, len(users), batch_size), desc=desc, disable=None if progress else True, leave=False
    ):
        chunk = users[i : i + batch_size]
        scores = scorer.score(chunk, split)  # (B, N+1)
        top = topk_scores(scores, kmax).numpy()
        positives, negatives = [], []
        for u in chunk:
            items, labels = ds.session(int(target[u]))
            positives.append(items[labels > 0])
            negatives.append(items[labels == 0])
        acc.add(retrieval_metrics(top, positives, ks=ks))
        for b, (pos, neg) in enumerate(zip(positives, negatives, strict=True)):
            if len(pos) and len(neg):
                row = scores[b].numpy()
                acc.add_auc(in_session_auc(row[pos], row[neg]))
    return acc.result()


def _target_sessions(ds: PreparedDataset, split: Split) -> dict[int, int]:
    sessions = np.flatnonzero(ds.sess_split == split)
    return {int(ds.sess_user[s]): int(s) for s in sessions}
