"""Sparse Mixture-of-Experts image classifier.

Layout of one forward pass (N samples, S = (image_size / patch_size)^2 tokens, d = d_model):

    image [N, C, H, W] -> patches [N, S, C*p*p] -> embed + position [N, S, d]
      -> MoELayer x num_moe_layers (pre-norm, residual, noisy top-k routing) [N, S, d]
      -> LayerNorm -> flatten [N, S*d] -> head [N, num_classes]

Everything that Opacus must clip per sample is batch-first and sample-local: the expert bank
takes ``(x[N, T, d], expert_index[N, T])``, routing never drops tokens by capacity, and the
auxiliary losses are returned per sample, so one sample's gradient never depends on another's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MoEBlockConfig:
    """What the MoE layers need; shared by the image classifier and the language model."""

    d_model: int = 64
    num_moe_layers: int = 1
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 128
    router_noise: float = 1.0  # std of Gaussian jitter on router logits, training only
    aux_loss_weight: float = 0.01  # Switch load-balancing loss
    z_loss_weight: float = 0.001  # router z-loss (ST-MoE)
    personal_expert: bool = False  # one more expert in every MoE layer, always on, kept by each site (personalize=expert)

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top-k must be in [1, num-experts={self.num_experts}], got {self.top_k}")

    @property
    def total_experts(self) -> int:
        """Experts over all MoE layers; global expert id = layer * num_experts + expert."""
        return self.num_moe_layers * self.num_experts


@dataclass
class MoEConfig(MoEBlockConfig):
    image_size: int = 28
    in_channels: int = 1
    patch_size: int = 7
    num_classes: int = 10
    head: str = "linear"  # linear: learned; fixed-etf: fixed simplex-ETF class vectors (simplex_etf)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head not in ("linear", "fixed-etf"):
            raise ValueError(f"head must be linear or fixed-etf, got {self.head!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch-size {self.patch_size} does not divide image size {self.image_size}")

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size**2


def dispatch_to_experts(x: torch.Tensor, expert_index: torch.Tensor, num_experts: int):
    """x [N, T, d], expert_index [N, T] -> (rows, combine): rows[e] [M_e, d] are the slots routed to
    expert e in row-major order (as ``x[expert_index == e]`` lists them), and ``combine`` puts the
    experts' outputs [M_e, d'] back in their slots, [N, T, d'].

    One gather and one scatter for all experts, where a mask per expert would allocate and zero a
    tensor of every slot for each expert in the forward and again in the backward.
    """
    flat_index = expert_index.flatten()
    order = flat_index.argsort(stable=True)
    rows = x.flatten(0, 1).index_select(0, order).split(torch.bincount(flat_index, minlength=num_experts).tolist())
    slot_of_row = torch.empty_like(order)
    slot_of_row[order] = torch.arange(len(order), device=order.device)

    def combine(outputs: list[torch.Tensor]) -> torch.Tensor:
        out = torch.cat(outputs).index_select(0, slot_of_row)
        return out.view(*expert_index.shape, out.shape[-1])

    return rows, combine


class ExpertBank(nn.Module):
    """E independent two-layer GELU MLPs, one set of parameters per expert.

    Parameters are registered directly on this module as ``w_in_{e}`` [d, h], ``b_in_{e}`` [h],
    ``w_out_{e}`` [h, d], ``b_out_{e}`` [d] so that each expert can be frozen, privatised and
    sent on its own. forward: x [N, T, d], expert_index [N, T] (long) -> [N, T, d], token t of
    sample n processed by expert expert_index[n, t].
    """

    PARAM_NAMES = ("w_in", "b_in", "w_out", "b_out")

    def __init__(self, num_experts: int, d_model: int, hidden: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.d_model = d_model
        self.hidden = hidden
        for e in range(num_experts):
            w_in = torch.empty(d_model, hidden)
            w_out = torch.empty(hidden, d_model)
            # Same init as nn.Linear (kaiming-uniform on fan_in).
            nn.init.kaiming_uniform_(w_in.T, a=math.sqrt(5))
            nn.init.kaiming_uniform_(w_out.T, a=math.sqrt(5))
            self.register_parameter(f"w_in_{e}", nn.Parameter(w_in))
            self.register_parameter(f"b_in_{e}", nn.Parameter(torch.zeros(hidden)))
            self.register_parameter(f"w_out_{e}", nn.Parameter(w_out))
            self.register_parameter(f"b_out_{e}", nn.Parameter(torch.zeros(d_model)))
        # book-keeping clipping sets a fedmoe.privacy.bookkeeping.HiddenKeeper here: each forward
        # with gradients hands it the trainable experts' pre-activations and hidden layers, so the
        # clipped gradient's factors come from the forward instead of being computed again
        self.hidden_keeper = None

    def expert_params(self, e: int) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter, nn.Parameter]:
        return tuple(getattr(self, f"{name}_{e}") for name in self.PARAM_NAMES)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        keeper = self.hidden_keeper if torch.is_grad_enabled() else None
        kept = {}
        rows, combine = dispatch_to_experts(x, expert_index, self.num_experts)
        outputs = []
        for e, rows_e in enumerate(rows):
            w_in, b_in, w_out, b_out = self.expert_params(e)
            # An expert without tokens still runs on an empty batch, so its .grad is zeros
            # rather than None (optimisers and Opacus both expect that).
            pre = rows_e @ w_in + b_in
            hidden = F.gelu(pre)
            outputs.append(hidden @ w_out + b_out)
            if keeper is not None and w_in.requires_grad:
                kept[e] = keeper.keep(pre, hidden)
        if keeper is not None:
            keeper.forwards.append(kept)
        return combine(outputs)


class PersonalExpert(nn.Module):
    """A two-layer GELU MLP beside the routed experts that every token passes through, with the
    gate 1: x [N, T, d] -> [N, T, d]. Its output layer starts at zero, so until a site trains it
    the layer computes exactly what it would without it (the global model, which never trains
    it, stays the plain MoE). Plain nn.Linear layers: Opacus and book-keeping clipping treat them
    as any other linear layer.
    """

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, hidden)
        self.w_out = nn.Linear(hidden, d_model)
        nn.init.zeros_(self.w_out.weight)
        nn.init.zeros_(self.w_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(x)))


class PositionEmbedding(nn.Module):
    """A learned vector per token position, added to the tokens: x [N, S, d] -> x + weight [S, d].

    (nn.Embedding over repeated position ids would do the same, but its Opacus norm sampler sorts
    the ids of every batch; this module's per-sample gradient is simply the output gradient.)
    """

    def __init__(self, num_positions: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_positions, d_model))  # nn.Embedding's N(0, 1) init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


@dataclass
class RoutingStats:
    """What the last forward routed: token-slot counts per expert and per sample."""

    expert_counts: torch.Tensor  # [E] token-slots (token x k) routed to each expert, whole batch
    per_sample: torch.Tensor  # [N, E] same, per sample


class MoELayer(nn.Module):
    """Pre-norm residual MoE feed-forward block with a noisy top-k router.

    Router: logits = W h (no bias); while training, Gaussian noise of std ``router_noise`` is
    added before the top-k choice; the gate weights are softmax over the k chosen logits, so
    they sum to 1 per token. Auxiliary losses per sample: ``router_losses``. With
    ``personal_expert`` a PersonalExpert's output is added to the routed experts' as well.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.router_noise = config.router_noise
        self.norm = nn.LayerNorm(config.d_model)
        self.router = nn.Linear(config.d_model, config.num_experts, bias=False)
        self.experts = ExpertBank(config.num_experts, config.d_model, config.expert_hidden)
        self.personal_expert = PersonalExpert(config.d_model, config.expert_hidden) if config.personal_expert else None
        self.last_routing: RoutingStats | None = None

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [N, S, d] -> (router logits [N, S, E], chosen experts [N, S, k], gates [N, S, k])."""
        logits = self.router(h)
        scores = logits
        if self.training and self.router_noise > 0:
            # Noise is drawn here, outside any module Opacus instruments.
            scores = logits + torch.randn_like(logits) * self.router_noise
        top_scores, top_index = scores.topk(self.top_k, dim=-1)
        gates = torch.softmax(top_scores, dim=-1)
        return logits, top_index, gates

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, S, d] -> (y [N, S, d], load-balance loss [N], z-loss [N])."""
        n, s, d = x.shape
        h = self.norm(x)
        logits, top_index, gates = self.route(h)
        slots = h.unsqueeze(2).expand(n, s, self.top_k, d).reshape(n, s * self.top_k, d)
        expert_out = self.experts(slots, top_index.reshape(n, s * self.top_k))
        y = x + (gates.unsqueeze(-1) * expert_out.view(n, s, self.top_k, d)).sum(dim=2)
        if self.personal_expert is not None:
            y = y + self.personal_expert(h)
        balance_loss, z_loss, self.last_routing = router_losses(logits, top_index)
        return y, balance_loss, z_loss


def router_losses(logits: torch.Tensor, top_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, RoutingStats]:
    """Per-sample router losses and routing counts of one MoE layer, from router logits [N, S, E]
    and the chosen experts [N, S, k]:
      load balance  E * sum_e f_ne * P_ne, f_ne = share of n's token-slots sent to e,
                    P_ne = mean router probability of e over n's tokens;
      z-loss        mean_s logsumexp(logits_ns)^2.
    Returns (load balance [N], z-loss [N], RoutingStats)."""
    n, s, num_experts = logits.shape
    dispatch = F.one_hot(top_index, num_experts).to(logits.dtype).sum(dim=2)  # [N, S, E]
    per_sample_counts = dispatch.sum(dim=1)  # [N, E]
    share = per_sample_counts / (s * top_index.shape[-1])
    mean_prob = torch.softmax(logits, dim=-1).mean(dim=1)
    balance_loss = num_experts * (share * mean_prob).sum(dim=-1)
    z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean(dim=1)
    counts = per_sample_counts.detach()
    return balance_loss, z_loss, RoutingStats(expert_counts=counts.sum(dim=0), per_sample=counts)


def simplex_etf(dim: int, num_classes: int) -> torch.Tensor:
    """[dim, K] unit class vectors with pairwise cosine -1/(K-1) (a simplex equiangular tight
    frame): sqrt(K/(K-1)) U (I - 11^T/K), U [dim, K] orthonormal from a fixed public seed.

    Used as a fixed classifier (FedETF, Li et al. ICCV 2023; FedBABU): under label skew a learned
    head is pulled towards each site's own classes; a fixed one is the same at every site, is never
    trained or sent, and depends on nothing but (dim, K).
    """
    if dim < num_classes:
        raise ValueError(f"a simplex ETF of {num_classes} classes needs dim >= {num_classes}, got {dim}")
    u, _ = torch.linalg.qr(torch.randn(dim, num_classes, generator=torch.Generator().manual_seed(0)))
    centred = torch.eye(num_classes) - torch.full((num_classes, num_classes), 1.0 / num_classes)
    return math.sqrt(num_classes / (num_classes - 1)) * u @ centred


class FixedLinearHead(nn.Module):
    """x [N, D] -> x @ weight [N, K] with a fixed, non-persistent weight: no parameters, so
    nothing to train, clip or send, and absent from checkpoints (rebuilt from the config)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class MoEClassifier(nn.Module):
    """Patch embedding trunk, MoE layers, flatten-and-project head (learned, or a fixed ETF)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Linear(config.patch_dim, config.d_model)
        self.position = PositionEmbedding(config.num_tokens, config.d_model)
        self.moe_layers = nn.ModuleList(MoELayer(config) for _ in range(config.num_moe_layers))
        self.norm = nn.LayerNorm(config.d_model)
        features = config.num_tokens * config.d_model
        if config.head == "fixed-etf":
            self.head = FixedLinearHead(simplex_etf(features, config.num_classes))
        else:
            self.head = nn.Linear(features, config.num_classes)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W] -> [N, S, C*p*p], row-major over the patch grid."""
        p = self.config.patch_size
        # im2col lays each patch out as (channel, row, column): 2.6x faster on the CPU than permuting
        # an unfolded view, whose innermost runs are p values long
        return F.unfold(images, kernel_size=p, stride=p).transpose(1, 2).contiguous()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [N, C, H, W] -> (class logits [N, classes], weighted aux loss [N])."""
        tokens = self.patches(images)
        x = self.position(self.embed(tokens))
        aux = x.new_zeros(tokens.shape[0])
        for layer in self.moe_layers:
            x, balance_loss, z_loss = layer(x)
            aux = aux + self.config.aux_loss_weight * balance_loss
            aux = aux + self.config.z_loss_weight * z_loss
        logits = self.head(self.norm(x).flatten(1))
        return logits, aux

    def routing_counts(self) -> torch.Tensor:
        """Token-slot counts per global expert id from the last forward: [total_experts]."""
        return torch.cat([layer.last_routing.expert_counts for layer in self.moe_layers])

    def expert_bank(self, layer: int) -> ExpertBank:
        return self.moe_layers[layer].experts
