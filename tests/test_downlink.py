"""Sparse downlink bookkeeping on hand-made cases (fedmoe.federation.downlink)."""

import numpy as np
import pytest

from fedmoe.federation.downlink import WHOLE_MODEL, CacheMiss, ModelVersions, complete


def arrays(**values):
    return {k: np.full(2, v, dtype=np.float32) for k, v in values.items()}


def test_unknown_node_gets_the_whole_model_then_only_what_changed():
    versions = ModelVersions(0)
    v0 = arrays(a=0, b=0, c=0)
    assert versions.delta(7, v0) == (WHOLE_MODEL, ["a", "b", "c"])
    versions.heard_from(7, 0)
    assert versions.delta(7, v0) == (0, [])
    v1 = {**v0, "a": np.ones(2, np.float32)}
    assert versions.record_update(v0, v1, 1) == ["a"]
    assert versions.delta(7, v1) == (0, ["a"])
    v2 = {**v1, "c": np.ones(2, np.float32)}
    versions.record_update(v1, v2, 2)
    assert versions.delta(7, v2) == (0, ["a", "c"])  # changed since version 0: a (at 1) and c (at 2)
    versions.heard_from(7, 1)
    assert versions.delta(7, v2) == (1, ["c"])


def test_versions_only_move_forward_and_a_miss_forgets_the_node():
    versions = ModelVersions(3)  # a run resumed after round 3
    versions.heard_from(1, 3)
    versions.heard_from(1, 2)  # a late reply about an older model
    assert versions.node_version[1] == 3
    versions.heard_from(1, 9)  # a version the server never had: ignored
    assert versions.node_version[1] == 3
    versions.forget(1)
    assert versions.delta(1, ["x"]) == (WHOLE_MODEL, ["x"])


def test_site_completes_a_sparse_message_from_a_copy_at_or_after_the_base():
    cached = arrays(a=0, b=0)
    merged = complete(arrays(a=1), 2, cached, 2)
    assert sorted(merged) == ["a", "b"] and merged["a"][0] == 1 and merged["b"] is cached["b"]
    assert complete(arrays(a=1), 2, cached, 3)["a"][0] == 1  # newer copy: the delta still covers it
    assert complete(arrays(a=5, b=5), WHOLE_MODEL, None, WHOLE_MODEL)["b"][0] == 5
    with pytest.raises(CacheMiss):
        complete(arrays(a=1), 2, cached, 1)  # copy older than the base: would miss changes
    with pytest.raises(CacheMiss):
        complete(arrays(a=1), 2, None, WHOLE_MODEL)  # restarted site without a copy


def test_a_cache_miss_says_what_the_site_holds():
    with pytest.raises(CacheMiss, match="^holds model version 2, the message completes version 3 onwards$") as miss:
        complete(arrays(a=1), 3, arrays(a=0), 2)
    assert miss.value.held == 2
    with pytest.raises(CacheMiss, match="^holds model version -1, the message completes version 0 onwards$") as miss:
        complete(arrays(a=1), 0, None, 5)
    assert miss.value.held == WHOLE_MODEL


def half_steps(delta):
    """Half the int8 quantisation step of each row of ``delta``, broadcastable against it."""
    rows = delta.reshape(len(delta) if delta.ndim > 1 else 1, -1)
    return (np.abs(rows).max(axis=1) / 127 / 2)[:, None]


def test_a_compressed_step_brings_a_site_to_the_servers_broadcast_model_bit_for_bit():
    from fedmoe.federation.downlink import CompressedBroadcast

    rng = np.random.default_rng(0)
    versions = ModelVersions(0)
    g0 = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32),
          "c": rng.normal(size=(2, 2)).astype(np.float32)}
    broadcast = CompressedBroadcast("int8")
    broadcast.advance(g0, versions)
    arrays, encoding = broadcast.message(WHOLE_MODEL, list(g0))
    assert encoding == "none" and all(np.array_equal(arrays[k], g0[k]) for k in g0)
    site = dict(arrays)
    g1 = {**g0, "a": g0["a"] + rng.normal(size=(3, 5)).astype(np.float32), "b": g0["b"] * 1.5}
    versions.record_update(g0, g1, 1)
    assert broadcast.stale(versions)
    broadcast.advance(g1, versions)
    step, encoding = broadcast.message(0, ["a", "b"])
    assert encoding == "int8" and set(step) == {"a", "b", "a.__row_scale__", "b.__row_scale__"}
    assert step["a"].dtype == np.int8 and step["b"].dtype == np.int8
    site = complete(step, 0, site, 0, encoding)
    assert all(np.array_equal(site[k], broadcast.model[k]) for k in g1)  # both ends decode alike
    assert np.array_equal(site["c"], g0["c"])  # untouched: not sent, unchanged
    for k in ("a", "b"):  # B is within half a quantisation step of the global model
        assert np.all(np.abs(g1[k] - site[k]).reshape(half_steps(g1[k]).shape[0], -1) <= half_steps(g1[k] - g0[k]) + 1e-6)
    # a node that missed the step gets B itself, float32, exactly
    arrays, encoding = broadcast.message(WHOLE_MODEL, list(g1))
    assert encoding == "none" and all(np.array_equal(arrays[k], broadcast.model[k]) for k in g1)
    # the next step of a tensor carries what the last one lost: it encodes g2 - B1, not g2 - g1
    b1 = dict(broadcast.model)
    g2 = {**g1, "a": g1["a"] + 1.0}
    versions.record_update(g1, g2, 2)
    broadcast.advance(g2, versions)
    step, _ = broadcast.message(1, ["a"])
    assert set(step) == {"a", "a.__row_scale__"}
    site = complete(step, 1, site, 1, "int8")
    assert np.all(np.abs(site["a"] - g2["a"]) <= half_steps(g2["a"] - b1["a"]) + 1e-6)
    with pytest.raises(CacheMiss):  # a step starts from exactly one version
        complete(step, 1, site, 2, "int8")


def test_a_derivable_initial_version_is_assumed_for_new_nodes_until_one_misses():
    versions = ModelVersions(0, derivable=0)
    v0 = arrays(a=0, b=0)
    assert versions.delta(4, v0) == (0, [])  # it rebuilds version 0 itself: nothing to send
    v1 = {**v0, "b": np.ones(2, np.float32)}
    versions.record_update(v0, v1, 1)
    assert versions.delta(4, v1) == (0, ["b"])
    versions.forget(4)  # it could not rebuild it
    assert versions.delta(4, v1) == (WHOLE_MODEL, ["a", "b"])
    versions.heard_from(4, 1)
    assert versions.delta(4, v1) == (1, [])
