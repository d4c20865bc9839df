"""Opacus grad and norm samplers for fedmoe's own layers: the expert banks (GELU and SwiGLU, with
or without LoRA factors) and the position embedding. Importing this module registers them.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler

from ..models.hf_moe import SwiGLUExpertBank
from ..models.moe import ExpertBank, PositionEmbedding

FactorPairs = dict[torch.nn.Parameter, tuple[torch.Tensor, torch.Tensor]]

# --- per-sample gradients of the expert banks ----------------------------------------------------
#
# Every expert tensor's per-sample gradient is an outer-product sum over the sample's token slots
# routed to the expert, sum_t g_t^T a_t. Each bank gives, per expert, one factor pair of rows
# (a [M,p], g [M,q]) over the M routed slots per tensor of ``expert_params(e)``; the pairs are laid
# out per sample as [N, W, *] (W: the most slots any sample routed to the expert, padding zero).
# The grad sampler forms the sums, the norm sampler (ghost clipping) only their norms, and
# book-keeping clipping (bookkeeping.py) their clipped sum over the batch, from the unpadded rows.

def _gelu_expert_factors(bank: ExpertBank, x: torch.Tensor, g_out: torch.Tensor, e: int, kept=None):
    """(a, g) rows for w_in [d,h], b_in [h], w_out [h,d], b_out [d] of expert e, from its routed
    inputs x [M,d] and output gradients g_out [M,d]; the hidden layer as the forward kept it
    (``kept``: pre-activation, hidden [M,h] and the pre-activation's gradient, scaled as g_out, or
    None where backward did not reach it) or recomputed as the forward did."""
    w_in, b_in, w_out, _ = bank.expert_params(e)
    pre, hidden, g_pre = kept if kept is not None and len(kept[0]) == len(x) else (None, None, None)
    if pre is None:
        pre = x @ w_in + b_in
        hidden = torch.nn.functional.gelu(pre)
    if g_pre is None:
        g_pre = torch.ops.aten.gelu_backward(g_out @ w_out.T, pre)
    ones = x.new_ones(len(x), 1)  # a bias multiplies 1
    return [(g_pre, x), (ones, g_pre), (g_out, hidden), (ones, g_out)]


def _swiglu_expert_factors(bank: SwiGLUExpertBank, x: torch.Tensor, g_out: torch.Tensor, e: int, kept=None):
    """(a, g) rows for gate_up [2I,H] and down [H,I] of expert e, or with LoRA (W = W0 + s B A on
    input a with output gradient g: dA = sum (s g B) a^T, dB = sum g (s A a)^T) for its four factors,
    from its routed inputs x [M,H] and output gradients g_out [M,H] (``kept``: unused, this bank keeps nothing)."""
    gate_up, down = bank.weights(e)
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    hidden = silu * up
    g_hidden = g_out @ down
    g_pre = torch.cat([g_hidden * up * sig * (1 + gate * (1 - sig)), g_hidden * silu], dim=-1)  # of gate|up
    if not bank.lora_rank:
        return [(x, g_pre), (hidden, g_out)]
    s = bank.lora_scale
    gate_up_a, gate_up_b, down_a, down_b = bank.lora_params(e)
    return [(x, s * g_pre @ gate_up_b), (s * x @ gate_up_a.T, g_pre),
            (hidden, s * g_out @ down_b), (s * hidden @ down_a.T, g_out)]


EXPERT_FACTORS = {ExpertBank: _gelu_expert_factors, SwiGLUExpertBank: _swiglu_expert_factors}


def expert_bank_factor_rows(bank, activations: list[torch.Tensor], backprops: torch.Tensor) -> list[tuple[torch.Tensor, FactorPairs]]:
    """x [N,T,d], index [N,T], backprops [N,T,d] -> [(routed [N,T], {param: (a [M,p], g [M,q])})], one
    entry per expert with a trainable tensor: the factor rows of each of its trainable tensors over
    the M slots routed to it, in row-major order (as x[routed] lists them)."""
    x, index = activations[0].to(backprops.dtype), activations[1]
    factors = EXPERT_FACTORS[type(bank)]
    # the forward's hidden layers, where it kept them (book-keeping clipping on a GELU bank)
    keeper = getattr(bank, "hidden_keeper", None)
    kept = keeper.pop() if keeper is not None else {}
    experts = []
    for e in range(bank.num_experts):
        params = bank.expert_params(e)
        if any(p.requires_grad for p in params):
            routed = index == e
            rows = factors(bank, x[routed], backprops[routed], e, kept.get(e))
            experts.append((routed, {p: pair for p, pair in zip(params, rows, strict=True) if p.requires_grad}))
    return experts


def lay_out_per_sample(routed: torch.Tensor, rows: FactorPairs) -> FactorPairs:
    """Factor rows [M,*] over the slots ``routed`` [N,T] marks (row-major) laid out per sample as
    [N, W, *], W = the most slots any sample routed, padding zero; a factor that several tensors
    share is laid out once."""
    n = len(routed)
    width = int(routed.sum(dim=1).max()) if routed.numel() else 0
    sample, slot = routed.nonzero(as_tuple=True)
    position = (routed.cumsum(dim=1) - 1)[sample, slot]
    laid: dict[int, torch.Tensor] = {}
    for a, g in rows.values():
        for t in (a, g):
            if id(t) not in laid:
                laid[id(t)] = t.new_zeros(n, width, t.shape[-1])
                laid[id(t)][sample, position] = t
    return {p: (laid[id(a)], laid[id(g)]) for p, (a, g) in rows.items()}


def expert_bank_factor_pairs(bank, activations: list[torch.Tensor], backprops: torch.Tensor) -> FactorPairs:
    """x [N,T,d], index [N,T], backprops [N,T,d] -> {param: (a [N,W,p], g [N,W,q])} for every
    trainable tensor of the bank's experts: its per-sample gradient is sum_w g_w^T a_w ([q, p],
    reshaped to the parameter's shape)."""
    pairs = {}
    for routed, rows in expert_bank_factor_rows(bank, activations, backprops):
        pairs.update(lay_out_per_sample(routed, rows))
    return pairs


class Grams:
    """Per-sample Gram matrices x x^T [N,T,T] of the factors [N,T,p] of one layer's pairs, each
    formed once: a weight and its bias share their output gradient's factor (a bias's other
    factor is all ones), so the bias's norm costs an element-wise product."""

    def __init__(self) -> None:
        self._formed: dict[int, torch.Tensor] = {}

    def cost(self, x: torch.Tensor) -> int:
        """Work (per sample, over T^2) still to do for x's Gram: its width, or 0 once formed."""
        return 0 if id(x) in self._formed else x.shape[-1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # keyed by identity: the pairs of one call hold every factor, so no id is reused meanwhile
        if id(x) not in self._formed:
            self._formed[id(x)] = torch.einsum("ntp,nsp->nts", x, x)
        return self._formed[id(x)]


def gram_is_cheaper(a: torch.Tensor, g: torch.Tensor, grams: Grams) -> bool:
    """For a [N,T,p], g [N,T,q]: whether the Gram form of the per-sample norm, N T^2 (p+q) work
    (less the Grams ``grams`` holds already, plus their product), beats forming the per-sample sums
    [N,p,q], N T p q work."""
    t, p, q = a.shape[1], a.shape[-1], g.shape[-1]
    return t * t * (grams.cost(a) + grams.cost(g) + 1) < t * p * q


def outer_sum_norm(a: torch.Tensor, g: torch.Tensor, grams: Grams | None = None) -> torch.Tensor:
    """|| sum_t a_t g_t^T ||_F per sample for a [N,T,p], g [N,T,q], without forming [N,p,q] when
    the Gram form sum_{t,s} (a_t.a_s)(g_t.g_s) is cheaper."""
    grams = grams if grams is not None else Grams()
    if gram_is_cheaper(a, g, grams):
        sq = (grams(a) * grams(g)).sum(dim=(1, 2))
    else:
        sq = torch.einsum("ntp,ntq->npq", a, g).pow(2).sum(dim=(1, 2))
    return sq.clamp_min(0).sqrt()


def pair_norms(pairs: FactorPairs) -> dict[torch.nn.Parameter, torch.Tensor]:
    """{param: || sum_t a_t g_t^T ||_F per sample [N]} for one layer's factor pairs, sharing Grams."""
    grams = Grams()
    return {p: outer_sum_norm(a, g, grams) for p, (a, g) in pairs.items()}


@register_grad_sampler([ExpertBank, SwiGLUExpertBank])
def compute_expert_bank_grad_sample(bank, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample grads: x [N,T,d], index [N,T], backprops [N,T,d] -> {param: [N, *param.shape]}."""
    pairs = expert_bank_factor_pairs(bank, activations, backprops)
    return {p: torch.einsum("ntq,ntp->nqp", g, a).reshape(len(a), *p.shape) for p, (a, g) in pairs.items()}


@register_norm_sampler([ExpertBank, SwiGLUExpertBank])
def compute_expert_bank_norm_sample(bank, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample grad norms (ghost clipping): x [N,T,d], index [N,T], backprops [N,T,d] -> {param: [N]}."""
    return pair_norms(expert_bank_factor_pairs(bank, activations, backprops))


@register_grad_sampler(PositionEmbedding)
def compute_position_grad_sample(
    module: PositionEmbedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample grads: backprops [N,S,d] -> {weight: [N,S,d]} (the output gradient itself)."""
    return {module.weight: backprops} if module.weight.requires_grad else {}


@register_norm_sampler(PositionEmbedding)
def compute_position_norm_sample(
    module: PositionEmbedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample grad norms: backprops [N,S,d] -> {weight: [N]}."""
    return {module.weight: backprops.flatten(1).norm(dim=1)} if module.weight.requires_grad else {}
