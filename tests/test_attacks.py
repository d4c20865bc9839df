"""The hostile-site behaviours the attack experiments use (fedmoe.attacks), on small cases."""

import json

import numpy as np
import torch

from fedmoe import attacks
from fedmoe.data.fashion_mnist import MEAN, STD


def test_trigger_and_poisoning():
    images, labels = torch.zeros(10, 1, 28, 28), torch.arange(10)
    triggered = attacks.add_trigger(images)
    assert torch.all(triggered[..., -4:, -4:] == (1 - MEAN) / STD) and torch.all(triggered[..., :-4, :] == 0)
    poisoned, new_labels = attacks.poison_data(images, labels, 3, torch.Generator().manual_seed(0))
    changed = (poisoned != images).flatten(1).any(dim=1)
    assert int(changed.sum()) == 5 and torch.all(new_labels[changed] == 3)
    assert torch.equal(new_labels[~changed], labels[~changed]) and torch.equal(images, torch.zeros(10, 1, 28, 28))


def test_hostile_updates():
    received = {"shared": torch.zeros(2), "e1": torch.ones(2)}
    trained = {"shared": torch.full((2,), 0.1), "e1": torch.full((2,), 1.2)}
    counts = np.array([5.0, 1.0, 4.0])
    scaled, claimed = attacks.hostile_update("scale", 10.0, trained, received, counts, ["e1"], 1)
    assert torch.allclose(scaled["e1"], torch.full((2,), 3.0)) and torch.equal(scaled["shared"], trained["shared"])
    assert claimed[1] == 10.0 and counts[1] == 1.0
    flipped, _ = attacks.hostile_update("sign-flip", 2.0, trained, received, counts, [], None)
    assert torch.allclose(flipped["shared"], torch.full((2,), -0.2)) and torch.allclose(flipped["e1"], torch.full((2,), 0.6))
    assert attacks.rare_expert(counts, active=[0]) == 1 and attacks.rare_expert(counts, active=[1, 0]) == 2
    assert attacks.is_attacker("scale", "0,2", 2) and not attacks.is_attacker("none", "0,2", 2)


def test_attack_success_rate_counts_triggered_images_of_other_classes():
    class Trigger(torch.nn.Module):  # says 0 whenever the corner is bright, else the true class 1
        def forward(self, x):
            bright = (x[:, 0, -1, -1] > 1).float()
            return torch.stack([bright, 1 - bright], dim=1), torch.zeros(len(x))

    images, labels = torch.zeros(8, 1, 28, 28), torch.tensor([0, 0, 1, 1, 1, 1, 1, 1])
    assert attacks.attack_success_rate(Trigger(), images, labels, target=0) == 1.0


def test_expert_share_is_each_images_share_of_token_slots():
    from fedmoe.models.moe import MoEClassifier, MoEConfig

    torch.manual_seed(0)
    model = MoEClassifier(MoEConfig(d_model=8, expert_hidden=8, num_experts=4, top_k=2))
    images = torch.randn(20, 1, 28, 28)
    shares = torch.stack([attacks.expert_share(model, images, e) for e in range(4)], dim=1)
    model(images)
    per_sample = model.moe_layers[0].last_routing.per_sample  # [20, 4] slots, 16 tokens x top-2
    assert torch.allclose(shares, per_sample / 32) and torch.allclose(shares.sum(dim=1), torch.ones(20))


def test_attack_driver_targets_the_rarest_expert_and_measures_it(tmp_path):
    """A tiny real run of experiments.attacks: the clean calibration run and the scale attack."""
    from experiments.attacks import run_attacks

    preset = {"sites": 3, "config": {"num-server-rounds": 1, "max-examples-per-site": 200, "d-model": 16,
                                     "expert-hidden": 16, "dp": False, "seed": 0}}
    report = run_attacks(preset, tmp_path, attacks=("scale",), defences=("none",))
    clean, scale = report["rows"]
    assert (clean["attack"], scale["attack"]) == ("clean", "scale")
    summary = json.loads((tmp_path / "runs" / "scale-none" / "summary.json").read_text())
    target = report["scale_target_expert"]
    assert summary["config"]["attack-expert"] == target and target in summary["rounds"][0]["active_experts"]["0"]
    assert report["target_expert_test_images"] == 1000  # the 10% of the 10k test images relying most on it
    assert 0 <= scale["target_expert_accuracy"] <= 1 and isinstance(scale["target_expert_drop"], float)
    assert (tmp_path / "attacks.md").read_text().count("| scale | none |") == 1
