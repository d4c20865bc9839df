"""Hugging Face transformers MoE models (task hf-moe): slice mapping, per-sample gradients against
the stock model, frozen slices, wire validation, a federated run and the exported model."""

import copy
import json

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping

transformers = pytest.importorskip("transformers")

from fedmoe import privacy  # noqa: E402
from fedmoe.privacy import samplers  # noqa: E402
from fedmoe.federation import wire  # noqa: E402
from fedmoe.models import hf_moe  # noqa: E402
from fedmoe.config import ConfigError, launch_config  # noqa: E402
from fedmoe.models.hf_families import FAMILIES  # noqa: E402
from fedmoe.training import MoELoss, freeze_inactive_experts, trained_state  # noqa: E402

SEQ = 8


def stock_model(family, dtype=torch.float32, seed=0, **sizes):
    """A tiny stock transformers model of the family, with non-zero everything."""
    torch.manual_seed(seed)
    shape = dict(d_model=16, num_layers=2, num_heads=2, num_experts=4, top_k=2, expert_hidden=12, seq_len=SEQ)
    shape.update(sizes)
    config = hf_moe.hf_config_for(family, 256, **shape)
    model = getattr(transformers, FAMILIES[family].model_class)(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():  # the default init leaves norms at 1 and some tensors tiny
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def wrapped(stock, aux=0.0, z=0.0):
    return hf_moe.HFMoECausalLM(copy.deepcopy(stock), SEQ, aux, z)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_wrapper_computes_what_the_stock_model_computes_and_maps_back_slice_by_slice(family):
    stock = stock_model(family)
    model = wrapped(stock).eval()
    tokens = torch.randint(0, 256, (3, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0], stock(input_ids=tokens).logits, rtol=0, atol=1e-6)
    fused = stock.state_dict()
    for layer in range(2):
        bank = model.moe_layers[layer].experts
        for e in range(4):
            gate_up, down = bank.expert_params(e)
            assert torch.equal(gate_up, fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e])
            assert torch.equal(down, fused[f"model.layers.{layer}.mlp.experts.down_proj"][e])
    back = model.to_hf().state_dict()
    assert back.keys() == fused.keys()
    assert all(torch.equal(back[k], fused[k]) for k in fused)
    # every parameter has exactly one name, and expert ids come from the slice names
    names = list(model.state_dict())
    assert len(names) == len(set(names)) == len(dict(model.named_parameters()))
    ids = {wire.expert_id(k, 4) for k in names} - {None}
    assert ids == set(range(8))
    assert wire.expert_id("moe_layers.1.experts.down_3", 4) == 7
    assert wire.expert_id("moe_layers.1.gate.weight", 4) is None


def brute_force_grads(model, tokens):
    """{name: [N, *shape]}, one backward per sample through ``model`` (a stock transformers model,
    its experts run by the library's own per-expert loop: grouped_mm has no float64 kernel)."""
    model.set_experts_implementation("eager")
    out = {n: [] for n, p in model.named_parameters()}
    for i in range(len(tokens)):
        model.zero_grad()
        logits = model(input_ids=tokens[i : i + 1, :-1]).logits
        torch.nn.functional.cross_entropy(logits[0], tokens[i, 1:]).backward()
        for n, p in model.named_parameters():
            out[n].append(p.grad.detach().clone())
    return {n: torch.stack(g) for n, g in out.items()}


def stock_name(model, name):
    """The stock model's name of a wrapper parameter, with the expert index for slices."""
    if name.startswith("hf."):
        return name[3:], None
    _, layer, rest = name.split(".", 2)
    prefix = f"model.layers.{model.sparse_layer_index[int(layer)]}.mlp."
    if rest.startswith("experts."):
        param, e = rest[len("experts."):].rsplit("_", 1)
        return prefix + "experts." + {"gate_up": "gate_up_proj", "down": "down_proj"}[param], int(e)
    return prefix + rest, None


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe"])
def test_hf_per_sample_grads_match_the_stock_model_one_sample_at_a_time(family):
    """Opacus' per-sample gradients of the wrapped model (expert slices through fedmoe's SwiGLU
    grad sampler; router, attention, norms, embeddings, shared expert through Opacus) against
    autograd on the unmodified transformers model, one sample at a time, float64."""
    stock = stock_model(family, torch.float64)
    tokens = torch.randint(0, 256, (4, SEQ + 1))
    expected = brute_force_grads(copy.deepcopy(stock).train(), tokens)
    model = wrapped(stock).train()
    freeze_inactive_experts(model, [0, 2, 5, 7])
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    MoELoss(reduction="sum")(gsm(tokens[:, :-1]), tokens[:, 1:]).backward()
    checked = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert getattr(p, "grad_sample", None) is None, name
            continue
        key, e = stock_name(model, name)
        want = expected[key] if e is None else expected[key][:, e]
        torch.testing.assert_close(p.grad_sample, want, rtol=1e-9, atol=1e-12, msg=name)
        checked += 1
    assert checked == sum(p.requires_grad for p in model.parameters())
    assert {"moe_layers.0.experts.gate_up_2", "moe_layers.1.experts.down_3"} <= {
        n for n, p in model.named_parameters() if p.requires_grad}


def test_hf_ghost_norms_match_the_stock_model_one_sample_at_a_time():
    stock = stock_model("qwen3-moe", torch.float64)
    tokens = torch.randint(0, 256, (5, SEQ + 1))
    expected = brute_force_grads(copy.deepcopy(stock).train(), tokens)
    model = wrapped(stock).train()
    freeze_inactive_experts(model, [1, 2, 4, 6])
    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum", max_grad_norm=1e9,
                                               use_ghost_clipping=True)
    MoELoss(reduction="sum")(gsm(tokens[:, :-1]), tokens[:, 1:]).backward()
    squares = torch.zeros(5, dtype=torch.float64)
    for name, p in model.named_parameters():
        if p.requires_grad:
            key, e = stock_name(model, name)
            g = expected[key] if e is None else expected[key][:, e]
            squares += g.flatten(1).pow(2).sum(1)
    torch.testing.assert_close(gsm.get_norm_sample(), squares.sqrt(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tokens", [7, 200])
def test_hf_swiglu_norm_sampler_equals_the_norms_of_its_grad_sampler(tokens):
    torch.manual_seed(3)
    bank = hf_moe.SwiGLUExpertBank(4, 16, 24)
    for p in bank.parameters():
        torch.nn.init.normal_(p)
    for p in bank.expert_params(1):
        p.requires_grad_(False)
    x, index, backprops = torch.randn(5, tokens, 16), torch.randint(0, 4, (5, tokens)), torch.randn(5, tokens, 16)
    grads = samplers.compute_expert_bank_grad_sample(bank, [x, index], backprops)
    norms = samplers.compute_expert_bank_norm_sample(bank, [x, index], backprops)
    assert grads.keys() == norms.keys() and len(norms) == 6  # experts 0, 2 and 3, two tensors each
    for p, g in grads.items():
        torch.testing.assert_close(norms[p], g.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dp", [False, True])
def test_hf_inactive_slices_stay_bit_identical_through_adam_and_dp_sgd(dp):
    """Local training as a site does it (Adam, and DP-SGD with noise on every trained tensor):
    the active slices move, the inactive ones do not change by a bit, in the exported fused tensors too."""
    from fedmoe.training import make_loader, make_optimizer, train_epochs

    model = wrapped(stock_model("mixtral")).train()
    before = model.to_hf().state_dict()
    active = [0, 3, 6]
    freeze_inactive_experts(model, active)
    tokens = torch.randint(0, 256, (24, SEQ + 1))
    optimizer = make_optimizer("adam", model.parameters(), 0.05)
    if dp:
        ledger = privacy.PrivacyLedger(site=0, target_epsilon=8.0, delta=1e-5, noise_multiplier=1.0,
                                       count_noise_multiplier=60.0, sample_rate=0.5, num_examples=24)
        privacy.train_private(model, torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]), 12, optimizer, 2,
                              ledger, 1.0, "bookkeeping", torch.Generator().manual_seed(0))
    else:
        train_epochs(model, make_loader(tokens[:, :-1], tokens[:, 1:], 8, torch.Generator().manual_seed(0)), optimizer, 2)
    after = model.to_hf().state_dict()
    for layer in range(2):
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.experts.{name}"
            for e in range(4):
                moved = not torch.equal(after[key][e], before[key][e])
                assert moved == (layer * 4 + e in active), (key, e)
    sent = trained_state(model)
    assert {wire.expert_id(k, 4) for k in sent} - {None} == set(active)


def test_hf_wire_rejects_unknown_slices_wrong_shapes_and_nan():
    model = wrapped(stock_model("qwen2-moe"))
    global_arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    freeze_inactive_experts(model, [1, 4])
    trained = {k: v.numpy() for k, v in trained_state(model).items()}
    counts = np.ones(8)

    def decode(tensors):
        content = wire.encode_train_reply({k: torch.from_numpy(v) for k, v in tensors.items()}, 0, 10, [1, 4], counts,
                                          None, None)
        return wire.decode_train_reply(content, global_arrays, 4)

    assert decode(trained).active_experts == [1, 4]
    unknown = dict(trained, **{"moe_layers.0.experts.gate_up_9": trained["moe_layers.0.experts.gate_up_1"]})
    with pytest.raises(wire.InvalidReply, match="gate_up_9"):
        decode(unknown)
    inactive = dict(trained, **{"moe_layers.0.experts.down_2": global_arrays["moe_layers.0.experts.down_2"]})
    with pytest.raises(wire.InvalidReply):
        decode(inactive)
    wrong = dict(trained, **{"moe_layers.1.experts.down_0": trained["moe_layers.1.experts.down_0"][:, :-1]})
    with pytest.raises(wire.InvalidReply, match=r"float32\[16, 11\], expected float32\[16, 12\]"):
        decode(wrong)
    nan = {k: v.copy() for k, v in trained.items()}
    nan["moe_layers.0.shared_expert.down_proj.weight"][0, 0] = np.nan
    with pytest.raises(wire.InvalidReply):
        decode(nan)


def test_hf_model_path_must_agree_with_the_run_config(tmp_path):
    stock_model("olmoe").save_pretrained(tmp_path / "m")
    config = {"task": "hf-moe", "model-path": str(tmp_path / "m"), "num-experts": 4, "top-k": 2,
              "num-moe-layers": 2, "seq-len": SEQ}
    assert launch_config(config)["model-path"] == str(tmp_path / "m")
    with pytest.raises(ConfigError) as error:
        launch_config(dict(config, **{"num-experts": 8, "top-k": 1}))
    assert "'num-experts': the model at model-path has 4" in str(error.value)
    assert "'top-k': the model at model-path has 2" in str(error.value)
    with pytest.raises(ConfigError, match="no config.json"):
        launch_config(dict(config, **{"model-path": str(tmp_path)}))
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(data, model_type="llama")))
    with pytest.raises(ConfigError, match="not a supported MoE family"):
        launch_config(config)


@pytest.mark.parametrize("family, adapter", [("mixtral", "lora")])
def test_hf_federated_dp_run_exports_a_model_that_from_pretrained_loads_and_generates(tmp_path, family, adapter):
    """A real 2-site simulation (1 round, DP-SGD), then the run folder's hf_model/ loaded by
    transformers' Auto class: it computes what the final global model (the checkpoint) computes,
    with LoRA merged into the weights. (README's hf-moe example runs Qwen2-MoE without adapters
    through the same path, checked by tests/test_readme.py.)"""
    from experiments.launch import run_app
    from fedmoe.data import tasks
    from fedmoe.config import RunConfig

    config = {"task": "hf-moe", "hf-model": family, "adapter": adapter, "languages": "en,ru", "num-moe-layers": 2,
              "d-model": 16, "num-heads": 2, "num-experts": 4, "top-k": 2, "expert-hidden": 16, "seq-len": 16,
              "num-server-rounds": 1, "max-examples-per-site": 120, "batch-size": 16, "learning-rate": 0.005}
    summary = run_app(config, sites=2, results_dir=tmp_path, run_name="hf", quiet=True)
    last = summary["rounds"][-1]
    assert summary["status"] == "completed" and last["replies"] == 2 and not last["rejected_replies"]
    assert 7.0 < last["epsilon_max"] <= 8.0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "hf_model")
    assert type(loaded).__name__ == FAMILIES[family].model_class
    model = tasks.build_model(RunConfig.from_run_config(config))
    model.load_state_dict(torch.load(tmp_path / "hf" / "checkpoint.pt", weights_only=True)["model"])
    initial = tasks.build_model(RunConfig.from_run_config(config)).state_dict()
    assert not torch.equal(model.state_dict()["moe_layers.0.gate.weight"], initial["moe_layers.0.gate.weight"])
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, model.eval()(tokens)[0], rtol=1e-4, atol=1e-5)
    out = loaded.generate(torch.tensor([list(b"The ")]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_hf_dense_layers_stay_stock_and_count_as_no_moe_layer(tmp_path):
    """Qwen2-MoE with layer 0 dense (mlp_only_layers): one sparse block, mapped to decoder layer 1,
    and the launcher asks for num-moe-layers=1."""
    torch.manual_seed(0)
    config = hf_moe.hf_config_for("qwen2-moe", 256, 16, 2, 2, 4, 2, 12, SEQ)
    config.mlp_only_layers = [0]
    stock = transformers.Qwen2MoeForCausalLM(config).eval()
    model = wrapped(stock).eval()
    assert model.sparse_layer_index == [1] and model.config.num_moe_layers == 1 and model.config.total_experts == 4
    tokens = torch.randint(0, 256, (2, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0], stock(input_ids=tokens).logits, rtol=0, atol=1e-6)
    stock.save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="'num-moe-layers': the model at model-path has 1; set num-moe-layers=1, got 2"):
        launch_config({"task": "hf-moe", "model-path": str(tmp_path / "m"), "num-experts": 4, "num-moe-layers": 2,
                       "seq-len": SEQ})


def test_hf_task_starts_from_a_model_folder(tmp_path):
    from fedmoe.data import tasks
    from fedmoe.config import RunConfig

    stock = stock_model("olmoe")
    stock.save_pretrained(tmp_path / "m")
    cfg = RunConfig.from_run_config({"task": "hf-moe", "model-path": str(tmp_path / "m"), "num-experts": 4,
                                     "num-moe-layers": 2, "seq-len": SEQ})
    model = tasks.build_model(cfg).eval()
    assert model.config.family == "olmoe" and model.config.num_tokens == SEQ
    tokens = torch.randint(0, 256, (2, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0], stock(input_ids=tokens).logits, rtol=0, atol=1e-6)


def lora_model(family="qwen2-moe", dtype=torch.float64, rank=3):
    """A wrapped model with LoRA whose factors are all non-zero (B starts at zero, under which the
    gradient of A vanishes and a wrong one would pass)."""
    model = hf_moe.HFMoECausalLM(stock_model(family, dtype), SEQ, 0.01, 0.001, lora_rank=rank, lora_alpha=6.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in model.frozen_parameters:
                p.normal_(0, 0.3)
    return model


def wrapper_brute_force_grads(model, tokens):
    """{name: [N, *shape]}, one backward per sample through the wrapper itself (autograd, no Opacus)."""
    loss_fn = MoELoss()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {n: [] for n, _ in trained}
    for i in range(len(tokens)):
        model.zero_grad()
        loss_fn(model(tokens[i : i + 1, :-1]), tokens[i : i + 1, 1:]).backward()
        for n, p in trained:
            out[n].append(p.grad.detach().clone())
    return {n: torch.stack(g) for n, g in out.items()}


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_hf_lora_per_sample_grads_and_norms_match_one_sample_at_a_time(mode):
    """With adapter=lora only the adapters (peft's on attention and the shared expert, the bank's
    per expert) and the routers train; their per-sample gradients (hooks) and norms (ghost) against
    autograd one sample at a time, float64, with the aux losses on."""
    model = lora_model().train()
    freeze_inactive_experts(model, [0, 3, 6])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not trainable & model.frozen_parameters
    assert {"moe_layers.0.experts.gate_up_a_0", "moe_layers.1.experts.down_b_2", "moe_layers.1.gate.weight",
            "moe_layers.0.shared_expert.up_proj.lora_B.default.weight",
            "hf.model.layers.1.self_attn.q_proj.lora_A.default.weight"} <= trainable
    assert {wire.expert_id(n, 4) for n in trainable} - {None} == {0, 3, 6}
    tokens = torch.randint(0, 256, (4, SEQ + 1))
    expected = wrapper_brute_force_grads(model, tokens)
    if mode == "hooks":
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    else:
        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum", max_grad_norm=1e9,
                                                   use_ghost_clipping=True)
    MoELoss(reduction="sum")(gsm(tokens[:, :-1]), tokens[:, 1:]).backward()
    if mode == "hooks":
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad_sample, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    else:
        total = torch.stack([g.flatten(1).norm(dim=1) for g in expected.values()]).pow(2).sum(0).sqrt()
        torch.testing.assert_close(gsm.get_norm_sample(), total, rtol=1e-9, atol=1e-12)


def test_hf_lora_sends_adapters_and_routers_only_and_the_base_stays_bit_identical():
    model = lora_model(dtype=torch.float32)
    global_arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    active = [1, 4]
    freeze_inactive_experts(model, active)
    tokens = torch.randint(0, 256, (24, SEQ + 1))
    ledger = privacy.PrivacyLedger(site=0, target_epsilon=8.0, delta=1e-5, noise_multiplier=1.0,
                                   count_noise_multiplier=60.0, sample_rate=0.5, num_examples=24)
    from fedmoe.training import make_optimizer

    privacy.train_private(model, torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]), 12,
                          make_optimizer("adam", model.parameters(), 0.05), 1, ledger, 1.0, "bookkeeping",
                          torch.Generator().manual_seed(0))
    after = model.state_dict()
    for key in global_arrays:
        moved = not np.array_equal(after[key].numpy(), global_arrays[key])
        expert = wire.expert_id(key, 4)
        should_move = key not in model.frozen_parameters and (expert is None or expert in active)
        assert moved == should_move, key
    sent = {k: v.numpy() for k, v in trained_state(model).items()}
    assert not set(sent) & model.frozen_parameters
    content = wire.encode_train_reply({k: torch.from_numpy(v) for k, v in sent.items()}, 0, 24, active, np.ones(8), None, None)
    reply = wire.decode_train_reply(content, global_arrays, 4, frozen=model.frozen_parameters)
    assert set(reply.arrays) == set(sent)
    base = "moe_layers.0.experts.gate_up_1"
    with_base = dict(sent, **{base: global_arrays[base]})
    content = wire.encode_train_reply({k: torch.from_numpy(v) for k, v in with_base.items()}, 0, 24, active, np.ones(8), None, None)
    with pytest.raises(wire.InvalidReply, match=f"tensor '{base}' is frozen"):
        wire.decode_train_reply(content, global_arrays, 4, frozen=model.frozen_parameters)
