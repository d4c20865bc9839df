"""expert_matched_average on hand-computed cases."""

import numpy as np
import pytest

from fedmoe.aggregation import SiteUpdate, expert_matched_average, load_coefficient_of_variation, weighted_mean


def expert_of(key):
    return int(key.split("/")[1]) if key.startswith("expert/") else None


GLOBAL = {
    "trunk": np.array([0.0, 0.0], dtype=np.float32),
    "router": np.array([[1.0, 1.0]], dtype=np.float32),
    "expert/0": np.array([10.0], dtype=np.float32),
    "expert/1": np.array([20.0], dtype=np.float32),
    "expert/2": np.array([0.1234567], dtype=np.float32),
}


def test_shared_tensors_are_weighted_by_num_examples():
    a = SiteUpdate({"trunk": np.array([1.0, 2.0], np.float32), "router": np.array([[0.0, 4.0]], np.float32)}, 1)
    b = SiteUpdate({"trunk": np.array([4.0, 8.0], np.float32), "router": np.array([[3.0, 1.0]], np.float32)}, 3)
    out = expert_matched_average(GLOBAL, [a, b], expert_of)
    # (1*1 + 3*4)/4 = 3.25, (1*2 + 3*8)/4 = 6.5
    np.testing.assert_allclose(out["trunk"], [3.25, 6.5])
    np.testing.assert_allclose(out["router"], [[2.25, 1.75]])
    assert out["trunk"].dtype == np.float32


def test_expert_in_one_reply_takes_that_value():
    a = SiteUpdate({"trunk": GLOBAL["trunk"], "expert/0": np.array([7.0], np.float32)}, 100, {0: 5.0})
    b = SiteUpdate({"trunk": GLOBAL["trunk"]}, 100)
    out = expert_matched_average(GLOBAL, [a, b], expert_of)
    np.testing.assert_array_equal(out["expert/0"], [7.0])


def test_expert_in_several_replies_weighted_by_routed_counts_not_examples():
    a = SiteUpdate({"expert/1": np.array([0.0], np.float32)}, 1000, {1: 1.0})
    b = SiteUpdate({"expert/1": np.array([8.0], np.float32)}, 1, {1: 3.0})
    out = expert_matched_average(GLOBAL, [a, b], expert_of)
    np.testing.assert_allclose(out["expert/1"], [6.0])  # (1*0 + 3*8) / 4


def test_expert_in_no_reply_is_bit_identical():
    a = SiteUpdate({"trunk": np.ones(2, np.float32), "expert/0": np.array([1.0], np.float32)}, 2, {0: 1.0})
    out = expert_matched_average(GLOBAL, [a], expert_of)
    assert out["expert/2"] is GLOBAL["expert/2"]
    assert out["expert/1"].tobytes() == GLOBAL["expert/1"].tobytes()


def test_zero_counts_fall_back_to_equal_weights():
    a = SiteUpdate({"expert/0": np.array([2.0], np.float32)}, 5, {0: 0.0})
    b = SiteUpdate({"expert/0": np.array([4.0], np.float32)}, 5, {0: 0.0})
    np.testing.assert_allclose(expert_matched_average(GLOBAL, [a, b], expert_of)["expert/0"], [3.0])


def test_no_updates_keeps_everything():
    out = expert_matched_average(GLOBAL, [], expert_of)
    assert all(out[k] is GLOBAL[k] for k in GLOBAL)


def test_weighted_mean_matches_numpy_average():
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(5)]
    w = rng.uniform(0.1, 2.0, size=5)
    np.testing.assert_allclose(weighted_mean(arrays, w), np.average(np.stack(arrays), axis=0, weights=w), rtol=1e-6)


@pytest.mark.parametrize("load,cv", [([5, 5, 5, 5], 0.0), ([0, 0, 0, 0], 0.0), ([2, 0], 1.0), ([1, 3], 0.5)])
def test_load_coefficient_of_variation(load, cv):
    assert load_coefficient_of_variation(np.array(load)) == pytest.approx(cv)
