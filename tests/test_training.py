"""Local training: frozen experts stay bit-identical, only trained tensors are sent, the iterate
average a site sends."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedmoe.models.moe import MoEClassifier, MoEConfig
from fedmoe import privacy
from fedmoe.training import (
    NoiseAwareAdam,
    TensorRows,
    freeze_inactive_experts,
    iterate_average,
    make_loader,
    make_optimizer,
    routing_counts,
    train_epochs,
    trained_state,
)


def test_frozen_experts_bit_identical_after_local_training():
    torch.manual_seed(0)
    model = MoEClassifier(MoEConfig(d_model=16, expert_hidden=16, num_experts=4, top_k=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.randn(96, 1, 28, 28), torch.randint(0, 10, (96,))
    freeze_inactive_experts(model, [1])
    for name in ("adam", "adam-bc", "sgd"):
        train_epochs(model, make_loader(images, labels, 16, torch.Generator().manual_seed(0)), make_optimizer(name, model.parameters(), 1e-2), 2)
    after = model.state_dict()
    for e in (0, 2, 3):
        for p in ("w_in", "b_in", "w_out", "b_out"):
            key = f"moe_layers.0.experts.{p}_{e}"
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["moe_layers.0.experts.w_in_1"], after["moe_layers.0.experts.w_in_1"])
    assert not torch.equal(before["head.weight"], after["head.weight"])
    sent = trained_state(model)
    assert {k for k in sent if ".experts." in k} == {f"moe_layers.0.experts.{p}_1" for p in ("w_in", "b_in", "w_out", "b_out")}


def test_noise_aware_adam_without_noise_is_adam():
    torch.manual_seed(0)
    ours, reference = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(5, 3))
    reference.data.copy_(ours.data)
    steps = [NoiseAwareAdam([ours], lr=0.01), torch.optim.Adam([reference], lr=0.01)]
    for _ in range(20):
        gradient = torch.randn(5, 3)
        ours.grad, reference.grad = gradient.clone(), gradient.clone()
        for optimizer in steps:
            optimizer.step()
    torch.testing.assert_close(ours.data, reference.data, rtol=1e-5, atol=1e-6)


def test_noise_aware_adam_step_on_a_hand_computed_case():
    # first step: m^ = g, v^ = g^2; with phi 1 and floor 0.25, v^ - phi = [8, -0.75] -> [8, 0.25]
    theta = nn.Parameter(torch.tensor([1.0, 1.0]))
    optimizer = NoiseAwareAdam([theta], lr=0.1, eps=0.0, floor=0.25)
    optimizer.param_groups[0]["noise_variance"] = 1.0
    theta.grad = torch.tensor([3.0, 0.5])
    optimizer.step()
    torch.testing.assert_close(theta.data, torch.tensor([1.0 - 0.1 * 3.0 / 8**0.5, 1.0 - 0.1 * 0.5 / 0.5]))


def test_routing_counts_cover_every_token_slot():
    model = MoEClassifier(MoEConfig(d_model=8, expert_hidden=8, num_experts=3, top_k=2))
    counts = routing_counts(model, torch.randn(10, 1, 28, 28), batch_size=3)
    assert counts.sum() == 10 * 16 * 2


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = MoEClassifier(MoEConfig(d_model=16, expert_hidden=16, num_experts=4, top_k=2))
    images = torch.randn(128, 1, 28, 28)
    labels = (images.mean(dim=(1, 2, 3)) > 0).long()
    loader = make_loader(images, labels, 32, torch.Generator().manual_seed(0))
    opt = make_optimizer("adam", model.parameters(), 3e-3)
    first = train_epochs(model, loader, opt, 1)
    last = train_epochs(model, loader, opt, 5)
    assert last < first


def test_iterate_average_of_gradient_descent_on_a_quadratic():
    """Loss 0.5 |w - c|^2 under plain SGD: w_{t+1} = w_t - lr (w_t - c), so iterate t is
    c + (1 - lr)^t (w_0 - c); the average follows a_{t+1} = d_t a_t + (1 - d_t) w_{t+1} with
    d_t = min(decay, (1 + t) / (10 + t)), a_0 = w_0, worked out here in numpy."""
    w0, c, lr, decay, steps = np.array([3.0, -1.0]), np.array([0.5, 2.0]), 0.2, 0.6, 7
    w = nn.Parameter(torch.tensor(w0))
    optimizer = torch.optim.SGD([w], lr=lr)
    with iterate_average(nn.ParameterList([w]), optimizer, decay):
        for _ in range(steps):
            optimizer.zero_grad()
            (0.5 * ((w - torch.tensor(c)) ** 2).sum()).backward()
            optimizer.step()
    expected = w0.copy()
    for t in range(steps):
        d = min(decay, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * (c + (1 - lr) ** (t + 1) * (w0 - c))
    np.testing.assert_allclose(w.detach().numpy(), expected, rtol=1e-12)


def test_iterate_average_off_leaves_the_last_iterate_and_frozen_tensors_alone():
    def train(decay: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = MoEClassifier(MoEConfig(d_model=16, expert_hidden=16, num_experts=4, top_k=2))
        freeze_inactive_experts(model, [1])
        images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
        optimizer = make_optimizer("adam", model.parameters(), 1e-2)
        with iterate_average(model, optimizer, decay):
            train_epochs(model, make_loader(images, labels, 16, torch.Generator().manual_seed(0)), optimizer, 1)
        return {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(0)
    initial = MoEClassifier(MoEConfig(d_model=16, expert_hidden=16, num_experts=4, top_k=2)).state_dict()
    last, averaged = train(0.0), train(0.9)
    for e in (0, 2, 3):
        key = f"moe_layers.0.experts.w_in_{e}"
        assert torch.equal(averaged[key], initial[key]) and torch.equal(last[key], initial[key])
    # after 4 steps the warm-up decay is at most 0.31: the average differs from the last iterate and the start
    for key in ("head.weight", "moe_layers.0.experts.w_in_1"):
        assert not torch.equal(averaged[key], last[key]) and not torch.equal(averaged[key], initial[key])


@pytest.mark.parametrize("physical", [0, 4])
def test_iterate_average_counts_noisy_steps_under_dp(physical):
    """Under DP-SGD the average moves once per noisy step (not per physical batch): recomputed
    from the iterates the optimizer leaves after each of its own steps."""
    torch.manual_seed(0)

    class Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.layer(x), torch.zeros(len(x))

    model = Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    iterates = []
    optimizer.register_step_post_hook(lambda *_: iterates.append(model.layer.weight.detach().clone()))
    start = model.layer.weight.detach().clone()
    ledger = privacy.PrivacyLedger(site=0, target_epsilon=8.0, delta=1e-5, noise_multiplier=1.0,
                                   count_noise_multiplier=60.0, sample_rate=0.25, num_examples=64)
    with iterate_average(model, optimizer, 0.9):
        privacy.train_private(model, TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,))), 16, optimizer, 2,
                              ledger, 1.0, "bookkeeping", privacy.dp_generator(), physical)
    assert len(iterates) == ledger.steps == 8
    expected = start
    for t, iterate in enumerate(iterates):
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * iterate
    torch.testing.assert_close(model.layer.weight.detach(), expected)


def test_loaders_fetch_whole_batches_that_match_the_example_by_example_fetch():
    """make_loader's batches (one index per tensor) are the ones a TensorDataset loader stacks
    example by example under the same generator; an empty index list is an empty batch."""
    from torch.utils.data import DataLoader

    images, labels = torch.randn(23, 1, 4, 4), torch.arange(23)
    ours = list(make_loader(images, labels, 5, torch.Generator().manual_seed(3)))
    reference = list(DataLoader(TensorDataset(images, labels), batch_size=5, shuffle=True,
                                generator=torch.Generator().manual_seed(3)))
    assert len(ours) == len(reference) == 5
    for (x, y), (x_ref, y_ref) in zip(ours, reference, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    empty_x, empty_y = TensorRows(images, labels).__getitems__([])
    assert empty_x.shape == (0, 1, 4, 4) and empty_y.shape == (0,) and empty_y.dtype == labels.dtype
