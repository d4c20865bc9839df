"""Hostile sites for the attack experiments (fedmoe.attacks, run config ``attack``): a wrapper
around the honest round of clients.app that changes what goes into it (the backdoor's poisoned
data) and what comes out of it (scaled or flipped updates, a grafted expert), so the honest round
itself never branches on hostility."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from torch import nn

from fedmoe import attacks
from fedmoe.federation import wire
from fedmoe.config import RunConfig
from fedmoe.training import make_loader, make_optimizer, round_seed, train_epochs

from clients.app import train_site


def hostile_train_site(msg: Message, context: Context, cfg: RunConfig, site: int, model: nn.Module, data) -> RecordDict:
    """The honest round on (possibly poisoned) data, then the attack applied to its reply."""
    received = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seed = round_seed(cfg.seed, site, int(msg.content[wire.CONFIG]["server-round"]))
    if cfg.attack == "backdoor":
        inputs, targets = attacks.poison_data(data[0], data[1], cfg.attack_target_label, torch.Generator().manual_seed(seed))
        data = (inputs, targets, *data[2:])
    content = train_site(msg, context, cfg, site, model, data)
    if wire.STATUS in content.config_records:
        return content
    metrics = content.metric_records[wire.METRICS]
    trained = wire.to_state_dict(content.array_records[wire.ARRAYS])
    counts = np.asarray(metrics[wire.EXPERT_COUNTS], dtype=np.float64)
    active = list(metrics[wire.ACTIVE_EXPERTS])
    target = None
    if cfg.attack == "scale":
        target = cfg.attack_expert if cfg.attack_expert >= 0 else attacks.rare_expert(counts, active)
        if target not in active:
            trained.update(train_one_expert(model, target, cfg, data, seed))
            active = sorted({*active, target})
    target_keys = [k for k in trained if wire.expert_id(k, cfg.num_experts) == target]
    trained, counts = attacks.hostile_update(cfg.attack, cfg.attack_scale, trained, received, counts, target_keys, target)
    arrays = wire.to_record(trained)
    content[wire.ARRAYS] = arrays
    metrics[wire.ACTIVE_EXPERTS] = [int(e) for e in active]
    metrics[wire.EXPERT_COUNTS] = [float(c) for c in counts]
    metrics[wire.SENT_BYTES] = arrays.count_bytes()
    return content


def train_one_expert(model: nn.Module, expert: int, cfg: RunConfig, data, seed: int) -> dict[str, torch.Tensor]:
    """Train global expert ``expert`` alone (everything else frozen, no DP: the attacker has no
    reason to protect its data) on the site's data; returns its tensors."""
    for name, p in model.named_parameters():
        p.requires_grad_(wire.expert_id(name, cfg.num_experts) == expert)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.learning_rate)
    train_epochs(model, make_loader(data[0], data[1], cfg.batch_size, torch.Generator().manual_seed(seed)), optimizer, cfg.local_epochs)
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
