"""The strategies' bookkeeping on hand-made rounds: what each node is sent (sparse downlink), what
each reply records (versions, lost nodes, budgets, ledgers, load), how site evaluations combine."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedmoe.federation import wire
from fedmoe.federation.downlink import WHOLE_MODEL
from server.strategy import ExpertMatched, FedAvgMoE
from tests.test_strategy_robustness import CFG, GLOBAL, reply


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


class Grid:
    """The part of Flower's Grid the strategies use: the connected nodes."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def strategy(cls=ExpertMatched, **kw):
    return cls(num_experts=CFG.num_experts, min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1, **kw)


def record():
    return wire.to_record({k: np.array(v) for k, v in GLOBAL.items()})


def evaluate_reply(node, site, n, accuracy, loss, bits=None, version=0):
    instruction = Message(RecordDict({wire.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=node,
                          message_type=MessageType.EVALUATE)
    content = wire.stamp_model_version(wire.encode_evaluate_reply(site, n, accuracy, loss, bits), version)
    return Message(content, reply_to=instruction)


def holding(msg, version=0):
    """The reply as a site sends it: saying which model version it holds."""
    wire.stamp_model_version(msg.content, version)
    return msg


def test_first_messages_carry_the_whole_model_then_only_what_changed():
    s = strategy()
    arrays = record()
    messages = list(s.configure_train(1, arrays, ConfigRecord({wire.RUN_DIR: "/r"}), Grid([1, 2])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2] and s.sampled[1] == [m.metadata.dst_node_id for m in messages]
    full = arrays.count_bytes()
    for m in messages:
        config = m.content[wire.CONFIG]
        assert config[wire.BASE_VERSION] == WHOLE_MODEL and config[wire.MODEL_VERSION] == 0 and config[wire.RUN_DIR] == "/r"
        assert config["server-round"] == 1 and m.content[wire.ARRAYS].count_bytes() == full
    assert s.round_stats[1].downlink_bytes == 2 * full
    # node 1 (site 0) replies holding version 0; the round changes expert 1 and the shared tensors only
    new_arrays, _ = s.aggregate_train(1, [holding(reply(0, "valid", [1], 1))])
    changed = {k for k in GLOBAL if not np.array_equal(wire.to_numpy(new_arrays)[k], GLOBAL[k])}
    assert changed == {k for k in GLOBAL if wire.expert_id(k, CFG.num_experts) in (None, 1)}
    messages = list(s.configure_train(2, new_arrays, ConfigRecord(), Grid([1, 2])))
    to = {m.metadata.dst_node_id: m for m in messages}
    assert set(to[1].content[wire.ARRAYS].keys()) == changed and to[1].content[wire.CONFIG][wire.BASE_VERSION] == 0
    assert to[1].content[wire.CONFIG][wire.MODEL_VERSION] == 1
    assert set(to[2].content[wire.ARRAYS].keys()) == set(GLOBAL)  # never replied: the whole model again
    assert s.round_stats[2].downlink_bytes == sum(m.content[wire.ARRAYS].count_bytes() for m in messages)
    assert s.round_stats[1].lost_nodes == [2]  # sampled, never replied
    assert set(s.round_stats[1].server_seconds) == {"configure-train", "aggregate-train"}
    assert all(v > 0 for v in s.round_stats[1].server_seconds.values())


def test_without_sparse_downlink_every_message_is_the_whole_model():
    s = strategy(sparse_downlink=False)
    s.versions.heard_from(1, 0)
    messages = list(s.configure_evaluate(1, record(), ConfigRecord(), Grid([1])))
    assert set(messages[0].content[wire.ARRAYS].keys()) == set(GLOBAL)
    assert messages[0].content[wire.CONFIG][wire.BASE_VERSION] == WHOLE_MODEL


def test_a_cache_miss_is_recorded_and_the_node_gets_the_whole_model_next():
    s = strategy()
    s.versions.heard_from(1, 0)
    s.global_arrays = dict(GLOBAL)
    miss = reply(0, "cache-miss", [1], 1)
    arrays, _ = s.aggregate_train(1, [miss])
    assert arrays is None and s.round_stats[1].model_cache_misses == [1] and s.round_stats[1].rejected_replies == []
    assert s.versions.delta(1, GLOBAL) == (-1, list(GLOBAL))  # the whole model


def test_round_statistics_lost_nodes_budgets_and_ledgers():
    s = strategy(round_offset=4)
    s.global_arrays = dict(GLOBAL)
    s.sampled[5] = [1, 2, 3, 4]
    ok = reply(0, "valid", [1, 2], 1)
    ok.content[wire.PRIVACY] = ConfigRecord({"ledger": '{"site": 0}'})
    ok.content.metric_records[wire.METRICS][wire.EPSILON] = 2.5
    second = reply(1, "valid", [2], 1)
    exhausted = reply(2, "budget-exhausted", [1], 1)
    replies = [holding(ok), holding(second), holding(exhausted)]
    _, metrics = s.aggregate_train(1, replies)  # Strategy.start counts from 1: round 5 of the run
    stats = s.round_stats[5]
    assert stats.lost_nodes == [4] and stats.replies == 2
    assert stats.budget_exhausted == {"2": 8.0} and stats.site_epsilon == {"0": 2.5}
    assert s.ledgers == {"0": '{"site": 0}'}
    # routed load: site i claims (e + 1)(i + 1) tokens for expert e: [1, 2, 3, 4] + [2, 4, 6, 8]
    assert stats.expert_load == [3.0, 6.0, 9.0, 12.0]
    load = np.array([3.0, 6.0, 9.0, 12.0])
    assert stats.expert_load_cv == pytest.approx(load.std() / load.mean())
    assert metrics["expert-load-cv"] == pytest.approx(stats.expert_load_cv)
    assert metrics["uplink-bytes"] == stats.uplink_bytes == sum(stats.site_uplink_bytes.values())
    assert metrics["rejected-replies"] == 0
    assert stats.site_update_norm["1"] > 0
    assert s.versions.node_version == {1: 0, 2: 0, 3: 0}


def test_an_error_reply_is_logged_as_rejected():
    s = strategy()
    s.global_arrays = dict(GLOBAL)
    instruction = Message(RecordDict({wire.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=3, message_type=MessageType.TRAIN)
    crashed = Message(Error(code=0, reason="ClientApp crashed"), reply_to=instruction)
    arrays, metrics = s.aggregate_train(1, [crashed])
    assert arrays is None and metrics is None
    assert s.round_stats[1].rejected_replies == ["node 3: error reply: ClientApp crashed"]


def test_site_evaluations_combine_weighted_by_examples():
    s = strategy()
    replies = [evaluate_reply(11, 0, 100, 0.5, 1.0, bits=3.0),
               evaluate_reply(12, 1, 300, 0.9, 0.2, version=2)]
    metrics = s.aggregate_evaluate(1, replies)
    assert metrics["accuracy"] == pytest.approx((100 * 0.5 + 300 * 0.9) / 400)
    assert metrics["loss"] == pytest.approx((100 * 1.0 + 300 * 0.2) / 400)
    stats = s.round_stats[1]
    assert stats.site_accuracy == {"0": 0.5, "1": 0.9} and stats.site_loss == {"0": 1.0, "1": 0.2}
    assert stats.site_bits_per_char == {"0": 3.0}
    assert s.versions.node_version == {11: 0}  # version 2 is not a version the server made yet


def test_invalid_or_failed_evaluations_are_left_out():
    s = strategy()
    bad = evaluate_reply(12, 1, 300, 1.5, 0.2)
    instruction = Message(RecordDict({wire.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=13, message_type=MessageType.EVALUATE)
    crashed = Message(Error(code=0, reason="boom"), reply_to=instruction)
    miss = Message(wire.encode_model_cache_miss(2, -1), reply_to=instruction)
    assert s.aggregate_evaluate(1, [bad, crashed, miss]) is None
    metrics = s.aggregate_evaluate(2, [bad, evaluate_reply(11, 0, 10, 0.25, 2.0)])
    assert metrics["accuracy"] == 0.25 and s.round_stats[2].site_accuracy == {"0": 0.25}


def test_fedavg_moe_keeps_the_same_records():
    s = strategy(FedAvgMoE)
    s.global_arrays = dict(GLOBAL)
    replies = [reply(i, "valid", list(range(CFG.num_experts)), 1) for i in range(2)]
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None and s.round_stats[1].replies == 2
    assert s.round_stats[1].active_experts == {"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}
    assert metrics["train-loss"] == pytest.approx(0.5)


def test_a_reply_without_a_training_loss_leaves_it_out_of_the_metrics():
    s = strategy()
    s.global_arrays = dict(GLOBAL)
    private = reply(0, "valid", [1], 1)
    del private.content.metric_records[wire.METRICS][wire.TRAIN_LOSS]
    _, metrics = s.aggregate_train(1, [private])
    assert "train-loss" not in metrics and np.isnan(s.round_stats[1].train_loss)


def test_a_resumed_run_counts_rounds_from_its_checkpoint():
    s = strategy(round_offset=3)
    arrays = record()
    train = list(s.configure_train(1, arrays, ConfigRecord(), Grid([1])))
    evaluate = list(s.configure_evaluate(1, arrays, ConfigRecord(), Grid([1])))
    assert train[0].content[wire.CONFIG]["server-round"] == 4 and set(s.round_stats) == {4}
    # a round's downlink is what its train and its evaluate messages carried
    assert s.round_stats[4].downlink_bytes == 2 * arrays.count_bytes()
    assert evaluate[0].content[wire.CONFIG][wire.MODEL_VERSION] == 3
    s.aggregate_evaluate(1, [evaluate_reply(1, 0, 10, 0.5, 1.0)])
    assert s.round_stats[4].site_accuracy == {"0": 0.5}


def test_one_bad_reply_does_not_stop_the_others_being_read():
    s = strategy()
    s.global_arrays = dict(GLOBAL)
    instruction = Message(RecordDict({wire.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=9, message_type=MessageType.TRAIN)
    crashed = Message(Error(code=0, reason="boom"), reply_to=instruction)
    replies = [crashed, reply(0, "cache-miss", [1], 1), reply(1, "budget-exhausted", [1], 1), reply(2, "valid", [1], 1)]
    arrays, _ = s.aggregate_train(1, replies)
    stats = s.round_stats[1]
    assert arrays is not None and stats.replies == 1 and stats.active_experts == {"2": [1]}
    assert stats.site_expert_counts == {"2": [3.0, 6.0, 9.0, 12.0]}
    ev_instruction = Message(RecordDict({wire.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=9,
                             message_type=MessageType.EVALUATE)
    evaluations = [Message(Error(code=0, reason="boom"), reply_to=ev_instruction),
                   Message(wire.encode_model_cache_miss(3, -1), reply_to=ev_instruction),
                   evaluate_reply(11, 0, 10, 0.25, 2.0)]
    assert s.aggregate_evaluate(1, evaluations)["accuracy"] == 0.25


def test_what_the_robust_rules_drop_is_recorded_in_its_round():
    from fedmoe.federation.aggregation import RobustRules

    s = strategy(rules=RobustRules(outlier_mad=3.5, min_contributors=3))
    s.global_arrays = dict(GLOBAL)
    replies = [reply(i, "valid", [1], 1) for i in range(3)] + [reply(3, "scaled-expert", [1], 1e4)]
    s.aggregate_train(1, replies)
    dropped = s.round_stats[1].dropped_updates
    assert len(dropped) == 1 and dropped[0].startswith("site 3: expert 1: update norm")


def test_expert_load_imbalance_is_the_mean_over_moe_layers():
    import torch

    from fedmoe.models.moe import MoEClassifier, MoEConfig
    from fedmoe.training import freeze_inactive_experts, trained_state

    torch.manual_seed(0)
    model = MoEClassifier(MoEConfig(d_model=8, expert_hidden=8, num_experts=2, top_k=1, num_moe_layers=2))
    s = ExpertMatched(num_experts=2)
    s.global_arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    freeze_inactive_experts(model, [0, 2])
    instruction = Message(RecordDict({wire.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=1, message_type=MessageType.TRAIN)
    content = wire.encode_train_reply(trained_state(model), 0, 10, [0, 2], np.array([1.0, 3.0, 2.0, 2.0]), None)
    s.aggregate_train(1, [Message(content, reply_to=instruction)])
    stats = s.round_stats[1]
    assert stats.expert_load == [1.0, 3.0, 2.0, 2.0]
    assert stats.expert_load_cv == pytest.approx((0.5 + 0.0) / 2)  # layer 0: std 1 / mean 2; layer 1: balanced


def test_a_fresh_run_loads_an_empty_state_and_personal_parts_are_refused():
    s = strategy(personal=frozenset({"head.weight"}))
    s.load_state({})  # what the ServerApp passes a run that resumes nothing
    assert s.ledgers == {}
    s.global_arrays = dict(GLOBAL)
    arrays, _ = s.aggregate_train(1, [reply(0, "valid", [1], 1)])  # every reply carries the head
    assert s.round_stats[1].rejected_replies == [
        "node 1: tensor 'head.weight' is a personal part (personalize): sites keep it"]
    assert s.round_stats[1].replies == 0


@pytest.mark.parametrize("cls", [ExpertMatched, FedAvgMoE])
def test_the_new_model_does_not_depend_on_the_order_replies_arrive_in(cls):
    """Sites finish in any order; float sums do not commute bit for bit, so replies are taken in site order."""
    replies = [reply(site, "valid", [1, site] if cls is ExpertMatched else [0, 1, 2, 3], 1) for site in range(3)]
    models = []
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        s = strategy(cls)
        s.global_arrays = dict(GLOBAL)
        arrays, _ = s.aggregate_train(1, [replies[i] for i in order])
        models.append(wire.to_numpy(arrays))
    for other in models[1:]:
        assert all(np.array_equal(models[0][k], other[k]) for k in models[0])


@pytest.mark.parametrize("method", ["fp16", "int8", "int4"])
def test_fedavg_moe_averages_the_tensors_compressed_replies_stand_for(method):
    """The FedAvg baseline with update-compression: the new model is FedAvg of the trained tensors
    the payloads decode to, as if the sites had sent those tensors uncompressed."""
    from fedmoe.federation import compression

    everything = list(range(CFG.num_experts))
    plain, compressed = [], []
    for site in range(3):
        original = reply(site, "valid", everything, 1)
        trained = wire.to_numpy(original.content.array_records[wire.ARRAYS])
        payload = compression.encode({k: (v - GLOBAL[k]).astype(np.float32) for k, v in trained.items()}, method)
        stands_for = compression.decode(payload, method, GLOBAL)
        for arrays, into in ((stands_for, plain), ({compression.PACKED: compression.pack(payload)}, compressed)):
            content = RecordDict({**original.content, wire.ARRAYS: wire.to_record(arrays)})
            into.append(Message(content, reply_to=Message(RecordDict(), dst_node_id=site + 1,
                                                          message_type=MessageType.TRAIN)))
    results = []
    for replies, codec in ((plain, "none"), (compressed, method)):
        s = strategy(FedAvgMoE, compression=codec)
        s.global_arrays = dict(GLOBAL)
        arrays, _ = s.aggregate_train(1, replies)
        assert s.round_stats[1].replies == 3
        results.append(wire.to_numpy(arrays))
    assert set(results[0]) == set(results[1]) == set(GLOBAL)
    for key in GLOBAL:
        np.testing.assert_array_equal(results[1][key], results[0][key], err_msg=key)
