"""The ClientApp's privacy path, called directly: ledger across rounds and restarts, budget guard."""

import json
import math

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from clients.app import app as client_app
from fedmoe import privacy, wire
from fedmoe.config import RunConfig
from fedmoe.model import MoEClassifier
from fedmoe.training import make_loader, make_optimizer

pytestmark = pytest.mark.skipif(
    not __import__("fedmoe.data", fromlist=["DEBIAN_DIR"]).DEBIAN_DIR.exists(), reason="needs dataset-fashion-mnist"
)

@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Messages are built as the ServerApp builds them, which needs the task identity it has."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


RUN = {"dp": True, "num-server-rounds": 3, "max-examples-per-site": 300, "d-model": 16, "expert-hidden": 16,
       "batch-size": 32, "seed": 1}


def run_config(**kw):
    return RunConfig.from_run_config({**RUN, **kw}).as_run_config()


def train_message(model, server_round, run_dir):
    content = RecordDict({
        wire.ARRAYS: wire.to_record(model.state_dict()),
        wire.CONFIG: ConfigRecord({"server-round": server_round, wire.RUN_DIR: str(run_dir)}),
    })
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def context(cfg, state_dir):
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3, "state-dir": str(state_dir)},
                   state=RecordDict(), run_config=cfg)


def global_model(cfg):
    torch.manual_seed(0)
    return MoEClassifier(RunConfig.from_run_config(cfg).model_config())


def test_ledger_survives_a_restart_and_matches_one_accountant(tmp_path):
    cfg = run_config()
    model = global_model(cfg)
    ctx = context(cfg, tmp_path / "site0")
    epsilons = []
    for r in (1, 2, 3):
        if r == 3:
            ctx = context(cfg, tmp_path / "site0")  # node restarted: Context.state is empty
        reply = client_app(train_message(model, r, tmp_path), ctx)
        assert not reply.has_error(), reply.error
        epsilons.append(reply.content.metric_records[wire.METRICS][wire.EPSILON])
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    ledger = json.loads((tmp_path / "site0" / tmp_path.name / "privacy_ledger.json").read_text())
    assert ledger["accountant"] == "rdp" and len(ledger["rounds"]) == 3
    recomputed = privacy.epsilon_of([tuple(h) for h in ledger["history"]], ledger["delta"])
    assert recomputed == pytest.approx(epsilons[-1], rel=1e-9)
    assert epsilons[-1] <= 8.0  # the noise was planned for 3 rounds at target 8
    # another run on the same node (Flower gives each run its own Context) keeps its own ledger on
    # disk in the same state-dir (a resumed run keeps its run name, so continues this one)
    other = client_app(train_message(model, 1, tmp_path / "another-run"), context(cfg, tmp_path / "site0"))
    assert other.content.metric_records[wire.METRICS][wire.EPSILON] == pytest.approx(epsilons[0])


def test_budget_guard_declines_to_train_instead_of_overspending(tmp_path):
    cfg = run_config(**{"target-epsilon": 3.0, "noise-multiplier": 1.2})  # rounds cost 2.7, 3.3, ...: round 2 must not run
    model = global_model(cfg)
    ctx = context(cfg, tmp_path / "s")
    statuses = []
    for r in (1, 2, 3):
        reply = client_app(train_message(model, r, tmp_path), ctx)
        statuses.append(wire.STATUS in reply.content.config_records)
    assert statuses[0] is False and statuses[-1] is True
    ledger = privacy.PrivacyLedger.load(tmp_path / "s" / tmp_path.name / "privacy_ledger.json")
    assert ledger.epsilon() <= 3.0
    exhausted = client_app(train_message(model, 4, tmp_path), ctx)
    with pytest.raises(wire.BudgetExhausted):
        wire.decode_train_reply(exhausted.content, {k: v.numpy() for k, v in model.state_dict().items()}, 8)


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_frozen_experts_unchanged_after_dp_training(mode):
    cfg = RunConfig.from_run_config({"d-model": 16, "expert-hidden": 16, "num-experts": 4})
    torch.manual_seed(0)
    model = MoEClassifier(cfg.model_config())
    from fedmoe.training import freeze_inactive_experts
    freeze_inactive_experts(model, [2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    loader = make_loader(images, labels, 16, 0)
    ledger = privacy.PrivacyLedger(site=0, target_epsilon=math.inf, delta=1e-5, noise_multiplier=1.0,
                                   count_noise_multiplier=20.0, sample_rate=1 / len(loader))
    privacy.train_private(model, loader, make_optimizer("adam", model.parameters(), 1e-2), 2, ledger, 1.0, mode,
                          torch.Generator().manual_seed(0))
    after = model.state_dict()
    for key in before:
        expert = wire.expert_id(key, 4)
        if expert is not None and expert != 2:
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["moe_layers.0.experts.w_in_2"], after["moe_layers.0.experts.w_in_2"])
    assert ledger.history == [(1.0, 1 / len(loader), 2 * len(loader))]
