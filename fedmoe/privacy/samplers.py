"""Opacus grad and norm samplers for fedmoe's own layers: the expert banks (GELU and SwiGLU, with
or without LoRA factors) and the position embedding. Importing this module registers them.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler

from ..models.hf_moe import SwiGLUExpertBank
from ..models.moe import ExpertBank, PositionEmbedding

# --- per-sample gradients of the expert banks ----------------------------------------------------
#
# Every expert tensor's per-sample gradient is an outer-product sum over the sample's token slots,
# sum_t g_t a_t^T (a: what the tensor multiplies, g: the gradient of what it produces). Each bank
# gives, per expert, one factor pair (a [N,T,p], g [N,T,q]) per tensor of ``expert_params(e)``;
# the grad sampler forms the sums, the norm sampler (ghost clipping) only their norms.

def _gelu_expert_factors(bank: ExpertBank, x: torch.Tensor, index: torch.Tensor, backprops: torch.Tensor, e: int):
    """(a, g) for w_in [d,h], b_in [h], w_out [h,d], b_out [d] of expert e; zero on token slots
    not routed to e, the hidden layer computed on the routed slots only, as the forward did."""
    w_in, b_in, w_out, _ = bank.expert_params(e)
    routed = index == e
    g_out = backprops * routed.unsqueeze(-1).to(backprops.dtype)
    pre = x[routed] @ w_in + b_in
    hidden = x.new_zeros(*index.shape, w_in.shape[1])
    hidden[routed] = torch.nn.functional.gelu(pre)
    g_pre = torch.zeros_like(hidden)
    g_pre[routed] = torch.ops.aten.gelu_backward(backprops[routed] @ w_out.T, pre)
    ones = x.new_ones(*index.shape, 1)  # a bias multiplies 1
    return [(g_pre, x), (ones, g_pre), (g_out, hidden), (ones, g_out)]


def _swiglu_expert_factors(bank: SwiGLUExpertBank, x: torch.Tensor, index: torch.Tensor, backprops: torch.Tensor, e: int):
    """(a, g) for gate_up [2I,H] and down [H,I] of expert e, or with LoRA (W = W0 + s B A on input a
    with output gradient g: dA = sum (s g B) a^T, dB = sum g (s A a)^T) for its four factors; zero
    on token slots not routed to e."""
    gate_up, down = bank.weights(e)
    routed = index == e
    g_out = backprops * routed.unsqueeze(-1).to(backprops.dtype)
    gate, up = (x[routed] @ gate_up.T).chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    hidden = x.new_zeros(*index.shape, bank.intermediate)
    hidden[routed] = silu * up
    g_hidden = backprops[routed] @ down
    g_pre = x.new_zeros(*index.shape, 2 * bank.intermediate)  # gradient of the gate|up pre-activation
    g_pre[routed] = torch.cat([g_hidden * up * sig * (1 + gate * (1 - sig)), g_hidden * silu], dim=-1)
    if not bank.lora_rank:
        return [(x, g_pre), (hidden, g_out)]
    s = bank.lora_scale
    gate_up_a, gate_up_b, down_a, down_b = bank.lora_params(e)
    return [(x, s * g_pre @ gate_up_b), (s * x @ gate_up_a.T, g_pre),
            (hidden, s * g_out @ down_b), (s * hidden @ down_a.T, g_out)]


EXPERT_FACTORS = {ExpertBank: _gelu_expert_factors, SwiGLUExpertBank: _swiglu_expert_factors}


def _per_trainable_parameter(bank, activations: list[torch.Tensor], backprops: torch.Tensor, outer):
    """{param: outer(a, g)} for every trainable tensor of the bank's experts."""
    x, index = activations[0].to(backprops.dtype), activations[1]
    factors = EXPERT_FACTORS[type(bank)]
    ret = {}
    for e in range(bank.num_experts):
        params = bank.expert_params(e)
        if any(p.requires_grad for p in params):
            pairs = factors(bank, x, index, backprops, e)
            ret.update({p: outer(a, g) for p, (a, g) in zip(params, pairs, strict=True) if p.requires_grad})
    return ret


def _outer_sum_norm(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """|| sum_t a_t g_t^T ||_F per sample for a [N,T,p], g [N,T,q], without forming [N,p,q] when
    the Gram form sum_{t,s} (a_t.a_s)(g_t.g_s) is cheaper."""
    n, t, p = a.shape
    q = g.shape[-1]
    if t * t * (p + q) < t * p * q:
        sq = (torch.einsum("ntp,nsp->nts", a, a) * torch.einsum("ntq,nsq->nts", g, g)).sum(dim=(1, 2))
    else:
        sq = torch.einsum("ntp,ntq->npq", a, g).pow(2).sum(dim=(1, 2))
    return sq.clamp_min(0).sqrt()


@register_grad_sampler([ExpertBank, SwiGLUExpertBank])
def compute_expert_bank_grad_sample(bank, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample grads: x [N,T,d], index [N,T], backprops [N,T,d] -> {param: [N, *param.shape]}."""
    sums = _per_trainable_parameter(bank, activations, backprops, lambda a, g: torch.einsum("ntq,ntp->nqp", g, a))
    return {p: s.reshape(len(s), *p.shape) for p, s in sums.items()}


@register_norm_sampler([ExpertBank, SwiGLUExpertBank])
def compute_expert_bank_norm_sample(bank, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample grad norms (ghost clipping): x [N,T,d], index [N,T], backprops [N,T,d] -> {param: [N]}."""
    return _per_trainable_parameter(bank, activations, backprops, _outer_sum_norm)


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
