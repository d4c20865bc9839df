"""Book-keeping clipping (dp-mode=bookkeeping): one backward pass leaves the same clipped sum as one
backward per sample followed by clipping, for every layer type fedmoe trains."""

import copy
import dataclasses
import math
import re

import pytest
import torch
from torch.utils.data import TensorDataset

from fedmoe import privacy
from fedmoe.models.charlm import CharLMConfig, CharMoETransformer
from fedmoe.models.moe import ExpertBank, MoEClassifier, MoEConfig
from fedmoe.privacy import samplers
from fedmoe.privacy.bookkeeping import HiddenKeeper
from fedmoe.training import MoELoss, freeze_inactive_experts


def brute_force_clipped_mean(model, data, max_grad_norm_quantile=0.5):
    """(-(1/n) sum_n min(1, C / (||g_n|| + 1e-6)) g_n by parameter name, C): g_n from one backward per
    sample, C the given quantile of the per-sample norms so that some samples are clipped and some
    not (a single sample: C is half its norm)."""
    loss_fn = MoELoss()
    grads = []
    for x, y in data:
        model.zero_grad()
        loss_fn(model(x[None]), y[None]).backward()
        grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad})
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in sample.values())) for sample in grads])
    c_max = float(norms.quantile(max_grad_norm_quantile)) if len(norms) > 1 else float(norms[0]) / 2
    factors = (c_max / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any() and ((factors == 1).any() or len(factors) == 1)
    mean = {name: -sum(f * sample[name] for f, sample in zip(factors, grads)) / len(grads) for name in grads[0]}
    return mean, c_max


def noiseless_step(model, data, mode, max_grad_norm):
    """{name: change} after one DP-SGD step over every example (q = 1, sigma 0, SGD at lr 1)."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ledger = privacy.PrivacyLedger(site=0, target_epsilon=math.inf, delta=1e-5, noise_multiplier=0.0,
                                   count_noise_multiplier=20.0, sample_rate=1.0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    privacy.train_private(model, data, len(data), optimizer, 1, ledger, max_grad_norm, mode, privacy.dp_generator())
    return {name: p.detach() - before[name] for name, p in model.named_parameters()}


def assert_step_is_the_clipped_mean(model, data, mode, rtol=1e-4, atol=1e-6):
    reference = copy.deepcopy(model).train()
    expected, max_grad_norm = brute_force_clipped_mean(reference, data)
    changes = noiseless_step(model, data, mode, max_grad_norm)
    for name, change in changes.items():
        if name in expected:
            torch.testing.assert_close(change, expected[name], rtol=rtol, atol=atol, msg=name)
        else:
            assert torch.equal(change, torch.zeros_like(change)), name


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost", "hooks"])
def test_image_moe_step_is_the_mean_of_clipped_per_sample_gradients(mode):
    """Patch embedding (Linear on [N,S,p]), position embedding, LayerNorms, router, GELU expert
    bank with random biases, head; experts 0 and 2 train."""
    torch.manual_seed(0)
    model = MoEClassifier(MoEConfig(d_model=12, expert_hidden=10, num_experts=4, top_k=2, router_noise=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".b_" in name:
                p.normal_()
    freeze_inactive_experts(model, [0, 2])
    data = TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    assert_step_is_the_clipped_mean(model, data, mode)


def test_charlm_step_is_the_mean_of_clipped_per_sample_gradients():
    """Byte embedding, causal attention, two MoE layers with a personal expert beside the routed
    ones (its zero-initialised output layer drawn at random here), LM head over every position."""
    torch.manual_seed(0)
    model = CharMoETransformer(CharLMConfig(seq_len=12, d_model=16, num_heads=2, num_moe_layers=2, num_experts=4,
                                            top_k=2, expert_hidden=16, router_noise=0.0, personal_expert=True))
    with torch.no_grad():
        for layer in model.moe_layers:
            for p in layer.personal_expert.w_out.parameters():
                p.normal_()
    freeze_inactive_experts(model, [1, 6])
    windows = torch.randint(0, 256, (6, 13))
    assert_step_is_the_clipped_mean(model, TensorDataset(windows[:, :-1], windows[:, 1:]), "bookkeeping")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_hf_moe_step_is_the_mean_of_clipped_per_sample_gradients(lora):
    """transformers Qwen2-MoE: attention projections, RMSNorms (functorch per-sample gradients),
    SwiGLU expert bank with a shared expert, and with LoRA the adapter factors of every linear."""
    pytest.importorskip("transformers")
    from test_hf_moe import SEQ, lora_model, stock_model, wrapped

    model = (lora_model(dtype=torch.float64) if lora else wrapped(stock_model("qwen2-moe", torch.float64))).train()
    freeze_inactive_experts(model, [1, 4])
    tokens = torch.randint(0, 256, (5, SEQ + 1))
    assert_step_is_the_clipped_mean(model, TensorDataset(tokens[:, :-1], tokens[:, 1:]), "bookkeeping", rtol=1e-6, atol=1e-7)


def test_empty_poisson_batches_take_noise_only_steps():
    """At sample rate 1/4 over 4 examples many Poisson batches are empty: each still takes its
    step (noise only) and is charged."""
    torch.manual_seed(0)
    model = MoEClassifier(dataclasses.replace(MoEConfig(d_model=8, expert_hidden=8, num_experts=4), router_noise=0.0))
    freeze_inactive_experts(model, [3])
    data = TensorDataset(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))
    sizes = []
    model.embed.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
    ledger = privacy.PrivacyLedger(site=0, target_epsilon=math.inf, delta=1e-5, noise_multiplier=1.0,
                                   count_noise_multiplier=20.0, sample_rate=0.25)
    before = copy.deepcopy(model.state_dict())
    privacy.train_private(model, data, 1, torch.optim.SGD(model.parameters(), lr=0.1), 5, ledger, 1.0, "bookkeeping",
                          privacy.dp_generator(3))
    assert 0 in sizes and ledger.history == [(1.0, 0.25, 20)]
    assert not torch.equal(before["head.weight"], model.state_dict()["head.weight"])


class TokenNet(torch.nn.Module):
    """A token embedding with a padding index, ids repeated within a sample, and a linear head."""

    def __init__(self, **embedding_options):
        super().__init__()
        self.embed = torch.nn.Embedding(9, 6, padding_idx=0, **embedding_options)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)).mean(dim=1)), self.head.bias.new_zeros(len(ids))


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost", "hooks"])
def test_token_embedding_step_is_the_mean_of_clipped_per_sample_gradients(mode):
    """Ids repeated within a sample, and padding positions, which add nothing (autograd leaves the
    padding row at zero; Opacus' own embedding samplers counted them: fedmoe's replace them)."""
    torch.manual_seed(0)
    ids = torch.tensor([[1, 1, 4, 0], [2, 3, 3, 3], [0, 0, 5, 5], [8, 7, 6, 1], [4, 4, 4, 4]])
    data = TensorDataset(ids, torch.randint(0, 3, (5,)))
    assert_step_is_the_clipped_mean(TokenNet(), data, mode)


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost", "hooks"])
@pytest.mark.parametrize("option, message", [
    ({"scale_grad_by_freq": True}, "DP-SGD: embedding embed has scale_grad_by_freq=True: its gradient depends on the whole "
     "batch, so no per-example clipping bounds it; build it with scale_grad_by_freq=False"),
    ({"max_norm": 0.5}, "DP-SGD: embedding embed has max_norm=0.5: its forward renormalises the rows of the batch's ids in "
     "place, a change to the weights that depends on the private data and gets no noise; build it with max_norm=None"),
], ids=["scale_grad_by_freq", "max_norm"])
def test_an_embedding_dp_sgd_cannot_bound_is_refused_before_any_step(mode, option, message):
    ids = torch.tensor([[1, 1, 4, 0], [2, 3, 3, 3]])
    ledger = privacy.PrivacyLedger(site=0, target_epsilon=math.inf, delta=1e-5, noise_multiplier=1.0,
                                   count_noise_multiplier=20.0, sample_rate=1.0)
    model = TokenNet(**option)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        privacy.train_private(model, TensorDataset(ids, torch.tensor([0, 1])), 2, torch.optim.SGD(model.parameters(), lr=0.1),
                              1, ledger, 1.0, mode, privacy.dp_generator())
    assert ledger.history == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class SharedNormNet(torch.nn.Module):
    """A LayerNorm applied twice in one forward: its per-sample gradient is the sum over both uses."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(6, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.mix = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.norm(self.mix(self.norm(self.embed(x))))
        return self.head(h), h.new_zeros(len(h))


def test_a_layer_used_twice_adds_both_uses_per_sample():
    torch.manual_seed(0)
    model = SharedNormNet()
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    data = TensorDataset(torch.randn(7, 6), torch.randint(0, 3, (7,)))
    assert_step_is_the_clipped_mean(model, data, "bookkeeping")


def test_the_single_pass_computes_no_weight_gradient():
    """Autograd is asked for the patch embedding's bias only: no weight gradient is computed (the
    clipped sums replace them), yet every hook fires."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    from fedmoe.privacy.bookkeeping import BookKeeping

    torch.manual_seed(0)
    model = MoEClassifier(MoEConfig(d_model=12, expert_hidden=10, num_experts=4, top_k=2, router_noise=0.0))
    freeze_inactive_experts(model, [1])
    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum", max_grad_norm=1.0)
    book = BookKeeping(gsm)
    images, labels = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    book.backward(MoELoss(reduction="sum")(gsm(images), labels))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert {name for name, p in trainable.items() if p.grad is not None} == {"embed.bias"}
    book.write_clipped_sums(gsm.get_clipping_coef())
    assert all(p.grad is not None for p in trainable.values())
    book.close()


def test_a_batch_of_one_is_clipped_like_any_other():
    torch.manual_seed(0)
    model = MoEClassifier(MoEConfig(d_model=8, expert_hidden=8, num_experts=4, router_noise=0.0))
    freeze_inactive_experts(model, [2])
    data = TensorDataset(torch.randn(1, 1, 28, 28), torch.randint(0, 10, (1,)))
    assert_step_is_the_clipped_mean(model, data, "bookkeeping")


class SkippableNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(6, 8)
        self.extra = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 3)
        self.skip = False

    def forward(self, x):
        h = self.embed(x)
        return self.head(h if self.skip else self.extra(h)), h.new_zeros(len(h))


def test_a_parameter_no_hook_saw_is_an_error_not_a_stale_or_unclipped_gradient():
    """The second batch skips a layer: Opacus still holds that layer's per-sample norms from the
    first one, and autograd would leave no gradient; the clipped sum refuses to go on."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    from fedmoe.privacy.bookkeeping import BookKeeping

    torch.manual_seed(0)
    model = SkippableNet()
    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum", max_grad_norm=1.0)
    book = BookKeeping(gsm)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    book.backward(MoELoss(reduction="sum")(gsm(x), y))
    book.write_clipped_sums(gsm.get_clipping_coef())
    model.skip = True
    book.backward(MoELoss(reduction="sum")(gsm(x), y))
    with pytest.raises(RuntimeError, match=r"saw no per-sample gradient for \['extra.weight', 'extra.bias'\]"):
        book.write_clipped_sums(gsm.get_clipping_coef())
    book.close()


def test_the_expert_bank_keeps_its_hidden_layers_and_their_gradient():
    """What the forward keeps for the sampler: each trainable expert's pre-activation and hidden
    layer on its routed slots, and the pre-activation's gradient of the per-sample losses' sum."""
    torch.manual_seed(5)
    bank = ExpertBank(num_experts=4, d_model=6, hidden=8)
    for p in bank.expert_params(3):
        p.requires_grad_(False)
    bank.hidden_keeper = keeper = HiddenKeeper()
    x, index = torch.randn(5, 3, 6, requires_grad=True), torch.tensor([[0, 1, 3]] * 3 + [[1, 1, 0], [2, 3, 3]])
    bank(x, index).pow(2).sum().backward()
    kept = keeper.pop()
    assert set(kept) == {0, 1, 2} and keeper.pop() == {}  # one forward, trainable experts only
    for e, (pre, hidden, g_pre) in kept.items():
        w_in, b_in, w_out, b_out = (p.detach() for p in bank.expert_params(e))
        rows = x.detach()[index == e]
        expected_pre = (rows @ w_in + b_in).requires_grad_()
        out = torch.nn.functional.gelu(expected_pre) @ w_out + b_out
        out.pow(2).sum().backward()
        torch.testing.assert_close(pre, expected_pre.detach())
        torch.testing.assert_close(hidden, torch.nn.functional.gelu(expected_pre.detach()))
        torch.testing.assert_close(g_pre, expected_pre.grad)


def test_the_sampler_takes_the_kept_hidden_layers_instead_of_recomputing_them():
    """The factors of a bank with a keeper are the forward's (recomputing gives the same numbers,
    slower): doctored kept values show up in the factor pairs."""
    torch.manual_seed(6)
    bank = ExpertBank(num_experts=2, d_model=4, hidden=5)
    bank.hidden_keeper = keeper = HiddenKeeper()
    x, index = torch.randn(3, 2, 4, requires_grad=True), torch.tensor([[0, 1], [1, 1], [0, 0]])
    bank(x, index).sum().backward()
    for entry in keeper.forwards[-1].values():
        entry[1], entry[2] = torch.full_like(entry[1], 7.0), torch.full_like(entry[2], 3.0)
    pairs = samplers.expert_bank_factor_pairs(bank, [x.detach(), index], torch.ones(3, 2, 4))
    for e in range(2):
        w_in, _, w_out, _ = bank.expert_params(e)
        g_pre, hidden = pairs[w_in][0], pairs[w_out][1]
        routed = (index == e).sum(dim=1)
        for n in range(3):  # routed slots hold the doctored values, padding stays zero
            assert torch.all(g_pre[n, : routed[n]] == 3.0) and torch.all(g_pre[n, routed[n]:] == 0.0)
            assert torch.all(hidden[n, : routed[n]] == 7.0) and torch.all(hidden[n, routed[n]:] == 0.0)


def test_training_leaves_no_book_keeping_hooks_or_keeper_on_the_model():
    model = MoEClassifier(MoEConfig(d_model=8, expert_hidden=8, num_experts=4, top_k=2))
    freeze_inactive_experts(model, [0, 2])
    data = TensorDataset(torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,)))
    hooks_before = sum(len(m._forward_pre_hooks) for m in model.modules())
    noiseless_step(model, data, "bookkeeping", 1.0)
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    assert all(layer.experts.hidden_keeper is None for layer in model.moe_layers)
    model.train()
    MoELoss()(model(data.tensors[0]), data.tensors[1]).backward()  # plain training works again


def record_noise_draws(monkeypatch, replace=None) -> list[tuple]:
    """Calls of Opacus' noise function, as (std, reference, generator, secure_mode); ``replace``
    (reference -> tensor) stands in for the draw."""
    import opacus.optimizers.optimizer as opacus_optimizer

    draws, original = [], opacus_optimizer._generate_noise

    def recording(std, reference, generator=None, secure_mode=False):
        draws.append((std, reference, generator, secure_mode))
        return replace(reference) if replace else original(std, reference, generator=generator, secure_mode=secure_mode)

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", recording)
    return draws


def two_steps_on_a_small_moe(mode: str, generator: torch.Generator, max_grad_norm: float) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model before, model after) one epoch of two expected batches of 4, SGD at learning rate 1."""
    model = MoEClassifier(MoEConfig(d_model=8, expert_hidden=8, num_experts=4, top_k=2))
    freeze_inactive_experts(model, [1])
    before = copy.deepcopy(model)
    ledger = privacy.PrivacyLedger(site=0, target_epsilon=8.0, delta=1e-5, noise_multiplier=1.0,
                                   count_noise_multiplier=20.0, sample_rate=0.5)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    data = TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    privacy.train_private(model, data, 4, optimizer, 1, ledger, max_grad_norm, mode, generator)
    return before, model


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost", "hooks"])
def test_the_noise_is_drawn_in_opacus_secure_mode_from_the_sites_generator(mode, monkeypatch):
    """Each step draws the noise of every trainable tensor through Opacus' hardened sampling (a
    sum of four Gaussians, against floating-point attacks on one) with the generator
    train_private was given, at standard deviation sigma C."""
    draws = record_noise_draws(monkeypatch)
    generator = privacy.dp_generator()
    before, _ = two_steps_on_a_small_moe(mode, generator, 0.5)
    trainable = sum(p.numel() for p in before.parameters() if p.requires_grad)
    assert len(draws) == 2  # two steps
    assert all((std, reference.numel(), g, secure) == (0.5, trainable, generator, True) for std, reference, g, secure in draws)


def test_a_clipped_sum_is_noised_once():
    """Opacus' guard against a gradient used in two steps (no zero_grad between them) holds for
    the one-draw noise: a second draw over the same clipped sums is refused."""
    from opacus.optimizers import DPOptimizer

    layer = torch.nn.Linear(3, 2)
    optimizer = DPOptimizer(torch.optim.SGD(layer.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_batch_size=4)
    for p in layer.parameters():
        p.summed_grad = torch.zeros_like(p)
    privacy.dp_sgd.add_noise_in_one_draw(optimizer)
    with pytest.raises(ValueError, match="zero_grad"):
        privacy.dp_sgd.add_noise_in_one_draw(optimizer)


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost", "hooks"])
def test_each_tensor_gets_its_own_part_of_the_draw_divided_by_the_expected_batch(mode, monkeypatch):
    """With gradients clipped to nothing, two SGD steps at learning rate 1 move each trainable
    tensor by minus twice its slice of the draw (the draw's order: the model's trainable
    parameters) over the expected batch of 4; frozen tensors do not move."""
    record_noise_draws(monkeypatch, replace=lambda reference: torch.arange(reference.numel(), dtype=torch.float32))
    before, after = two_steps_on_a_small_moe(mode, privacy.dp_generator(), 1e-12)
    offset = 0
    for (name, old), new in zip(before.named_parameters(), after.parameters(), strict=True):
        if not old.requires_grad:
            assert torch.equal(old, new), name
            continue
        slice_ = torch.arange(offset, offset + old.numel(), dtype=torch.float32).view_as(old)
        torch.testing.assert_close(new - old, -2 * slice_ / 4, rtol=1e-5, atol=1e-4, msg=name)
        offset += old.numel()
