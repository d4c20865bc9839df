"""Personal parts (fedmoe.federation.personalization): which tensors they are, that they never leave a site,
that the server neither expects nor aggregates them, and that a restarted site gets them back; and the
whole personal model of personal-model=ditto: its objective, that nothing sent depends on it, that it is kept."""

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from clients.app import PERSONAL_FILE, PERSONAL_MODEL_FILE, app as client_app
from fedmoe.federation import personalization, wire
from fedmoe.federation.aggregation import RobustRules
from fedmoe.models.charlm import CharLMConfig, CharMoETransformer
from fedmoe.config import ConfigError, RunConfig
from fedmoe.models.moe import MoEClassifier, MoEConfig
from fedmoe.training import ProximalLoss, evaluate
from server.strategy import ExpertMatched
from tests.sites import context, global_model, message, needs_fmnist, reply_arrays, run_config, server_identity  # noqa: F401
from tests.test_strategy_robustness import CFG, GLOBAL, reply


def test_parts_name_the_head_and_the_routers():
    image = MoEClassifier(MoEConfig(num_moe_layers=2)).state_dict()
    assert personalization.personal_keys(image, "head") == {"head.weight", "head.bias"}
    assert personalization.personal_keys(image, "router") == {"moe_layers.0.router.weight", "moe_layers.1.router.weight"}
    assert personalization.personal_keys(image, "head,router") == {"head.weight", "head.bias", "moe_layers.0.router.weight",
                                                                   "moe_layers.1.router.weight"}
    assert personalization.personal_keys(image, "none") == frozenset()
    text = CharMoETransformer(CharLMConfig(num_moe_layers=1)).state_dict()
    assert personalization.personal_keys(text, "head") == {"head.weight", "head.bias"}
    with_expert = CharMoETransformer(CharLMConfig(num_moe_layers=2, personal_expert=True)).state_dict()
    assert personalization.personal_keys(with_expert, "expert") == {
        f"moe_layers.{layer}.personal_expert.{linear}.{p}" for layer in (0, 1) for linear in ("w_in", "w_out")
        for p in ("weight", "bias")}
    assert RunConfig.from_run_config({"task": "charlm", "personalize": "expert,head"}).personal_expert
    with pytest.raises(ConfigError, match="run config 'personalize': a personal expert .* not task='hf-moe'"):
        RunConfig.from_run_config({"task": "hf-moe", "personalize": "expert"})
    with pytest.raises(ConfigError, match="run config 'personalize': unknown personal parts \\['experts'\\]"):
        RunConfig.from_run_config({"personalize": "head,experts"})


@pytest.mark.parametrize("model", [MoEClassifier, CharMoETransformer])
def test_a_personal_expert_starts_silent(model):
    """Until a site trains it, the personal expert adds nothing: the model computes what the same
    weights compute without it, so the global model (which never trains it) is the plain MoE."""
    config = MoEConfig(num_moe_layers=2) if model is MoEClassifier else CharLMConfig(num_moe_layers=2, seq_len=16)
    torch.manual_seed(0)
    plain = model(config).eval()
    grafted = model(dataclasses.replace(config, personal_expert=True)).eval()
    missing = grafted.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(".personal_expert." in key for key in missing)
    inputs = torch.randn(4, 1, 28, 28) if model is MoEClassifier else torch.randint(0, 256, (4, 16))
    assert torch.equal(grafted(inputs)[0], plain(inputs)[0])
    assert any(p.abs().sum() > 0 for p in grafted.moe_layers[0].personal_expert.parameters())  # not all zeros


@pytest.mark.parametrize("rules", [RobustRules(), RobustRules(rule="median", update_norm_bound=100.0)], ids=["plain", "robust"])
def test_the_server_rejects_a_reply_carrying_a_personal_part_and_keeps_the_global_one(rules):
    """... and aggregates everything else, under the robust rules too (which take a unit only from
    sites that sent all of it: the personal parts must not count as part of the shared unit)."""
    personal = frozenset({"head.weight", "head.bias"})
    with pytest.raises(wire.InvalidReply, match="tensor 'head.(weight|bias)' is a personal part"):
        wire.decode_train_reply(reply(0, "valid", [1], 1).content, GLOBAL, CFG.num_experts, personal=personal)
    s = ExpertMatched(num_experts=CFG.num_experts, personal=personal, rules=rules)
    s.global_arrays = dict(GLOBAL)
    replies = []
    for site in (0, 1):
        msg = reply(site, "valid", [1], 1)
        for key in personal:
            del msg.content.array_records[wire.ARRAYS][key]
        replies.append(msg)
    arrays, _ = s.aggregate_train(1, replies)
    got = wire.to_numpy(arrays)
    assert s.round_stats[1].replies == 2
    assert all(got[k].tobytes() == GLOBAL[k].tobytes() for k in personal)
    assert not np.array_equal(got["embed.weight"], GLOBAL["embed.weight"])


@needs_fmnist
@pytest.mark.parametrize("part, kept", [("head", "head.weight"), ("expert", "moe_layers.0.personal_expert.w_out.weight")])
def test_personal_parts_never_leave_the_site_and_survive_a_restart(tmp_path, part, kept):
    cfg = run_config({"dp": True, "num-server-rounds": 3, "max-examples-per-site": 200, "d-model": 16,
                      "expert-hidden": 16, "batch-size": 32, "noise-multiplier": 1.0, "target-epsilon": 100.0,
                      "personalize": part, "dp-site-evaluation": True})
    model = global_model(cfg)
    personal = {k for k in model.state_dict() if (k.startswith("head.") if part == "head" else ".personal_expert." in k)}
    assert kept in personal and len(personal) == (2 if part == "head" else 4)
    state = tmp_path / "site"
    sent = reply_arrays(client_app(message(model, 1, tmp_path / "run"), context(cfg, state)))
    assert not personal & set(sent) and "embed.weight" in sent
    saved = torch.load(state / "run" / PERSONAL_FILE, weights_only=True)
    assert set(saved) == personal
    assert not torch.equal(saved[kept], model.state_dict()[kept])  # trained (with DP-SGD)
    # the node restarts (empty Context.state): its evaluation uses the parts it kept
    restarted = context(cfg, state)
    metrics = client_app(message(model, 1, tmp_path / "run", MessageType.EVALUATE), restarted).content.metric_records[wire.METRICS]
    from fedmoe.data import tasks

    _, _, test_inputs, test_targets = tasks.site_data(RunConfig.from_run_config(cfg), 0, 3)
    own = global_model(cfg)
    own.load_state_dict(saved, strict=False)
    loss, accuracy = evaluate(own, test_inputs, test_targets)
    assert metrics[wire.EVAL_ACCURACY] == accuracy and metrics[wire.EVAL_LOSS] == pytest.approx(loss, rel=1e-6)
    generic_loss, _ = evaluate(global_model(cfg), test_inputs, test_targets)
    assert generic_loss != pytest.approx(loss, rel=1e-6)
    # and trains on from them: round 2's kept parts moved on from round 1's
    client_app(message(model, 2, tmp_path / "run"), restarted)
    again = torch.load(state / "run" / PERSONAL_FILE, weights_only=True)
    assert not torch.equal(again[kept], saved[kept])


def test_the_ditto_objective_adds_half_lambda_times_the_squared_distance_to_the_anchor():
    """By hand: logits (0, ln 3) for label 1 cost ln(4/3); weight I and bias 0 against an anchor of
    weight 0 and bias 1 are at squared distance 4, so lambda 0.5 adds 1; the frozen tensor adds nothing."""
    model = torch.nn.Linear(2, 2)
    extra = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    model.register_parameter("frozen", extra)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    anchor = {"weight": torch.zeros(2, 2), "bias": torch.ones(2), "frozen": torch.zeros(3)}
    logits = torch.tensor([[0.0, float(np.log(3.0))]])
    loss = ProximalLoss(model, anchor, 0.5)((logits, torch.zeros(1)), torch.tensor([1]))
    assert float(loss.detach()) == pytest.approx(np.log(4 / 3) + 1.0, rel=1e-6)
    loss.backward()
    assert torch.allclose(model.weight.grad, 0.5 * torch.eye(2)) and torch.allclose(model.bias.grad, torch.full((2,), -0.5))
    assert float(ProximalLoss(model, anchor, 0.0)((logits, torch.zeros(1)), torch.tensor([1]))) == pytest.approx(np.log(4 / 3))


@needs_fmnist
def test_a_ditto_site_sends_exactly_what_it_sends_without_its_personal_model_and_keeps_that_model(tmp_path):
    base = {"dp": True, "num-server-rounds": 3, "max-examples-per-site": 200, "d-model": 16, "expert-hidden": 16,
            "batch-size": 32, "noise-multiplier": 1.0, "target-epsilon": 100.0, "dp-site-evaluation": True,
            "dp-reproducible-noise": True, "personal-learning-rate": 0.01}
    plain, ditto = run_config(base), run_config(base, **{"personal-model": "ditto", "ditto-lambda": 0.0})
    model = global_model(plain)
    sent_plain = reply_arrays(client_app(message(model, 1, tmp_path / "run"), context(plain, tmp_path / "plain")))
    sent_ditto = reply_arrays(client_app(message(model, 1, tmp_path / "run"), context(ditto, tmp_path / "ditto")))
    assert sent_ditto.keys() == sent_plain.keys()
    assert all(torch.equal(sent_ditto[k], sent_plain[k]) for k in sent_plain)
    assert not (tmp_path / "plain" / "run" / PERSONAL_MODEL_FILE).exists()
    kept = torch.load(tmp_path / "ditto" / "run" / PERSONAL_MODEL_FILE, weights_only=True)
    assert kept.keys() == model.state_dict().keys()
    assert not torch.equal(kept["embed.weight"], model.state_dict()["embed.weight"])
    assert not torch.equal(kept["embed.weight"], sent_ditto["embed.weight"])
    # after a restart the site evaluates the model it kept, not the global one it is sent
    from fedmoe.data import tasks

    _, _, test_inputs, test_targets = tasks.site_data(RunConfig.from_run_config(ditto), 0, 3)
    own = global_model(ditto)
    own.load_state_dict(kept)
    loss, accuracy = evaluate(own, test_inputs, test_targets)
    restarted = context(ditto, tmp_path / "ditto")
    metrics = client_app(message(model, 1, tmp_path / "run", MessageType.EVALUATE), restarted).content.metric_records[wire.METRICS]
    assert metrics[wire.EVAL_ACCURACY] == accuracy and metrics[wire.EVAL_LOSS] == pytest.approx(loss, rel=1e-6)
    # round 2 trains on from the kept model; a strong pull keeps it close to the global model it received
    client_app(message(model, 2, tmp_path / "run"), restarted)
    again = torch.load(tmp_path / "ditto" / "run" / PERSONAL_MODEL_FILE, weights_only=True)
    assert not torch.equal(again["embed.weight"], kept["embed.weight"])
    pulled = run_config(base, **{"personal-model": "ditto", "ditto-lambda": 100.0})
    client_app(message(model, 1, tmp_path / "run"), context(pulled, tmp_path / "pulled"))
    tied = torch.load(tmp_path / "pulled" / "run" / PERSONAL_MODEL_FILE, weights_only=True)

    def distance(state):
        return sum(float((state[k] - v).pow(2).sum()) for k, v in model.state_dict().items()) ** 0.5

    assert distance(tied) < 0.5 * distance(kept)


def test_a_personal_model_replaces_personal_parts():
    with pytest.raises(ConfigError, match="run config 'personal-model': a whole personal model replaces personal parts"):
        RunConfig.from_run_config({"personal-model": "ditto", "personalize": "head"})
