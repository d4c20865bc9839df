"""Local training and evaluation of the MoE classifier on one site's data."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .model import MoEClassifier


def freeze_inactive_experts(model: MoEClassifier, active: Iterable[int]) -> None:
    """requires_grad False on every expert not in ``active`` (global ids); everything else trains."""
    active = set(active)
    for p in model.parameters():
        p.requires_grad_(True)
    for layer_index, layer in enumerate(model.moe_layers):
        bank = layer.experts
        for e in range(bank.num_experts):
            if layer_index * bank.num_experts + e not in active:
                for p in bank.expert_params(e):
                    p.requires_grad_(False)


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a site sends back: exactly the parameters that required grad."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def make_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=shuffle, generator=generator)


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"optimizer must be adam or sgd, got {name!r}")


def per_sample_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus the weighted router auxiliary losses, one value per sample: [N]."""
    logits, aux = model(images)
    return F.cross_entropy(logits, labels, reduction="none") + aux


def train_epochs(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, epochs: int) -> float:
    """Run ``epochs`` passes; return the mean per-sample loss over all steps."""
    model.train()
    total, seen = 0.0, 0
    for _ in range(epochs):
        for images, labels in loader:
            if len(labels) == 0:  # Poisson sampling can draw an empty batch
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = per_sample_loss(model, images, labels)
            loss.mean().backward()
            optimizer.step()
            total += float(loss.detach().sum())
            seen += len(labels)
    return total / max(seen, 1)


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
    """(mean cross-entropy, accuracy) of ``model`` on the given examples."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        logits, _ = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    n = max(len(labels), 1)
    return loss_sum / n, correct / n
