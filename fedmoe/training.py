"""Local training and evaluation of a site's model on its data. Models return (logits, aux [N]):
logits [N, C] with labels [N] (classifier), or [N, T, V] with targets [N, T] (language model,
every position predicting the next byte; losses are means over positions)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .models.moe import MoEClassifier


def freeze_inactive_experts(model: MoEClassifier, active: Iterable[int]) -> None:
    """requires_grad False on every expert not in ``active`` (global ids) and on the model's
    ``frozen_parameters`` if it has them (hf-moe with LoRA: the base weights); everything else trains."""
    active = set(active)
    frozen = getattr(model, "frozen_parameters", frozenset())
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    for layer_index, layer in enumerate(model.moe_layers):
        bank = layer.experts
        for e in range(bank.num_experts):
            if layer_index * bank.num_experts + e not in active:
                for p in bank.expert_params(e):
                    p.requires_grad_(False)


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a site sends back: exactly the parameters that required grad."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def round_seed(seed: int, site: int, server_round: int) -> int:
    """Seed of a site's public randomness in a round (router noise, shuffling without DP): it is
    derivable from the run config, so DP never draws from it (privacy.dp_generator)."""
    return seed * 1_000_003 + site * 10_007 + server_round


class TensorRows(TensorDataset):
    """A TensorDataset that a DataLoader reads a batch at a time: ``__getitems__`` indexes each
    tensor once with the batch's indices, where the default fetches the examples one by one and
    stacks them (a sixth of an image-model epoch's time). Its loaders take ``collate_fn=as_fetched``."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[index] for t in self.tensors)


def as_fetched(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The collate function of TensorRows loaders: the batch is already stacked."""
    return batch


def make_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator) -> DataLoader:
    """Shuffled mini-batches for training without DP (DP-SGD samples its own: privacy.train_private)."""
    return DataLoader(TensorRows(images, labels), batch_size=batch_size, shuffle=True, generator=generator,
                      collate_fn=as_fetched)


class NoiseAwareAdam(torch.optim.Optimizer):
    """Adam whose second moment discounts the variance of the DP noise (DP-AdamBC: Tang, Panchal,
    Hsu, Lécuyer, AAAI 2024, "DP-AdamBC: Your DP-Adam Is Actually DP-SGD (Unless You Apply Bias
    Correction)").

    Under DP-SGD every coordinate of the gradient the optimiser sees carries independent Gaussian
    noise of variance phi = (sigma C / B)^2 (noise multiplier sigma, clipping norm C, expected
    batch B), so Adam's v estimates E[g^2] + phi; where phi dominates, Adam's step is lr m / sqrt(phi),
    the same for every coordinate: DP-SGD with momentum. With m, v Adam's moments and m^, v^ their
    bias-corrected values, the step is

        theta <- theta - lr m^ / (sqrt(max(v^ - phi, floor phi)) + eps)

    phi is the param group's ``noise_variance`` (0, plain Adam, until ``privacy.train_private``
    sets it from Opacus' optimizer); ``floor`` bounds the step where v^ is mostly noise (1: such a
    coordinate steps as under Adam; smaller: larger steps there). phi is a function of public
    quantities only, so the step stays post-processing of the noisy gradients.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, floor: float = 1.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "floor": floor, "noise_variance": 0.0})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            phi = group["noise_variance"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                state["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = state["m"] / (1 - beta1 ** state["step"])
                v_hat = state["v"] / (1 - beta2 ** state["step"])
                if phi > 0:
                    v_hat = (v_hat - phi).clamp_min_(group["floor"] * phi)
                p.addcdiv_(m_hat, v_hat.sqrt_().add_(group["eps"]), value=-group["lr"])
        return loss


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, noise_floor: float = 1.0) -> torch.optim.Optimizer:
    """adam, sgd (momentum 0.9), or adam-bc (NoiseAwareAdam with ``noise_floor``; Adam without DP)."""
    params = [p for p in params if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adam-bc":
        return NoiseAwareAdam(params, lr=lr, floor=noise_floor)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"optimizer must be adam, adam-bc or sgd, got {name!r}")


@contextmanager
def iterate_average(model: nn.Module, optimizer: torch.optim.Optimizer, decay: float) -> Iterator[None]:
    """Inside the block, keep an exponential moving average of ``model``'s trainable parameters
    over ``optimizer``'s steps; on leaving, put the average into the model (``decay`` 0: leave
    the last iterate). Step t (from 0) does avg <- d avg + (1 - d) w with d = min(decay,
    (1 + t) / (10 + t)): the warm-up keeps the round's starting point, already counted in the
    average's first value, from outweighing the few steps of a short round.

    Averaging the iterates damps the noise DP-SGD adds at every step (De et al. 2022, "Unlocking
    high-accuracy differentially private image classification through scale"). It is
    post-processing: DP-SGD's guarantee covers the whole sequence of noisy iterates, and the
    average is a function of that sequence alone. Opacus' DPOptimizer calls the wrapped optimizer's
    step only for a logical batch's noisy step, so physical batches do not count as steps.
    """
    if decay <= 0:
        yield
        return
    params = [p for p in model.parameters() if p.requires_grad]
    average = [p.detach().clone() for p in params]
    steps = 0

    def update(_optimizer, _args, _kwargs) -> None:
        nonlocal steps
        d = min(decay, (1 + steps) / (10 + steps))
        with torch.no_grad():
            for avg, p in zip(average, params):
                avg.lerp_(p, 1.0 - d)
        steps += 1

    handle = optimizer.register_step_post_hook(update)
    try:
        yield
    finally:
        handle.remove()
    with torch.no_grad():
        for avg, p in zip(average, params):
            p.copy_(avg)


def per_sample_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N]: cross-entropy of each sample, averaged over its positions for sequence outputs."""
    if logits.dim() == 2:
        return F.cross_entropy(logits, targets, reduction="none")
    n, t, v = logits.shape
    return F.cross_entropy(logits.reshape(n * t, v), targets.reshape(n * t), reduction="none").view(n, t).mean(dim=1)


class MoELoss(nn.Module):
    """Cross-entropy plus the model's weighted router losses, both per sample, then reduced.

    Takes the model's output ``(logits [N, C] or [N, T, V], aux [N])``. ``reduction`` is an
    attribute, as Opacus' ghost clipping expects of a criterion (it switches it to "none" to get [N]).
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, output: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        logits, aux = output
        per_sample = per_sample_cross_entropy(logits, labels) + aux
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        # an empty Poisson batch still takes its (noise-only) step: mean over at least one
        return per_sample.sum() / max(len(labels), 1)


class ProximalLoss(MoELoss):
    """MoELoss plus (lam / 2) ||theta - anchor||^2 over ``model``'s trainable parameters theta, once
    per batch (the penalty's gradient is lam (theta - anchor) at every step). ``anchor`` maps
    parameter names to tensors, e.g. the global model a site received. This is Ditto's personal
    objective h(v) = F_site(v) + (lam / 2) ||v - w||^2 (Li, Hu, Beirami, Smith, ICML 2021)."""

    def __init__(self, model: nn.Module, anchor: dict[str, torch.Tensor], lam: float) -> None:
        super().__init__()
        self.lam = lam
        self.pairs = [(p, anchor[name].detach()) for name, p in model.named_parameters() if p.requires_grad]

    def forward(self, output: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        loss = super().forward(output, labels)
        if self.lam == 0:
            return loss
        return loss + 0.5 * self.lam * sum((p - a).pow(2).sum() for p, a in self.pairs)


def train_epochs(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, epochs: int,
                 criterion: nn.Module | None = None) -> float:
    """Run ``epochs`` passes; return the mean per-batch loss. Batches go to the model's device."""
    criterion = criterion or MoELoss()
    model.train()
    device = next(model.parameters()).device
    total, steps = 0.0, 0
    for _ in range(epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
    return total / max(steps, 1)


@torch.no_grad()
def routing_counts(model: MoEClassifier, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Tokens routed to each global expert by the (noise-free) router over ``images``."""
    model.eval()
    counts = torch.zeros(model.config.total_experts, dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        model(images[start : start + batch_size])
        counts += model.routing_counts().double()
    return counts.numpy()


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> tuple[float, float]:
    """(mean cross-entropy in nats, accuracy) of ``model`` on the given examples; for sequences,
    per predicted position."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        logits, _ = model(x)
        loss_sum += float(per_sample_cross_entropy(logits, y).sum()) * (y.numel() // max(len(y), 1))
        correct += int((logits.argmax(dim=-1) == y).sum())
    n = max(labels.numel(), 1)
    return loss_sum / n, correct / n
