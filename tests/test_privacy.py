"""Per-sample gradients and norms of the expert bank against brute force; accounting against Opacus."""

import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModuleFastGradientClipping

from fedmoe import privacy
from fedmoe.model import MoEClassifier, MoEConfig
from fedmoe.training import MoELoss, freeze_inactive_experts

CFG = MoEConfig(d_model=12, expert_hidden=10, num_experts=4, top_k=2, router_noise=0.0)


def model_and_batch(seed=0, n=6):
    torch.manual_seed(seed)
    model = MoEClassifier(CFG)
    freeze_inactive_experts(model, [0, 2])
    return model, torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))


def brute_force_grads(model, images, labels):
    """{name: [N, *shape]} from one backward per sample."""
    loss_fn = MoELoss()
    out = {n: [] for n, p in model.named_parameters() if p.requires_grad}
    for i in range(len(labels)):
        model.zero_grad()
        loss_fn(model(images[i : i + 1]), labels[i : i + 1]).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                out[n].append(p.grad.detach().clone())
    return {n: torch.stack(g) for n, g in out.items()}


def test_hooks_grad_samples_match_brute_force():
    model, images, labels = model_and_batch()
    expected = brute_force_grads(model, images, labels)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    model.zero_grad()
    MoELoss(reduction="sum")(gsm(images), labels).backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".experts." in n for n in names)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad_sample is not None, name
            assert (p.grad_sample - expected[name]).abs().max() < 1e-5, name
        else:
            assert getattr(p, "grad_sample", None) is None, name


def test_ghost_norms_match_brute_force():
    model, images, labels = model_and_batch(seed=1)
    expected = brute_force_grads(model, images, labels)
    bank = model.moe_layers[0].experts
    x = torch.randn(5, 16 * 2, CFG.d_model)
    index = torch.randint(0, 4, (5, 32))
    backprops = torch.randn(5, 32, CFG.d_model)
    grads = privacy.compute_expert_bank_grad_sample(bank, [x, index], backprops)
    norms = privacy.compute_expert_bank_norm_sample(bank, [x, index], backprops)
    assert grads.keys() == norms.keys() and len(norms) == 8  # experts 0 and 2, four tensors each
    for p, g in grads.items():
        torch.testing.assert_close(norms[p], g.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-6)
    # and the whole model's per-sample norms in Opacus' ghost module equal the brute-force ones
    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum", max_grad_norm=1e9, use_ghost_clipping=True)
    MoELoss(reduction="sum")(gsm(images), labels).backward()
    total = torch.stack([g.flatten(1).norm(dim=1) for g in expected.values()]).pow(2).sum(0).sqrt()
    torch.testing.assert_close(gsm.get_norm_sample(), total, rtol=1e-4, atol=1e-5)


def test_planned_noise_matches_opacus_without_count_releases():
    ours = privacy.plan_noise_multiplier(4.0, 1e-5, 0.02, 500)
    theirs = get_noise_multiplier(target_epsilon=4.0, target_delta=1e-5, sample_rate=0.02, steps=500, accountant="rdp")
    assert ours == pytest.approx(theirs, rel=0.02)
    assert privacy.epsilon_of([(ours, 0.02, 500)], 1e-5) <= 4.0


def test_count_releases_raise_the_noise_and_stay_within_target():
    base = privacy.plan_noise_multiplier(2.0, 1e-5, 0.02, 500)
    with_counts = privacy.plan_noise_multiplier(2.0, 1e-5, 0.02, 500, count_releases=10, count_noise_multiplier=20.0)
    assert with_counts > base
    assert privacy.epsilon_of([(with_counts, 0.02, 500), (20.0, 1.0, 10)], 1e-5) <= 2.0
    with pytest.raises(ValueError, match="count releases"):
        privacy.plan_noise_multiplier(0.1, 1e-5, 0.02, 500, count_releases=100, count_noise_multiplier=1.0)


def test_ledger_restored_over_rounds_equals_one_accountant(tmp_path):
    one = RDPAccountant()
    ledger = privacy.PrivacyLedger(site=0, target_epsilon=8.0, delta=1e-5, noise_multiplier=1.1, count_noise_multiplier=20.0, sample_rate=0.05)
    path = tmp_path / "ledger.json"
    for _ in range(4):
        ledger.charge([(20.0, 1.0, 1)])
        one.step(noise_multiplier=20.0, sample_rate=1.0)
        # a fresh accountant each round, restored from the saved ledger, as Opacus sees it
        acc = RDPAccountant()
        acc.history = list(ledger.history)
        for _ in range(30):
            acc.step(noise_multiplier=1.1, sample_rate=0.05)
            one.step(noise_multiplier=1.1, sample_rate=0.05)
        ledger.history = list(acc.history)
        ledger.save(path)
        ledger = privacy.PrivacyLedger.load(path)
    assert ledger.steps == 4 * 31
    assert ledger.epsilon() == pytest.approx(one.get_epsilon(delta=1e-5), rel=1e-12)


def test_infinite_target_means_no_noise():
    assert privacy.plan_noise_multiplier(math.inf, 1e-5, 0.1, 100) == 0.0
    assert privacy.epsilon_of([(0.0, 0.1, 10)], 1e-5) == math.inf
