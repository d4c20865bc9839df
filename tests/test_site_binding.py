"""A reply counts only from the node bound to the site it names (fedmoe.federation.site_binding), in the
strategy too: a node claiming another site's id is rejected and its update never averaged."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedmoe.federation import wire
from fedmoe.federation.site_binding import SiteBinding, read_registry
from tests.test_strategy import evaluate_reply, holding, strategy, task_identity  # noqa: F401 (fixture)
from tests.test_strategy_robustness import GLOBAL, reply


def test_first_use_binds_and_then_holds_both_ways():
    binding = SiteBinding()
    assert binding.check(11, "0") is None and binding.check(22, "1") is None
    assert binding.check(11, "0") is None  # again, same node: fine
    assert "bound to node 11" in binding.check(33, "0")  # a newcomer claiming a taken site
    assert "bound to site 0" in binding.check(11, "2")  # a bound node claiming a second site
    assert binding.check(33, "2") is None  # a newcomer with a free site is bound


def test_a_registry_fixes_the_map_and_admits_no_one_else():
    binding = SiteBinding({"0": 11, "1": 22})
    assert binding.check(22, "1") is None and binding.check(11, "0") is None
    assert "does not list" in binding.check(33, "2")
    assert binding.check(11, "1") == "node 11 is bound to site 0 but claims site 1"
    assert binding.check(33, "1") == "node 33 claims site 1, which is bound to node 22"
    with pytest.raises(ValueError, match="one node id is given for two sites"):
        SiteBinding({"0": 11, "1": 11})


def test_registry_file(tmp_path):
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"0": 11, "1": "22"}))
    assert read_registry(path) == {"0": 11, "1": 22}
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="'site-registry'"):
        read_registry(path)


def claimed_by(node: int, honest: Message) -> Message:
    """``honest``'s content (a site's reply, naming that site) sent by another node."""
    instruction = Message(RecordDict({wire.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=node,
                          message_type=MessageType.TRAIN)
    return Message(honest.content, reply_to=instruction)


@pytest.mark.parametrize("registry", [None, {"0": 1, "1": 2, "2": 3}])
def test_strategy_rejects_a_node_that_claims_another_sites_id(registry):
    s = strategy(site_binding=SiteBinding(registry))
    s.global_arrays = dict(GLOBAL)
    # round 1: nodes 1, 2 and 3 speak for sites 0, 1 and 2 (node = site + 1 in these replies)
    s.aggregate_train(1, [holding(reply(site, "valid", [site], 1)) for site in range(3)])
    assert s.round_stats[1].replies == 3 and not s.round_stats[1].rejected_replies
    # round 2: node 3 sends site 0's update, naming site 0; node 1 stays silent
    liar = claimed_by(3, holding(reply(0, "valid", [3], 5.0)))
    arrays, _ = s.aggregate_train(2, [liar, holding(reply(1, "valid", [1], 1))])
    stats = s.round_stats[2]
    assert stats.replies == 1 and stats.rejected_replies == ["node 3 is bound to site 2 but claims site 0"]
    assert set(stats.site_update_norm) == {"1"} and "0" not in stats.site_num_examples
    expected = strategy()
    expected.global_arrays = dict(GLOBAL)
    honest_only, _ = expected.aggregate_train(2, [holding(reply(1, "valid", [1], 1))])
    for key in GLOBAL:  # the liar's update changed nothing
        np.testing.assert_array_equal(wire.to_numpy(arrays)[key], wire.to_numpy(honest_only)[key])


def test_an_evaluation_from_the_wrong_node_is_left_out():
    s = strategy()
    s.global_arrays = dict(GLOBAL)
    s.aggregate_train(1, [holding(reply(site, "valid", [site], 1)) for site in range(2)])
    metrics = s.aggregate_evaluate(1, [evaluate_reply(1, 0, 10, 0.9, 0.1), evaluate_reply(2, 0, 90, 0.1, 2.0)])
    assert metrics["accuracy"] == pytest.approx(0.9) and s.round_stats[1].site_accuracy == {"0": 0.9}
    assert s.round_stats[1].rejected_replies == ["node 2 is bound to site 1 but claims site 0"]


def test_with_a_registry_only_registered_nodes_are_sent_the_model():
    from tests.test_strategy import Grid, record

    s = strategy(site_binding=SiteBinding({"0": 1, "1": 2}))
    messages = list(s.configure_train(1, record(), ConfigRecord(), Grid([1, 2, 99])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2] and s.sampled[1] == [m.metadata.dst_node_id for m in messages]
    evaluations = list(s.configure_evaluate(1, record(), ConfigRecord(), Grid([1, 2, 99])))
    assert sorted(m.metadata.dst_node_id for m in evaluations) == [1, 2]
    assert len(list(strategy().configure_train(1, record(), ConfigRecord(), Grid([1, 2, 99])))) == 3
