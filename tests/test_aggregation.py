"""expert_matched_average on hand-computed cases."""

import numpy as np
import pytest

from fedmoe.aggregation import RobustRules, SiteUpdate, expert_matched_average, load_coefficient_of_variation, weighted_mean


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


# --- robust rules on hand-computed cases ---------------------------------------------------------

ZERO = {"trunk": np.zeros(2, np.float32), "expert/1": np.zeros(2, np.float32), "expert/2": np.ones(1, np.float32)}


def expert_updates(values, counts=None):
    """Sites sending the trunk unchanged and expert 1 at the given values."""
    counts = counts or [1.0] * len(values)
    return [SiteUpdate({"trunk": ZERO["trunk"], "expert/1": np.asarray(v, np.float32)}, 10, {1: c}, site=i)
            for i, (v, c) in enumerate(zip(values, counts))]


def robust(updates, **rules):
    dropped = []
    out = expert_matched_average(ZERO, updates, expert_of, RobustRules(**rules), dropped)
    return out, dropped


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    out, _ = robust(expert_updates([[1, -1], [2, -2], [3, -3], [4, -4], [100, -100]]), rule="trimmed-mean", trim_fraction=0.2)
    np.testing.assert_allclose(out["expert/1"], [3, -3])  # mean of 2, 3, 4


def test_median_ignores_one_scaled_update():
    out, _ = robust(expert_updates([[1, 0], [2, 0], [100, 0]]), rule="median")
    np.testing.assert_allclose(out["expert/1"], [2, 0])


def test_update_norm_bound_clips_each_site_before_the_weighted_mean():
    out, _ = robust(expert_updates([[3, 4], [0.3, 0.4]], counts=[1, 1]), update_norm_bound=1.0)
    # (3, 4) has norm 5 -> (0.6, 0.8); (0.3, 0.4) stays; mean (0.45, 0.6)
    np.testing.assert_allclose(out["expert/1"], [0.45, 0.6], rtol=1e-6)


def test_norm_outlier_is_dropped_and_reported():
    out, dropped = robust(expert_updates([[1, 0], [1.1, 0], [0.9, 0], [50, 0]]), outlier_mad=3.5)
    np.testing.assert_allclose(out["expert/1"], [1.0, 0], rtol=1e-6)
    assert len(dropped) == 1 and dropped[0].startswith("site 3: expert 1: update norm 50")


def test_direction_outlier_is_dropped():
    out, dropped = robust(expert_updates([[1, 1], [1.1, 0.9], [-5, -5]]), outlier_min_cosine=0.0)
    np.testing.assert_allclose(out["expert/1"], [1.05, 0.95], rtol=1e-6)
    assert dropped and "site 2: expert 1: cosine" in dropped[0]


def test_outlier_tests_need_enough_contributors():
    out, dropped = robust(expert_updates([[1, 0], [50, 0]]), outlier_mad=3.5, min_contributors=3)
    assert not dropped
    np.testing.assert_allclose(out["expert/1"], [25.5, 0])


def test_robust_rules_keep_untouched_experts_and_never_go_non_finite():
    updates = expert_updates([[np.nan, 0], [1, 0], [2, 0]])
    out, dropped = robust(updates, rule="mean", update_norm_bound=10.0)
    assert out["expert/2"] is ZERO["expert/2"]
    np.testing.assert_array_equal(out["expert/1"], ZERO["expert/1"])  # NaN would have spread: unit kept
    assert any("non-finite" in d for d in dropped)


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="aggregation"):
        RobustRules(rule="krum")
