import numpy as np
import pytest

from fedmoe.federation.selection import select_active_experts


def test_threshold_and_top_m():
    counts = np.array([50, 30, 15, 5, 0, 0, 0, 0])
    assert select_active_experts(counts, 8, min_share=0.1, top_m=0) == [0, 1, 2]
    assert select_active_experts(counts, 8, min_share=0.1, top_m=2) == [0, 1]
    assert select_active_experts(counts, 8, min_share=0.0, top_m=0) == [0, 1, 2, 3]


def test_most_used_expert_always_active():
    assert select_active_experts(np.array([1, 1, 1, 2]), 4, min_share=0.9, top_m=0) == [3]
    assert select_active_experts(np.zeros(4), 4, min_share=0.5, top_m=0) == [0]


def test_per_layer_global_ids():
    counts = np.array([0, 9, 1, 0, 7, 0, 0, 3])  # two layers of four experts
    assert select_active_experts(counts, 4, min_share=0.2, top_m=1) == [1, 4]


def test_rejects_ragged_counts():
    with pytest.raises(ValueError):
        select_active_experts(np.ones(5), 4, 0.1, 1)


def test_boundaries_of_the_share_and_of_a_single_token():
    # shares 0.25, 0.25, 0.5: an expert at exactly the threshold is active
    assert select_active_experts(np.array([1, 1, 2, 0]), 4, min_share=0.25, top_m=0) == [0, 1, 2]
    # an expert one token routed to is used; one with none is not, whatever the threshold
    assert select_active_experts(np.array([2, 1, 1, 0]), 4, min_share=0.0, top_m=0) == [0, 1, 2]
    # ties break towards the lower id
    assert select_active_experts(np.array([1, 5, 5, 5]), 4, min_share=0.0, top_m=2) == [1, 2]


def test_counts_must_be_a_flat_vector():
    with pytest.raises(ValueError, match=r"^counts must be a flat vector of layers x 4, got \(2, 4\)$"):
        select_active_experts(np.ones((2, 4)), 4, 0.1, 1)
    with pytest.raises(ValueError, match=r"got \(4, 4\)$"):
        select_active_experts(np.ones((4, 4)), 4, 0.1, 1)  # as many rows as experts: still not flat


def test_released_counts_below_one_token_are_shares_too():
    """Noised counts are real numbers: a layer whose counts sum to less than one token still
    selects by share."""
    assert select_active_experts(np.array([0.3, 0.5, 0.2, 0.0]), 4, min_share=0.25, top_m=0) == [0, 1]
