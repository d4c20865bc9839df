"""Random malformed and hostile replies thrown at the strategies: a round never raises, every reply
is either aggregated or accounted for, and the global model never takes a non-finite value."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmoe.federation import wire
from fedmoe.federation.aggregation import RobustRules
from fedmoe.config import RunConfig
from fedmoe.models.moe import MoEClassifier
from fedmoe.training import freeze_inactive_experts, trained_state
from server.strategy import ExpertMatched, FedAvgMoE

CFG = RunConfig.from_run_config({"d-model": 8, "expert-hidden": 8, "num-experts": 4})
torch.manual_seed(0)
MODEL = MoEClassifier(CFG.model_config())
GLOBAL = {k: v.numpy().copy() for k, v in MODEL.state_dict().items()}
MUTATIONS = ("valid", "nan", "inf", "wrong-shape", "wrong-dtype", "unknown-key", "missing-tensor",
             "expert-out-of-range", "duplicate-expert", "negative-count", "nan-count", "short-counts",
             "missing-metric", "zero-examples", "huge-update", "error-reply", "budget-exhausted",
             "cache-miss", "empty", "scaled-expert")


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def reply(site: int, mutation: str, active: list[int], scale: float) -> Message:
    freeze_inactive_experts(MODEL, active)
    state = {k: v + 0.01 * (site + 1) for k, v in trained_state(MODEL).items()}
    counts = np.arange(1.0, CFG.num_experts + 1) * (site + 1)  # unequal weights, so a wrong weighting shows
    instruction = Message(RecordDict({wire.CONFIG: ConfigRecord({"server-round": 1})}),
                          dst_node_id=site + 1, message_type=MessageType.TRAIN)
    if mutation == "error-reply":
        return Message(Error(code=0, reason="ClientApp crashed"), reply_to=instruction)
    if mutation == "budget-exhausted":
        return Message(wire.encode_budget_exhausted(site, 8.0, 8.5), reply_to=instruction)
    if mutation == "cache-miss":
        return Message(wire.encode_model_cache_miss(site, -1), reply_to=instruction)
    if mutation == "empty":
        return Message(RecordDict(), reply_to=instruction)
    key = f"moe_layers.0.experts.w_in_{active[0]}"
    if mutation == "nan":
        state["head.weight"][0, 0] = float("nan")
    elif mutation == "inf":
        state[key][0, 0] = float("inf")
    elif mutation == "wrong-shape":
        state["head.bias"] = torch.zeros(11)
    elif mutation == "wrong-dtype":
        state["head.bias"] = state["head.bias"].double()
    elif mutation == "unknown-key":
        state["backdoor.weight"] = torch.zeros(3)
    elif mutation == "missing-tensor":
        del state["norm.weight"]
    elif mutation in ("huge-update", "scaled-expert"):
        state[key] = torch.as_tensor(GLOBAL[key]) + scale * (state[key] - torch.as_tensor(GLOBAL[key]))
    content = wire.encode_train_reply(state, site, num_examples(site), active, counts, 0.5)
    metrics = content.metric_records[wire.METRICS]
    if mutation == "expert-out-of-range":
        metrics[wire.ACTIVE_EXPERTS] = [*active, CFG.num_experts + 3]
    elif mutation == "duplicate-expert":
        metrics[wire.ACTIVE_EXPERTS] = [active[0], active[0]]
    elif mutation == "negative-count":
        metrics[wire.EXPERT_COUNTS] = [-1.0] * CFG.num_experts
    elif mutation == "nan-count":
        metrics[wire.EXPERT_COUNTS] = [float("nan")] * CFG.num_experts
    elif mutation == "short-counts":
        metrics[wire.EXPERT_COUNTS] = [1.0]
    elif mutation == "missing-metric":
        content[wire.METRICS] = MetricRecord({wire.NUM_EXAMPLES: 100})
    elif mutation == "zero-examples":
        metrics[wire.NUM_EXAMPLES] = 0
    return Message(content, reply_to=instruction)


def num_examples(site: int) -> int:
    return 100 + 37 * site


def expected_average(messages):
    """Expert-matched averaging of the given (valid) replies, computed here: shared tensors by
    examples, each expert over the replies holding it by its routed counts, the rest unchanged."""
    out = {}
    for key, value in GLOBAL.items():
        expert = wire.expert_id(key, CFG.num_experts)
        total, weight = np.zeros(value.shape), 0.0
        for msg in messages:
            metrics = msg.content.metric_records[wire.METRICS]
            arrays = msg.content.array_records[wire.ARRAYS]
            if key in arrays:
                w = metrics[wire.NUM_EXAMPLES] if expert is None else metrics[wire.EXPERT_COUNTS][expert]
                total += w * arrays[key].numpy().astype(np.float64)
                weight += w
        out[key] = total / weight if weight else value
    return out


def aggregate(strategy, replies):
    strategy.global_arrays = dict(GLOBAL)
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays, strategy.round_stats[1]


site_replies = st.lists(
    st.tuples(st.sampled_from(MUTATIONS), st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True),
              st.sampled_from([1e3, 1e6, 1e30, 1e38])),
    min_size=1, max_size=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(site_replies, st.sampled_from(["mean", "trimmed-mean", "median"]), st.booleans())
def test_expert_matched_survives_any_mix_of_replies(replies, rule, defended):
    rules = RobustRules(rule=rule, update_norm_bound=1.0 if defended else 0.0, outlier_mad=3.5 if defended else 0.0,
                        outlier_min_cosine=0.0 if defended else -1.0)
    strategy = ExpertMatched(num_experts=CFG.num_experts, rules=rules, max_update_norm=1e4 if defended else 0.0)
    messages = [reply(i, m, sorted(a), s) for i, (m, a, s) in enumerate(replies)]
    arrays, stats = aggregate(strategy, messages)
    statuses = sum(m in ("budget-exhausted", "cache-miss") for m, _, _ in replies)
    assert stats.replies + len(stats.rejected_replies) + statuses == len(replies)
    malformed = {m for m, _, _ in replies} - {"valid", "budget-exhausted", "cache-miss", "huge-update", "scaled-expert"}
    assert stats.replies <= len(replies) - sum(m in malformed for m, _, _ in replies)
    if arrays is None:
        assert stats.replies == 0
        return
    for key, value in wire.to_numpy(arrays).items():
        assert value.shape == GLOBAL[key].shape and np.all(np.isfinite(value)), key
    if rule == "mean" and not defended:  # every well-formed reply is averaged with its weights
        accepted = [msg for msg, (m, _, _) in zip(messages, replies) if m in ("valid", "huge-update", "scaled-expert")]
        assert stats.replies == len(accepted)
        got = wire.to_numpy(arrays)
        for key, value in expected_average(accepted).items():
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(value).max())), err_msg=key)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=5))
def test_fedavg_survives_any_mix_of_replies(mutations):
    strategy = FedAvgMoE(num_experts=CFG.num_experts)
    messages = [reply(i, m, list(range(CFG.num_experts)), 1e6) for i, m in enumerate(mutations)]
    arrays, stats = aggregate(strategy, messages)
    if arrays is not None:
        assert all(np.all(np.isfinite(v)) for v in wire.to_numpy(arrays).values())


def test_max_update_norm_rejects_a_scaled_reply_with_its_reason():
    strategy = ExpertMatched(num_experts=CFG.num_experts, max_update_norm=10.0)
    _, stats = aggregate(strategy, [reply(0, "valid", [1], 1), reply(1, "huge-update", [1], 1e6)])
    assert stats.replies == 1
    assert len(stats.rejected_replies) == 1 and "exceeds max-update-norm" in stats.rejected_replies[0]


def test_aggregate_train_weights_shared_tensors_by_examples_and_experts_by_counts():
    """Three sites with overlapping active sets and unequal examples and counts, end to end
    through the strategy: compared with the weighted means computed by hand below."""
    messages = [reply(0, "valid", [0, 1], 1), reply(1, "valid", [1, 2], 1), reply(2, "valid", [1], 1)]
    arrays, stats = aggregate(ExpertMatched(num_experts=CFG.num_experts), messages)
    got = wire.to_numpy(arrays)
    assert stats.replies == 3
    # site i sends x + 0.01 (i + 1) for every tensor it trained; examples 100, 137, 174; counts c_ie = (e + 1)(i + 1)
    key = "head.bias"  # shared: (100 * .01 + 137 * .02 + 174 * .03) / 411
    np.testing.assert_allclose(got[key], GLOBAL[key] + (100 * .01 + 137 * .02 + 174 * .03) / 411, rtol=1e-5)
    key = "moe_layers.0.experts.w_in_1"  # sites 0, 1, 2 with counts 2, 4, 6
    np.testing.assert_allclose(got[key], GLOBAL[key] + (2 * .01 + 4 * .02 + 6 * .03) / 12, rtol=1e-5)
    key = "moe_layers.0.experts.b_out_2"  # site 1 only
    np.testing.assert_allclose(got[key], GLOBAL[key] + .02, rtol=1e-5)
    key = "moe_layers.0.experts.w_out_0"  # site 0 only
    np.testing.assert_allclose(got[key], GLOBAL[key] + .01, rtol=1e-5)
    key = "moe_layers.0.experts.w_in_3"  # nobody: bit-identical
    assert got[key].tobytes() == GLOBAL[key].tobytes()
    assert stats.site_num_examples == {"0": 100, "1": 137, "2": 174}
    assert stats.active_experts == {"0": [0, 1], "1": [1, 2], "2": [1]}
    assert stats.uplink_bytes == sum(stats.site_uplink_bytes.values()) > 0
    # train loss (dp=false replies carry it) weighted by examples
    assert stats.train_loss == pytest.approx(0.5)


def test_fedavg_averages_whole_models_by_examples():
    messages = [reply(i, "valid", list(range(CFG.num_experts)), 1) for i in range(2)]
    arrays, _ = aggregate(FedAvgMoE(num_experts=CFG.num_experts), messages)
    key = "moe_layers.0.experts.w_in_3"
    np.testing.assert_allclose(wire.to_numpy(arrays)[key], GLOBAL[key] + (100 * .01 + 137 * .02) / 237, rtol=1e-5)
