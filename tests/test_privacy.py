"""Per-sample gradients and norms of the expert bank against brute force; accounting against Opacus."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch.utils.data import TensorDataset

from fedmoe import privacy
from fedmoe.privacy import samplers
from fedmoe.models.moe import ExpertBank, MoEClassifier, MoEConfig
from fedmoe.training import MoELoss, freeze_inactive_experts

CFG = MoEConfig(d_model=12, expert_hidden=10, num_experts=4, top_k=2, router_noise=0.0)


def with_random_biases(module):
    """Experts start with zero biases, under which a sign error on a bias term cannot show."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.rsplit(".", 1)[-1].startswith(("b_in_", "b_out_")):
                p.normal_()
    return module


def model_and_batch(seed=0, n=6):
    torch.manual_seed(seed)
    model = with_random_biases(MoEClassifier(CFG))
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


@pytest.mark.parametrize("cfg", [CFG, MoEConfig()], ids=["small", "default-widths"])
def test_ghost_norms_match_brute_force(cfg):
    """Per-sample gradient norms of the whole model in Opacus' ghost-clipping module against one
    backward per sample, at small widths and at the defaults (d=64, h=128, 16 tokens), whose
    expert-bank norms take the Gram form."""
    torch.manual_seed(1)
    model = with_random_biases(MoEClassifier(dataclasses.replace(cfg, router_noise=0.0)))
    freeze_inactive_experts(model, [0, 2])
    images, labels = torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,))
    expected = brute_force_grads(model, images, labels)
    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum", max_grad_norm=1e9, use_ghost_clipping=True)
    MoELoss(reduction="sum")(gsm(images), labels).backward()
    total = torch.stack([g.flatten(1).norm(dim=1) for g in expected.values()]).pow(2).sum(0).sqrt()
    torch.testing.assert_close(gsm.get_norm_sample(), total, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("d, h, tokens", [(12, 10, 32), (64, 128, 16), (64, 128, 200)])
def test_expert_bank_norm_sampler_equals_the_norms_of_its_grad_sampler(d, h, tokens):
    torch.manual_seed(2)
    bank = with_random_biases(ExpertBank(4, d, h))
    for p in bank.expert_params(1):
        p.requires_grad_(False)
    x, index, backprops = torch.randn(5, tokens, d), torch.randint(0, 4, (5, tokens)), torch.randn(5, tokens, d)
    grads = samplers.compute_expert_bank_grad_sample(bank, [x, index], backprops)
    norms = samplers.compute_expert_bank_norm_sample(bank, [x, index], backprops)
    assert grads.keys() == norms.keys() and len(norms) == 12  # experts 0, 2 and 3, four tensors each
    for p, g in grads.items():
        torch.testing.assert_close(norms[p], g.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape, normalized, bias, eps, frozen_weight", [
    ((5, 6), (6,), True, 1e-5, False), ((5, 3, 6), (6,), False, 1e-5, False), ((4, 3, 2, 5), (2, 5), True, 1e-5, False),
    ((5, 3, 6), (6,), True, 0.5, False), ((5, 3, 6), (6,), True, 1e-5, True),
], ids=["rows", "tokens-no-bias", "two-dims", "large-eps", "frozen-weight"])
def test_layer_norm_grad_samples_match_brute_force(shape, normalized, bias, eps, frozen_weight):
    """Per-sample gradients of a LayerNorm's trainable tensors with a random affine part, against
    one backward per sample of sum(output * backprops)."""
    torch.manual_seed(4)
    layer = torch.nn.LayerNorm(normalized, eps=eps, bias=bias)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    layer.weight.requires_grad_(not frozen_weight)
    x, backprops = torch.randn(shape), torch.randn(shape)
    expected = {p: [] for p in layer.parameters() if p.requires_grad}
    for i in range(len(x)):
        grads = torch.autograd.grad((layer(x[i : i + 1]) * backprops[i : i + 1]).sum(), list(expected))
        for p, g in zip(expected, grads):
            expected[p].append(g)
    grad_samples = samplers.compute_layer_norm_grad_sample(layer, [x], backprops)
    assert grad_samples.keys() == expected.keys()
    for p, per_sample in expected.items():
        torch.testing.assert_close(grad_samples[p], torch.stack(per_sample))


@pytest.mark.parametrize("padding_idx", [None, 0], ids=["no-padding", "padding"])
def test_embedding_norms_match_brute_force(padding_idx):
    """Per-sample gradient norms of a token embedding, with ids repeated within a sample (their rows
    add up before squaring) and a sample of padding only, against one backward per sample."""
    torch.manual_seed(5)
    layer = torch.nn.Embedding(7, 4, padding_idx=padding_idx)
    ids = torch.tensor([[1, 3, 1, 1], [0, 2, 0, 5], [0, 0, 0, 0], [6, 6, 2, 0]])
    backprops = torch.randn(4, 4, 4, dtype=torch.float64)
    expected = torch.stack([torch.autograd.grad((layer(ids[i]).double() * backprops[i]).sum(), layer.weight)[0].norm()
                            for i in range(len(ids))])
    rows = samplers.embedding_rows(layer, ids, backprops)
    torch.testing.assert_close(samplers.embedding_norms(*rows, len(ids), 7), expected.to(torch.float64))
    assert (len(rows[0]) == 16) == (padding_idx is None)


def runs_of(counts: list[int]) -> samplers.RowRuns:
    """Runs of the given lengths, one per sample (zero: a sample without rows)."""
    sample = torch.tensor([n for n, c in enumerate(counts) for _ in range(c)], dtype=torch.long)
    return samplers.RowRuns(sample, len(counts), max(counts))


def brute_force_norms(counts: list[int], a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """|| sum over the sample's rows of g_t^T a_t ||_F, one sample at a time."""
    ends = torch.tensor(counts).cumsum(0).tolist()
    return torch.stack([(g[end - c:end].T @ a[end - c:end]).norm() for c, end in zip(counts, ends)])


@pytest.mark.parametrize("counts, p, q, grams", [
    ([3, 0, 5, 1, 5, 2, 4, 4, 0], 64, 128, True),  # uneven runs, some across block boundaries, empty ones
    ([1, 7, 7, 2, 0, 6, 3], 3, 4, False),  # narrow factors: the per-sample gradients are cheaper
    ([4, 4, 4, 4, 4], 64, 128, True),  # every run full: the blocks are the runs
    ([4, 4, 4, 4, 4], 2, 200, False),
    ([3, 1, 0, 4], 1, 50, False),  # one column (a bias's factor): its own product order
    ([1, 3], 16, 32, True),  # fewer rows than two blocks: no block's window lies within them
    ([1, 1, 1, 1], 2, 16, True),  # a two-column factor's Grams (a bmm, not the one column's outer product)
    ([0, 0, 0], 8, 8, True),  # nothing routed
])
def test_row_run_norms_in_either_form_are_the_frobenius_norm(counts, p, q, grams):
    """|| sum_t g_t^T a_t ||_F per sample over its run of rows, whichever form the shapes pick."""
    torch.manual_seed(3)
    runs = runs_of(counts)
    a, g = torch.randn(sum(counts), p, dtype=torch.float64), torch.randn(sum(counts), q, dtype=torch.float64)
    assert runs.grams_are_cheaper(a, g) == grams
    expected = brute_force_norms(counts, a, g) if sum(counts) else torch.zeros(len(counts), dtype=torch.float64)
    torch.testing.assert_close(runs.norms(a, g), expected, rtol=1e-10, atol=1e-10)


def test_row_runs_lay_out_each_sample_from_its_first_slot():
    counts = [2, 0, 3, 1]
    rows = torch.arange(1.0, 7.0).unsqueeze(1)
    expected = torch.tensor([[1, 2, 0], [0, 0, 0], [3, 4, 5], [6, 0, 0]], dtype=torch.float).unsqueeze(2)
    torch.testing.assert_close(runs_of(counts).lay_out(rows), expected)


@pytest.mark.parametrize("counts", [[2, 5, 0, 3, 4, 1], [3, 3, 3, 3]], ids=["uneven", "full"])
def test_norms_sharing_a_factor_are_each_pairs_frobenius_norm(counts):
    """A weight and its bias share the output gradient's factor (the bias's other factor, a column
    of ones, is drawn at random here: any one-column factor); sharing its block Grams must not mix
    up the pairs, and the column's Grams come in the Gram form too."""
    torch.manual_seed(4)
    runs, m = runs_of(counts), sum(counts)
    a, g = torch.randn(m, 64, dtype=torch.float64), torch.randn(m, 128, dtype=torch.float64)
    column = torch.randn(m, 1, dtype=torch.float64)
    weight_norms = runs.norms(a, g)
    assert runs.grams_are_cheaper(column, g)
    torch.testing.assert_close(weight_norms, brute_force_norms(counts, a, g), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(runs.norms(column, g), brute_force_norms(counts, column, g), rtol=1e-10, atol=1e-10)


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


def gaussian_mechanism_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with sensitivity / sigma = mu (Balle & Wang 2018,
    Theorem 8: delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)), by bisection."""
    from scipy.stats import norm

    def delta_of(eps):
        return norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu)

    low, high = 0.0, 50.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return high


def test_prv_epsilon_is_opacus_prv_on_the_history_in_its_order():
    """A ledger alternates count releases and DP-SGD steps; summing each mechanism's steps first
    (which keeps PRV fast) gives what Opacus' PRV accountant gives on the entries as charged."""
    history = [(20.0, 1.0, 1), (1.1, 0.125, 16)] * 3
    stepped = PRVAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            stepped.step(noise_multiplier=sigma, sample_rate=q)
    ours = privacy.epsilon_of(history, 1e-5, "prv")
    assert ours == pytest.approx(stepped.get_epsilon(delta=1e-5), rel=1e-6)
    assert ours < privacy.epsilon_of(history, 1e-5, "rdp") - 0.1


def test_prv_bounds_the_full_batch_gaussian_release_from_above_and_closely():
    """The count release (q = 1): ten releases at sigma 5 are one Gaussian mechanism with
    mu = sqrt(10) / 5, whose exact epsilon PRV must bound within its eps_error of 0.01."""
    exact = gaussian_mechanism_epsilon(math.sqrt(10) / 5, 1e-5)
    prv = privacy.epsilon_of([(5.0, 1.0, 10)], 1e-5, "prv")
    assert exact <= prv <= exact + 0.02
    assert privacy.epsilon_of([(5.0, 1.0, 10)], 1e-5, "rdp") > prv


def test_prv_plans_less_noise_for_the_same_target():
    q, steps = 1 / 15, 150
    rdp = privacy.plan_noise_multiplier(8.0, 1e-5, q, steps, count_releases=10, count_noise_multiplier=60.0)
    prv = privacy.plan_noise_multiplier(8.0, 1e-5, q, steps, count_releases=10, count_noise_multiplier=60.0,
                                        accountant="prv")
    assert 0.9 * rdp < prv < 0.97 * rdp

    def opacus_prv(sigma):
        accountant = PRVAccountant()
        accountant.history = [(60.0, 1.0, 10), (sigma, q, steps)]
        return accountant.get_epsilon(delta=1e-5)

    assert 7.95 <= opacus_prv(prv) <= 8.0
    assert opacus_prv(0.98 * prv) > 8.0


def test_train_private_continues_the_ledger_history_as_one_accountant():
    torch.manual_seed(0)
    model = MoEClassifier(CFG)
    freeze_inactive_experts(model, [1])
    ledger = privacy.PrivacyLedger(site=0, target_epsilon=50.0, delta=1e-5, noise_multiplier=1.1,
                                   count_noise_multiplier=20.0, sample_rate=0.25)
    ledger.history = [(20.0, 1.0, 1), (1.1, 0.25, 8), (20.0, 1.0, 1)]  # two rounds' count releases, one round's steps
    data = TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    privacy.train_private(model, data, 16, torch.optim.SGD(model.parameters(), lr=0.1), 1, ledger, 1.0, "ghost",
                          privacy.dp_generator())
    assert ledger.history == [(20.0, 1.0, 1), (1.1, 0.25, 8), (20.0, 1.0, 1), (1.1, 0.25, 4)]
    one = RDPAccountant()
    for sigma, q, steps in [(20.0, 1.0, 1), (1.1, 0.25, 8), (20.0, 1.0, 1), (1.1, 0.25, 4)]:
        for _ in range(steps):
            one.step(noise_multiplier=sigma, sample_rate=q)
    assert ledger.epsilon() == pytest.approx(one.get_epsilon(delta=1e-5), rel=1e-12)


def test_ledger_json_round_trip_keeps_everything(tmp_path):
    ledger = privacy.PrivacyLedger(site=3, target_epsilon=math.inf, delta=1e-6, noise_multiplier=0.9,
                                   count_noise_multiplier=15.0, sample_rate=0.1, num_examples=95, reproducible_noise=True)
    ledger.charge([(15.0, 1.0, 1), (0.9, 0.1, 10)])
    ledger.close_round(4, [(15.0, 1.0, 1), (0.9, 0.1, 10)])
    ledger.save(tmp_path / "l.json")
    back = privacy.PrivacyLedger.load(tmp_path / "l.json")
    assert back == ledger
    saved = json.loads((tmp_path / "l.json").read_text())
    assert saved["target_epsilon"] == "inf" and saved["epsilon"] == pytest.approx(ledger.epsilon())
    assert saved["rounds"] == [{"round": 4, "charged": [[15.0, 1.0, 1], [0.9, 0.1, 10]], "epsilon": ledger.epsilon()}]
    assert privacy.PrivacyLedger.load(tmp_path / "missing.json") is None


def test_charges_merge_only_identical_mechanisms():
    assert privacy.merge_history([(1.0, 0.5, 2)], [(1.0, 0.5, 3), (1.0, 0.25, 1), (1.0, 0.25, 0), (2.0, 0.25, 1)]) == [
        (1.0, 0.5, 5), (1.0, 0.25, 1), (2.0, 0.25, 1)]


def test_count_sensitivity_bounds_every_samples_count_vector():
    """One sample adds 1 to k distinct experts per layer for each of its T tokens: its count
    vector's L2 norm is at most T sqrt(kL), reached when all its tokens pick the same experts."""
    assert privacy.count_sensitivity(16, 2, 1) == pytest.approx(16 * math.sqrt(2))
    assert privacy.count_sensitivity(64, 2, 3) == pytest.approx(64 * math.sqrt(6))
    torch.manual_seed(4)
    cfg = MoEConfig(d_model=16, expert_hidden=16, num_experts=4, top_k=2, num_moe_layers=2)
    model = MoEClassifier(cfg).eval()
    images = torch.randn(20, 1, 28, 28)
    images[0] = 0.0  # identical patches: every token of sample 0 takes the same experts (up to position)
    model(images)
    per_sample = torch.cat([layer.last_routing.per_sample for layer in model.moe_layers], dim=1).double()
    bound = privacy.count_sensitivity(cfg.num_tokens, cfg.top_k, cfg.num_moe_layers)
    assert torch.all(per_sample.norm(dim=1) <= bound + 1e-9)
    assert torch.all(per_sample.sum(dim=1) == cfg.num_tokens * cfg.top_k * cfg.num_moe_layers)


def test_count_release_noise_has_the_stated_scale_and_is_clamped_at_zero():
    """Gaussian noise of std sigma x sensitivity on each count (tolerance: 2% on the std of 20000
    draws, whose standard error is 0.5%); negative results are clamped to 0."""
    generator = torch.Generator().manual_seed(0)
    counts = np.full(20000, 1e6)
    released = privacy.release_counts(counts, 20.0, 16 * math.sqrt(2), generator)
    noise = released - counts
    assert np.std(noise) == pytest.approx(20.0 * 16 * math.sqrt(2), rel=0.02)
    assert abs(np.mean(noise)) < 3 * 20.0 * 16 * math.sqrt(2) / math.sqrt(20000)
    zeros = privacy.release_counts(np.zeros(20000), 1.0, 1.0, generator)
    assert zeros.min() == 0.0 and 0.45 < np.mean(zeros == 0.0) < 0.55


def test_dp_generators_are_secret_unless_seeded():
    first, second = privacy.dp_generator(), privacy.dp_generator()
    assert first.initial_seed() != second.initial_seed()
    assert not torch.equal(torch.randn(8, generator=first), torch.randn(8, generator=second))
    assert torch.equal(torch.randn(8, generator=privacy.dp_generator(123)), torch.randn(8, generator=torch.Generator().manual_seed(123)))


def test_infinite_target_means_no_noise():
    assert privacy.plan_noise_multiplier(math.inf, 1e-5, 0.1, 100) == 0.0
    assert privacy.epsilon_of([(0.0, 0.1, 10)], 1e-5) == math.inf


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost", "hooks"])
def test_physical_batches_give_the_same_step_as_one_logical_batch(mode):
    """BatchMemoryManager cuts each Poisson batch into physical ones and takes one noisy step
    per logical batch: the same masks and noise (same generator seed) give the same model and
    the same accountant history as the whole batch at once."""
    data = TensorDataset(torch.randn(96, 1, 28, 28), torch.randint(0, 10, (96,)))
    results = []
    for physical in (0, 7):
        torch.manual_seed(0)
        model = MoEClassifier(dataclasses.replace(CFG, router_noise=0.0))
        freeze_inactive_experts(model, [2])
        ledger = privacy.PrivacyLedger(site=0, target_epsilon=50.0, delta=1e-5, noise_multiplier=0.8,
                                       count_noise_multiplier=20.0, sample_rate=1 / 3)
        privacy.train_private(model, data, 32, torch.optim.SGD(model.parameters(), lr=0.5), 2, ledger, 1.0, mode,
                              privacy.dp_generator(11), max_physical_batch_size=physical)
        results.append((model.state_dict(), ledger.history))
    (whole, history), (split, split_history) = results
    assert history == split_history == [(0.8, 1 / 3, 6)]
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-4, atol=1e-5, msg=key)


# --- decisions the accounting and the mechanism rest on -----------------------------------------

def test_epsilon_of_nothing_is_zero_and_of_noiseless_steps_infinite():
    assert privacy.epsilon_of([], 1e-5) == 0.0
    assert privacy.epsilon_of([(1.0, 0.1, 10)], 1e-5) < math.inf
    assert privacy.steps_per_epoch(100, 32) == 4 and privacy.steps_per_epoch(96, 32) == 3
    assert privacy.steps_per_epoch(0, 32) == 1 and privacy.steps_per_epoch(5, 64) == 1


def test_planning_small_targets_and_large_noise():
    sigma = privacy.plan_noise_multiplier(0.5, 1e-5, 0.1, 1000)  # needs far more than sigma 2
    assert sigma > 4
    assert 0.49 <= privacy.epsilon_of([(sigma, 0.1, 1000)], 1e-5) <= 0.5
    floor = privacy.epsilon_of([(1.0, 1.0, 100)], 1e-5)
    with pytest.raises(ValueError, match=f"^target-epsilon {floor} is spent by the 100 count releases alone"):
        privacy.plan_noise_multiplier(floor, 1e-5, 0.02, 500, count_releases=100, count_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="^target-epsilon 1e-06 is unreachable for 100000 steps$"):
        privacy.plan_noise_multiplier(1e-6, 1e-5, 1.0, 100000)


def test_count_noise_comes_from_the_given_generator_in_float64():
    counts = np.array([10.0, 20.0, 30.0, 40.0])
    released = privacy.release_counts(counts, 2.0, 3.0, torch.Generator().manual_seed(5))
    noise = torch.randn(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64).numpy()
    np.testing.assert_array_equal(released, np.clip(counts + noise * 6.0, 0.0, None))


def test_a_ledger_written_without_its_epsilon_still_loads():
    ledger = privacy.PrivacyLedger(site=1, target_epsilon=2.0, delta=1e-5, noise_multiplier=1.0,
                                   count_noise_multiplier=20.0, sample_rate=0.5)
    document = json.loads(ledger.to_json())
    del document["epsilon"]
    assert privacy.PrivacyLedger.from_json(json.dumps(document)) == ledger


def test_empty_charges_are_not_recorded():
    assert privacy.merge_history([(1.0, 0.5, 2)], [(3.0, 0.5, 0)]) == [(1.0, 0.5, 2)]


def one_step_update(mode, sigma, max_grad_norm, generator, n=40):
    """One DP-SGD step over every example (q = 1) with plain SGD at lr 1: the update is the
    (noised) mean of the clipped per-sample gradients."""
    torch.manual_seed(0)
    model = MoEClassifier(dataclasses.replace(CFG, router_noise=0.0))
    freeze_inactive_experts(model, [1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    data = TensorDataset(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,)))
    ledger = privacy.PrivacyLedger(site=0, target_epsilon=math.inf, delta=1e-5, noise_multiplier=sigma,
                                   count_noise_multiplier=20.0, sample_rate=1.0)
    privacy.train_private(model, data, n, torch.optim.SGD(model.parameters(), lr=1.0), 1, ledger, max_grad_norm, mode,
                          generator)
    after = model.state_dict()
    return torch.sqrt(sum((after[k] - before[k]).pow(2).sum() for k in before)), ledger


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost", "hooks"])
def test_every_per_sample_gradient_is_clipped(mode):
    """Without noise, one step over n examples moves the model by the mean of n gradients each
    clipped to C: at most C (the unclipped gradients are far larger than the tiny C here)."""
    norm, ledger = one_step_update(mode, 0.0, 1e-3, privacy.dp_generator())
    assert 0 < float(norm) <= 1e-3 * (1 + 1e-4)
    assert ledger.history == [(0.0, 1.0, 1)]
    unclipped, _ = one_step_update(mode, 0.0, 1e6, privacy.dp_generator())
    assert float(unclipped) > 100 * 1e-3


def test_an_accelerators_noise_seed_is_62_secret_bits_of_the_sites_generator():
    """The seed of the noise generator on a GPU comes from the site's generator alone (the global
    RNG, which the config seeds, has no part) and spans 62 bits, too many to enumerate."""
    torch.manual_seed(0)
    first = privacy.dp_sgd.secret_seed(torch.Generator().manual_seed(123))
    torch.manual_seed(1)
    assert privacy.dp_sgd.secret_seed(torch.Generator().manual_seed(123)) == first
    generator = torch.Generator().manual_seed(7)
    seeds = [privacy.dp_sgd.secret_seed(generator) for _ in range(200)]
    assert len(set(seeds)) == 200 and max(seeds) > 2**61 and min(seeds) >= 0 and max(seeds) < 2**62


def test_the_noise_is_drawn_from_the_sites_generator_not_the_global_one():
    torch.manual_seed(1)  # whatever the global generator holds, the same site generator gives the same step
    first, _ = one_step_update("ghost", 1.0, 1.0, privacy.dp_generator(99))
    torch.manual_seed(2)
    second, _ = one_step_update("ghost", 1.0, 1.0, privacy.dp_generator(99))
    third, _ = one_step_update("ghost", 1.0, 1.0, privacy.dp_generator(100))
    assert float(first) == float(second) and float(first) != float(third)


def poisson_batch_sizes(generator) -> list[int]:
    model = MoEClassifier(CFG)
    freeze_inactive_experts(model, [1])
    sizes = []
    model.embed.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
    ledger = privacy.PrivacyLedger(site=0, target_epsilon=math.inf, delta=1e-5, noise_multiplier=1.0,
                                   count_noise_multiplier=20.0, sample_rate=0.25)
    data = TensorDataset(torch.randn(200, 1, 28, 28), torch.randint(0, 10, (200,)))
    privacy.train_private(model, data, 50, torch.optim.SGD(model.parameters(), lr=0.1), 3, ledger, 1.0, "hooks", generator)
    return sizes


def test_batches_are_poisson_sampled_with_the_sites_generator():
    """Opacus' Poisson loader: every example joins each batch independently, so batch sizes vary;
    which examples join is drawn from the site's generator, whatever the global one holds."""
    torch.manual_seed(0)
    sizes = poisson_batch_sizes(privacy.dp_generator(5))
    assert len(sizes) == 12 and len(set(sizes)) > 3 and sizes != [50] * 12
    torch.manual_seed(1)
    assert poisson_batch_sizes(privacy.dp_generator(5)) == sizes
    assert poisson_batch_sizes(privacy.dp_generator(6)) != sizes
