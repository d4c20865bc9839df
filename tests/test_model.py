"""Routing invariants and shapes of the MoE classifier."""

import torch

from fedmoe.models.moe import ExpertBank, MoEClassifier, MoEConfig


def small_config(**kw):
    return MoEConfig(**{"d_model": 16, "expert_hidden": 24, "num_experts": 5, "top_k": 2, **kw})


def test_forward_shapes_and_per_sample_aux():
    model = MoEClassifier(small_config(num_moe_layers=2))
    logits, aux = model(torch.randn(7, 1, 28, 28))
    assert logits.shape == (7, 10) and aux.shape == (7,)
    assert model.routing_counts().shape == (10,)


def test_each_token_gets_exactly_k_experts_and_gates_sum_to_one():
    torch.manual_seed(0)
    model = MoEClassifier(small_config(top_k=3))
    layer = model.moe_layers[0]
    h = torch.randn(4, model.config.num_tokens, 16)
    for training in (True, False):
        layer.train(training)
        logits, top_index, gates = layer.route(h)
        assert top_index.shape == (4, 16, 3)
        # k distinct experts per token
        assert (top_index.sort(dim=-1).values.diff(dim=-1) > 0).all()
        torch.testing.assert_close(gates.sum(-1), torch.ones(4, 16))
        assert (gates > 0).all()
    model.eval()
    model(torch.randn(4, 1, 28, 28))
    assert model.routing_counts().sum() == 4 * 16 * 3
    assert (model.moe_layers[0].last_routing.per_sample.sum(-1) == 16 * 3).all()


def test_router_is_deterministic_in_eval_and_noisy_in_training():
    torch.manual_seed(0)
    model = MoEClassifier(small_config(router_noise=5.0))
    x = torch.randn(32, 1, 28, 28)
    model.eval()
    a, _ = model(x)
    b, _ = model(x)
    torch.testing.assert_close(a, b)
    model.train()
    model(x)
    c1 = model.routing_counts().clone()
    model(x)
    assert not torch.equal(c1, model.routing_counts())


def test_expert_bank_matches_per_token_loop():
    torch.manual_seed(1)
    bank = ExpertBank(3, 8, 12)
    x = torch.randn(4, 6, 8)
    idx = torch.randint(0, 3, (4, 6))
    out = bank(x, idx)
    for n in range(4):
        for t in range(6):
            w_in, b_in, w_out, b_out = bank.expert_params(int(idx[n, t]))
            ref = torch.nn.functional.gelu(x[n, t] @ w_in + b_in) @ w_out + b_out
            torch.testing.assert_close(out[n, t], ref)


def test_unused_expert_gets_zero_grad_not_none():
    bank = ExpertBank(3, 4, 5)
    x = torch.randn(2, 3, 4)
    bank(x, torch.zeros(2, 3, dtype=torch.long)).sum().backward()
    for p in bank.expert_params(2):
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0


def test_one_samples_output_does_not_depend_on_another():
    torch.manual_seed(2)
    model = MoEClassifier(small_config()).eval()
    x = torch.randn(5, 1, 28, 28)
    full, aux_full = model(x)
    alone, aux_alone = model(x[:1])
    torch.testing.assert_close(full[:1], alone)
    torch.testing.assert_close(aux_full[:1], aux_alone)


def test_fixed_etf_head_is_a_simplex_frame_with_nothing_to_train_or_send():
    model = MoEClassifier(small_config(head="fixed-etf"))
    weight = model.head.weight  # [S*d, K] class vectors
    k = 10
    gram = weight.T @ weight
    # unit vectors, every pair at cosine -1/(K-1): the most separated K directions there are
    expected = torch.full((k, k), -1.0 / (k - 1)) + torch.eye(k) * (1.0 + 1.0 / (k - 1))
    torch.testing.assert_close(gram, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(weight.sum(dim=1), torch.zeros(weight.shape[0]), atol=1e-5, rtol=0)
    assert not any(name.startswith("head") for name, _ in model.named_parameters())
    assert not any(key.startswith("head") for key in model.state_dict())
    # rebuilt identically everywhere from (dim, K) alone: every site and the server share it
    torch.manual_seed(123)
    torch.testing.assert_close(MoEClassifier(small_config(head="fixed-etf")).head.weight, weight, atol=0, rtol=0)
    images = torch.randn(3, 1, 28, 28)
    model.train(False)  # no router noise
    features = model.norm(model.moe_layers[0](model.position(model.embed(model.patches(images))))[0]).flatten(1)
    torch.testing.assert_close(model(images)[0], features @ weight)


def test_a_token_is_one_patch_channel_by_channel_in_row_major_order():
    model = MoEClassifier(small_config(image_size=8, in_channels=3, patch_size=2))
    images = torch.randn(2, 3, 8, 8)
    tokens = model.patches(images)
    expected = torch.stack([
        torch.stack([images[n, :, row * 2:row * 2 + 2, col * 2:col * 2 + 2].reshape(-1)
                     for row in range(4) for col in range(4)])
        for n in range(2)])
    assert tokens.shape == (2, 16, 12) and tokens.is_contiguous()
    assert torch.equal(tokens, expected)
