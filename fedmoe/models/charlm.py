"""Switch-style sparse MoE language model over UTF-8 bytes (the ``charlm`` task).

Layout of one forward pass (N sequences of T bytes, d = d_model, L = num_moe_layers):

    bytes [N, T] -> embedding + position [N, T, d]
      -> L x (causal self-attention block, MoE feed-forward block)   each pre-norm, residual
      -> LayerNorm -> head [N, T, 256]   (logits for the next byte at every position)

The feed-forward blocks are fedmoe.models.moe.MoELayer on the same expert bank as the image model, so
DP-SGD (its grad and norm samplers), expert selection and expert-matched averaging work
unchanged; expert ids are per layer (global id = layer * num_experts + expert). Attention is
written with nn.Linear projections and a fixed causal mask so that Opacus instruments it as
ordinary Linear layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .moe import MoEBlockConfig, MoELayer, PositionEmbedding
from ..data.text import VOCAB_SIZE



@dataclass
class CharLMConfig(MoEBlockConfig):
    seq_len: int = 64
    num_heads: int = 4
    num_moe_layers: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_model % self.num_heads:
            raise ValueError(f"num-heads {self.num_heads} must divide d-model {self.d_model}")

    @property
    def num_tokens(self) -> int:
        """Tokens per sample (what one example contributes to the routing counts)."""
        return self.seq_len


class CausalSelfAttention(nn.Module):
    """Pre-norm residual multi-head attention; position t attends to positions <= t."""

    def __init__(self, config: CharLMConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.norm = nn.LayerNorm(config.d_model)
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)
        mask = torch.tril(torch.ones(config.seq_len, config.seq_len, dtype=torch.bool))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, T, d] -> [N, T, d]."""
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).split(d, dim=-1)
        q, k, v = (z.view(n, t, self.num_heads, d // self.num_heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.num_heads)
        scores = scores.masked_fill(~self.mask[:t, :t], float("-inf"))
        attended = torch.softmax(scores, dim=-1) @ v  # [N, heads, T, d/heads]
        return x + self.out(attended.transpose(1, 2).reshape(n, t, d))


class CharMoETransformer(nn.Module):
    """Decoder-only byte-level transformer with MoE feed-forward blocks."""

    def __init__(self, config: CharLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(VOCAB_SIZE, config.d_model)
        self.position = PositionEmbedding(config.seq_len, config.d_model)
        self.attn_layers = nn.ModuleList(CausalSelfAttention(config) for _ in range(config.num_moe_layers))
        self.moe_layers = nn.ModuleList(MoELayer(config) for _ in range(config.num_moe_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, VOCAB_SIZE)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [N, T] (long) -> (next-byte logits [N, T, 256], weighted aux loss [N])."""
        x = self.position(self.embed(tokens))
        aux = x.new_zeros(tokens.shape[0])
        for attention, moe in zip(self.attn_layers, self.moe_layers, strict=True):
            x, balance_loss, z_loss = moe(attention(x))
            aux = aux + self.config.aux_loss_weight * balance_loss + self.config.z_loss_weight * z_loss
        return self.head(self.norm(x)), aux

    def routing_counts(self) -> torch.Tensor:
        """Token-slot counts per global expert id from the last forward: [total_experts]."""
        return torch.cat([layer.last_routing.expert_counts for layer in self.moe_layers])
