"""Server optimizers (fedmoe.federation.server_optimizers) on hand-computed steps; untouched tensors stay
bit-identical and their moments still; through the strategy and a checkpoint."""

import math

import numpy as np
import pytest
import torch

from fedmoe.federation import wire
from fedmoe.federation.server_optimizers import ServerOptimizer
from server.strategy import ExpertMatched
from tests.test_strategy import strategy
from tests.test_strategy_robustness import CFG, GLOBAL, reply, task_identity  # noqa: F401

X = {"a": np.array([1.0, -2.0], np.float32), "b": np.array([5.0], np.float32)}


def averaged(**deltas):
    return {k: (X[k] + np.float32(deltas.get(k, 0.0))).astype(np.float32) for k in X}


def test_fedavgm_with_unit_rate_and_no_momentum_is_plain_averaging():
    opt = ServerOptimizer("fedavgm", learning_rate=1.0, beta1=0.0)
    out = opt.step(X, averaged(a=0.5), ["a"])
    np.testing.assert_array_equal(out["a"], X["a"] + np.float32(0.5))


def test_fedavgm_accumulates_momentum():
    opt = ServerOptimizer("fedavgm", learning_rate=0.5, beta1=0.9)
    first = opt.step(X, averaged(a=2.0), ["a"])  # m = 2, x + 0.5 * 2
    np.testing.assert_allclose(first["a"], X["a"] + 1.0)
    second = opt.step(first, {**first, "a": first["a"] + np.float32(1.0)}, ["a"])  # m = 0.9 * 2 + 1 = 2.8
    np.testing.assert_allclose(second["a"], X["a"] + 1.0 + 0.5 * 2.8, rtol=1e-6)


def test_fedadam_first_steps_with_bias_correction():
    opt = ServerOptimizer("fedadam", learning_rate=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    out = opt.step(X, averaged(a=4.0), ["a"])
    # t = 1: m = 0.4, v = 0.16, eta_1 = 0.01 * sqrt(0.01) / 0.1 = 0.01
    np.testing.assert_allclose(out["a"], X["a"] + 0.01 * 0.4 / (0.4 + 1e-3), rtol=1e-6)
    out2 = opt.step(out, {**out, "a": out["a"] - np.float32(2.0)}, ["a"])
    # t = 2: m = 0.9 * 0.4 - 0.2 = 0.16, v = 0.99 * 0.16 + 0.01 * 4 = 0.1984
    eta = 0.01 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    np.testing.assert_allclose(out2["a"], out["a"] + eta * 0.16 / (math.sqrt(0.1984) + 1e-3), rtol=1e-5)


def test_fedyogi_second_moment_moves_by_the_sign_rule():
    opt = ServerOptimizer("fedyogi", learning_rate=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    out = opt.step(X, averaged(b=3.0), ["b"])
    # v = 0 - 0.01 * 9 * sign(0 - 9) = 0.09, m = 0.3: x + 0.1 * 0.3 / (0.3 + 1e-3)
    np.testing.assert_allclose(out["b"], X["b"] + 0.1 * 0.3 / (0.3 + 1e-3), rtol=1e-6)
    out2 = opt.step(out, {**out, "b": out["b"] + np.float32(0.1)}, ["b"])
    # delta^2 = 0.01 < v: v = 0.09 - 0.01 * 0.01 = 0.0899; m = 0.27 + 0.01 = 0.28
    np.testing.assert_allclose(out2["b"], out["b"] + 0.1 * 0.28 / (math.sqrt(0.0899) + 1e-3), rtol=1e-5)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_untouched_tensors_stay_bit_identical_and_their_moments_still(name):
    opt = ServerOptimizer(name, learning_rate=0.1)
    out = opt.step(X, averaged(a=1.0, b=7.0), ["a"])  # b changed in the average but nobody sent it
    assert out["b"] is X["b"] and "b" not in opt.m and "b" not in opt.steps
    for _ in range(3):
        out = opt.step(out, {**out, "a": out["a"] + np.float32(1.0)}, ["a"])
    assert out["b"] is X["b"] and opt.steps == {"a": 4}
    # b's first update: its own step count starts at 1 (its bias correction is its own)
    fresh = ServerOptimizer(name, learning_rate=0.1).step(X, averaged(b=1.0), ["b"])
    later = opt.step(out, {**out, "b": X["b"] + np.float32(1.0)}, ["b"])
    np.testing.assert_array_equal(later["b"], fresh["b"])
    assert opt.steps == {"a": 4, "b": 1}


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="server optimizer"):
        ServerOptimizer("fedprox")


def test_state_survives_a_weights_only_checkpoint(tmp_path):
    opt = ServerOptimizer("fedadam", learning_rate=0.01)
    opt.step(X, averaged(a=1.0, b=2.0), ["a", "b"])
    torch.save({"strategy": {"server_optimizer": opt.state()}}, tmp_path / "c.pt")
    restored = ServerOptimizer("fedadam", learning_rate=0.01)
    restored.load_state(torch.load(tmp_path / "c.pt", weights_only=True)["strategy"]["server_optimizer"])
    nxt = averaged(a=0.5, b=-1.0)
    a, b = opt.step(X, nxt, ["a", "b"]), restored.step(X, nxt, ["a", "b"])
    assert all(np.array_equal(a[k], b[k]) for k in X) and restored.steps == {"a": 2, "b": 2}


def test_the_strategy_moves_only_what_sites_sent():
    s = strategy(ExpertMatched, server_optimizer=ServerOptimizer("fedavgm", learning_rate=2.0, beta1=0.0))
    s.global_arrays = dict(GLOBAL)
    arrays, _ = s.aggregate_train(1, [reply(0, "valid", [1], 1)])  # site 0 sends x + 0.01 for what it trained
    got = wire.to_numpy(arrays)
    for key, value in GLOBAL.items():
        expert = wire.expert_id(key, CFG.num_experts)
        if expert in (None, 1):
            np.testing.assert_allclose(got[key], value + 2.0 * 0.01, rtol=1e-5, atol=1e-7)
        else:
            assert got[key].tobytes() == value.tobytes(), key
    s.ledgers["0"] = '{"site": 0}'
    restored = strategy(ExpertMatched, server_optimizer=ServerOptimizer("fedavgm", learning_rate=2.0, beta1=0.0))
    restored.load_state(s.state())
    assert restored.server_optimizer.steps == s.server_optimizer.steps and restored.ledgers == {"0": '{"site": 0}'}
    plain = strategy(ExpertMatched)  # a run without a server optimizer ignores saved moments
    plain.load_state(s.state())
    assert plain.server_optimizer is None and plain.ledgers == {"0": '{"site": 0}'}
    assert "server_optimizer" not in plain.state()


def test_fedyogi_with_a_zero_or_negative_update():
    opt = ServerOptimizer("fedyogi", learning_rate=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    same = opt.step(X, averaged(), ["a"])  # sent but unchanged: delta 0, v 0
    np.testing.assert_array_equal(same["a"], X["a"])
    out = opt.step(X, averaged(b=0.3), ["b"])  # v = 0.0009, m = 0.03
    out2 = opt.step(out, {**out, "b": out["b"] - np.float32(0.5)}, ["b"])
    # delta^2 = 0.25 > v: v = 0.0009 + 0.01 * 0.25 = 0.0034; m = 0.027 - 0.05 = -0.023
    np.testing.assert_allclose(out2["b"], out["b"] + 0.1 * -0.023 / (math.sqrt(0.0034) + 1e-3), rtol=1e-4)
    assert out2["b"].dtype == np.float32


def test_loading_an_empty_state_starts_afresh():
    opt = ServerOptimizer("fedadam")
    opt.load_state({})
    assert opt.m == {} and opt.v == {} and opt.steps == {}
    with pytest.raises(ValueError, match=r"^server optimizer must be one of \('fedavgm', 'fedadam', 'fedyogi'\), got 'sgd'$"):
        ServerOptimizer("sgd")
