"""Local training: frozen experts stay bit-identical, only trained tensors are sent."""

import torch

from fedmoe.models.moe import MoEClassifier, MoEConfig
from fedmoe.training import freeze_inactive_experts, make_loader, make_optimizer, routing_counts, train_epochs, trained_state


def test_frozen_experts_bit_identical_after_local_training():
    torch.manual_seed(0)
    model = MoEClassifier(MoEConfig(d_model=16, expert_hidden=16, num_experts=4, top_k=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.randn(96, 1, 28, 28), torch.randint(0, 10, (96,))
    freeze_inactive_experts(model, [1])
    for name in ("adam", "sgd"):
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
