"""Sparse downlink bookkeeping on hand-made cases (fedmoe.downlink)."""

import numpy as np
import pytest

from fedmoe.downlink import WHOLE_MODEL, CacheMiss, ModelVersions, complete


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
