"""The charlm task: byte-level MoE transformer shapes, causal masking, DP, text data, and a tiny
real federated run whose loss goes down."""

import json
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from fedmoe import privacy
from fedmoe.data import text
from fedmoe.federation import wire
from fedmoe.models.charlm import CharLMConfig, CharMoETransformer
from fedmoe.training import freeze_inactive_experts, make_optimizer

SMALL = CharLMConfig(seq_len=16, d_model=16, num_heads=2, num_moe_layers=2, num_experts=4, top_k=2, expert_hidden=16)


def test_shapes_and_per_layer_expert_ids():
    model = CharMoETransformer(SMALL)
    logits, aux = model(torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256) and aux.shape == (3,)
    assert model.routing_counts().shape == (8,) and float(model.routing_counts().sum()) == 3 * 16 * 2 * 2
    expert_keys = {k for k in model.state_dict() if wire.expert_id(k, 4) is not None}
    assert {wire.expert_id(k, 4) for k in expert_keys} == set(range(8))  # layer 1's experts are 4..7


def test_a_position_never_sees_later_bytes():
    torch.manual_seed(0)
    model = CharMoETransformer(SMALL).eval()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    a, _ = model(tokens)
    b, _ = model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost", "hooks"])
def test_dp_training_runs_and_keeps_frozen_experts(mode):
    torch.manual_seed(0)
    model = CharMoETransformer(SMALL)
    freeze_inactive_experts(model, [1, 6])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(0, 256, (48, 17))
    ledger = privacy.PrivacyLedger(site=0, target_epsilon=math.inf, delta=1e-5, noise_multiplier=1.0,
                                   count_noise_multiplier=20.0, sample_rate=1 / 3)
    loss = privacy.train_private(model, TensorDataset(windows[:, :-1], windows[:, 1:]), 16,
                                 make_optimizer("adam", model.parameters(), 1e-2), 1, ledger, 1.0, mode, privacy.dp_generator())
    assert math.isfinite(loss)
    after = model.state_dict()
    for key, value in before.items():
        expert = wire.expert_id(key, 4)
        if expert is not None and expert not in (1, 6):
            assert torch.equal(value, after[key]), key
    assert not torch.equal(before["moe_layers.1.experts.w_in_2"], after["moe_layers.1.experts.w_in_2"])
    assert not torch.equal(before["attn_layers.0.qkv.weight"], after["attn_layers.0.qkv.weight"])


def test_windows_and_a_folder_corpus(tmp_path):
    (tmp_path / "site-a").mkdir()
    (tmp_path / "site-a" / "one.txt").write_text("abcdefghij" * 30)
    (tmp_path / "site-b").mkdir()
    (tmp_path / "site-b" / "two.txt").write_text("ÄÖÜ" * 100)
    sources = text.site_sources([], str(tmp_path))
    assert [label for label, _ in sources] == ["site-a", "site-b"]
    split = text.split_corpus(sources[1][1], seq_len=8)
    assert split.train.shape[1] == 9
    assert split.test_characters < split.test_bytes <= 2 * split.test_characters + 1  # two bytes per umlaut
    w = text.windows(b"0123456789", 4)
    assert w.tolist() == [[48, 49, 50, 51, 52], [52, 53, 54, 55, 56]]


@pytest.mark.skipif(not text.fortune_files("de") or not text.fortune_files("en"),
                    reason="fortunes-de is not installed (make setup installs the fortunes packages)")
def test_fortunes_languages_are_separate_corpora():
    de = text.corpus_bytes("fortunes:de")
    en = text.corpus_bytes("fortunes:en")
    assert len(de) > 100_000 and len(en) > 100_000 and de[:1000] != en[:1000]
    assert all(p.suffix not in (".dat", ".u8") for p in text.fortune_files("de"))


@pytest.mark.skipif(not text.fortune_files("en") or not text.fortune_files("ru"), reason="fortunes, fortunes-ru not installed")
def test_tiny_federated_run_learns_and_writes_the_heat_map(tmp_path):
    from experiments.launch import run_app

    config = {"task": "charlm", "dp": False, "languages": "en,ru", "num-moe-layers": 2, "d-model": 32,
              "num-heads": 2, "num-experts": 4, "expert-hidden": 32, "seq-len": 32, "num-server-rounds": 3,
              "max-examples-per-site": 150, "batch-size": 16, "learning-rate": 0.005, "active-top-m": 2}
    summary = run_app(config, sites=2, results_dir=tmp_path, run_name="charlm", quiet=True)
    rounds = summary["rounds"]
    assert rounds[-1]["loss"] < rounds[0]["loss"] and rounds[-1]["bits_per_char"] < rounds[0]["bits_per_char"]
    assert set(rounds[-1]["site_bits_per_char"]) == {"0", "1"}
    assert all(len(c) == 8 for c in rounds[-1]["site_expert_counts"].values())  # 2 layers x 4 experts
    assert all(0 < b < summary["full_model_bytes"] for b in rounds[-1]["site_uplink_bytes"].values())
    assert (tmp_path / "charlm" / "expert_utilisation.png").stat().st_size > 1000
    assert json.loads((tmp_path / "charlm" / "summary.json").read_text())["config"]["task"] == "charlm"
