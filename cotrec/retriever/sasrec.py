"""SASRec with an optional user token: the CoT-Rec retriever, in one readable file.

SASRec (Kang & McAuley, 2018) is a causal Transformer over a user's item sequence: the hidden
state at position t summarises items 0..t and is scored against every item's embedding to
predict item t+1. CoT-Rec adds one thing: a *user token* at position 0, whose embedding can start
from the user's LLM-extracted preference (Encode & Map), while the item table can start from the
encoded caption or caption + description.

Layout of one input row (right-padded, so real positions never attend to padding):

    position:  0       1     2     ...   n     n+1 ...
    token:     [user]  i_0   i_1   ...   i_n-1 PAD ...       (user token only when enabled)

Item ids are shifted by one inside the model: 0 is padding, item k is row k+1 of the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class SASRecConfig:
    num_items: int
    num_users: int = 0          # > 0 turns the user token on
    dim: int = 64               # the authors' width (64 or 128)
    max_len: int = 32           # items per input row (the authors: 32)
    layers: int = 2
    heads: int = 1
    ffn_mult: int = 1           # the feed-forward's hidden width in multiples of dim (1: checkpoints that predate it)
    dropout: float = 0.2
    # The user table's gradient as a sparse tensor (only the batch's rows), for SparseAdam: with a
    # dense one every step touches every user's row, so a step's cost grows with the users.
    sparse_users: bool = False

    @property
    def user_token(self) -> bool:
        return self.num_users > 0

    @property
    def positions(self) -> int:
        # The user token takes one extra position (position 0).
        return self.max_len + int(self.user_token)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        assert cfg.dim % cfg.heads == 0, "dim must be divisible by heads"
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        # `allowed` (b, 1, t, t) is True where a query may look at a key: causal, and never at padding
        # (a position may always look at itself, so no row is empty and softmax never sees all -inf).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm Transformer block (more stable than SASRec's original post-norm at this size)."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim)
        inner = cfg.dim * cfg.ffn_mult
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, inner), nn.GELU(), nn.Linear(inner, cfg.dim),
                                 nn.Dropout(cfg.dropout))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), allowed))
        return x + self.ffn(self.ln2(x))


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig, item_init: Optional[torch.Tensor] = None,
                 user_init: Optional[torch.Tensor] = None):
        super().__init__()
        self.cfg = cfg
        # Random rows are N(0, 1/dim): unit norm on average, the same scale as the L2-normalised
        # Encode & Map rows, so "random" vs "caption" compares the content, not the scale.
        std = 1.0 / math.sqrt(cfg.dim)
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.dim, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=std)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
            if item_init is not None:
                self.item_emb.weight[1:].copy_(item_init)
        self.user_emb = None
        if cfg.user_token:
            self.user_emb = nn.Embedding(cfg.num_users, cfg.dim, sparse=cfg.sparse_users)
            nn.init.normal_(self.user_emb.weight, std=std)
            if user_init is not None:
                with torch.no_grad():
                    self.user_emb.weight.copy_(user_init)
        self.pos_emb = nn.Embedding(cfg.positions, cfg.dim)
        nn.init.normal_(self.pos_emb.weight, std=std)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)

    def hidden(self, items: torch.Tensor, users: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden states (batch, positions, dim). `items` holds shifted ids (0 = padding), right-padded."""
        x = self.item_emb(items)
        valid = items > 0
        if self.user_emb is not None:
            if users is None:
                raise ValueError("this model has a user token: pass `users`")
            x = torch.cat([self.user_emb(users).unsqueeze(1), x], dim=1)
            valid = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
        t = x.shape[1]
        x = self.drop(x + self.pos_emb.weight[:t])
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(t, dtype=torch.bool, device=x.device)
        allowed = (causal & valid[:, None, :]) | eye        # (b, t, t)
        allowed = allowed.unsqueeze(1)                       # broadcast over heads
        for block in self.blocks:
            x = block(x, allowed)
        return self.ln_f(x)

    def item_table(self) -> torch.Tensor:
        """Output embeddings, tied to the input table (row k = item k, padding dropped)."""
        return self.item_emb.weight[1:]

    def forward(self, items: torch.Tensor, users: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden states at every position; the losses score them against `item_table()`.

        (Returning states rather than logits lets the sampled softmax avoid the full item product.)
        """
        return self.hidden(items, users)

    def logits(self, items: torch.Tensor, users: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scores of all items at every position: (batch, positions, num_items)."""
        return self.hidden(items, users) @ self.item_table().T

    @torch.no_grad()
    def last_hidden(self, items: torch.Tensor, lengths: torch.Tensor,
                    users: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The state after each row's last real item (the user token alone when a row is empty)."""
        h = self.hidden(items, users)
        last = lengths - 1 + int(self.user_emb is not None)
        return h[torch.arange(h.shape[0], device=h.device), last.clamp(min=0)]
