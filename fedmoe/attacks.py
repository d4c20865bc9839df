"""Hostile sites, for measuring the defences (experiments.attacks). A site listed in the run
config's ``attack-sites`` behaves as ``attack`` says; every other site is honest.

  scale      targets one expert (``attack-expert``, by default the one its own data uses least:
             a rarely used, specialised expert): trains it too, sends global + s * (trained -
             global) for it and claims all of its routed tokens for it, so expert-matched
             averaging weights it fully
  sign-flip  sends global - s * (trained - global) for every tensor it trained
  backdoor   stamps a trigger (a bright square in the bottom-right corner) on a share of its
             training images and relabels them ``attack-target-label``, then sends
             global + s * (trained - global) (model replacement when s > 1)
with s = ``attack-scale``. Attack success for the backdoor is the share of triggered test images
of other classes that the final global model assigns the target label; the scale attack's
damage shows on the test images that rely most on the targeted expert (largest share of
their token slots routed to it).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .data.fashion_mnist import MEAN, STD

ATTACKS = ("none", "scale", "sign-flip", "backdoor")
TRIGGER_SIZE = 4
POISON_FRACTION = 0.5


def is_attacker(attack: str, attack_sites: str, site: int) -> bool:
    return attack != "none" and site in parse_sites(attack_sites)


def parse_sites(attack_sites: str) -> set[int]:
    """'0,3' -> {0, 3}; raises ValueError on anything else."""
    return {int(s) for s in attack_sites.split(",") if s.strip()}


def add_trigger(images: torch.Tensor) -> torch.Tensor:
    """Normalised images [N, 1, 28, 28] with the trigger: white pixels in the last rows and columns."""
    out = images.clone()
    out[..., -TRIGGER_SIZE:, -TRIGGER_SIZE:] = (1.0 - MEAN) / STD
    return out


def poison_data(images: torch.Tensor, labels: torch.Tensor, target: int, generator: torch.Generator):
    """The backdoor's training set: POISON_FRACTION of the images triggered and relabelled."""
    chosen = torch.randperm(len(labels), generator=generator)[: int(POISON_FRACTION * len(labels))]
    images, labels = images.clone(), labels.clone()
    images[chosen] = add_trigger(images[chosen])
    labels[chosen] = target
    return images, labels


def rare_expert(counts: np.ndarray, active: list[int]) -> int:
    """The expert this site routes the fewest tokens to, outside its active set."""
    order = [int(e) for e in np.argsort(counts, kind="stable") if int(e) not in active]
    return order[0] if order else active[0]


def scale_updates(trained: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor],
                  factor: float, keys=None) -> dict[str, torch.Tensor]:
    """global + factor * (trained - global) for ``keys`` (default: all); the rest as trained."""
    keys = set(trained) if keys is None else set(keys)
    return {k: global_state[k] + factor * (v - global_state[k]) if k in keys else v for k, v in trained.items()}


def hostile_update(attack: str, factor: float, trained: Mapping[str, torch.Tensor],
                   received: Mapping[str, torch.Tensor], counts: np.ndarray, target_keys: list[str],
                   target_expert: int | None) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """What an attacking site sends instead of its honest (trained tensors, routing counts)."""
    counts = np.array(counts, dtype=np.float64)
    if attack == "scale":
        counts[target_expert] = counts.sum()
        return scale_updates(trained, received, factor, target_keys), counts
    if attack == "sign-flip":
        return scale_updates(trained, received, -factor), counts
    return scale_updates(trained, received, factor), counts


@torch.no_grad()
def attack_success_rate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, target: int) -> float:
    """Share of triggered images whose true label is not ``target`` that ``model`` labels ``target``."""
    model.eval()
    keep = labels != target
    triggered = add_trigger(images[keep])
    hits = 0
    for start in range(0, len(triggered), 512):
        logits, _ = model(triggered[start : start + 512])
        hits += int((logits.argmax(dim=1) == target).sum())
    return hits / max(int(keep.sum()), 1)


@torch.no_grad()
def expert_share(model: torch.nn.Module, images: torch.Tensor, expert: int) -> torch.Tensor:
    """[N]: share of each image's token slots routed to global expert ``expert`` (eval routing)."""
    model.eval()
    shares = []
    for start in range(0, len(images), 512):
        model(images[start : start + 512])
        per_sample = torch.cat([layer.last_routing.per_sample for layer in model.moe_layers], dim=1)
        shares.append(per_sample[:, expert] / per_sample.sum(dim=1) * len(model.moe_layers))
    return torch.cat(shares)
