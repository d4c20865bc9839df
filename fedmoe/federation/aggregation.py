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

Robust rules (``RobustRules``) work per unit u (the shared tensors, or one expert's tensors) on
the sites' updates d_iu = x_iu - x_u, flattened over the unit's tensors:
  outliers     with at least ``min_contributors`` updates, drop d_iu when its norm's modified
               z-score 0.6745 (|d_iu| - med_j |d_ju|) / MAD exceeds ``outlier_mad`` (a scaled
               update), or when cos(d_iu, coordinate-wise median of all d_ju) is below
               ``outlier_min_cosine`` (an update pointing elsewhere, e.g. a flipped sign)
  clipping     d_iu <- d_iu * min(1, B / |d_iu|) with B = ``update_norm_bound``
  combining    x_u <- x_u + mean_w(d_iu) ("mean", the weights above), or the coordinate-wise
               trimmed mean ("trimmed-mean": drop the floor(trim_fraction * m) largest and smallest
               values of each coordinate) or median ("median"), both unweighted
A unit whose result is not finite keeps its previous value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SiteUpdate:
    """One site's contribution to a round."""

    arrays: Mapping[str, np.ndarray]
    num_examples: float
    expert_weights: Mapping[int, float] = field(default_factory=dict)
    site: Any = None  # names the site in reports of dropped updates


AGGREGATION_RULES = ("mean", "trimmed-mean", "median")


@dataclass(frozen=True)
class RobustRules:
    """Per-unit defences (module doc); the defaults are plain expert-matched averaging."""

    rule: str = "mean"
    trim_fraction: float = 0.2
    update_norm_bound: float = 0.0  # 0: no clipping
    outlier_mad: float = 0.0  # 0: no norm outlier test
    outlier_min_cosine: float = -1.0  # -1: no direction test
    min_contributors: int = 3

    def __post_init__(self) -> None:
        if self.rule not in AGGREGATION_RULES:
            raise ValueError(f"aggregation must be one of {AGGREGATION_RULES}, got {self.rule!r}")

    @property
    def plain(self) -> bool:
        return (self.rule == "mean" and self.update_norm_bound <= 0 and self.outlier_mad <= 0
                and self.outlier_min_cosine <= -1)


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum_i w_i a_i / sum_i w_i in float64, cast back to the inputs' dtype; equal weights if all w_i are 0."""
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones_like(w)
    if len(w) != len(arrays):
        raise ValueError(f"{len(arrays)} arrays but {len(w)} weights")
    return weighted_sum(w / w.sum(), np.stack(arrays)).astype(arrays[0].dtype, copy=False)


def weighted_sum(w: np.ndarray, stacked: np.ndarray) -> np.ndarray:
    """sum_i w_i stacked[i] in float64, elementwise rather than a BLAS tensordot (whose threads
    made aggregation many times slower on busy cores)."""
    return (stacked * w.astype(np.float64).reshape(-1, *([1] * (stacked.ndim - 1)))).sum(axis=0)


def expert_matched_average(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[SiteUpdate],
    expert_of: Callable[[str], int | None],
    rules: RobustRules = RobustRules(),
    dropped: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """New global arrays from the previous ones and the round's site updates (see module doc).

    ``expert_of(key)`` names the expert a tensor belongs to, or None for shared tensors.
    Keys absent from every update keep the previous array object unchanged. Updates the robust
    rules drop are described in ``dropped``.
    """
    result = dict(global_arrays)
    units: dict[int | None, list[str]] = {}
    for key in global_arrays:
        units.setdefault(expert_of(key), []).append(key)
    def weights(unit: int | None, contributors: Sequence[SiteUpdate]) -> list[float]:
        if unit is None:
            return [u.num_examples for u in contributors]
        return [max(float(u.expert_weights.get(unit, 0.0)), 0.0) for u in contributors]

    for unit, keys in units.items():
        if rules.plain:
            for key in keys:
                contributors = [u for u in updates if key in u.arrays]
                if contributors:
                    result[key] = weighted_mean([u.arrays[key] for u in contributors], weights(unit, contributors))
            continue
        contributors = [u for u in updates if all(k in u.arrays for k in keys)]  # validated replies send whole units
        if contributors:
            label = "shared tensors" if unit is None else f"expert {unit}"
            result.update(robust_unit_update(global_arrays, keys, contributors, weights(unit, contributors), rules,
                                             label, dropped if dropped is not None else []))
    return result


def robust_unit_update(
    global_arrays: Mapping[str, np.ndarray], keys: Sequence[str], contributors: Sequence[SiteUpdate],
    weights: Sequence[float], rules: RobustRules, label: str, dropped: list[str],
) -> dict[str, np.ndarray]:
    """The unit's new tensors under ``rules`` (module doc); appends what it dropped to ``dropped``."""
    deltas = {k: np.stack([u.arrays[k].astype(np.float64) - global_arrays[k] for u in contributors]) for k in keys}
    m = len(contributors)
    norms = np.sqrt(sum((d.reshape(m, -1) ** 2).sum(axis=1) for d in deltas.values()))
    keep = np.ones(m, dtype=bool)
    if m >= rules.min_contributors:
        if rules.outlier_mad > 0:
            median = np.median(norms)
            mad = np.median(np.abs(norms - median))
            z = 0.6745 * (norms - median) / max(mad, 1e-12 * max(median, 1e-12))
            for i in np.flatnonzero(z > rules.outlier_mad):
                keep[i] = False
                dropped.append(f"site {contributors[i].site}: {label}: update norm {norms[i]:.4g}, "
                               f"median {median:.4g} (modified z-score {z[i]:.1f} > {rules.outlier_mad})")
        if rules.outlier_min_cosine > -1:
            medians = {k: np.median(d, axis=0) for k, d in deltas.items()}
            ref_norm = np.sqrt(sum((v ** 2).sum() for v in medians.values()))
            dots = sum((deltas[k].reshape(m, -1) @ medians[k].ravel()) for k in keys)
            cosine = dots / np.maximum(norms * ref_norm, 1e-30)
            for i in np.flatnonzero(keep & (cosine < rules.outlier_min_cosine) & (ref_norm > 0)):
                keep[i] = False
                dropped.append(f"site {contributors[i].site}: {label}: cosine {cosine[i]:.3f} to the median "
                               f"update < {rules.outlier_min_cosine}")
    if not keep.any():
        return {}
    scale = np.ones(m)
    if rules.update_norm_bound > 0:
        scale = np.minimum(1.0, rules.update_norm_bound / np.maximum(norms, 1e-30))
    w = np.asarray(weights, dtype=np.float64)[keep]
    w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))
    out = {}
    for key, d in deltas.items():
        d = d[keep] * scale[keep].reshape(-1, *([1] * (d.ndim - 1)))
        if rules.rule == "median":
            step = np.median(d, axis=0)
        elif rules.rule == "trimmed-mean":
            cut = int(rules.trim_fraction * len(d))
            cut = min(cut, (len(d) - 1) // 2)
            step = np.sort(d, axis=0)[cut : len(d) - cut].mean(axis=0)
        else:
            step = weighted_sum(w, d)
        out[key] = (global_arrays[key] + step).astype(global_arrays[key].dtype)
    if not all(np.all(np.isfinite(v)) for v in out.values()):
        dropped.append(f"{label}: non-finite result, kept the previous value")
        return {}
    return out


def load_coefficient_of_variation(expert_load: np.ndarray) -> float:
    """std / mean of tokens per expert (FLEX-MoE's expert-load imbalance); 0 when nothing was routed."""
    load = np.asarray(expert_load, dtype=np.float64)
    mean = load.mean()
    return float(load.std() / mean) if mean > 0 else 0.0
