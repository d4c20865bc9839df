"""Book-keeping clipping (Bu, Wang, Zha, Karypis, ICML 2023): DP-SGD's clipped gradient sum from
one backward pass.

Opacus' ghost clipping runs backward twice: the first pass gives each sample's gradient norm
||grad_n|| from the layers' inputs and output gradients, the second differentiates the loss
re-weighted by c_n = min(1, C / (||grad_n|| + 1e-6)) to get sum_n c_n grad_n. For a layer whose
per-sample gradient is a sum of outer products over the sample's positions, grad_n = sum_t
g_nt^T a_nt (a linear layer, an expert of the bank, a LoRA factor), the clipped sum is one matrix
product of factors the first pass already had:

    sum_n c_n grad_n = (c * g)^T a        over all (n, t), with g scaled per sample.

So the first pass keeps those factors (FACTOR_RULES) where the Gram form of the norm is the
cheaper one (few positions T against the layer's widths), as rows in runs by sample (samplers.
RowRuns: an expert's rows are only the slots routed to it, and its norms come from those rows
without a per-sample layout, which pads every sample to the most any sample routed), and
otherwise the per-sample gradients [N, q, p] it formed for the norm (summing those is T times
cheaper than the factor product). A token embedding's per-sample gradient is its output
gradient's rows added into the table at the sample's ids: the pass keeps those rows, its norms
sum them per (sample, id), and its clipped sum adds them in, scaled (Opacus' grad sampler would
fill a [N, vocab, d] tensor). For the small layers without a rule (norms, position embeddings,
...) it keeps the per-sample gradients Opacus' grad samplers compute for their norms anyway.
After it, ``BookKeeping.write_clipped_sums`` puts sum_n c_n grad_n into every
trainable parameter's ``.grad`` — what Opacus' second pass would have left there — and
DPOptimizerFastGradientClipping adds the noise exactly as under ghost clipping. The pass asks
autograd for the gradient of one parameter of each entry layer only (a layer whose inputs need
no gradient: the patch or token embedding; its bias where it has one), so every layer's output
gradient is computed and every hook fires, but autograd skips the weight gradients, which the
clipped sums replace; a trainable parameter that no hook saw is an error, not a silent unclipped gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping, DPTensorFastGradientClipping
from opacus.utils.module_utils import trainable_modules
from torch import nn

from ..models.hf_moe import SwiGLUExpertBank
from ..models.moe import ExpertBank
from .samplers import FactorPairs, RowRuns, embedding_norms, embedding_rows, expert_bank_factor_rows

FactorGroup = tuple[FactorPairs, RowRuns]
"""Factor rows of some of a layer's tensors {param: (a [M,p], g [M,q])} and the runs, one per
sample, they come in."""
FactorRule = Callable[[nn.Module, list[torch.Tensor], torch.Tensor], list[FactorGroup]]


def linear_factor_groups(layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor) -> list[FactorGroup]:
    """x [N,...,in], backprops [N,...,out] -> one group: {weight: (x [N T,in], g [N T,out]), bias: (1 [N T,1], g)}
    over all N T positions, T per sample."""
    a, g = (t.unsqueeze(1) if t.dim() == 2 else t.flatten(1, -2) for t in (activations[0].to(backprops.dtype), backprops))
    runs = RowRuns.full(len(a), a.shape[1], a.device)
    a, g = a.flatten(0, 1), g.flatten(0, 1)
    rows = {}
    if layer.weight.requires_grad:
        rows[layer.weight] = (a, g)
    if layer.bias is not None and layer.bias.requires_grad:
        rows[layer.bias] = (a.new_ones(len(a), 1), g)
    return [(rows, runs)]


def expert_bank_factor_groups(bank: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> list[FactorGroup]:
    """x [N,T,d], index [N,T], backprops [N,T,d] -> one group per expert with a trainable tensor."""
    return [(rows, runs) for runs, rows in expert_bank_factor_rows(bank, activations, backprops)]


FACTOR_RULES: dict[type, FactorRule] = {
    nn.Linear: linear_factor_groups,
    ExpertBank: expert_bank_factor_groups,
    SwiGLUExpertBank: expert_bank_factor_groups,
}


class HiddenKeeper:
    """What a GELU expert bank's forwards keep for its clipped gradient (``ExpertBank.hidden_keeper``):
    per forward, {expert: [pre-activation, hidden, gradient of the pre-activation]} of its trainable
    experts. The gradient arrives during backward (a hook on the pre-activation, which autograd
    computes anyway for the bank's input gradient); the single pass differentiates the per-sample
    losses' sum, so it is already on the scale of the output gradients the samplers get."""

    def __init__(self) -> None:
        self.forwards: list[dict[int, list]] = []

    def keep(self, pre: torch.Tensor, hidden: torch.Tensor) -> list:
        entry = [pre.detach(), hidden.detach(), None]
        if pre.requires_grad:
            pre.register_hook(lambda grad: entry.__setitem__(2, grad))
        return entry

    def pop(self) -> dict[int, list]:
        """The last forward's entries: the hooks of a bank used twice fire in reverse order of the calls."""
        return self.forwards.pop() if self.forwards else {}


class BookKeeping:
    """What one backward pass keeps for the clipped sum, installed on an Opacus ghost-clipping module.

    The module's norm samplers become, for layer types with a factor rule, "compute the factor
    pairs, keep them, return their per-sample norms"; every other trainable layer type goes
    through its Opacus grad sampler (or functorch), whose per-sample gradients are kept. Both
    tables are set on this module instance only, so Opacus' class-wide registries do not change.
    """

    def __init__(self, module: GradSampleModuleFastGradientClipping) -> None:
        self.module = module
        self.factors: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (param, a, g, sample)
        self.lookups: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (table, ids, g, sample)
        self.grad_samples: list[dict[nn.Parameter, torch.Tensor]] = []
        self.entry_parameters: dict[nn.Parameter, None] = {}
        norm_samplers, grad_samplers = {}, dict(module.GRAD_SAMPLERS)
        self._handles = []
        self._banks: list[ExpertBank] = []
        if module.loss_reduction != "sum":
            # under a mean loss Opacus' hooks multiply every layer's output gradient by the batch
            # size to undo the mean; the single pass differentiates the per-sample losses' sum,
            # whose output gradients need no such full-size product
            module.remove_hooks()
            module.add_hooks(loss_reduction="sum", batch_first=module.batch_first, force_functorch=module.force_functorch)
        for _, layer in trainable_modules(module._module):
            kind = type(layer)
            if kind in FACTOR_RULES:
                norm_samplers[kind] = self._keeping_factors(FACTOR_RULES[kind])
            elif kind is nn.Embedding:  # (dp_sgd refuses one scaled by batch frequency)
                norm_samplers[kind] = self._keeping_lookups
            else:
                grad_samplers[kind] = self._keeping_grad_samples(module.GRAD_SAMPLERS.get(kind, ft_compute_per_sample_gradient))
            self._handles.append(layer.register_forward_pre_hook(self._note_entry, with_kwargs=True))
            if isinstance(layer, ExpertBank):
                layer.hidden_keeper = HiddenKeeper()
                self._banks.append(layer)
        module.NORM_SAMPLERS = norm_samplers
        module.GRAD_SAMPLERS = grad_samplers

    def _note_entry(self, layer: nn.Module, args, kwargs) -> None:
        """A layer none of whose inputs needs a gradient starts the graph (a patch embedding, a
        token embedding): the single backward pass differentiates for one of its parameters, the
        smallest (a bias: a sum of the output gradient, where the weight's is a product as large
        as the layer's forward, which the clipped sum would replace)."""
        inputs = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        trainable = [p for p in layer.parameters(recurse=False) if p.requires_grad]
        if torch.is_grad_enabled() and trainable and not any(t.requires_grad for t in inputs):
            self.entry_parameters[min(trainable, key=torch.Tensor.numel)] = None

    def backward(self, loss: torch.Tensor) -> None:
        """One backward pass of ``loss``, the sum of the batch's per-sample losses, that computes
        every layer's output gradient (so every hook fires) but no parameter gradient beyond one
        per entry layer: autograd skips the weight gradients nothing asks for, and the clipped
        sums replace them anyway."""
        entry, self.entry_parameters = list(self.entry_parameters), {}
        loss.backward(inputs=entry or None)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        for bank in self._banks:
            bank.hidden_keeper = None

    def _keeping_factors(self, rule: FactorRule):
        def norm_sampler(layer, activations, backprops):
            norms = {}
            for rows, runs in rule(layer, activations, backprops):
                for p, (a, g) in rows.items():
                    if runs.grams_are_cheaper(a, g):
                        self.factors.append((p, a, g, runs.sample))
                        norms[p] = runs.norms(a, g)
                    else:  # the norm forms the per-sample gradients anyway: keep those, not the factors
                        per_sample = runs.per_sample(a, g)
                        self.grad_samples.append({p: per_sample.reshape(len(per_sample), *p.shape)})
                        norms[p] = per_sample.flatten(1).norm(dim=1)
            return norms
        return norm_sampler

    def _keeping_lookups(self, layer: nn.Embedding, activations, backprops):
        """An embedding's norms from its rows (samplers.embedding_norms), which it keeps: the clipped
        sum is each row scaled by its sample's coefficient, added into the table at its id."""
        ids, g, sample = embedding_rows(layer, activations[0], backprops)
        self.lookups.append((layer.weight, ids, g, sample))
        return {layer.weight: embedding_norms(ids, g, sample, len(backprops), layer.num_embeddings)}

    def _keeping_grad_samples(self, grad_sampler):
        def keeping(layer, activations, backprops):
            grad_samples = grad_sampler(layer, activations, backprops)
            self.grad_samples.append(grad_samples)
            return grad_samples
        return keeping

    def write_clipped_sums(self, coefficients: torch.Tensor) -> None:
        """p.grad = sum_n c_n grad_n for every trainable parameter, from what the pass kept;
        coefficients [N]. Raises if a trainable parameter got nothing (it would go out unclipped)."""
        sums: dict[nn.Parameter, torch.Tensor] = {}

        def add(p: nn.Parameter, value: torch.Tensor) -> None:
            sums[p] = sums[p] + value if p in sums else value

        def per_row(sample: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return coefficients.to(dtype)[sample].unsqueeze(1)

        for p, a, g, sample in self.factors:
            # (c g)^T a = g^T (c a), each row scaled by its sample's coefficient: scale the narrower
            # factor (a bias's is its column of ones)
            c = per_row(sample, g.dtype)
            a, g = (a * c, g) if a.shape[-1] < g.shape[-1] else (a, g * c)
            add(p, (g.T @ a).reshape(p.shape).to(p.dtype))
        for p, ids, g, sample in self.lookups:
            add(p, torch.zeros_like(p).index_add_(0, ids, (g * per_row(sample, g.dtype)).to(p.dtype)))
        for grad_samples in self.grad_samples:
            for p, per_sample in grad_samples.items():
                add(p, torch.einsum("n,n...->...", coefficients.to(per_sample.dtype), per_sample).to(p.dtype))
        self.factors.clear()
        self.lookups.clear()
        self.grad_samples.clear()
        for bank in self._banks:  # what a forward without hooks firing (an empty batch) left
            bank.hidden_keeper.forwards.clear()
        trainable = [(name, p) for name, p in self.module._module.named_parameters() if p.requires_grad]
        if len(coefficients) == 0:  # an empty Poisson batch: its step is noise only
            sums = {p: torch.zeros_like(p) for _, p in trainable}
        missing = [name for name, p in trainable if p not in sums]
        if missing:
            raise RuntimeError(f"book-keeping clipping saw no per-sample gradient for {missing}; use dp-mode=ghost")
        for p, total in sums.items():
            p.grad = total


class BookKeepingLoss(DPLossFastGradientClipping):
    """Opacus' ghost-clipping criterion whose ``loss.backward()`` runs one pass, not two."""

    def __init__(self, ghost_loss: DPLossFastGradientClipping) -> None:
        super().__init__(ghost_loss.module, ghost_loss.optimizer, ghost_loss.criterion, ghost_loss.loss_reduction)
        self.book = BookKeeping(ghost_loss.module)

    def __call__(self, *args, **kwargs) -> BookKeepingTensor:
        loss = super().__call__(*args, **kwargs)
        return BookKeepingTensor(self.book, loss.optimizer, loss.loss_per_sample, loss.loss_reduction)


class BookKeepingTensor(DPTensorFastGradientClipping):
    """The per-sample losses of one physical batch; ``backward`` leaves the clipped sum in ``.grad``."""

    def __init__(self, book: BookKeeping, optimizer, loss_per_sample: torch.Tensor, loss_reduction: str) -> None:
        super().__init__(book.module, optimizer, loss_per_sample, loss_reduction)
        self.book = book

    def backward(self) -> None:
        self.book.backward(self.loss_per_sample.sum())
        self.book.write_clipped_sums(self.module.get_clipping_coef())
