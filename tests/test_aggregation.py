"""expert_matched_average on hand-computed cases."""

import numpy as np
import pytest

from fedmoe.federation.aggregation import RobustRules, SiteUpdate, expert_matched_average, load_coefficient_of_variation, weighted_mean


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


def test_robust_mean_weights_experts_by_counts_and_shared_tensors_by_examples():
    """The robust path (any rule switched on) combines with the same weights as plain averaging."""
    updates = [
        SiteUpdate({"trunk": np.array([1.0, 0.0], np.float32), "expert/1": np.array([2.0, 0.0], np.float32)}, 1, {1: 3.0}, site=0),
        SiteUpdate({"trunk": np.array([5.0, 0.0], np.float32), "expert/1": np.array([6.0, 4.0], np.float32)}, 3, {1: 1.0}, site=1),
    ]
    out, dropped = robust(updates, update_norm_bound=100.0)
    assert not dropped
    np.testing.assert_allclose(out["trunk"], [(1 * 1 + 3 * 5) / 4, 0.0], rtol=1e-6)  # by examples: 4.0
    np.testing.assert_allclose(out["expert/1"], [(3 * 2 + 1 * 6) / 4, (3 * 0 + 1 * 4) / 4], rtol=1e-6)  # by counts: 3, 1


def test_clipping_then_unequal_weights():
    out, _ = robust(expert_updates([[3, 4], [0.3, 0.4]], counts=[1, 3]), update_norm_bound=1.0)
    # (3, 4) -> (0.6, 0.8) with weight 1; (0.3, 0.4) with weight 3: (0.6 + 0.9) / 4, (0.8 + 1.2) / 4
    np.testing.assert_allclose(out["expert/1"], [0.375, 0.5], rtol=1e-6)


def test_outlier_dropped_then_the_rest_weighted_by_counts():
    out, dropped = robust(expert_updates([[1, 0], [2, 0], [1.5, 0], [60, 0]], counts=[1, 3, 4, 50]), outlier_mad=3.5)
    assert len(dropped) == 1 and dropped[0].startswith("site 3")
    np.testing.assert_allclose(out["expert/1"], [(1 * 1 + 3 * 2 + 4 * 1.5) / 8, 0], rtol=1e-6)


def test_zero_count_weights_fall_back_to_equal_in_the_robust_path():
    out, _ = robust(expert_updates([[2, 0], [4, 0]], counts=[0.0, 0.0]), update_norm_bound=100.0)
    np.testing.assert_allclose(out["expert/1"], [3.0, 0])


def test_trimmed_mean_of_few_contributors_keeps_the_middle():
    out, _ = robust(expert_updates([[1, 0], [2, 0], [9, 0]]), rule="trimmed-mean", trim_fraction=0.4)
    np.testing.assert_allclose(out["expert/1"], [2, 0])  # floor(0.4 * 3) = 1 cut from each end
    out, _ = robust(expert_updates([[1, 0], [3, 0]]), rule="trimmed-mean", trim_fraction=0.49)
    np.testing.assert_allclose(out["expert/1"], [2, 0])  # never cuts everything


# --- attacks against the rules: the undefended rule is hurt, the defence helps ------------------

def attacked_round(attack, scale, rules, seed=0):
    """Five sites train expert 1 and the trunk (honest updates: a common direction plus noise);
    site 0 sends what fedmoe.attacks makes of its honest update. Returns the distance of the
    aggregate to the mean of the four honest sites' updates, and the largest distance of an
    honest site's update to that mean."""
    import torch

    from fedmoe.attacks import hostile_update

    rng = np.random.default_rng(seed)
    direction = rng.normal(size=6)
    direction *= 2.0 / np.linalg.norm(direction)
    honest = [{"trunk": (direction + 0.3 * rng.normal(size=6)).astype(np.float32),
               "expert/1": (direction + 0.3 * rng.normal(size=6)).astype(np.float32)} for _ in range(5)]
    zero = {"trunk": np.zeros(6, np.float32), "expert/1": np.zeros(6, np.float32)}
    counts = np.array([0.0, 10.0])
    trained, claimed = hostile_update(attack, scale, {k: torch.as_tensor(v) for k, v in honest[0].items()},
                                      {k: torch.as_tensor(v) for k, v in zero.items()}, counts, ["expert/1"], 1)
    sites = [{k: v.numpy() for k, v in trained.items()}, *honest[1:]]
    weights = [claimed[1], *[10.0] * 4]
    updates = [SiteUpdate(arrays, 10, {1: w}, site=i) for i, (arrays, w) in enumerate(zip(sites, weights))]
    out = expert_matched_average(zero, updates, expert_of, rules)
    target = {k: np.mean([h[k] for h in honest[1:]], axis=0) for k in zero}
    spread = max(float(np.linalg.norm(h[k] - target[k])) for h in honest[1:] for k in zero)
    return max(float(np.linalg.norm(out[k] - target[k])) for k in zero), spread


@pytest.mark.parametrize("attack, scale, defence", [
    ("sign-flip", 4.0, RobustRules(outlier_mad=3.5, outlier_min_cosine=0.0)),
    ("sign-flip", 4.0, RobustRules(rule="median")),
    ("scale", 20.0, RobustRules(outlier_mad=3.5)),
    ("scale", 20.0, RobustRules(rule="trimmed-mean", trim_fraction=0.2)),
    ("backdoor", 5.0, RobustRules(update_norm_bound=2.5)),  # honest update norms are about 2
])
def test_the_undefended_mean_is_hurt_and_the_defence_helps(attack, scale, defence):
    undefended, spread = attacked_round(attack, scale, RobustRules())
    defended, _ = attacked_round(attack, scale, defence)
    # spread: the farthest an honest site's update lies from the honest mean
    assert undefended > 2 * spread  # the attack moved the model far off the honest mean
    assert defended < min(undefended / 3, spread)  # the defence took most of it back


# --- edges of the weights and of the robust rules (each pins one decision) ----------------------

def test_weights_summing_below_one_are_still_weights():
    np.testing.assert_allclose(weighted_mean([np.array([0.0]), np.array([4.0])], [0.2, 0.6]), [3.0])
    with pytest.raises(ValueError, match="^2 arrays but 3 weights$"):
        weighted_mean([np.zeros(1), np.zeros(1)], [1.0, 1.0, 1.0])


def test_expert_weights_below_one_missing_or_negative():
    a = SiteUpdate({"expert/0": np.array([0.0], np.float32)}, 1, {0: 0.25})
    b = SiteUpdate({"expert/0": np.array([4.0], np.float32)}, 1, {0: 0.75})
    np.testing.assert_allclose(expert_matched_average(GLOBAL, [a, b], expert_of)["expert/0"], [3.0])
    # a reply without a weight for an expert it sent, or with a negative one, weighs nothing
    c = SiteUpdate({"expert/0": np.array([100.0], np.float32)}, 1, {})
    d = SiteUpdate({"expert/0": np.array([100.0], np.float32)}, 1, {0: -5.0})
    np.testing.assert_allclose(expert_matched_average(GLOBAL, [a, b, c, d], expert_of)["expert/0"], [3.0])
    out = expert_matched_average(GLOBAL, [a, b, c, d], expert_of, RobustRules(update_norm_bound=1e6))
    np.testing.assert_allclose(out["expert/0"], [3.0], rtol=1e-6)


def test_robust_rules_work_on_updates_relative_to_a_nonzero_global_model():
    start = {**ZERO, "expert/1": np.array([10.0, -10.0], np.float32)}
    updates = [SiteUpdate({"expert/1": np.array(v, np.float32)}, 1, {1: 1.0}, site=i)
               for i, v in enumerate([[13.0, -6.0], [10.3, -9.6]])]  # updates (3, 4) and (0.3, 0.4)
    out = expert_matched_average(start, updates, expert_of, RobustRules(update_norm_bound=1.0))
    np.testing.assert_allclose(out["expert/1"], [10.45, -9.4], rtol=1e-6)  # 10 + (0.6 + 0.3) / 2, -10 + (0.8 + 0.4) / 2
    assert out["expert/1"].dtype == np.float32


def test_clipping_small_updates():
    out, _ = robust(expert_updates([[0.3, 0.4], [0.0, 0.0]]), update_norm_bound=0.25)
    np.testing.assert_allclose(out["expert/1"], [0.075, 0.1], rtol=1e-6)  # (0.15, 0.2) and 0, halved


def test_norm_outliers_are_reported_with_their_modified_z_score():
    _, dropped = robust(expert_updates([[1, 0], [2, 0], [1.5, 0], [60, 0]]), outlier_mad=3.5)
    # median 1.75, MAD median(|-0.75|, |0.25|, |-0.25|, |58.25|) = 0.5, z = 0.6745 * 58.25 / 0.5
    assert dropped == ["site 3: expert 1: update norm 60, median 1.75 (modified z-score 78.6 > 3.5)"]
    _, dropped = robust(expert_updates([[1, 0], [2, 0], [3, 0]]), outlier_mad=0.6745)  # z(3) = 0.6745: not above
    assert dropped == []
    _, dropped = robust(expert_updates([[1, 0], [2, 0], [3, 0]]), outlier_mad=0.5)  # a threshold below 1
    assert [d.split(":")[0] for d in dropped] == ["site 2"]


def test_a_zero_mad_still_flags_a_deviating_update():
    _, dropped = robust(expert_updates([[4, 0], [4, 0], [4, 0], [9, 0]]), outlier_mad=3.5)
    assert [d.split(":")[0] for d in dropped] == ["site 3"]


def test_direction_outliers_are_reported_with_their_cosine():
    shared = [SiteUpdate({"trunk": np.array(v, np.float32)}, 1, site=i) for i, v in enumerate([[1, 1], [1, 0.9], [-1, -1.1]])]
    out, dropped = robust(shared, outlier_min_cosine=0.0)
    # the median update is (1, 0.9); site 2's cosine to it: -(1 + 0.99) / (|(1, 1.1)| |(1, 0.9)|)
    cosine = -(1 + 0.99) / (np.hypot(1, 1.1) * np.hypot(1, 0.9))
    assert dropped == [f"site 2: shared tensors: cosine {cosine:.3f} to the median update < 0.0"]
    np.testing.assert_allclose(out["trunk"], [1.0, 0.95], rtol=1e-6)


def test_the_cosine_test_on_small_updates_and_at_its_boundary():
    _, dropped = robust(expert_updates([[0.01, 0.01], [0.01, 0.009], [-0.01, -0.011]]), outlier_min_cosine=0.0)
    assert [d.split(":")[0] for d in dropped] == ["site 2"]  # small norms are still directions
    _, dropped = robust(expert_updates([[0.01, 0.01], [0.01, 0.009], [0.012, 0.01]]), outlier_min_cosine=0.9)
    assert dropped == []  # aligned small updates have cosines near 1, not their tiny dot products
    _, dropped = robust(expert_updates([[1, 0], [1, 0], [0, 1]]), outlier_min_cosine=0.0)
    assert dropped == []  # cosine exactly 0 is not below 0
    _, dropped = robust(expert_updates([[1, 0], [-1, 0], [0, 0]]), outlier_min_cosine=0.5)
    assert dropped == []  # the median update is zero: no direction to compare with


def test_weights_below_one_in_the_robust_mean():
    out, _ = robust(expert_updates([[0, 0], [4, 0]], counts=[0.2, 0.6]), update_norm_bound=100.0)
    np.testing.assert_allclose(out["expert/1"], [3.0, 0], rtol=1e-6)


def test_trimmed_mean_never_cuts_every_value():
    out, _ = robust(expert_updates([[1, 0], [3, 0]]), rule="trimmed-mean", trim_fraction=0.5)
    np.testing.assert_allclose(out["expert/1"], [2, 0])
