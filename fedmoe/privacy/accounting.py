"""Privacy accounting: the site's ledger, noise planning, the routing-count release and the
site's secret DP randomness.

Accounting is Opacus' RDP accountant (``opacus.accountants.RDPAccountant``, the default) or its
PRV accountant (``PRVAccountant``, Gopi et al. 2021: numerical composition of privacy loss
distributions; run config ``accountant=prv``), which proves the same noise to a smaller epsilon,
so a target needs about 5-8% less noise. A site's ledger is one accountant history for the
whole run: entries (noise multiplier, sample rate, steps) for its DP-SGD steps and one full-batch
Gaussian entry (sigma_c, 1.0, 1) per release of its routing counts. The history is restored before each round and saved after it, so epsilon accumulates
over rounds and restarts exactly as one accountant that saw every step.

Randomness: every draw the guarantee rests on (sampling masks, DP-SGD noise, count-release
noise) comes from ``dp_generator``, seeded from OS entropy inside the site each round, never from
the run config, site id or round, which the server knows (README, "Threat model").
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus.accountants import create_accountant

from ..results import atomic_write_json

ACCOUNTANTS = ("rdp", "prv")
ACCOUNTANT = "rdp"
MAX_SIGMA = 1e4
# PRV's discretisation grows without bound as the noise falls far below what RDP plans (sigma 0.1
# at q = 1/15 took minutes and returned inf), and its saving is 5-8%: its search stays above this share
PRV_SEARCH_FLOOR = 0.7

HistoryEntry = tuple[float, float, int]  # (noise multiplier, sample rate, steps), as Opacus' accountants


def epsilon_of(history: list[HistoryEntry], delta: float, accountant: str = ACCOUNTANT) -> float:
    """Epsilon of a composed history under Opacus' ``accountant`` (0 for an empty history).

    Entries of the same mechanism are summed first, in order of first appearance: composition does
    not depend on order, and PRV's cost grows with the number of entries (a ledger alternates
    count releases and DP-SGD steps; 100 rounds took minutes ungrouped, under a second grouped).
    PRV's epsilon is its upper bound at eps_error 0.01 (Opacus' ``get_epsilon``)."""
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    grouped: dict[tuple[float, float], int] = {}
    for sigma, rate, steps in history:
        grouped[(float(sigma), float(rate))] = grouped.get((float(sigma), float(rate)), 0) + int(steps)
    counter = create_accountant(accountant)
    counter.history = [(sigma, rate, steps) for (sigma, rate), steps in grouped.items()]
    return float(counter.get_epsilon(delta=delta))


def plan_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int,
    count_releases: int = 0, count_noise_multiplier: float = 0.0, tolerance: float = 0.01,
    accountant: str = ACCOUNTANT,
) -> float:
    """Smallest DP-SGD noise multiplier (to ``tolerance`` in epsilon) such that ``steps`` steps at
    ``sample_rate`` plus ``count_releases`` full-batch Gaussian releases stay within the target
    under ``accountant``. PRV searches between PRV_SEARCH_FLOOR times the RDP plan and the RDP plan
    (raised if PRV ever needs more)."""
    if math.isinf(target_epsilon):
        return 0.0

    def eps(sigma: float) -> float:
        history = [(sigma, sample_rate, steps)]
        if count_releases:
            history.append((count_noise_multiplier, 1.0, count_releases))
        return epsilon_of(history, delta, accountant)

    floor = epsilon_of([(count_noise_multiplier, 1.0, count_releases)], delta, accountant) if count_releases else 0.0
    if floor >= target_epsilon:
        raise ValueError(
            f"target-epsilon {target_epsilon} is spent by the {count_releases} count releases alone "
            f"(epsilon {floor:.2f}); raise count-noise-multiplier or the target"
        )
    if accountant == "rdp":
        low, high = 0.0, 1.0
    else:
        rdp = plan_noise_multiplier(target_epsilon, delta, sample_rate, steps, count_releases,
                                    count_noise_multiplier, tolerance, "rdp")
        low, high = PRV_SEARCH_FLOOR * rdp, rdp
        if eps(low) <= target_epsilon:
            return low
    eps_high = eps(high)
    while eps_high > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_SIGMA:
            raise ValueError(f"target-epsilon {target_epsilon} is unreachable for {steps} steps")
        eps_high = eps(high)
    while eps_high < target_epsilon - tolerance and high - low > 1e-4:
        mid = (low + high) / 2
        eps_mid = eps(mid)
        if eps_mid > target_epsilon:
            low = mid
        else:
            high, eps_high = mid, eps_mid
    return high


def count_sensitivity(tokens_per_sample: int, top_k: int, num_layers: int) -> float:
    """L2 sensitivity of the routed token counts to one sample: each of its tokens adds 1 to k
    distinct experts per layer, so its count vector has entries <= tokens and norm <= tokens*sqrt(k*L)."""
    return tokens_per_sample * math.sqrt(top_k * num_layers)


def release_counts(counts: np.ndarray, noise_multiplier: float, sensitivity: float, generator: torch.Generator) -> np.ndarray:
    """Gaussian mechanism on routing counts; negative results are clamped to 0 (post-processing)."""
    noise = torch.randn(len(counts), generator=generator, dtype=torch.float64).numpy()
    return np.clip(counts + noise * noise_multiplier * sensitivity, 0.0, None)


def dp_generator(reproducible_seed: int | None = None) -> torch.Generator:
    """The source of every draw a site's DP guarantee rests on in one round: Poisson sampling
    masks, DP-SGD noise, count-release noise.

    By default it is seeded with 63 bits from the OS entropy pool (``secrets``) that never leave
    this function: the server knows the run config, the seed, the site and the round, and must
    not be able to regenerate the noise from them and subtract it. ``reproducible_seed`` (run
    config ``dp-reproducible-noise=true``) seeds it from the config instead, for debugging only:
    the guarantee then does not hold against anyone who knows the config.
    """
    seed = secrets.randbits(63) if reproducible_seed is None else reproducible_seed
    return torch.Generator().manual_seed(seed)


RoundRecord = dict[str, Any]  # {"round": r, "charged": [HistoryEntry, ...], "epsilon": after the round}


@dataclass
class PrivacyLedger:
    """One site's privacy state for a whole run; everything needed to recompute its epsilon.

    ``history`` is what ``accountant`` composes; ``rounds`` says what each round charged
    (its count release, then its DP-SGD steps) and the epsilon after it, so an auditor can check
    that the history is exactly the rounds' charges (fedmoe.privacy.audit). ``num_examples`` fixes the
    sample rate 1 / ceil(n / batch size); like every DP-SGD analysis that publishes q, the ledger
    treats the site's dataset size as public. ``reproducible_noise`` is sticky: once one round's
    randomness came from the config, the run's guarantee is void against whoever knows it.
    """

    site: int
    target_epsilon: float
    delta: float
    noise_multiplier: float
    count_noise_multiplier: float
    sample_rate: float
    num_examples: int = 0
    reproducible_noise: bool = False
    accountant: str = ACCOUNTANT
    history: list[HistoryEntry] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(s for _, _, s in self.history)

    def epsilon(self, extra: list[HistoryEntry] | None = None) -> float:
        return epsilon_of(self.history + list(extra or []), self.delta, self.accountant)

    def charge(self, entries: list[HistoryEntry]) -> None:
        """Append entries, merging with the last one when the mechanism is identical (as Opacus does)."""
        self.history = merge_history(self.history, entries)

    def close_round(self, server_round: int, charged: list[HistoryEntry]) -> None:
        """Record what ``server_round`` charged (already in the history) and the epsilon after it."""
        self.rounds.append({"round": int(server_round), "charged": [list(e) for e in charged],
                            "epsilon": _json_float(self.epsilon())})

    def to_json(self) -> str:
        d = asdict(self)
        d["history"] = [list(h) for h in self.history]
        d["target_epsilon"] = _json_float(self.target_epsilon)
        d["epsilon"] = _json_float(self.epsilon())
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "PrivacyLedger":
        d = json.loads(text)
        d.pop("epsilon", None)
        d["history"] = [(float(s), float(q), int(n)) for s, q, n in d["history"]]
        d["target_epsilon"] = float(d["target_epsilon"])
        return cls(**d)

    def save(self, path: Path) -> None:
        atomic_write_json(path, json.loads(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> "PrivacyLedger | None":
        return cls.from_json(path.read_text()) if path.exists() else None


def merge_history(history: list[HistoryEntry], entries: list[HistoryEntry]) -> list[HistoryEntry]:
    """``history`` followed by ``entries``, a new entry merged into the last one when its
    (noise multiplier, sample rate) is the same, as Opacus' accountant records repeated steps."""
    merged = [tuple(h) for h in history]
    for sigma, rate, steps in entries:
        if steps <= 0:
            continue
        if merged and merged[-1][:2] == (sigma, rate):
            merged[-1] = (sigma, rate, merged[-1][2] + steps)
        else:
            merged.append((sigma, rate, steps))
    return merged


def _json_float(x: float) -> float | str:
    return "inf" if math.isinf(x) else x
