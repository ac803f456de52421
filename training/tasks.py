"""What each model contributes to the shared trainer and evaluator: batches, loss, scores.

A task owns one model and knows how to (1) build its training batches from a dataset,
(2) compute its loss on one, and (3) score the whole catalogue for held-out users. The trainer
(`training.train`) and evaluator (`training.evaluate`) only talk to this interface, which is
what puts SessionRec, the SASRec-style baseline and popularity in one harness.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from model_store.model import SessionRec, pad_tokens
from model_store.sasrec import SASRec
from training.batching import BatchConfig, Batcher, SessionBatch, history_range, train_users
from training.dataset import PreparedDataset, Split
from training.losses import NegativeSampler, pairwise_rank, sampled_softmax


class Scorer(Protocol):
    def score(self, users: np.ndarray, split: Split) -> Tensor:
        """(B, N+1) scores of every item index for the users' held-out sessions; column 0 is
        padding and ignored."""


def positive_counts(
    ds: PreparedDataset,
    splits: tuple[Split, ...] = (Split.TRAIN,),
    *,
    impressions_only: bool = False,
) -> np.ndarray:
    """(N+1,) positives per item over sessions of the given splits; ``impressions_only``
    counts only sessions that also show a not-engaged item (MIND: the impressions, not the
    click-history pseudo-session)."""
    ev_session = np.repeat(np.arange(ds.n_sessions), np.diff(ds.sess_offsets))
    keep = (ds.ev_label > 0) & np.isin(ds.sess_split[ev_session], list(splits))
    if impressions_only:
        shown = np.zeros(ds.n_sessions, dtype=bool)
        shown[ev_session[ds.ev_label == 0]] = True
        keep &= shown[ev_session]
    return np.bincount(ds.ev_item[keep], minlength=ds.n_items + 1).astype(np.float64)


class PopularityScorer:
    """Most-engaged items first; counts every positive the model may see for the split
    (``impressions_only``: only those of sessions with shown negatives — a reference for
    how far a non-personal "what is being clicked on screens now" list goes)."""

    def __init__(self, ds: PreparedDataset, *, impressions_only: bool = False) -> None:
        def counts(splits):
            c = positive_counts(ds, splits, impressions_only=impressions_only)
            return torch.from_numpy(c).float()

        self.by_split = {
            Split.VAL: counts((Split.TRAIN,)),
            Split.TEST: counts((Split.TRAIN, Split.VAL)),
        }

    def score(self, users: np.ndarray, split: Split) -> Tensor:
        return self.by_split[split][None].expand(len(users), -1)


class RecentItemsScorer:
    """Re-engagement heuristic: the user's own history items, most recent first, then
    popularity. Not a model — a reference for how much of a dataset is repeat behaviour."""

    def __init__(self, ds: PreparedDataset) -> None:
        self.ds = ds
        self.popularity = PopularityScorer(ds)

    def score(self, users: np.ndarray, split: Split) -> Tensor:
        pop = self.popularity.score(users, split)
        scores = (pop / pop.max().clamp(min=1.0)).clone()  # popularity in [0, 1]
        for b, u in enumerate(users):
            first, end, _ = history_range(self.ds, int(u), split)
            a, z = int(self.ds.sess_offsets[first]), int(self.ds.sess_offsets[end])
            # Most recent occurrence of each item: dedupe the reversed history, keep first.
            newest_first = self.ds.ev_item[a:z][::-1]
            items, first = np.unique(newest_first, return_index=True)
            recency = 1.0 - first / max(z - a, 1)  # newest → 1, oldest → ~0
            scores[b, torch.from_numpy(items.astype(np.int64))] = torch.from_numpy(
                2.0 + recency
            ).float()
        return scores


class SessionRecTask:
    def __init__(
        self,
        model: SessionRec,
        ds: PreparedDataset,
        batch: BatchConfig,
        *,
        rank_alpha: float,
        n_negatives: int,
        per_session: bool = False,
        device: torch.device,
    ) -> None:
        self.model = model
        self.ds = ds
        self.per_session = per_session
        self.batcher = Batcher(ds, batch)
        self.eval_batcher = Batcher(ds, BatchConfig(batch.max_sessions, batch.max_items, 0.0))
        self.rank_alpha = rank_alpha
        self.n_negatives = n_negatives
        self.device = device
        self.sampler = NegativeSampler(positive_counts(ds))
        self.log_q = self.sampler.log_probs.to(device)
        self.users = train_users(ds)

    def batches(self, batch_size: int, rng: np.random.Generator) -> Iterator[SessionBatch]:
        users = rng.permutation(self.users)
        for i in range(0, len(users), batch_size):
            yield self.batcher.build(users[i : i + batch_size], Split.TRAIN, rng)

    def loss(self, batch: SessionBatch) -> tuple[Tensor, dict[str, float]]:
        b = batch.to(self.device)
        model, tau = self.model, self.model.config.temperature
        users = self.user_vectors(b)  # (B*Q, d)
        pos_vecs = model.item_vectors(b.pos_item)  # (P, d), shared by both losses
        negs = self.sampler.sample(self.n_negatives).to(self.device)
        retrieval = sampled_softmax(
            users,
            b.pos_query,
            pos_vecs,
            b.pos_item,
            model.item_vectors(negs),
            negs,
            self.log_q,
            tau,
            per_query=self.per_session,
        )
        loss, parts = retrieval, {"retrieval": retrieval.item()}
        if self.rank_alpha > 0 and b.neg_item.numel():
            pos_s = (users[b.pos_query] * pos_vecs).sum(-1) / tau
            neg_s = (users[b.neg_query] * model.item_vectors(b.neg_item)).sum(-1) / tau
            rank = pairwise_rank(pos_s, b.pos_query, neg_s, b.neg_query, b.n_queries)
            loss = loss + self.rank_alpha * rank
            parts["rank"] = rank.item()
        return loss, parts

    def user_vectors(self, b: SessionBatch) -> Tensor:
        """Full recompute of every query token in the batch → (B*Q, d)."""
        model = self.model
        tokens = pad_tokens(model.encode_sessions(b.sessions), b.lengths)  # (B, S, d)
        queries = model.encode_queries(b.query_gap, b.query_start, b.context)  # (B*Q, d)
        B, Q = b.query_pos.shape
        out = model(tokens, b.lengths, queries.view(B, Q, -1), b.query_pos)  # (B, Q, d)
        return out.reshape(B * Q, -1)

    @torch.inference_mode()
    def score(self, users: np.ndarray, split: Split) -> Tensor:
        b = self.eval_batcher.build(users, split).to(self.device)
        u = self.user_vectors(b)  # one query per user: (B, d)
        scores = u @ self.model.item_vectors().T  # (B, N)
        return torch.cat([scores.new_full((len(users), 1), -torch.inf), scores], 1).cpu()


class SASRecTask:
    """Next-item training over each user's positives, in time order, across sessions."""

    def __init__(
        self, model: SASRec, ds: PreparedDataset, *, n_negatives: int, device: torch.device
    ) -> None:
        self.model = model
        self.ds = ds
        self.n_negatives = n_negatives
        self.device = device
        self.sampler = NegativeSampler(positive_counts(ds))
        self.log_q = self.sampler.log_probs.to(device)
        self.users = train_users(ds)
        self.max_len = model.config.max_len

    def positives_before(self, user: int, end: int) -> np.ndarray:
        """The user's positive items in time order over sessions [first, end)."""
        lo = int(self.ds.user_offsets[user])
        a, z = int(self.ds.sess_offsets[lo]), int(self.ds.sess_offsets[end])
        return self.ds.ev_item[a:z][self.ds.ev_label[a:z] > 0]

    def batches(self, batch_size: int, rng: np.random.Generator) -> Iterator[Tensor]:
        users = rng.permutation(self.users)
        for i in range(0, len(users), batch_size):
            seqs = []
            for u in users[i : i + batch_size]:
                _, end, _ = history_range(self.ds, int(u), Split.TRAIN)
                seq = self.positives_before(int(u), end)[-(self.max_len + 1) :]
                if len(seq) >= 2:
                    seqs.append(seq)
            if seqs:
                yield _left_pad(seqs)

    def loss(self, seqs: Tensor) -> tuple[Tensor, dict[str, float]]:
        seqs = seqs.to(self.device)
        inputs, targets = seqs[:, :-1], seqs[:, 1:]
        out = self.model(inputs)  # (B, L, d)
        keep = (inputs > 0) & (targets > 0)
        users = out[keep]  # (P, d), one query per next-item target
        pos_items = targets[keep]
        negs = self.sampler.sample(self.n_negatives).to(self.device)
        loss = sampled_softmax(
            users,
            torch.arange(len(pos_items), device=self.device),
            self.model.item_vectors(pos_items),
            pos_items,
            self.model.item_vectors(negs),
            negs,
            self.log_q,
            self.model.config.temperature,
        )
        return loss, {"retrieval": loss.item()}

    @torch.inference_mode()
    def score(self, users: np.ndarray, split: Split) -> Tensor:
        seqs = []
        for u in users:
            _, end, _ = history_range(self.ds, int(u), split)
            seq = self.positives_before(int(u), end)[-self.max_len :]
            seqs.append(seq if len(seq) else np.zeros(1, dtype=np.int64))
        out = self.model(_left_pad(seqs).to(self.device))[:, -1]  # (B, d)
        scores = out @ self.model.item_vectors().T
        return torch.cat([scores.new_full((len(users), 1), -torch.inf), scores], 1).cpu()


def _left_pad(seqs: list[np.ndarray]) -> Tensor:
    L = max(len(s) for s in seqs)
    out = np.zeros((len(seqs), L), dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, L - len(s) :] = s
    return torch.from_numpy(out)
