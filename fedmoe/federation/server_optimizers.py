"""Server optimizers on the aggregated pseudo-gradient (Reddi et al. 2021, "Adaptive Federated
Optimization"), per tensor, on plain numpy arrays.

With x a global tensor before the round and x̄ its (expert-matched) average, Δ = x̄ - x, and t the
number of rounds in which the tensor was updated so far (this one included):

    fedavgm   m <- β1 m + Δ                                     x <- x + η m
    fedadam   m <- β1 m + (1 - β1) Δ,  v <- β2 v + (1 - β2) Δ²   x <- x + η_t m / (√v + τ),
              η_t = η √(1 - β2^t) / (1 - β1^t)  (Adam's bias correction)
    fedyogi   m as fedadam,  v <- v - (1 - β2) Δ² sign(v - Δ²)    x <- x + η m / (√v + τ)

(Flower's FedAvgM, FedAdam and FedYogi, per tensor.) A tensor no site sent this round (an expert
nobody trained) is left bit-identical, and its m, v and t do not advance: an expert's moments
move only in rounds where some site trained it, and t counts those rounds, so its bias correction
is its own. With η = 1 and β1 = 0, fedavgm is plain averaging.

Privacy: the optimizer sees only the aggregate of the sites' DP-SGD outputs; everything it does
is post-processing of them and costs no privacy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi")


@dataclass
class ServerOptimizer:
    """Moments and step counts per tensor, and the update rule of the module doc."""

    name: str
    learning_rate: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS[1:]:
            raise ValueError(f"server optimizer must be one of {SERVER_OPTIMIZERS[1:]}, got {self.name!r}")

    def step(self, previous: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray],
             updated: Iterable[str]) -> dict[str, np.ndarray]:
        """The new global tensors: ``averaged`` moved by the rule for the keys in ``updated``;
        every other key keeps its previous array object."""
        out = dict(previous)
        for key in updated:
            x = previous[key].astype(np.float64)
            delta = averaged[key].astype(np.float64) - x
            t = self.steps.get(key, 0) + 1
            m = self.m.get(key, np.zeros_like(x))
            if self.name == "fedavgm":
                m = self.beta1 * m + delta
                new = x + self.learning_rate * m
            else:
                m = self.beta1 * m + (1 - self.beta1) * delta
                v = self.v.get(key, np.zeros_like(x))
                if self.name == "fedadam":
                    v = self.beta2 * v + (1 - self.beta2) * delta**2
                    rate = self.learning_rate * np.sqrt(1 - self.beta2**t) / (1 - self.beta1**t)
                else:
                    v = v - (1 - self.beta2) * delta**2 * np.sign(v - delta**2)
                    rate = self.learning_rate
                self.v[key] = v
                new = x + rate * m / (np.sqrt(v) + self.tau)
            self.m[key], self.steps[key] = m, t
            out[key] = new.astype(previous[key].dtype)
        return out

    def state(self) -> dict[str, dict]:
        """What a checkpoint keeps: moments as torch tensors (a checkpoint loads with
        weights_only) and step counts."""
        import torch  # here, not at the top: the run config imports this module and must load fast

        return {"m": {k: torch.from_numpy(v) for k, v in self.m.items()},
                "v": {k: torch.from_numpy(v) for k, v in self.v.items()}, "steps": dict(self.steps)}

    def load_state(self, state: Mapping[str, Mapping]) -> None:
        self.m = {k: np.asarray(v, dtype=np.float64) for k, v in state.get("m", {}).items()}
        self.v = {k: np.asarray(v, dtype=np.float64) for k, v in state.get("v", {}).items()}
        self.steps = {k: int(t) for k, t in state.get("steps", {}).items()}
