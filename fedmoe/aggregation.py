"""Expert-matched averaging on plain numpy arrays (no Flower types).

Notation: site i sends arrays x_i (only the tensors it trained), n_i examples and, for each
expert e it trained, a weight c_ie (tokens routed to e; noised under DP). R_e is the set of
sites whose update contains expert e. For a shared tensor (trunk, router, head):

    x <- sum_i n_i x_i / sum_i n_i                 over all sites

for a tensor of expert e:

    x_e <- sum_{i in R_e} c_ie x_ie / sum_{i in R_e} c_ie     if R_e is not empty
    x_e <- x_e (previous global value, bit for bit)          if R_e is empty

If every c_ie of a contributing expert is zero (possible after clamping noisy counts), the
sites in R_e are weighted equally.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SiteUpdate:
    """One site's contribution to a round."""

    arrays: Mapping[str, np.ndarray]
    num_examples: float
    expert_weights: Mapping[int, float] = field(default_factory=dict)


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum_i w_i a_i / sum_i w_i in float64, cast back to the inputs' dtype; equal weights if all w_i are 0."""
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones_like(w)
    if len(w) != len(arrays):
        raise ValueError(f"{len(arrays)} arrays but {len(w)} weights")
    total = np.tensordot(w / w.sum(), np.stack(arrays), axes=1)  # float64: w is float64
    return total.astype(arrays[0].dtype, copy=False)


def expert_matched_average(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[SiteUpdate],
    expert_of: Callable[[str], int | None],
) -> dict[str, np.ndarray]:
    """New global arrays from the previous ones and the round's site updates (see module doc).

    ``expert_of(key)`` names the expert a tensor belongs to, or None for shared tensors.
    Keys absent from every update keep the previous array object unchanged.
    """
    result = dict(global_arrays)
    for key in global_arrays:
        contributors = [u for u in updates if key in u.arrays]
        if not contributors:
            continue
        expert = expert_of(key)
        if expert is None:
            weights = [u.num_examples for u in contributors]
        else:
            weights = [max(float(u.expert_weights.get(expert, 0.0)), 0.0) for u in contributors]
        result[key] = weighted_mean([u.arrays[key] for u in contributors], weights)
    return result


def load_coefficient_of_variation(expert_load: np.ndarray) -> float:
    """std / mean of tokens per expert (FLEX-MoE's expert-load imbalance); 0 when nothing was routed."""
    load = np.asarray(expert_load, dtype=np.float64)
    mean = load.mean()
    return float(load.std() / mean) if mean > 0 else 0.0
