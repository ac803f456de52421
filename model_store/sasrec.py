"""SASRec-style item-level baseline: a causal transformer over a user's positive items.

The comparison the SessionRec paper makes: the same item tower, embedding size, layers and
heads as SessionRec, but one token per engaged item (no sessions, no negatives in the input),
trained with a next-item sampled softmax. Evaluated under the same next-session protocol: the
hidden state after the last positive before the held-out session scores the catalogue.

Sequences are left-padded so the newest item is always the last position; a learned *recency*
embedding (distance from the end) replaces absolute positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_store.model import ItemTower, ModelConfig, causal_blocks


@dataclass(frozen=True)
class SASRecConfig:
    n_items: int
    n_categories: int = 0
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    mlp_ratio: int = 4
    dropout: float = 0.1
    max_len: int = 200
    temperature: float = 0.05

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SASRecConfig:
        return cls(**data)

    def tower_config(self) -> ModelConfig:
        return ModelConfig(
            n_items=self.n_items,
            n_categories=self.n_categories,
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
        )


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.item_tower = ItemTower(config.tower_config())
        self.recency_emb = nn.Embedding(config.max_len, d)
        # Same small init as every embedding of SessionRec: at N(0, 1) it would swamp the items.
        nn.init.normal_(self.recency_emb.weight, std=0.02)
        self.blocks = causal_blocks(
            config.n_layers, d, config.n_heads, config.mlp_ratio, config.dropout
        )
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, d)

    def item_vectors(self, items: Tensor | None = None) -> Tensor:
        return self.item_tower.vectors(items)

    def forward(self, items: Tensor) -> Tensor:
        """Left-padded item sequences (B, L) → normalised next-item vectors at every position."""
        B, L = items.shape
        recency = torch.arange(L - 1, -1, -1, device=items.device)
        recency = recency.clamp(max=self.config.max_len - 1)
        x = self.item_tower(items) + self.recency_emb(recency)[None]
        valid = items > 0  # (B, L)
        causal = torch.ones(L, L, dtype=torch.bool, device=items.device).tril()
        eye = torch.eye(L, dtype=torch.bool, device=items.device)
        mask = ((causal[None] & valid[:, None, :]) | eye)[:, None]  # (B, 1, L, L)
        for block in self.blocks:
            x, _, _ = block(x, mask)
        return F.normalize(self.head(self.ln_f(x)), dim=-1)
