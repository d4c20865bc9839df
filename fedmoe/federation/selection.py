"""Which experts a site trains this round (its active set)."""

from __future__ import annotations

import numpy as np


def select_active_experts(
    counts: np.ndarray, num_experts: int, min_share: float, top_m: int
) -> list[int]:
    """Global expert ids a site trains, chosen per MoE layer from its routed token counts.

    counts: [layers * num_experts] tokens the site's data routed to each expert. In each layer an
    expert is active when its share of the layer's tokens is at least ``min_share``; when
    ``top_m`` > 0 only the ``top_m`` most used of those are kept. The most used expert of a
    layer is always active, so every layer trains something. Ties break towards the lower id.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or len(counts) % num_experts:
        raise ValueError(f"counts must be a flat vector of layers x {num_experts}, got {counts.shape}")
    active: list[int] = []
    for layer, layer_counts in enumerate(counts.reshape(-1, num_experts)):
        total = layer_counts.sum()
        order = np.argsort(-layer_counts, kind="stable")
        share = layer_counts / total if total > 0 else np.zeros_like(layer_counts)
        chosen = [int(e) for e in order if share[e] >= min_share and layer_counts[e] > 0]
        if top_m > 0:
            chosen = chosen[:top_m]
        if not chosen:
            chosen = [int(order[0])]
        active.extend(sorted(layer * num_experts + e for e in chosen))
    return active
