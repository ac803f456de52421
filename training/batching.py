"""Turn a PreparedDataset into model batches: histories, query tokens and their targets.

Which sessions a user contributes, per mode:

- ``Split.TRAIN`` — the sessions before the user's VAL session (all of them for users without
  one), cut to the last ``max_sessions``. Every session with a positive is a target: its query
  token sits at its position and sees the sessions before it (the first session's query is the
  cold-start query when the window starts at the user's real first session).
- ``Split.VAL`` / ``Split.TEST`` — the history is every session before the held-out session,
  cut to the last ``max_sessions``; one query at the end predicts the held-out session.

Sessions longer than ``max_items`` keep their positives first (pooling is order-free) so the
cap never hides what the user engaged with. With probability ``reveal_prob`` a training target
also gets a query that sees a random prefix of the session (the "items already seen in this
session" context of the serving request) and predicts the rest: beside the plain query
(``reveal_mode="extra"``, the training default) or instead of it (``"replace"``, the first
default, which took the revealed items out of the plain next-session targets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model_store.features import cap_events, session_gap
from model_store.model import Sessions
from training.dataset import PreparedDataset, Split

REVEAL_MODES = ("replace", "extra")


@dataclass(frozen=True)
class BatchConfig:
    max_sessions: int = 64  # history sessions per user in one sequence
    max_items: int = 50  # events per session token
    reveal_prob: float = 0.0  # chance a training target reveals a prefix of itself
    # "replace": the revealing query replaces the plain one (its revealed items stop being
    # targets); "extra": it is added beside the plain query, which keeps every target.
    reveal_mode: str = "replace"


@dataclass
class SessionBatch:
    """Everything one SessionRec forward + loss needs, as tensors; Q queries per user."""

    sessions: Sessions  # history sessions, per user contiguous and in time order
    lengths: Tensor  # (B,)
    query_pos: Tensor  # (B, Q) position of each query; padded queries at 0
    query_valid: Tensor  # (B, Q) bool
    query_gap: Tensor  # (B*Q,) float seconds since the previous session ended (< 0: none)
    query_start: Tensor  # (B*Q,) long request time
    context: Sessions  # revealed in-session items, segment = flat query index
    pos_query: Tensor  # (P,) flat query index of each target positive
    pos_item: Tensor  # (P,)
    neg_query: Tensor  # (N,) flat query index of each shown negative of the target session
    neg_item: Tensor  # (N,)
    users: np.ndarray  # (B,) user indices

    @property
    def n_queries(self) -> int:
        return self.query_valid.numel()

    def to(self, device: torch.device) -> SessionBatch:
        def move(x):
            if isinstance(x, Tensor):
                return x.to(device, non_blocking=True)
            if isinstance(x, Sessions):
                return Sessions(*(move(t) for t in x[:-1]), x.n)
            return x

        return SessionBatch(**{k: move(v) for k, v in vars(self).items()})


def eval_users(ds: PreparedDataset, split: Split) -> np.ndarray:
    """Users that have a held-out session of ``split`` (VAL or TEST), ascending."""
    return np.unique(ds.sess_user[ds.sess_split == split]).astype(np.int64)


def train_users(ds: PreparedDataset) -> np.ndarray:
    """Users with at least one training target (a positive session before any held-out one)."""
    has_pos = np.zeros(ds.n_sessions, dtype=bool)
    pos_sessions = np.searchsorted(ds.sess_offsets, np.flatnonzero(ds.ev_label > 0), "right") - 1
    has_pos[pos_sessions] = True
    ok = has_pos & (ds.sess_split == Split.TRAIN)
    return np.unique(ds.sess_user[ok]).astype(np.int64)


def history_range(ds: PreparedDataset, user: int, split: Split) -> tuple[int, int, int]:
    """(first, end, target) session indices: history is [first, end), target is the held-out
    session for VAL/TEST (-1 for TRAIN). ``first`` is not yet cut to ``max_sessions``."""
    lo, hi = int(ds.user_offsets[user]), int(ds.user_offsets[user + 1])
    splits = ds.sess_split[lo:hi]
    if split == Split.TRAIN:
        held = np.flatnonzero(splits != Split.TRAIN)
        return lo, lo + (int(held[0]) if held.size else hi - lo), -1
    found = np.flatnonzero(splits == split)
    if not found.size:
        raise ValueError(f"user {user} has no {split.name} session")
    target = lo + int(found[0])
    return lo, target, target


class Batcher:
    """Builds `SessionBatch`es for a dataset; the only place that knows the array layout."""

    def __init__(self, ds: PreparedDataset, config: BatchConfig) -> None:
        if config.reveal_mode not in REVEAL_MODES:
            raise ValueError(
                f"reveal_mode must be one of {REVEAL_MODES}, got {config.reveal_mode!r}"
            )
        self.ds = ds
        self.config = config

    def session_events(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """A session's (items, labels), capped at ``max_items`` with positives kept first."""
        items, labels = self.ds.session(s)
        return cap_events(items, labels, self.config.max_items)

    def gap(self, s: int, user_first: int) -> int:
        """Seconds between the end of the session before ``s`` and the start of ``s``."""
        previous = int(self.ds.sess_end[s - 1]) if s > user_first else None
        return session_gap(int(self.ds.sess_start[s]), previous)

    def build(
        self, users: np.ndarray, split: Split, rng: np.random.Generator | None = None
    ) -> SessionBatch:
        """One batch for ``users``: training targets (``Split.TRAIN``) or held-out sessions."""
        ds, cfg = self.ds, self.config
        hist_items, hist_labels, hist_seg, hist_gap, hist_start = [], [], [], [], []
        lengths, queries = [], []  # queries: (b, pos, session, revealed prefix length)
        n_hist = 0
        for b, u in enumerate(users):
            user_first = int(ds.user_offsets[u])
            first, end, target = history_range(ds, int(u), split)
            first = max(first, end - cfg.max_sessions)
            for s in range(first, end):
                items, labels = self.session_events(s)
                hist_items.append(items)
                hist_labels.append(labels)
                hist_seg.append(np.full(len(items), n_hist, dtype=np.int64))
                hist_gap.append(self.gap(s, user_first))
                hist_start.append(int(ds.sess_start[s]))
                n_hist += 1
            lengths.append(end - first)
            if split == Split.TRAIN:
                for pos, s in enumerate(range(first, end)):
                    labels = ds.ev_label[ds.sess_offsets[s] : ds.sess_offsets[s + 1]]
                    if not labels.any():
                        continue
                    cut = 0
                    if rng is not None and cfg.reveal_prob and rng.random() < cfg.reveal_prob:
                        cut = _reveal_cut(labels, rng)
                    if cut and cfg.reveal_mode == "extra":
                        queries.append((b, pos, s, 0))
                    queries.append((b, pos, s, cut))
            else:
                queries.append((b, end - first, target, 0))
        return self._assemble(
            users,
            lengths,
            queries,
            (hist_items, hist_labels, hist_seg, hist_gap, hist_start, n_hist),
        )

    def _assemble(self, users, lengths, queries, hist) -> SessionBatch:
        ds, cfg = self.ds, self.config
        hist_items, hist_labels, hist_seg, hist_gap, hist_start, n_hist = hist
        B = len(users)
        per_user = np.bincount([q[0] for q in queries], minlength=B) if queries else np.zeros(B)
        Q = max(int(per_user.max()) if B else 0, 1)
        query_pos = np.zeros((B, Q), dtype=np.int64)
        query_valid = np.zeros((B, Q), dtype=bool)
        query_gap = np.full(B * Q, -1.0, dtype=np.float32)
        query_start = np.zeros(B * Q, dtype=np.int64)
        ctx, pos, neg = _Ragged(), _Ragged(), _Ragged()
        slot = np.zeros(B, dtype=np.int64)
        for b, p, s, cut in queries:
            qi = b * Q + slot[b]
            query_pos[b, slot[b]] = p
            query_valid[b, slot[b]] = True
            slot[b] += 1
            user_first = int(ds.user_offsets[users[b]])
            query_gap[qi] = self.gap(s, user_first)
            query_start[qi] = ds.sess_start[s]
            items, labels = ds.session(s)
            if cut:
                ctx.add(qi, items[:cut], labels[:cut])
            rest_items, rest_labels = items[cut:], labels[cut:]
            pos.add(qi, rest_items[rest_labels > 0])
            neg.add(qi, rest_items[rest_labels == 0][: cfg.max_items])
        return SessionBatch(
            sessions=Sessions(
                items=_cat_long(hist_items),
                labels=_cat_long(hist_labels),
                segment=_cat_long(hist_seg),
                gap=torch.tensor(hist_gap, dtype=torch.float32),
                start=torch.tensor(hist_start, dtype=torch.long),
                n=n_hist,
            ),
            lengths=torch.tensor(lengths, dtype=torch.long),
            query_pos=torch.from_numpy(query_pos),
            query_valid=torch.from_numpy(query_valid),
            query_gap=torch.from_numpy(query_gap),
            query_start=torch.from_numpy(query_start),
            context=ctx.sessions(B * Q),
            pos_query=pos.segments(),
            pos_item=pos.values(),
            neg_query=neg.segments(),
            neg_item=neg.values(),
            users=np.asarray(users),
        )


class _Ragged:
    """Accumulates (segment, values[, labels]) groups into flat tensors."""

    def __init__(self) -> None:
        self.seg: list[np.ndarray] = []
        self.val: list[np.ndarray] = []
        self.lab: list[np.ndarray] = []

    def add(self, segment: int, values: np.ndarray, labels: np.ndarray | None = None) -> None:
        self.seg.append(np.full(len(values), segment, dtype=np.int64))
        self.val.append(values)
        self.lab.append(labels if labels is not None else np.ones(len(values), dtype=np.int8))

    def segments(self) -> Tensor:
        return _cat_long(self.seg)

    def values(self) -> Tensor:
        return _cat_long(self.val)

    def sessions(self, n: int) -> Sessions:
        return Sessions(
            self.values(),
            _cat_long(self.lab),
            self.segments(),
            torch.full((n,), -1.0),
            torch.zeros(n, dtype=torch.long),
            n,
        )


def _reveal_cut(labels: np.ndarray, rng: np.random.Generator) -> int:
    """A prefix length in [1, last positive] so at least one positive stays a target; 0 if the
    session is too short to reveal anything."""
    positives = np.flatnonzero(labels > 0)
    if not positives.size or positives[-1] < 1:
        return 0
    return int(rng.integers(1, positives[-1] + 1))


def _cat_long(parts: list[np.ndarray]) -> Tensor:
    if not parts:
        return torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(np.concatenate(parts).astype(np.int64, copy=False))
