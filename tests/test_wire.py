"""Pack/unpack round trip and validation of train replies."""

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from fedmoe.federation import wire
from fedmoe.models.moe import MoEClassifier, MoEConfig
from fedmoe.training import freeze_inactive_experts, trained_state

CFG = MoEConfig(d_model=8, expert_hidden=8, num_experts=4, top_k=2, num_moe_layers=2)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MoEClassifier(CFG)


def global_arrays(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def reply(model, active, **metric_overrides):
    freeze_inactive_experts(model, active)
    content = wire.encode_train_reply(trained_state(model), 3, 100, active, np.arange(8.0), 0.5)
    for k, v in metric_overrides.items():
        content.metric_records[wire.METRICS][k] = v
    return content


def test_expert_ids_are_global_over_layers():
    assert wire.expert_id("moe_layers.0.experts.w_in_3", 4) == 3
    assert wire.expert_id("moe_layers.1.experts.b_out_2", 4) == 6
    assert wire.expert_id("moe_layers.1.router.weight", 4) is None
    assert wire.expert_id("head.weight", 4) is None


def test_round_trip_is_exact(model):
    state = model.state_dict()
    back = wire.to_state_dict(wire.to_record(state))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_decoded_reply_holds_exactly_shared_and_active_tensors(model):
    decoded = wire.decode_train_reply(reply(model, [1, 6]), global_arrays(model), 4)
    experts = {wire.expert_id(k, 4) for k in decoded.arrays} - {None}
    assert experts == {1, 6}
    shared = {k for k in model.state_dict() if wire.expert_id(k, 4) is None}
    assert shared <= decoded.arrays.keys()
    assert decoded.site == 3 and decoded.num_examples == 100 and decoded.active_experts == [1, 6]
    assert decoded.nbytes < wire.to_record(model.state_dict()).count_bytes()
    assert decoded.nbytes == reply(model, [1, 6]).metric_records[wire.METRICS][wire.SENT_BYTES]


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda c: c.array_records["arrays"].__setitem__("bogus", c.array_records["arrays"]["head.bias"]), "unknown tensor"),
        (lambda c: c.array_records["arrays"].__setitem__("head.bias", wire.to_record({"x": torch.zeros(3)})["x"]), "expected"),
        (lambda c: c.array_records["arrays"].__setitem__("head.bias", wire.to_record({"x": torch.full((10,), float("nan"))})["x"]), "NaN"),
        (lambda c: c.array_records["arrays"].__setitem__("head.bias", wire.to_record({"x": torch.zeros(10, dtype=torch.float64)})["x"]), "expected"),
        (lambda c: c.array_records["arrays"].__delitem__("moe_layers.0.experts.w_in_1"), "missing"),
        (lambda c: c.metric_records["metrics"].__setitem__(wire.ACTIVE_EXPERTS, [1, 6, 9]), "outside"),
        (lambda c: c.metric_records["metrics"].__setitem__(wire.ACTIVE_EXPERTS, [1]), "not active"),
        (lambda c: c.metric_records["metrics"].__setitem__(wire.EXPERT_COUNTS, [1.0] * 7), "counts"),
        (lambda c: c.metric_records["metrics"].__setitem__(wire.EXPERT_COUNTS, [-1.0] * 8), "counts"),
        (lambda c: c.metric_records["metrics"].__setitem__(wire.NUM_EXAMPLES, 0), "positive"),
        (lambda c: c.metric_records["metrics"].__delitem__(wire.EXPERT_COUNTS), "missing"),
        (lambda c: c.metric_records["metrics"].__setitem__(wire.TRAIN_LOSS, float("nan")), "finite"),
        (lambda c: c.metric_records["metrics"].__setitem__(wire.EPSILON, -0.5), "epsilon"),
        (lambda c: c.metric_records["metrics"].__setitem__(wire.EPSILON, float("nan")), "epsilon"),
    ],
)
def test_malformed_replies_are_rejected_with_a_reason(model, mutate, reason):
    content = reply(model, [1, 6])
    mutate(content)
    with pytest.raises(wire.InvalidReply, match=reason):
        wire.decode_train_reply(content, global_arrays(model), 4)


def test_reply_without_records_is_rejected(model):
    with pytest.raises(wire.InvalidReply):
        wire.decode_train_reply(RecordDict({"metrics": MetricRecord({"a": 1})}), global_arrays(model), 4)


def test_evaluate_reply_round_trip():
    assert wire.decode_evaluate_reply(wire.encode_evaluate_reply(2, 50, 0.75, 0.6)) == wire.EvaluateReply(2, 50, 0.75, 0.6)
    assert wire.decode_evaluate_reply(wire.encode_evaluate_reply(2, 50, 0.75, 0.6, 2.5)).bits_per_char == 2.5
    with pytest.raises(wire.InvalidReply):
        wire.decode_evaluate_reply(wire.encode_evaluate_reply(2, 50, 1.5, 0.6))


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4), np.full((), 2.5, np.float32), np.zeros((0, 5), np.float64),
    np.arange(6, dtype=np.int64), np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
    np.array([1.0, np.nan], dtype=">f8"),
])
def test_fast_array_decoding_equals_flowers(array):
    from flwr.app import Array

    flower = Array(array)
    fast = wire.array_to_numpy(flower)
    assert fast.dtype == flower.numpy().dtype and fast.shape == flower.numpy().shape
    np.testing.assert_array_equal(fast, flower.numpy())


def test_release_violations_name_unclassified_and_not_private_fields(model):
    content = reply(model, [1, 6])  # carries a training loss: not private
    assert wire.release_violations(content, dp=False) == []
    assert wire.release_violations(content, dp=True) == [
        "'metrics/train-loss' is not private (loss on private training examples; sent only with dp=false) and is not sent under DP"]
    del content.metric_records[wire.METRICS][wire.TRAIN_LOSS]
    assert wire.release_violations(content, dp=True) == []
    content.metric_records[wire.METRICS]["gradient-norm"] = 1.0
    assert wire.release_violations(content, dp=False) == ["'metrics/gradient-norm' has no release class (fedmoe.federation.wire.RELEASES)"]
    evaluation = wire.encode_evaluate_reply(2, 50, 0.75, 0.6, 2.5)
    problems = wire.release_violations(evaluation, dp=True)
    assert len(problems) == 3 and all(p.endswith("is not sent under DP unless dp-site-evaluation=true") for p in problems)
    assert wire.release_violations(evaluation, dp=True, opted_in=frozenset({"dp-site-evaluation"})) == []
    status = wire.encode_budget_exhausted(1, 7.5, 8.5)
    assert wire.release_violations(wire.stamp_model_version(status, 3), dp=True) == []
    assert wire.release_of(wire.ARRAYS, "any.tensor", True).kind == wire.CHARGED
    assert wire.release_of(wire.METRICS, "any.tensor", False) is None


def test_status_replies_round_trip(model):
    exhausted = wire.encode_budget_exhausted(4, 7.5, 8.5)
    with pytest.raises(wire.BudgetExhausted) as raised:
        wire.decode_train_reply(exhausted, global_arrays(model), 4)
    assert (raised.value.site, raised.value.epsilon) == (4, 7.5) and "site 4 stopped at epsilon 7.500" in str(raised.value)
    assert exhausted.config_records[wire.STATUS]["projected-epsilon"] == 8.5
    miss = wire.stamp_model_version(wire.encode_model_cache_miss(2, 5), 5)
    assert wire.held_model_version(miss) == 5
    with pytest.raises(wire.ModelCacheMiss) as raised:
        wire.decode_evaluate_reply(miss)
    assert (raised.value.site, raised.value.held) == (2, 5)
    assert wire.held_model_version(wire.stamp_model_version(reply(model, [1]), 7)) == 7
    assert wire.held_model_version(reply(model, [1])) is None


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_fast_decoding_parses_every_npy_header_version_itself(monkeypatch, version):
    """The fast path must not hand C-order numeric arrays to Flower's np.load parser."""
    import io

    from flwr.app import Array

    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version)
    flower = Array(dtype=str(array.dtype), shape=array.shape, stype="numpy.ndarray", data=buffer.getvalue())
    monkeypatch.setattr(Array, "numpy", lambda self: pytest.fail("fell back to np.load"))
    np.testing.assert_array_equal(wire.array_to_numpy(flower), array)


def test_a_truncated_payload_is_not_read_by_the_fast_path():
    import io

    from flwr.app import Array

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.arange(4, dtype=np.float32))
    data = buffer.getvalue()[:-4]  # one float missing
    with pytest.raises(ValueError):
        wire.array_to_numpy(Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=data))


def test_status_records_without_details_still_name_what_happened():
    from flwr.app import ConfigRecord

    bare = RecordDict({wire.STATUS: ConfigRecord({wire.STATUS: wire.BUDGET_EXHAUSTED})})
    with pytest.raises(wire.BudgetExhausted) as raised:
        wire.raise_for_status(bare)
    assert raised.value.site == -1 and np.isnan(raised.value.epsilon)
    bare = RecordDict({wire.STATUS: ConfigRecord({wire.STATUS: wire.MODEL_CACHE_MISS})})
    with pytest.raises(wire.ModelCacheMiss, match="^site -1 holds model version -1: cannot complete a sparse downlink message$") as miss:
        wire.raise_for_status(bare)
    assert (miss.value.site, miss.value.held) == (-1, -1)


def test_validation_boundaries(model):
    arrays = global_arrays(model)
    assert wire.decode_train_reply(reply(model, [1], **{wire.NUM_EXAMPLES: 1}), arrays, 4).num_examples == 1
    with pytest.raises(wire.InvalidReply, match=r"^'active-experts' \[1, 8\] has duplicates or ids outside \[0, 8\)$"):
        wire.decode_train_reply(reply(model, [1], **{wire.ACTIVE_EXPERTS: [1, 8]}), arrays, 4)
    with pytest.raises(wire.InvalidReply, match="^'active-experts' must be a list of ints$"):
        wire.decode_train_reply(reply(model, [1], **{wire.ACTIVE_EXPERTS: 3}), arrays, 4)
    with pytest.raises(wire.InvalidReply, match="^reply lacks the 'arrays' ArrayRecord or the 'metrics' MetricRecord$"):
        wire.decode_train_reply(RecordDict({wire.ARRAYS: wire.to_record({"head.bias": torch.zeros(10)})}), arrays, 4)
    # without a bound, any update norm passes; a bound below 1 is a bound; a norm at the bound passes
    far = reply(model, [1])
    far.array_records[wire.ARRAYS]["head.bias"] = wire.to_record({"x": torch.full((10,), 5.0)})["x"]
    norm = wire.decode_train_reply(far, arrays, 4).update_norm
    assert norm > 10
    with pytest.raises(wire.InvalidReply, match=r"exceeds max-update-norm 0\.5$"):
        wire.decode_train_reply(far, arrays, 4, max_update_norm=0.5)
    assert wire.decode_train_reply(far, arrays, 4, max_update_norm=norm).update_norm == norm
    # epsilon 0 and below 1 are epsilons; without a privacy record there is no ledger
    for epsilon in (0.0, 0.5):
        decoded = wire.decode_train_reply(reply(model, [1], **{wire.EPSILON: epsilon}), arrays, 4)
        assert decoded.epsilon == epsilon and decoded.ledger_json is None


def test_the_missing_and_extra_tensors_are_named(model):
    content = reply(model, [1, 6])
    for key in [k for k in content.array_records[wire.ARRAYS].keys() if k.endswith(("_1", "_6"))]:
        del content.array_records[wire.ARRAYS][key]
    with pytest.raises(wire.InvalidReply) as raised:
        wire.decode_train_reply(content, global_arrays(model), 4)
    assert str(raised.value) == ("tensors do not match the active experts [1, 6]: missing ['moe_layers.0.experts.b_in_1', "
                                 "'moe_layers.0.experts.b_out_1', 'moe_layers.0.experts.w_in_1'], not active []")


def test_a_dp_reply_carries_its_epsilon_and_ledger(model):
    from fedmoe.privacy import PrivacyLedger

    ledger = PrivacyLedger(site=3, target_epsilon=8.0, delta=1e-5, noise_multiplier=1.0, count_noise_multiplier=20.0,
                           sample_rate=0.1, num_examples=100, history=[(1.0, 0.1, 10)])
    freeze_inactive_experts(model, [1])
    content = wire.encode_train_reply(trained_state(model), 3, 100, [1], np.arange(8.0), None, ledger)
    decoded = wire.decode_train_reply(content, global_arrays(model), 4)
    assert decoded.epsilon == pytest.approx(ledger.epsilon()) and decoded.ledger_json == ledger.to_json()
    assert decoded.train_loss is None


def test_evaluate_reply_boundaries():
    assert wire.decode_evaluate_reply(wire.encode_evaluate_reply(2, 1, 0.0, 0.6)).accuracy == 0.0
    assert wire.decode_evaluate_reply(wire.encode_evaluate_reply(2, 1, 1.0, 0.6, 0.0)).bits_per_char == 0.0
    with pytest.raises(wire.InvalidReply, match="^evaluate metrics out of range: n=0 accuracy=0.5 loss=0.6$"):
        wire.decode_evaluate_reply(wire.encode_evaluate_reply(2, 0, 0.5, 0.6))
    with pytest.raises(wire.InvalidReply, match="^'bits-per-char' must be finite and >= 0, got -0.5$"):
        wire.decode_evaluate_reply(wire.encode_evaluate_reply(2, 3, 0.5, 0.6, -0.5))
    with pytest.raises(wire.InvalidReply, match="bits-per-char"):
        wire.decode_evaluate_reply(wire.encode_evaluate_reply(2, 3, 0.5, 0.6, float("inf")))
    incomplete = RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 3, wire.SITE: 1, wire.EVAL_ACCURACY: 0.5})})
    with pytest.raises(wire.InvalidReply, match="^evaluate reply lacks metrics$"):
        wire.decode_evaluate_reply(incomplete)


def test_at_most_three_tensors_of_an_inactive_expert_are_named(model):
    content = reply(model, [1, 6])
    content.metric_records[wire.METRICS][wire.ACTIVE_EXPERTS] = [1]  # expert 6's four tensors are not active
    with pytest.raises(wire.InvalidReply) as raised:
        wire.decode_train_reply(content, global_arrays(model), 4)
    assert str(raised.value) == ("tensors do not match the active experts [1]: missing [], not active "
                                 "['moe_layers.1.experts.b_in_2', 'moe_layers.1.experts.b_out_2', 'moe_layers.1.experts.w_in_2']")


def test_a_personal_part_in_a_reply_is_named(model):
    content = reply(model, [1])
    with pytest.raises(wire.InvalidReply) as raised:
        wire.decode_train_reply(content, global_arrays(model), 4, personal=frozenset({"head.bias"}))
    assert str(raised.value) == "tensor 'head.bias' is a personal part (personalize): sites keep it"
