"""The ClientApp's privacy path, called directly: the epsilon it reports against Opacus' accountant
on the history the config implies, across rounds and a restart; the budget guard; frozen experts."""

import json
import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch.utils.data import TensorDataset

from clients.app import app as client_app
from fedmoe import privacy
from fedmoe.data import tasks
from fedmoe.federation import wire
from fedmoe.config import RunConfig
from fedmoe.models.moe import MoEClassifier, MoEConfig
from fedmoe.training import freeze_inactive_experts, make_optimizer
from tests.sites import context, global_model, message, needs_fmnist, run_config, server_identity  # noqa: F401

RUN = {"dp": True, "num-server-rounds": 3, "max-examples-per-site": 300, "d-model": 16, "expert-hidden": 16,
       "batch-size": 32, "seed": 1, "noise-multiplier": 1.3, "target-epsilon": 50.0, "count-noise-multiplier": 20.0}


def expected_epsilons(rounds, num_examples, batch_size, sigma, sigma_counts, delta, accountant_type=RDPAccountant):
    """Epsilon after each round from the config alone: per round one count release (Gaussian,
    q = 1) and ceil(n / B) DP-SGD steps at q = 1 / ceil(n / B), stepped through Opacus' accountant."""
    steps = math.ceil(num_examples / batch_size)
    accountant, out = accountant_type(), []
    for _ in range(rounds):
        accountant.step(noise_multiplier=sigma_counts, sample_rate=1.0)
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=1.0 / steps)
        out.append(accountant.get_epsilon(delta=delta))
    return out


@needs_fmnist
def test_epsilon_rises_every_round_across_a_restart_as_opacus_counts_it(tmp_path):
    cfg = run_config(RUN)
    model = global_model(cfg)
    ctx = context(cfg, tmp_path / "site0")
    epsilons = []
    for r in (1, 2, 3):
        if r == 3:
            ctx = context(cfg, tmp_path / "site0")  # node restarted: Context.state is empty
        reply = client_app(message(model, r, tmp_path), ctx)
        assert not reply.has_error(), reply.error
        epsilons.append(reply.content.metric_records[wire.METRICS][wire.EPSILON])
    n = len(tasks.site_data(RunConfig.from_run_config(cfg), 0, 3)[1])
    assert n == 240  # 300 examples, a fifth kept for the site's test split
    expected = expected_epsilons(3, n, 32, sigma=1.3, sigma_counts=20.0, delta=1e-5)
    assert epsilons == pytest.approx(expected, rel=1e-9)
    assert epsilons[0] < epsilons[1] < epsilons[2]
    ledger = json.loads((tmp_path / "site0" / tmp_path.name / "privacy_ledger.json").read_text())
    assert ledger["accountant"] == "rdp" and [r["round"] for r in ledger["rounds"]] == [1, 2, 3]
    assert ledger["num_examples"] == n and ledger["reproducible_noise"] is False
    # another run on the same node (Flower gives each run its own Context) keeps its own ledger on
    # disk in the same state-dir (a resumed run keeps its run name, so continues this one)
    other = client_app(message(model, 1, tmp_path / "another-run"), context(cfg, tmp_path / "site0"))
    assert other.content.metric_records[wire.METRICS][wire.EPSILON] == pytest.approx(expected[0], rel=1e-9)


@needs_fmnist
@pytest.mark.parametrize("accountant, accountant_type, rel", [("rdp", RDPAccountant, 1e-9), ("prv", PRVAccountant, 1e-6)])
def test_planned_noise_keeps_the_whole_run_within_the_target(tmp_path, accountant, accountant_type, rel):
    cfg = run_config(RUN, **{"noise-multiplier": 0.0, "target-epsilon": 4.0, "accountant": accountant})
    model = global_model(cfg)
    ctx = context(cfg, tmp_path / "s")
    epsilons = [client_app(message(model, r, tmp_path), ctx).content.metric_records[wire.METRICS][wire.EPSILON]
                for r in (1, 2, 3)]
    ledger = json.loads((tmp_path / "s" / tmp_path.name / "privacy_ledger.json").read_text())
    sigma = ledger["noise_multiplier"]
    assert ledger["accountant"] == accountant
    assert epsilons == pytest.approx(expected_epsilons(3, 240, 32, sigma, 20.0, 1e-5, accountant_type), rel=rel)
    # the plan spends the budget: within the target, and 5% less noise would exceed it
    assert 3.9 < epsilons[-1] <= 4.0
    assert expected_epsilons(3, 240, 32, 0.95 * sigma, 20.0, 1e-5, accountant_type)[-1] > 4.0


@needs_fmnist
def test_budget_guard_declines_to_train_instead_of_overspending(tmp_path):
    cfg = run_config(RUN, **{"target-epsilon": 3.0, "noise-multiplier": 1.2})
    per_round = expected_epsilons(3, 240, 32, 1.2, 20.0, 1e-5)
    assert per_round[0] < 3.0 < per_round[1]  # round 1 fits the budget, round 2 would not
    model = global_model(cfg)
    ctx = context(cfg, tmp_path / "s")
    replies = [client_app(message(model, r, tmp_path), ctx) for r in (1, 2, 3)]
    assert [wire.STATUS in r.content.config_records for r in replies] == [False, True, True]
    status = replies[1].content.config_records[wire.STATUS]
    assert status[wire.STATUS] == wire.BUDGET_EXHAUSTED
    assert status[wire.EPSILON] == pytest.approx(per_round[0], rel=1e-9)
    assert status["projected-epsilon"] == pytest.approx(per_round[1], rel=1e-9)
    ledger = privacy.PrivacyLedger.load(tmp_path / "s" / tmp_path.name / "privacy_ledger.json")
    assert ledger.epsilon() == pytest.approx(per_round[0], rel=1e-9) and len(ledger.rounds) == 1
    with pytest.raises(wire.BudgetExhausted):
        wire.decode_train_reply(replies[2].content, {k: v.numpy() for k, v in model.state_dict().items()}, 8)


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost", "hooks"])
def test_frozen_experts_unchanged_after_dp_training(mode):
    cfg = RunConfig.from_run_config({"features": "pixels", "d-model": 16, "expert-hidden": 16, "num-experts": 4})
    torch.manual_seed(0)
    model = MoEClassifier(cfg.model_config())
    freeze_inactive_experts(model, [2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    ledger = privacy.PrivacyLedger(site=0, target_epsilon=math.inf, delta=1e-5, noise_multiplier=1.0,
                                   count_noise_multiplier=20.0, sample_rate=1 / 4)
    privacy.train_private(model, TensorDataset(images, labels), 16, make_optimizer("adam", model.parameters(), 1e-2), 2,
                          ledger, 1.0, mode, privacy.dp_generator())
    after = model.state_dict()
    for key in before:
        expert = wire.expert_id(key, 4)
        if expert is not None and expert != 2:
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["moe_layers.0.experts.w_in_2"], after["moe_layers.0.experts.w_in_2"])
    assert ledger.history == [(1.0, 1 / 4, 2 * 4)]  # 64 examples in batches of 16: q = 1/4, 4 steps per epoch


def test_dp_training_tells_a_noise_aware_optimizer_the_noise_variance():
    torch.manual_seed(0)
    model = MoEClassifier(MoEConfig(d_model=16, expert_hidden=16, num_experts=4))
    ledger = privacy.PrivacyLedger(site=0, target_epsilon=math.inf, delta=1e-5, noise_multiplier=0.8,
                                   count_noise_multiplier=20.0, sample_rate=1 / 4)
    optimizer = make_optimizer("adam-bc", model.parameters(), 1e-2)
    privacy.train_private(model, TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))), 16, optimizer,
                          1, ledger, 0.5, "bookkeeping", privacy.dp_generator())
    # noise of std sigma C on the clipped sum, divided by the expected batch q N = 16
    assert optimizer.param_groups[0]["noise_variance"] == pytest.approx((0.8 * 0.5 / 16) ** 2)
