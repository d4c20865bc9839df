"""Opacus grad and norm samplers for fedmoe's own layers: the expert banks (GELU and SwiGLU, with
or without LoRA factors) and the position embedding; in place of Opacus' own, token embedding
samplers that leave out the padding index, as autograd does, and a faster LayerNorm grad sampler
(the same values). Importing this module registers them (at its end).
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.utils.tensor_utils import sum_over_all_but_batch_and_last_n
from torch import nn

from ..models.hf_moe import SwiGLUExpertBank
from ..models.moe import ExpertBank, PositionEmbedding

FactorPairs = dict[torch.nn.Parameter, tuple[torch.Tensor, torch.Tensor]]

# --- per-sample gradients of the expert banks ----------------------------------------------------
#
# Every expert tensor's per-sample gradient is an outer-product sum over the sample's token slots
# routed to the expert, sum_t g_t^T a_t. Each bank gives, per expert, one factor pair of rows
# (a [M,p], g [M,q]) over the M routed slots per tensor of ``expert_params(e)``, in runs by sample
# (RowRuns). The grad sampler lays them out per sample as [N, W, *] (W: the most slots any sample
# routed to the expert, padding zero) and forms the sums, the norm sampler (ghost clipping) only
# their norms, from the rows, and book-keeping clipping (bookkeeping.py) their norms and their
# clipped sum over the batch, from the rows.

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


def expert_bank_factor_rows(bank, activations: list[torch.Tensor], backprops: torch.Tensor) -> list[tuple[RowRuns, FactorPairs]]:
    """x [N,T,d], index [N,T], backprops [N,T,d] -> [(runs, {param: (a [M,p], g [M,q])})], one
    entry per expert with a trainable tensor: the factor rows of each of its trainable tensors over
    the M slots routed to it, in row-major order (as x[index == e] lists them), in runs by sample."""
    x, index = activations[0].to(backprops.dtype), activations[1]
    n, t = index.shape
    factors = EXPERT_FACTORS[type(bank)]
    # the forward's hidden layers, where it kept them (book-keeping clipping on a GELU bank)
    keeper = getattr(bank, "hidden_keeper", None)
    kept = keeper.pop() if keeper is not None else {}
    x, backprops = x.flatten(0, 1), backprops.flatten(0, 1)
    experts = []
    for e in range(bank.num_experts):
        params = bank.expert_params(e)
        if any(p.requires_grad for p in params):
            slots = (index.flatten() == e).nonzero().squeeze(1)
            sample = slots // t
            width = int(torch.bincount(sample, minlength=n).max()) if n else 0
            rows = factors(bank, x.index_select(0, slots), backprops.index_select(0, slots), e, kept.get(e))
            runs = RowRuns(sample, n, width)
            experts.append((runs, {p: pair for p, pair in zip(params, rows, strict=True) if p.requires_grad}))
    return experts


def outer_product_sums(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """a [N,T,p], g [N,T,q] -> sum_t g_t^T a_t [N,q,p]."""
    if a.shape[-1] == 1:  # a bias's column of ones: the row-vector product a^T g is about twice as fast as g^T a
        return torch.bmm(a.transpose(1, 2), g).transpose(1, 2)
    return torch.bmm(g.transpose(1, 2), a)


class RowRuns:
    """Rows [M, *] of a layer's factors that come in runs, one run per sample: ``sample`` [M]
    (nondecreasing), at most ``width`` rows a run (an expert's routed slots in row-major order; a
    linear layer's N x T positions, every run full).

    A tensor's per-sample gradient is sum_t g_t^T a_t over its sample's run, and its squared norm
    the Gram form sum_{t,s} (a_t.a_s)(g_t.g_s) over pairs of the same run. Those pairs are found
    without laying the rows out per sample (a zero-filled [N, W, *] copy, W the longest run, about
    twice the rows for an expert): the rows are cut into blocks of ``width`` rows, so a run lies in
    one block or two neighbours, and the Grams of each block's rows with the window of that block
    and the next [B, W, 2W] hold every pair of a run, once within the block (as (t, s) and (s, t))
    and once across (counted twice); where every run is full, a block's runs are the block and
    its Gram with itself [B, W, W] holds them. Each factor's Grams are formed once (a weight and
    its bias share their output gradient's factor; a bias's other factor is all ones).
    """

    def __init__(self, sample: torch.Tensor, num_samples: int, width: int) -> None:
        self.sample, self.num_samples, self.width = sample, num_samples, max(width, 1)
        self.aligned = len(sample) == num_samples * self.width  # runs of at most `width` rows: all full
        self.blocks = -(-len(sample) // self.width)
        self._padding = self.blocks * self.width - len(sample)
        self._grams: dict[int, torch.Tensor] = {}
        if not self.aligned:  # padding rows, and the window past the last block, belong to no sample (a last bin, dropped)
            run = torch.nn.functional.pad(sample, (0, self._padding + self.width), value=num_samples)
            self._run = run[:-self.width].view(self.blocks, self.width)
            window = run.as_strided((self.blocks, 2 * self.width), (self.width, 1))
            same = self._run.unsqueeze(2) == window.unsqueeze(1)  # [B, W, 2W]: a row and a row of its run
            self._pair_weight = same * torch.cat([torch.ones(self.width), torch.full((self.width,), 2.0)]).to(sample.device)

    @classmethod
    def full(cls, num_samples: int, width: int, device: torch.device) -> RowRuns:
        """N samples of ``width`` rows each (a linear layer's positions)."""
        return cls(torch.arange(num_samples, device=device).repeat_interleave(width), num_samples, width)

    def lay_out(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows [M, *] laid out per sample [N, W, *], padding zero."""
        if self.aligned:
            return rows.view(self.num_samples, self.width, *rows.shape[1:])
        counts = torch.bincount(self.sample, minlength=self.num_samples)
        position = torch.arange(len(self.sample), device=rows.device) - (counts.cumsum(0) - counts)[self.sample]
        laid = rows.new_zeros(self.num_samples, self.width, *rows.shape[1:])
        laid[self.sample, position] = rows
        return laid

    def gram_work(self, x: torch.Tensor) -> int:
        """Work still to do (per row, over its block rows) for x's block Grams: 0 once formed."""
        return 0 if id(x) in self._grams else x.shape[-1] * (1 if self.aligned else 2)

    def grams_are_cheaper(self, a: torch.Tensor, g: torch.Tensor) -> bool:
        """For rows a [M,p], g [M,q]: whether the Gram form of the per-sample norms, M W (p+q)
        work (twice that unless every run is full; less the Grams formed already, plus their
        product), beats forming the per-sample gradients [N,q,p], N W p q work."""
        product = 1 if self.aligned else 2
        grams = len(self.sample) * self.width * (self.gram_work(a) + self.gram_work(g) + product)
        return grams < self.num_samples * self.width * a.shape[-1] * g.shape[-1]

    def _block_grams(self, x: torch.Tensor) -> torch.Tensor:
        """x [M,p] -> each block's rows against its window's rows: [B, W, 2W] ([B, W, W] where every
        run is full); no gradient flows through a norm (the clipping coefficients are constants)."""
        # keyed by identity: the rows of one layer's call hold every factor, so no id is reused meanwhile
        key = id(x)
        if key not in self._grams:
            x, width = x.detach(), self.width
            if self.aligned:
                blocks = x.view(self.blocks, width, x.shape[-1])
                self._grams[key] = self._gram(blocks, blocks, x.new_empty(self.blocks, width, width))
            else:
                # the blocks whose window lies within the rows read them in place; only the rows
                # past the last such window are copied, with padding
                x, grams = x.contiguous(), x.new_empty(self.blocks, width, 2 * width)
                inner = max(len(x) // width - 1, 0)
                tail = torch.nn.functional.pad(x[inner * width:], (0, 0, 0, self._padding + width))
                self._window_grams(x, grams[:inner])
                self._window_grams(tail, grams[inner:])
                self._grams[key] = grams
        return self._grams[key]

    def _window_grams(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """x [>= (B + 1) W, p] -> out [B, W, 2W]: the first B blocks' rows against their windows."""
        width, p = self.width, x.shape[-1]
        window = x.as_strided((len(out), 2 * width, p), (width * p, p, 1))
        self._gram(window[:, :width], window, out)

    @staticmethod
    def _gram(rows: torch.Tensor, window: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """rows [B, W, p], window [B, V, p] -> out [B, W, V]."""
        # a column's Gram (a bias's factor of ones) is an outer product, which bmm does ten times slower
        return torch.bmm(rows, window.transpose(1, 2), out=out) if rows.shape[-1] > 1 else torch.mul(rows, window.transpose(1, 2), out=out)

    def per_sample(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """sum_t g_t^T a_t per sample [N,q,p] for rows a [M,p], g [M,q]."""
        return outer_product_sums(self.lay_out(a), self.lay_out(g))

    def norms(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """|| sum_t g_t^T a_t ||_F per sample [N] for rows a [M,p], g [M,q], in the cheaper form."""
        if not self.grams_are_cheaper(a, g):
            return self.per_sample(a, g).flatten(1).norm(dim=1)
        pairs = self._block_grams(a) * self._block_grams(g)
        if self.aligned:
            sq = pairs.sum(dim=(1, 2))
        else:
            per_row = (pairs * self._pair_weight).sum(dim=2).flatten()
            sq = per_row.new_zeros(self.num_samples + 1).index_add_(0, self._run.flatten(), per_row)[:-1]
        return sq.clamp_min(0).sqrt()


def expert_bank_factor_pairs(bank, activations: list[torch.Tensor], backprops: torch.Tensor) -> FactorPairs:
    """x [N,T,d], index [N,T], backprops [N,T,d] -> {param: (a [N,W,p], g [N,W,q])} for every
    trainable tensor of the bank's experts: its per-sample gradient is sum_w g_w^T a_w ([q, p],
    reshaped to the parameter's shape)."""
    pairs = {}
    for runs, rows in expert_bank_factor_rows(bank, activations, backprops):
        laid = {}
        for a, g in rows.values():  # a factor that several tensors share is laid out once
            for t in (a, g):
                if id(t) not in laid:
                    laid[id(t)] = runs.lay_out(t)
        pairs.update({p: (laid[id(a)], laid[id(g)]) for p, (a, g) in rows.items()})
    return pairs


def compute_expert_bank_grad_sample(bank, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample grads: x [N,T,d], index [N,T], backprops [N,T,d] -> {param: [N, *param.shape]}."""
    pairs = expert_bank_factor_pairs(bank, activations, backprops)
    return {p: outer_product_sums(a, g).reshape(len(a), *p.shape) for p, (a, g) in pairs.items()}


def compute_expert_bank_norm_sample(bank, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample grad norms (ghost clipping): x [N,T,d], index [N,T], backprops [N,T,d] -> {param: [N]}."""
    norms = {}
    for runs, rows in expert_bank_factor_rows(bank, activations, backprops):
        norms.update({p: runs.norms(a, g) for p, (a, g) in rows.items()})
    return norms


# --- token embeddings (book-keeping clipping) -------------------------------------------------------
#
# An embedding's per-sample gradient is sum_t onehot(id_t)^T g_t: the output gradients of the
# sample's positions summed per id, a handful of rows of the table. Opacus' grad sampler writes it
# into a zero-filled [N, vocab, d] tensor; book-keeping clipping keeps the rows instead.

def embedding_rows(layer: nn.Embedding, ids: torch.Tensor, backprops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [N,...], backprops [N,...,d] -> (ids [M], g [M,d], sample [M]) over the positions whose id
    is not the layer's padding index (the padding row gets no gradient)."""
    n = len(ids)
    ids, g = ids.reshape(n, -1), backprops.reshape(n, -1, backprops.shape[-1])
    sample = torch.arange(n, device=ids.device).unsqueeze(1).expand_as(ids)
    if layer.padding_idx is None:
        return ids.flatten(), g.flatten(0, 1), sample.flatten()
    used = ids != layer.padding_idx
    return ids[used], g[used], sample[used]


def embedding_norms(ids: torch.Tensor, g: torch.Tensor, sample: torch.Tensor, num_samples: int, vocab: int) -> torch.Tensor:
    """|| sum_t onehot(id_t)^T g_t ||_F per sample [N] for rows ids [M], g [M,d], sample [M]: each
    sample's rows summed per id (one sort of the (sample, id) keys), then squared and summed."""
    keys, position = torch.unique(sample * vocab + ids, return_inverse=True)
    sums = g.new_zeros(len(keys), g.shape[-1]).index_add_(0, position, g)
    return g.new_zeros(num_samples).index_add_(0, keys // vocab, sums.pow(2).sum(dim=1)).sqrt()


def compute_embedding_grad_sample(layer: nn.Embedding, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample grads (hooks): ids [N,...], backprops [N,...,d] -> {weight: [N, vocab, d]}. As
    Opacus' sampler, but the padding row stays zero, as autograd leaves it (Opacus' adds the
    padding positions' output gradients there)."""
    if not layer.weight.requires_grad:
        return {}
    ids, g, sample = embedding_rows(layer, activations[0], backprops)
    grads = g.new_zeros(len(backprops), *layer.weight.shape)
    return {layer.weight: grads.index_put_((sample, ids), g, accumulate=True)}


def compute_embedding_norm_sample(layer: nn.Embedding, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample grad norms (ghost clipping): ids [N,...], backprops [N,...,d] -> {weight: [N]},
    without the padding positions, which Opacus' sampler counts (a norm above the gradient's)."""
    if not layer.weight.requires_grad:
        return {}
    ids, g, sample = embedding_rows(layer, activations[0], backprops)
    return {layer.weight: embedding_norms(ids, g, sample, len(backprops), layer.num_embeddings)}


def compute_position_grad_sample(
    module: PositionEmbedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample grads: backprops [N,S,d] -> {weight: [N,S,d]} (the output gradient itself)."""
    return {module.weight: backprops} if module.weight.requires_grad else {}


def compute_position_norm_sample(
    module: PositionEmbedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample grad norms: backprops [N,S,d] -> {weight: [N]}."""
    return {module.weight: backprops.flatten(1).norm(dim=1)} if module.weight.requires_grad else {}


def compute_layer_norm_grad_sample(layer: nn.LayerNorm, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample grads: x [N,...,*shape], backprops [N,...,*shape] -> {weight, bias: [N, *shape]}:
    sum over the positions of normalised x times backprops, and of backprops. As Opacus' sampler,
    but x is normalised through the affine kernel with weight one: on the CPU PyTorch's layer_norm
    without a weight takes about twice as long (1.4 against 0.8 ms on [1024, 16, 64]), bit for bit
    the same values."""
    x, n = activations[0], len(layer.normalized_shape)
    grads = {}
    if layer.weight is not None and layer.weight.requires_grad:
        normalised = nn.functional.layer_norm(x, layer.normalized_shape, torch.ones_like(layer.weight), eps=layer.eps)
        grads[layer.weight] = sum_over_all_but_batch_and_last_n(normalised * backprops, n)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = sum_over_all_but_batch_and_last_n(backprops, n)
    return grads


# Registered by call, not by decorator, so that `make mutation` mutates them: mutmut leaves
# decorated functions alone.
register_grad_sampler([ExpertBank, SwiGLUExpertBank])(compute_expert_bank_grad_sample)
register_norm_sampler([ExpertBank, SwiGLUExpertBank])(compute_expert_bank_norm_sample)
register_grad_sampler(nn.Embedding)(compute_embedding_grad_sample)
register_norm_sampler(nn.Embedding)(compute_embedding_norm_sample)
register_grad_sampler(PositionEmbedding)(compute_position_grad_sample)
register_norm_sampler(PositionEmbedding)(compute_position_norm_sample)
register_grad_sampler(nn.LayerNorm)(compute_layer_norm_grad_sample)
