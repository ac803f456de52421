"""The SessionRec model: item tower → intra-session encoder → causal inter-session encoder.

One user history is a sequence of *session tokens* (one per closed session, pooled by the
intra-session encoder). To recommend session t+1 the model appends a *query token* (a learned
"next" embedding plus request context) that attends to the session tokens and returns the
user-interest vector; retrieval scores are inner products with the (L2-normalised) item vectors.

Two code paths run over the same weights and compute the same function:

* ``forward`` — the full recompute over a padded batch of histories plus any number of query
  tokens (M-FALCON-style mask: a query at position i sees sessions < i and itself, and no
  token ever sees a query). Used by training and as the parity reference.
* ``prefill`` + ``step`` — prefill returns the per-layer K/V of the last ``window`` sessions;
  ``step`` runs one token per user against that cache, either a query (cache untouched) or a
  closed session (its K/V appended). This is the serving path.

Window policy (past W). Every token attends to itself and at most the ``window`` (W) sessions
before it: a banded causal mask. The cache therefore holds exactly W sessions; appending to a
full cache evicts the oldest. Because the band is part of the model's function, not an
approximation of the cache, ``prefill + step`` equals ``forward`` for any history length, W or
beyond.

Receptive field. Each layer reaches W sessions further back through the cached K/V, so an
interest vector depends on exactly the last ``n_layers · W`` sessions and on nothing older:
a recompute over those sessions equals a recompute over the whole history (tested). That is
the history training and evaluation use, and what a rebuild of the cache from a raw session
log needs to be exact.

There are no absolute position embeddings: order comes from the causal mask and recency from
the time-gap embedding in every token, so a session's K/V never depend on where it sits in the
window and eviction is a plain shift.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QUERY_TIME = ("gap+hour", "gap", "none")  # time features a query token carries


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one SessionRec model; saved inside the artifact as JSON."""

    n_items: int  # catalogue size; item index 0 is padding, items are 1..n_items
    n_categories: int = 0  # side feature of the item tower; 0 = none
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    mlp_ratio: int = 4
    dropout: float = 0.1
    window: int = 64  # W: sessions each token sees, and sessions kept in the K/V cache
    gap_buckets: int = 32  # log-spaced time-gap buckets (plus bucket 0 = "no previous session")
    use_negatives: bool = True  # ISE pools shown-but-not-engaged items (ablation switch)
    use_context: bool = True  # query token carries request context (ablation switch)
    query_time: str = "gap+hour"  # time features of the query token: gap+hour | gap | none
    temperature: float = 0.05  # softmax temperature over cosine scores in training

    def __post_init__(self) -> None:
        if self.query_time not in QUERY_TIME:
            raise ValueError(f"query_time must be one of {QUERY_TIME}, got {self.query_time!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_items < 1 or self.window < 1:
            raise ValueError("n_items and window must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**data)


class Sessions(NamedTuple):
    """A ragged batch of sessions in flat form: event e belongs to segment ``segment[e]``."""

    items: Tensor  # (E,) long, item index 1..N
    labels: Tensor  # (E,) long/bool, 1 = positive, 0 = shown negative
    segment: Tensor  # (E,) long, which session (0..n-1) the event belongs to
    gap: Tensor  # (n,) float seconds since the previous session ended; < 0 = none
    start: Tensor  # (n,) long Unix seconds the session started (time-of-day feature)
    n: int


class KVCache(NamedTuple):
    """Per-layer keys/values of the last ``window`` sessions of B users, right-padded."""

    k: Tensor  # (L, B, H, W, Dh)
    v: Tensor  # (L, B, H, W, Dh)
    lengths: Tensor  # (B,) long, valid sessions per user (≤ W)

    @staticmethod
    def empty(config: ModelConfig, batch: int, *, device=None, dtype=torch.float32) -> KVCache:
        shape = (config.n_layers, batch, config.n_heads, config.window, config.head_dim)
        zeros = torch.zeros(shape, device=device, dtype=dtype)
        return KVCache(zeros, zeros.clone(), torch.zeros(batch, dtype=torch.long, device=device))

    def user(self, b: int) -> tuple[Tensor, Tensor]:
        """One user's valid K/V: two (L, H, n, Dh) tensors."""
        n = int(self.lengths[b])
        return self.k[:, b, :, :n], self.v[:, b, :, :n]

    @staticmethod
    def stack(users: list[tuple[Tensor, Tensor]], config: ModelConfig, *, device=None) -> KVCache:
        """Right-pad per-user (L, H, n, Dh) K/V pairs into one batch cache."""
        cache = KVCache.empty(config, len(users), device=device)
        for b, (k, v) in enumerate(users):
            n = k.shape[2]
            cache.k[:, b, :, :n] = k
            cache.v[:, b, :, :n] = v
            cache.lengths[b] = n
        return cache


# ----------------------------------------------------------------------------- modules


class ItemTower(nn.Module):
    """Item id (+ category) embedding → residual MLP → item vector (un-normalised)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.dim
        self.item_emb = nn.Embedding(config.n_items + 1, d, padding_idx=0)
        self.cat_emb = (
            nn.Embedding(config.n_categories + 1, d, padding_idx=0) if config.n_categories else None
        )
        # The category of every item travels with the weights, so weights alone rebuild it.
        self.register_buffer("item_category", torch.zeros(config.n_items + 1, dtype=torch.long))
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        # Ids start small (N(0, 0.02)); categories keep PyTorch's N(0, 1), so at first an item
        # *is* its category. On sparse catalogues (Taobao: 80 % of items occur once) the
        # category is what generalises: starting categories at N(0, 0.02) too cut SessionRec's
        # Taobao test Recall@50 from 0.041 to 0.006 (docs/RESULTS.md).
        nn.init.normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()  # padding

    def vectors(self, items: Tensor | None = None) -> Tensor:
        """L2-normalised retrieval vectors of ``items``; all items 1..N by default."""
        if items is None:
            n = self.item_emb.num_embeddings - 1
            items = torch.arange(1, n + 1, device=self.item_emb.weight.device)
        return F.normalize(self(items), dim=-1)

    def forward(self, items: Tensor) -> Tensor:  # (...,) long → (..., d)
        x = self.item_emb(items)
        if self.cat_emb is not None:
            x = x + self.cat_emb(self.item_category[items])
        return x + self.mlp(self.norm(x))


class TimeFeatures(nn.Module):
    """Embeds the gap since the previous session (log buckets) and the hour of day (UTC).

    No weekday or date feature: on logs a few days long (Taobao: 9 days) a weekday embedding
    identifies the date, and the held-out sessions are the latest ones, so the model learned
    date-specific popularity that does not transfer (Taobao test Recall@50 fell ~10x with it).
    """

    def __init__(self, config: ModelConfig, *, hour: bool = True) -> None:
        super().__init__()
        self.use_hour = hour
        self.buckets = config.gap_buckets
        self.gap_emb = nn.Embedding(config.gap_buckets + 1, config.dim)
        self.hour_emb = nn.Embedding(24, config.dim)
        # Small init: at N(0, 1) these would drown the pooled item signal in every token
        # (Taobao test Recall@50 0.009 → 0.042 with it; docs/RESULTS.md).
        nn.init.normal_(self.gap_emb.weight, std=0.02)
        nn.init.normal_(self.hour_emb.weight, std=0.02)

    def forward(self, gap: Tensor, start: Tensor) -> Tensor:  # (n,), (n,) → (n, d)
        x = self.gap_emb(gap_bucket(gap, self.buckets))
        if self.use_hour:
            x = x + self.hour_emb(torch.remainder(start // 3600, 24))
        return x


class SessionEncoder(nn.Module):
    """ISE: mean-pools a session's positives and its shown negatives separately → one token."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.dim
        self.use_negatives = config.use_negatives
        self.proj = nn.Linear(2 * d + 2, d)  # [mean_pos, mean_neg, log1p(n_pos), log1p(n_neg)]

    def pool(self, item_vecs: Tensor, labels: Tensor, segment: Tensor, n: int) -> Tensor:
        """(E, d) event vectors → (n, d) session summaries."""
        return self.proj(pool_by_label(item_vecs, labels, segment, n, self.use_negatives))


class CausalBlock(nn.Module):
    """Pre-LN transformer block whose attention can run over a full sequence or a K/V cache."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )
        self.dropout = dropout

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, d) → q, k, v each (B, H, T, Dh)."""
        B, T, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return q, k, v

    def attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """Residual attention + MLP given projected q and the keys/values to attend to."""
        B, T, d = x.shape
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B,H,T,Dh)
        x = x + F.dropout(self.out(y.transpose(1, 2).reshape(B, T, d)), p, self.training)
        return x + F.dropout(self.mlp(self.ln2(x)), p, self.training)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.project(x)
        return self.attend(x, q, k, v, mask), k, v


def causal_blocks(n: int, dim: int, n_heads: int, mlp_ratio: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(CausalBlock(dim, n_heads, mlp_ratio, dropout) for _ in range(n))


class SessionRec(nn.Module):
    """Item tower + ISE + causal SSE + query token; see the module docstring."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.item_tower = ItemTower(config)
        self.ise = SessionEncoder(config)
        self.session_time = TimeFeatures(config)
        self.query_time = TimeFeatures(config, hour=config.query_time == "gap+hour")
        self.next_emb = nn.Parameter(torch.randn(d) * 0.02)
        self.context_proj = nn.Linear(2 * d + 2, d)  # in-session items already shown/clicked
        self.blocks = causal_blocks(
            config.n_layers, d, config.n_heads, config.mlp_ratio, config.dropout
        )
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, d)

    # ---- tokens

    def item_vectors(self, items: Tensor | None = None) -> Tensor:
        """L2-normalised retrieval vectors; all items 1..N (row i = item i+1) by default."""
        return self.item_tower.vectors(items)

    def encode_sessions(self, s: Sessions) -> Tensor:
        """Closed sessions → session tokens (n, d)."""
        pooled = self.ise.pool(self.item_tower(s.items), s.labels, s.segment, s.n)
        return pooled + self.session_time(s.gap, s.start)

    def encode_queries(self, gap: Tensor, start: Tensor, context: Sessions | None) -> Tensor:
        """Query tokens (n, d): the learned "next" embedding plus request context.

        ``gap``: seconds since the user's last session ended (< 0: no history); ``start``: the
        request's Unix time; ``context``: items already shown/clicked in the current session
        (one segment per query; may be empty).
        """
        x = self.next_emb.expand(gap.shape[0], -1)
        if not self.config.use_context:
            return x
        if self.config.query_time != "none":
            x = x + self.query_time(gap, start)
        if context is not None and context.items.numel():
            vecs = self.item_tower(context.items)
            pooled = pool_by_label(vecs, context.labels, context.segment, context.n)
            x = x + self.context_proj(pooled)
        return x

    def interest(self, h: Tensor) -> Tensor:
        """Final hidden state of a query token → L2-normalised user-interest vector."""
        return F.normalize(self.head(self.ln_f(h)), dim=-1)

    # ---- full recompute

    def forward(
        self, sessions: Tensor, lengths: Tensor, queries: Tensor, query_pos: Tensor
    ) -> Tensor:
        """Full recompute over padded histories plus query tokens.

        sessions (B, S, d) right-padded session tokens, lengths (B,) valid sessions;
        queries (B, Q, d) query tokens, query_pos (B, Q): the query at position i predicts
        session i, i.e. sees sessions [i - W, i). Returns user-interest vectors (B, Q, d).
        """
        B, S, _ = sessions.shape
        mask = full_mask(lengths, query_pos, S, self.config.window)  # (B, 1, S+Q, S+Q)
        x = torch.cat([sessions, queries], dim=1)
        for block in self.blocks:
            x, _, _ = block(x, mask)
        return self.interest(x[:, S:])

    # ---- incremental path

    def prefill(self, sessions: Tensor, lengths: Tensor) -> KVCache:
        """Run padded histories (B, S, d) once; keep each layer's K/V of the last W sessions."""
        B, S, _ = sessions.shape
        W = self.config.window
        if S == 0:
            return KVCache.empty(self.config, B, device=sessions.device, dtype=sessions.dtype)
        no_queries = lengths.new_zeros(B, 0)
        mask = full_mask(lengths, no_queries, S, W)
        keep = lengths.clamp(max=W)  # (B,)
        # Source index of cache slot j for user b: lengths[b] - keep[b] + j (clamped padding).
        src = (lengths - keep)[:, None] + torch.arange(W, device=lengths.device)  # (B, W)
        src = src.clamp(max=S - 1)
        x = sessions
        ks, vs = [], []
        for block in self.blocks:
            q, k, v = block.project(x)
            x = block.attend(x, q, k, v, mask)
            ks.append(_gather_time(k, src))
            vs.append(_gather_time(v, src))
        valid = (torch.arange(W, device=lengths.device) < keep[:, None])[None, :, None, :, None]
        k_cache = torch.stack(ks) * valid  # (L, B, H, W, Dh)
        v_cache = torch.stack(vs) * valid
        return KVCache(k_cache, v_cache, keep)

    def step(self, token: Tensor, cache: KVCache, *, append: bool) -> tuple[Tensor, KVCache]:
        """One token per user (B, d) against the cache.

        A query token (``append=False``) returns the user-interest vectors (B, d) and the cache
        unchanged. A closed session's token (``append=True``) returns its final hidden state
        and the cache with its K/V appended (the oldest session evicted when W are held).
        """
        W = self.config.window
        B = token.shape[0]
        x = token[:, None, :]  # (B, 1, d)
        slots = torch.arange(W + 1, device=token.device)
        # Cached slots < length are valid; slot W is the new token itself.
        mask = ((slots[None, :] < cache.lengths[:, None]) | (slots[None, :] == W))[:, None, None]
        new_k, new_v = [], []
        for layer, block in enumerate(self.blocks):
            q, k, v = block.project(x)  # (B, H, 1, Dh)
            keys = torch.cat([cache.k[layer], k], dim=2)  # (B, H, W+1, Dh)
            values = torch.cat([cache.v[layer], v], dim=2)
            x = block.attend(x, q, keys, values, mask)
            new_k.append(k)
            new_v.append(v)
        if not append:
            return self.interest(x[:, 0]), cache
        return x[:, 0], _append(cache, torch.stack(new_k), torch.stack(new_v), B, W)


# ----------------------------------------------------------------------------- helpers


def gap_bucket(gap_seconds: Tensor, buckets: int) -> Tensor:
    """Seconds → bucket: 0 = no previous session (gap < 0), else 1 + ⌊2·log2(1 + minutes)⌋.

    Half-octave steps: 1 min → 3, 1 h → 12, 1 day → 22, 30 days → 32 (clamped to ``buckets``).
    """
    minutes = gap_seconds.to(torch.float32).clamp(min=0) / 60.0
    b = 1 + torch.floor(2.0 * torch.log2(1.0 + minutes)).long()
    return torch.where(gap_seconds < 0, torch.zeros_like(b), b.clamp(max=buckets))


def full_mask(lengths: Tensor, query_pos: Tensor, S: int, window: int) -> Tensor:
    """Boolean attention mask (B, 1, S+Q, S+Q) for ``SessionRec.forward`` (True = attend).

    Session i sees sessions [i - W, i]; query q at position p sees sessions [p - W, p) and
    itself; nothing sees a query; padding is never seen (padded rows see themselves only).
    """
    B, Q = query_pos.shape
    dev = lengths.device
    j = torch.arange(S, device=dev)  # key positions
    valid = j[None, :] < lengths[:, None]  # (B, S)
    i = j[:, None]
    sess_to_sess = (j[None, :] <= i) & (j[None, :] >= i - window)  # (S, S)
    diag = torch.eye(S, dtype=torch.bool, device=dev)
    sess_to_sess = (sess_to_sess[None] & valid[:, None, :]) | diag
    p = query_pos[:, :, None]  # (B, Q, 1)
    q_to_sess = (j[None, None, :] < p) & (j[None, None, :] >= p - window) & valid[:, None, :]
    top = torch.cat([sess_to_sess, sess_to_sess.new_zeros(B, S, Q)], dim=2)
    eye_q = torch.eye(Q, dtype=torch.bool, device=dev).expand(B, Q, Q)
    bottom = torch.cat([q_to_sess, eye_q], dim=2)
    return torch.cat([top, bottom], dim=1)[:, None]


def pool_by_label(
    vecs: Tensor, labels: Tensor, segment: Tensor, n: int, use_negatives: bool = True
) -> Tensor:
    """Per segment: mean of positives, mean of negatives, log1p of both counts → (n, 2d + 2).

    Pooling the two labels separately keeps positives and shown negatives distinguishable
    while adding no sequence length; ``use_negatives=False`` drops the negatives (ablation).
    """
    d = vecs.shape[-1]
    pos = (labels > 0).to(vecs.dtype)  # (E,)
    neg = 1.0 - pos if use_negatives else torch.zeros_like(pos)
    weights = torch.stack([pos, neg], dim=1)  # (E, 2)
    sums = vecs.new_zeros(n, 2, d).index_add_(0, segment, weights[:, :, None] * vecs[:, None])
    counts = vecs.new_zeros(n, 2).index_add_(0, segment, weights)  # (n, 2)
    means = sums / counts.clamp(min=1.0)[..., None]  # (n, 2, d)
    return torch.cat([means.flatten(1), torch.log1p(counts)], dim=-1)


def _gather_time(x: Tensor, index: Tensor) -> Tensor:
    """x (B, H, S, Dh), index (B, W) → (B, H, W, Dh) along the time axis."""
    B, H, _, Dh = x.shape
    idx = index[:, None, :, None].expand(B, H, index.shape[1], Dh)
    return torch.gather(x, 2, idx)


def _append(cache: KVCache, k: Tensor, v: Tensor, B: int, W: int) -> KVCache:
    """Append one (L, B, H, 1, Dh) entry per user; full rows shift left (evict the oldest)."""
    full = (cache.lengths >= W)[None, :, None, None, None]
    slot = cache.lengths.clamp(max=W - 1)  # (B,)
    idx = slot[None, :, None, None, None].expand(k.shape)
    out = []
    for buf, new in ((cache.k, k), (cache.v, v)):
        shifted = torch.where(full, torch.roll(buf, -1, dims=3), buf)
        out.append(shifted.scatter(3, idx, new))
    return KVCache(out[0], out[1], (cache.lengths + 1).clamp(max=W))


def pad_tokens(tokens: Tensor, lengths: Tensor) -> Tensor:
    """Flat per-user-contiguous tokens (n, d) → right-padded (B, max(lengths), d)."""
    B = lengths.shape[0]
    S = int(lengths.max()) if B else 0
    out = tokens.new_zeros(B, S, tokens.shape[-1])
    pos = torch.arange(S, device=tokens.device)
    out[pos[None, :] < lengths[:, None]] = tokens
    return out
