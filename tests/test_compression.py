"""Compressed updates: int8, int4 and fp16 codecs against hand-computed bounds, error feedback that
loses nothing over rounds, malformed payloads rejected, and a real site's compressed reply
decoded by the server into its trained tensors."""

import zlib

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from clients.app import app as client_app
from fedmoe.federation import compression, wire
from fedmoe.federation.compression import ErrorFeedback, MalformedPayload, decode, encode
from fedmoe.config import RunConfig
from tests.sites import context, global_model, message, needs_fmnist, run_config, server_identity  # noqa: F401

RNG = np.random.default_rng(0)
UPDATE = {"w": RNG.normal(size=(5, 7)).astype(np.float32), "b": RNG.normal(size=7).astype(np.float32),
          "t": RNG.normal(size=(3, 2, 4)).astype(np.float32)}
ZEROS = {k: np.zeros_like(v) for k, v in UPDATE.items()}


@pytest.mark.parametrize("method,levels,dtype,w_shape", [("int8", 127, np.int8, (5, 7)), ("int4", 7, np.uint8, (5, 4))])
def test_integer_codes_round_each_value_to_within_half_its_rows_step(method, levels, dtype, w_shape):
    payload = encode(UPDATE, method)
    assert payload["w"].dtype == dtype and payload["w"].shape == w_shape and payload["w" + compression.SCALE].shape == (5,)
    assert payload["b" + compression.SCALE].shape == (1,) and payload["t" + compression.SCALE].shape == (3,)
    decoded = decode(payload, method, ZEROS)
    for key, u in UPDATE.items():
        rows = u.reshape(len(u), -1) if u.ndim > 1 else u.reshape(1, -1)
        step = np.abs(rows).max(axis=1) / levels  # each row's largest value maps to +-levels exactly
        error = np.abs(decoded[key] - u).reshape(rows.shape)
        assert np.all(error <= step[:, None] / 2 + 1e-6), key
        largest = np.abs(rows).argmax(axis=1)
        np.testing.assert_allclose(np.abs(decoded[key].reshape(rows.shape)[np.arange(len(rows)), largest]),
                                   np.abs(rows).max(axis=1), rtol=1e-6)


def test_int4_packs_two_offset_codes_per_byte_low_nibble_first():
    # row max 1: step 1/7; codes 7, -7, round(2.1) = 2 -> stored 15, 1, 10 and the pad 8
    payload = encode({"w": np.array([[1.0, -1.0, 0.3]], np.float32)}, "int4")
    assert payload["w"].tolist() == [[0x1F, 0x8A]]
    np.testing.assert_allclose(payload["w" + compression.SCALE], [1 / 7])
    np.testing.assert_allclose(decode(payload, "int4", {"w": np.zeros((1, 3), np.float32)})["w"], [[1, -1, 2 / 7]], rtol=1e-6)


def test_fp16_is_the_half_precision_update_and_an_all_zero_row_survives():
    decoded = decode(encode(UPDATE, "fp16"), "fp16", ZEROS)
    for key, u in UPDATE.items():
        np.testing.assert_array_equal(decoded[key], u.astype(np.float16).astype(np.float32))
    zero_row = {"w": np.zeros((2, 3), dtype=np.float32)}
    assert np.array_equal(decode(encode(zero_row, "int8"), "int8", {"w": np.ones((2, 3), np.float32)})["w"], np.ones((2, 3)))


def test_decoded_update_is_added_to_the_global_tensor():
    global_arrays = {k: np.full_like(v, 2.0) for k, v in UPDATE.items()}
    decoded = decode(encode(UPDATE, "fp16"), "fp16", global_arrays)
    np.testing.assert_allclose(decoded["w"], 2.0 + UPDATE["w"], atol=2e-3)


@pytest.mark.parametrize("method", ["int8", "int4", "fp16"])
def test_error_feedback_sends_the_whole_sum_of_updates_over_rounds(method):
    feedback = ErrorFeedback()
    received = {"w": np.zeros((4, 6), np.float32)}
    true_total = np.zeros((4, 6))
    sent_total = np.zeros((4, 6))
    for r in range(6):
        update = np.random.default_rng(r).normal(size=(4, 6)).astype(np.float32)
        true_total += update
        payload = feedback.compress({"w": received["w"] + update}, received, method)
        sent_total += decode(payload, method, {"w": np.zeros((4, 6), np.float32)})["w"]
        # what was sent plus what is still owed is exactly what was trained
        np.testing.assert_allclose(sent_total + feedback.residual["w"], true_total, atol=1e-5)
    if method in compression.LEVELS:  # a residual never exceeds one step of the row it was rounded in
        assert np.abs(feedback.residual["w"]).max() <= np.abs(true_total).max() / compression.LEVELS[method]
    else:
        assert np.abs(feedback.residual["w"]).max() <= 1e-2


def test_an_expert_not_trained_this_round_keeps_what_it_is_owed():
    feedback = ErrorFeedback({"expert_1": np.full((2, 2), 0.25, np.float32)})
    feedback.compress({"expert_0": np.ones((2, 2), np.float32)}, {"expert_0": np.zeros((2, 2), np.float32)}, "int8")
    np.testing.assert_array_equal(feedback.residual["expert_1"], np.full((2, 2), 0.25))


def bad(method, change):
    payload = encode(UPDATE, method)
    change(payload)
    return payload


@pytest.mark.parametrize("method,change,reason", [
    ("int8", lambda p: p.pop("w" + compression.SCALE), "int8 scales for ['w'] do not match"),
    ("int8", lambda p: p.__setitem__("w" + compression.SCALE, np.full(5, np.nan, np.float32)), "finite"),
    ("int8", lambda p: p.__setitem__("w" + compression.SCALE, -np.ones(5, np.float32)), ">= 0"),
    ("int8", lambda p: p.__setitem__("w" + compression.SCALE, np.ones(4, np.float32)), "5 finite"),
    ("int8", lambda p: p.__setitem__("w", p["w"].astype(np.int16)), "expected int8"),
    ("int8", lambda p: p.__setitem__("w", p["w"][:4]), "expected int8[5, 7]"),
    ("int8", lambda p: p.__setitem__("x", np.zeros(3, np.int8)), "scales"),
    ("int4", lambda p: p.__setitem__("w", np.zeros((5, 7), np.uint8)), "expected uint8[5, 4]"),
    ("int4", lambda p: p.__setitem__("w", p["w"].astype(np.int8)), "expected uint8"),
    ("int4", lambda p: p.__setitem__("w" + compression.SCALE, np.full(5, np.inf, np.float32)), "finite"),
    ("int4", lambda p: p.__setitem__("w" + compression.SCALE, np.ones(5, np.float16)), "float32"),
    ("fp16", lambda p: p.__setitem__("w", p["w"].astype(np.float32)), "expected float16"),
    ("fp16", lambda p: p.__setitem__("x", np.zeros(3, np.float16)), "unknown tensor 'x'"),
    ("fp16", lambda p: p.__setitem__("w" + compression.SCALE, np.ones(5, np.float32)), "no scales"),
])
def test_malformed_payloads_are_refused_with_the_reason(method, change, reason):
    with pytest.raises(MalformedPayload, match=reason.replace("[", r"\[").replace("]", r"\]")):
        decode(bad(method, change), method, ZEROS)


def test_an_unknown_code_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="must be one of fp16, int8, int4 here, got 'int3'"):
        encode(UPDATE, "int3")


@pytest.mark.parametrize("method,value_bytes", [("int8", 64 * 128), ("int4", 64 * 64)])
def test_an_integer_payload_is_its_codes_plus_one_float32_scale_per_row(method, value_bytes):
    update = {"w": RNG.normal(size=(64, 128)).astype(np.float32)}
    payload = encode(update, method)
    assert sum(v.nbytes for v in payload.values()) == value_bytes + 64 * 4


@pytest.mark.parametrize("method", ["int8", "int4", "fp16"])
def test_a_packed_payload_unpacks_to_the_same_arrays_whatever_order_it_was_built_in(method):
    payload = encode(UPDATE, method)
    packed = compression.pack(payload)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert np.array_equal(compression.pack(dict(reversed(list(payload.items())))), packed)
    unpacked = compression.unpack(packed, method, ["t", "w", "b"], ZEROS)
    assert set(unpacked) == set(payload)
    for name, value in payload.items():
        assert unpacked[name].dtype == value.dtype and np.array_equal(unpacked[name], value), name
    # tensor by tensor in key order (b, t, w), each tensor's codes before its scales
    order = ["b", "b" + compression.SCALE, "t", "t" + compression.SCALE, "w", "w" + compression.SCALE]
    raw = b"".join(payload[name].tobytes() for name in order if name in payload)
    assert zlib.decompress(packed.tobytes()) == raw


# int8 arrays of UPDATE: w 5x7 codes + 5 scales, b 7 + 1, t 3x2x4 + 3: 35 + 20 + 7 + 4 + 24 + 12 bytes
INT8_BYTES = 102
PACKED = compression.pack(encode(UPDATE, "int8"))


@pytest.mark.parametrize("packed,reason", [
    (compression.pack(encode({k: UPDATE[k] for k in "wt"}, "int8")), f"holds {INT8_BYTES - 11} bytes where the 6 arrays of its 3 tensors take {INT8_BYTES}"),
    (compression.pack(encode({**UPDATE, "x": UPDATE["b"]}, "int8")), f"holds more than {INT8_BYTES} bytes"),
    (np.concatenate([PACKED, np.zeros(3, np.uint8)]), f"holds more than {INT8_BYTES} bytes"),
    (PACKED[:-6], "cut short"),
    (PACKED[:-4], f"cut short: its deflate stream stops after {INT8_BYTES} bytes"),  # every byte there, not the checksum
    (np.frombuffer(zlib.compress(bytes(10**8)), np.uint8), f"holds more than {INT8_BYTES} bytes"),
    (np.arange(40, dtype=np.uint8), "not a deflate stream"),
    (PACKED.astype(np.int16), "must be uint8"),
    (PACKED.reshape(1, -1), "must be uint8"),
])
def test_a_packed_stream_of_other_than_the_expected_bytes_is_refused(packed, reason):
    with pytest.raises(MalformedPayload, match=reason):
        compression.unpack(packed, "int8", UPDATE, ZEROS)


@needs_fmnist
@pytest.mark.parametrize("method", ["int8", "int4", "fp16"])
def test_a_sites_compressed_reply_decodes_to_what_it_trained_and_the_next_one_pays_what_it_owed(tmp_path, method):
    base = {"num-server-rounds": 2, "max-examples-per-site": 200, "d-model": 16, "expert-hidden": 16, "dp": False,
            "seed": 2}
    plain = client_app(message(global_model(run_config(base)), 1, tmp_path), context(run_config(base), tmp_path / "a"))
    cfg = run_config(base, **{"update-compression": method})
    model = global_model(cfg)
    ctx = context(cfg, tmp_path / "b")
    reply = client_app(message(model, 1, tmp_path), ctx)
    assert not reply.has_error(), reply.error
    global_arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    num_experts = RunConfig.from_run_config(cfg).num_experts
    decoded = wire.decode_train_reply(reply.content, global_arrays, num_experts, compression=method)
    trained = wire.decode_train_reply(plain.content, global_arrays, num_experts)
    assert set(decoded.arrays) == set(trained.arrays)  # dp=false: the same training, bit for bit
    for key, value in trained.arrays.items():
        update = value - global_arrays[key]
        levels = {"int8": 127, "int4": 7}.get(method)
        tolerance = np.abs(update).max() / levels / 2 + 1e-6 if levels else np.abs(update).max() * 1e-3 + 1e-7
        assert np.abs(decoded.arrays[key] - value).max() <= tolerance, key
    packed = reply.content.array_records[wire.ARRAYS]
    assert list(packed) == [compression.PACKED]
    sent = zlib.decompress(wire.array_to_numpy(packed[compression.PACKED]).tobytes())
    shapes = [(len(v), v.size // len(v)) if v.ndim > 1 else (1, v.size) for v in trained.arrays.values()]
    expected = {"fp16": sum(2 * r * c for r, c in shapes), "int8": sum(r * c + 4 * r for r, c in shapes),
                "int4": sum(r * ((c + 1) // 2) + 4 * r for r, c in shapes)}[method]
    assert len(sent) == expected
    assert decoded.nbytes < trained.nbytes  # as received, headers and names included
    residual = wire.to_numpy(ctx.state["compression-residual"])
    for key, value in trained.arrays.items():  # what was not sent is owed, exactly
        np.testing.assert_allclose(decoded.arrays[key] - global_arrays[key] + residual[key],
                                   value - global_arrays[key], atol=1e-6)
    with pytest.raises(wire.InvalidReply, match=f"compressed update \\({method}\\)"):
        wire.decode_train_reply(plain.content, global_arrays, num_experts, compression=method)
    # a NaN inside the packed stream is found after unpacking: in a scale, or in an fp16 update
    payload = compression.unpack(wire.array_to_numpy(packed[compression.PACKED]), method, trained.arrays, global_arrays)
    name = min(trained.arrays) + ("" if method == "fp16" else compression.SCALE)
    payload[name] = np.full_like(payload[name], np.nan)
    poisoned = RecordDict({**reply.content, wire.ARRAYS: wire.to_record({compression.PACKED: compression.pack(payload)})})
    with pytest.raises(wire.InvalidReply, match="NaN or Inf" if method == "fp16" else "finite float32"):
        wire.decode_train_reply(poisoned, global_arrays, num_experts, compression=method)
    # the next round's reply carries what this one owed: decoded + new residual = trained + old residual
    plain_next = wire.decode_train_reply(client_app(message(model, 2, tmp_path), context(run_config(base), tmp_path / "a")).content,
                                         global_arrays, num_experts)
    reply_next = client_app(message(model, 2, tmp_path), ctx)
    decoded_next = wire.decode_train_reply(reply_next.content, global_arrays, num_experts, compression=method)
    residual_next = wire.to_numpy(ctx.state["compression-residual"])
    assert any(np.abs(residual[key]).max() > 0 for key in plain_next.arrays)
    for key, value in plain_next.arrays.items():
        np.testing.assert_allclose(decoded_next.arrays[key] - global_arrays[key] + residual_next[key],
                                   value - global_arrays[key] + residual[key], atol=1e-6)


@needs_fmnist
def test_a_compressed_downlink_keeps_server_and_site_on_one_model_and_untouched_experts_exact(tmp_path):
    """Three rounds of the strategy against the real ClientApp with int8 both ways: after every
    message the site holds the strategy's broadcast model bit for bit, steps are about a quarter
    of float32, the site's compressed update decodes against what it holds, and experts no site
    trained are bit-identical to the initial model in the global and the broadcast model."""
    from flwr.app import ConfigRecord

    from server.strategy import ExpertMatched
    from tests.test_strategy import Grid

    cfg = run_config({"num-server-rounds": 3, "max-examples-per-site": 200, "d-model": 16, "expert-hidden": 16,
                      "dp": False, "update-compression": "int8", "downlink-compression": "int8", "active-top-m": 1})
    model = global_model(cfg)
    initial = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    num_experts = RunConfig.from_run_config(cfg).num_experts
    s = ExpertMatched(num_experts=num_experts, min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1,
                      compression="int8", downlink_compression="int8")
    ctx = context(cfg, tmp_path / "site")
    arrays = wire.to_record(model.state_dict())
    trained = set()
    for r in (1, 2, 3):
        [msg] = s.configure_train(r, arrays, ConfigRecord({wire.RUN_DIR: str(tmp_path / "run")}), Grid([1]))
        encoding = msg.content[wire.CONFIG][wire.DOWNLINK_ENCODING]
        assert encoding == ("none" if r == 1 else "int8")
        if r > 1:
            changed = s.versions.delta(99, arrays.keys())[1]
            assert msg.content[wire.ARRAYS].count_bytes() < 0.35 * sum(initial[k].nbytes for k in changed)
        reply = client_app(msg, ctx)
        assert not reply.has_error(), reply.error
        held = wire.to_numpy(ctx.state["model-cache"])
        assert all(np.array_equal(held[k], s.broadcast.model[k]) for k in initial)
        decoded = wire.decode_train_reply(reply.content, s.broadcast.model, num_experts, compression="int8")
        trained |= set(decoded.active_experts)
        arrays, _ = s.aggregate_train(r, [reply])
        assert s.round_stats[r].replies == 1
        for k, v in decoded.arrays.items():  # one site: the new global tensors are its own, decoded against B
            np.testing.assert_allclose(wire.to_numpy(arrays)[k], v, rtol=0, atol=1e-7, err_msg=k)
    final = wire.to_numpy(arrays)
    untouched = [k for k in initial if wire.expert_id(k, num_experts) not in trained | {None}]
    assert untouched
    for k in untouched:
        assert final[k].tobytes() == initial[k].tobytes() and s.broadcast.model[k].tobytes() == initial[k].tobytes()


@needs_fmnist
def test_sites_rebuild_the_initial_model_from_the_run_config_and_a_wrong_digest_is_a_miss(tmp_path):
    """derive-initial-model: round 1 carries no tensor, only the initial model's digest; the real
    ClientApp rebuilds the model under the run's seed and trains from it. A site whose rebuilt
    model differs (another seed) answers model-cache-miss and gets the whole model next."""
    from flwr.app import ConfigRecord

    from fedmoe.data import tasks
    from fedmoe.results import state_sha256
    from server.strategy import ExpertMatched
    from tests.test_strategy import Grid

    shape = {"num-server-rounds": 2, "max-examples-per-site": 200, "d-model": 16, "expert-hidden": 16, "dp": False,
             "derive-initial-model": True}
    cfg = run_config(shape, seed=3)
    torch.manual_seed(3)  # the server's initial model, built by hand under the run's seed
    initial = tasks.build_model(RunConfig.from_run_config(cfg)).state_dict()
    num_experts = RunConfig.from_run_config(cfg).num_experts
    s = ExpertMatched(num_experts=num_experts, min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1,
                      initial_model_sha256=state_sha256(initial))
    arrays = wire.to_record(initial)
    run_dir = ConfigRecord({wire.RUN_DIR: str(tmp_path / "run")})
    [msg] = s.configure_train(1, arrays, run_dir, Grid([1]))
    config = msg.content[wire.CONFIG]
    assert config[wire.BASE_VERSION] == 0 and len(msg.content[wire.ARRAYS]) == 0
    assert config[wire.INITIAL_MODEL] == state_sha256(initial)
    ctx = context(cfg, tmp_path / "site")
    reply = client_app(msg, ctx)
    assert not reply.has_error(), reply.error
    held = wire.to_numpy(ctx.state["model-cache"])
    assert all(np.array_equal(held[k], v.numpy()) for k, v in initial.items())
    assert wire.decode_train_reply(reply.content, {k: v.numpy() for k, v in initial.items()}, num_experts).arrays

    other = context(run_config(shape, seed=4), tmp_path / "other")
    [msg] = s.configure_train(1, arrays, run_dir, Grid([2]))
    miss = client_app(msg, other)
    with pytest.raises(wire.ModelCacheMiss):
        wire.raise_for_status(miss.content)
    s.aggregate_train(1, [miss])
    assert s.round_stats[1].model_cache_misses == [2]
    [msg] = s.configure_train(2, arrays, run_dir, Grid([2]))
    assert msg.content[wire.CONFIG][wire.BASE_VERSION] == -1 and wire.INITIAL_MODEL not in msg.content[wire.CONFIG]
    assert len(msg.content[wire.ARRAYS]) == len(initial)
