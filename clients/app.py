"""fedmoe ClientApp: one site. Trains the shared tensors and its active experts, sends only those."""

from __future__ import annotations

from functools import lru_cache

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmoe import wire
from fedmoe.config import RunConfig
from fedmoe.data import load_site
from fedmoe.model import MoEClassifier
from fedmoe.selection import select_active_experts
from fedmoe.training import (
    evaluate as evaluate_model,
    freeze_inactive_experts,
    make_loader,
    make_optimizer,
    routing_counts,
    train_epochs,
    trained_state,
)

app = ClientApp()


@lru_cache(maxsize=4)
def site_tensors(cfg: RunConfig, partition_id: int, num_partitions: int):
    """(train images, train labels, test images, test labels) of this site, cached per process."""
    site = load_site(
        partition_id, num_partitions, partitioning=cfg.partitioning, alpha=cfg.dirichlet_alpha,
        domains_per_site=cfg.domains_per_site, seed=cfg.seed, test_fraction=cfg.site_test_fraction,
        source=cfg.data_source, max_examples=cfg.max_examples_per_site,
    )
    return (*site.train.tensors(), *site.test.tensors())


def setup(msg: Message, context: Context):
    cfg = RunConfig.from_run_config(context.run_config)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    model = MoEClassifier(cfg.model_config())
    model.load_state_dict(wire.to_state_dict(msg.content[wire.ARRAYS]))
    return cfg, partition_id, model, site_tensors(cfg, partition_id, num_partitions)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, site, model, (images, labels, _, _) = setup(msg, context)
    server_round = int(msg.content[wire.CONFIG]["server-round"])
    counts = routing_counts(model, images)
    active = select_active_experts(counts, cfg.num_experts, cfg.active_min_share, cfg.active_top_m)
    freeze_inactive_experts(model, active)

    seed = cfg.seed * 1_000_003 + site * 10_007 + server_round
    torch.manual_seed(seed)
    loader = make_loader(images, labels, cfg.batch_size, seed)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.learning_rate)
    loss = train_epochs(model, loader, optimizer, cfg.local_epochs)

    content = wire.encode_train_reply(trained_state(model), site, len(labels), active, counts, loss)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, site, model, (_, _, test_images, test_labels) = setup(msg, context)
    loss, accuracy = evaluate_model(model, test_images, test_labels)
    return Message(wire.encode_evaluate_reply(site, len(test_labels), accuracy, loss), reply_to=msg)
