"""Tests that play the server (README, "Threat model"): it knows the run config, the seed, the
site id, the round and the model, and sees every reply. It must not be able to regenerate the
randomness DP relies on, and nothing may leave a site that the release classes do not allow."""

import math

import pytest
import torch
from flwr.app import MessageType

from clients.app import app as client_app
from fedmoe.federation import wire
from fedmoe.config import RunConfig
from fedmoe.training import MoELoss, freeze_inactive_experts, round_seed
from tests.sites import context, global_model, message, needs_fmnist, reply_arrays, run_config, server_identity  # noqa: F401

pytestmark = needs_fmnist

RUN = {"dp": True, "num-server-rounds": 2, "max-examples-per-site": 200, "d-model": 16, "expert-hidden": 16,
       "batch-size": 32, "seed": 7, "noise-multiplier": 1.0, "target-epsilon": 1e6}


def site_round(cfg, tmp_path, name, server_round=1):
    """One train round of site 0 on a fresh node (its own state folder), on the same global model."""
    return client_app(message(global_model(cfg), server_round, tmp_path / "run"), context(cfg, tmp_path / name))


def test_the_same_dp_round_twice_gives_different_updates(tmp_path):
    cfg = run_config(RUN)
    first, second = (reply_arrays(site_round(cfg, tmp_path, n)) for n in ("a", "b"))
    server_guess = reply_arrays(site_round(run_config(RUN, **{"dp-reproducible-noise": True}), tmp_path, "c"))
    for key in first:
        if key.startswith("head."):  # always trained, so always noised
            assert not torch.equal(first[key], second[key]), key
            assert not torch.equal(first[key], server_guess[key]), key


def test_reproducible_noise_is_reproducible_and_said_so(tmp_path):
    cfg = run_config(RUN, **{"dp-reproducible-noise": True})
    replies = [site_round(cfg, tmp_path, n) for n in ("a", "b")]
    first, second = map(reply_arrays, replies)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    ledger = replies[0].content.config_records[wire.PRIVACY]["ledger"]
    assert '"reproducible_noise": true' in ledger


def test_without_dp_the_same_round_is_bit_reproducible(tmp_path):
    cfg = run_config(RUN, dp=False)
    replies = [site_round(cfg, tmp_path, n) for n in ("a", "b")]
    first, second = map(reply_arrays, replies)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert wire.TRAIN_LOSS in replies[0].content.metric_records[wire.METRICS]


def clipped_gradient_sum(model, inputs, targets, max_grad_norm):
    """sum_i clip(g_i): every sample's gradient over the trainable parameters, clipped to the
    bound as a whole, one backward per sample (the value DP-SGD adds its noise to)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    for i in range(len(targets)):
        model.zero_grad()
        MoELoss()(model(inputs[i : i + 1]), targets[i : i + 1]).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if n in total}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        factor = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        for n in names:
            total[n] += factor * grads[n]
    return total


def regenerated_noise(seed, num_counts, num_examples, params, std):
    """The noise a site drew from a generator seeded with ``seed``, replayed in the site's order:
    the count release, the data loader's base seed (torch draws one when an iterator starts), the
    Poisson mask of the one step, then the noise of all trainable parameters in one draw, as
    Opacus' hardened sampling draws it (one throwaway draw, then the halved sum of four), cut in
    the parameters' order."""
    generator = torch.Generator().manual_seed(seed)
    torch.randn(num_counts, generator=generator, dtype=torch.float64)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    torch.rand(num_examples, generator=generator)
    torch.normal(mean=0, std=std, size=(1, 1), generator=generator)
    total = sum(p.numel() for _, p in params)
    flat = sum(torch.normal(mean=0, std=std, size=(total,), generator=generator) for _ in range(4)) / 2
    sizes = [p.numel() for _, p in params]
    return {name: z.view_as(p) for (name, p), z in zip(params, flat.split(sizes), strict=True)}


@pytest.mark.parametrize("reproducible", [True, False])
def test_a_server_that_regenerates_the_noise_from_the_config_recovers_the_gradients_only_if_it_was_seeded(tmp_path, reproducible):
    """One DP-SGD step (every example in the batch: q = 1), plain SGD at lr 1, no router noise:
    the update is -(S + sigma C z) / n, S the clipped gradient sum. The server knows n, sigma, C,
    the model and the config; it regenerates z from the config's seed and solves for S."""
    overrides = {"optimizer": "sgd", "learning-rate": 1.0, "batch-size": 256, "router-noise": 0.0,
                 "max-examples-per-site": 50, "dp-reproducible-noise": reproducible}
    cfg = run_config(RUN, **overrides)
    typed = RunConfig.from_run_config(cfg)
    reply = site_round(cfg, tmp_path, "site")
    sent = reply_arrays(reply)
    metrics = reply.content.metric_records[wire.METRICS]
    n = metrics[wire.NUM_EXAMPLES]
    model = global_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    freeze_inactive_experts(model, metrics[wire.ACTIVE_EXPERTS])  # the server reads the active set off the reply
    inputs, targets, _, _ = __import__("fedmoe.data.tasks", fromlist=["site_data"]).site_data(typed, 0, 3)
    assert len(targets) == n == 40
    truth = clipped_gradient_sum(model, inputs, targets, typed.max_grad_norm)
    std = typed.noise_multiplier * typed.max_grad_norm
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    noise = regenerated_noise(round_seed(typed.seed, 0, 1), typed.num_experts, n, params, std)
    recovered_error, noise_norm = 0.0, 0.0
    for name, _ in params:
        # sent = before - (S + noise) / n  (momentum SGD's first step is a plain step)
        recovered = (before[name] - sent[name]) * n - noise[name]
        recovered_error += float((recovered - truth[name]).pow(2).sum())
        noise_norm += float(noise[name].pow(2).sum())
    recovered_error, noise_norm = math.sqrt(recovered_error), math.sqrt(noise_norm)
    if reproducible:  # the attack works when the noise comes from the config ...
        assert recovered_error < 1e-3 * noise_norm
    else:  # ... and misses by the size of two independent noise vectors when it does not
        assert recovered_error > 0.5 * noise_norm


def test_every_field_a_site_sends_has_a_release_class(tmp_path):
    cfg = run_config(RUN, **{"dp-site-evaluation": True, "target-epsilon": 5.0})  # one round costs 4.5
    model = global_model(cfg)
    ctx = context(cfg, tmp_path / "s")
    sent = [client_app(message(model, r, tmp_path / "run"), ctx) for r in (1, 2)]  # trained, then out of budget
    sent.append(client_app(message(model, 1, tmp_path / "run", MessageType.EVALUATE), ctx))
    sent.append(client_app(message(global_model(run_config(RUN, dp=False)), 1, tmp_path / "run2"),
                           context(run_config(RUN, dp=False), tmp_path / "t")))
    seen = set()
    for reply in sent:
        assert not reply.has_error(), reply.error
        for name, record in reply.content.items():
            for key in record.keys():
                assert wire.release_of(name, key, name == wire.ARRAYS) is not None, (name, key)
                seen.add((name, wire.ANY_TENSOR if name == wire.ARRAYS else key))
    assert wire.STATUS in sent[1].content.config_records  # the budget-exhausted reply was among them
    assert seen >= {(wire.METRICS, wire.TRAIN_LOSS), (wire.METRICS, wire.EVAL_ACCURACY), (wire.PRIVACY, "ledger")}


def test_nothing_unclassified_or_not_private_leaves_a_site_under_dp(tmp_path):
    cfg = run_config(RUN)
    model = global_model(cfg)
    train = client_app(message(model, 1, tmp_path / "run"), context(cfg, tmp_path / "s"))
    assert wire.TRAIN_LOSS not in train.content.metric_records[wire.METRICS]
    assert wire.release_violations(train.content, dp=True) == []
    # a new field nobody classified is withheld, as is a not-private one under DP
    train.content.metric_records[wire.METRICS]["gradient-norm"] = 1.0
    assert any("no release class" in p for p in wire.release_violations(train.content, dp=True))
    train.content.metric_records[wire.METRICS][wire.TRAIN_LOSS] = 0.5
    assert any(wire.TRAIN_LOSS in p for p in wire.release_violations(train.content, dp=True, opted_in=frozenset({"dp-site-evaluation"})))
    # site evaluation under DP without the opt-in: the site refuses to send its test metrics
    with pytest.raises(RuntimeError, match="reply withheld: 'metrics/accuracy' is not private .* dp-site-evaluation=true"):
        client_app(message(model, 1, tmp_path / "run", MessageType.EVALUATE), context(cfg, tmp_path / "s"))


def test_readme_lists_every_release():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### What a site sends"):]
    section = section[: section.index("\n## ")]
    for (record, key), release in wire.RELEASES.items():
        row = next((line for line in section.splitlines() if line.startswith(f"| `{record}/{key}`")), None)
        assert row is not None, (record, key)
        assert f"| {release.kind} |" in row, row
