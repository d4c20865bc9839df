"""Playing the server against the real ClientApp: messages built as the ServerApp builds them, a
site's Context, the global model. Test modules import the ``server_identity`` fixture from here."""

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedmoe.federation import wire
from fedmoe.config import RunConfig
from fedmoe.data.fashion_mnist import DEBIAN_DIR
from fedmoe.models.moe import MoEClassifier

needs_fmnist = pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="needs dataset-fashion-mnist")


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Messages are built as the ServerApp builds them, which needs the task identity it has."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def run_config(base, **overrides):
    """Flower's flat run config: ``base`` and ``overrides`` over the defaults, validated."""
    return RunConfig.from_run_config({**base, **overrides}).as_run_config()


def message(model, server_round, run_dir, message_type=MessageType.TRAIN):
    content = RecordDict({
        wire.ARRAYS: wire.to_record(model.state_dict()),
        wire.CONFIG: ConfigRecord({"server-round": server_round, wire.RUN_DIR: str(run_dir)}),
    })
    return Message(content=content, dst_node_id=1, message_type=message_type)


def context(cfg, state_dir, site=0, sites=3):
    return Context(run_id=1, node_id=1, node_config={"partition-id": site, "num-partitions": sites, "state-dir": str(state_dir)},
                   state=RecordDict(), run_config=cfg)


def global_model(cfg):
    torch.manual_seed(0)
    return MoEClassifier(RunConfig.from_run_config(cfg).model_config())


def reply_arrays(reply):
    assert not reply.has_error(), reply.error
    return wire.to_state_dict(reply.content.array_records[wire.ARRAYS])
