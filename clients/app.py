"""fedmoe ClientApp: one site. Trains the shared tensors and its active experts, sends only those.

With dp=true the site's routing counts are released through a Gaussian mechanism before the
active set is chosen, training is DP-SGD (Opacus), and both are charged to the site's privacy
ledger, kept in Context.state and on node-local disk (``<state-dir>/<run name>/`` with the
node-config key ``state-dir``; default ``<run folder>/sites/site-<partition-id>/``) so a restarted
site continues its budget. A run resumed from a checkpoint keeps its run name, so its ledger.
Everything DP relies on is drawn from a generator seeded inside the site from OS entropy
(fedmoe.privacy.dp_generator), and every reply is checked against the release classes of
fedmoe.federation.wire before it leaves. Attacking sites (fedmoe.attacks) wrap this round: clients.hostile.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import TensorDataset

from fedmoe import attacks
from fedmoe.data import tasks
from fedmoe.config import RunConfig
from fedmoe.federation import downlink, wire
from fedmoe.federation.compression import PACKED, ErrorFeedback, pack
from fedmoe.federation.personalization import personal_keys
from fedmoe.federation.selection import select_active_experts
from fedmoe.results import atomic_torch_save, state_sha256
from fedmoe.training import (
    ProximalLoss,
    evaluate as evaluate_model,
    freeze_inactive_experts,
    iterate_average,
    make_loader,
    make_optimizer,
    round_seed,
    routing_counts,
    train_epochs,
    trained_state,
)

if TYPE_CHECKING:
    from fedmoe import privacy

app = ClientApp()
LEDGER_STATE = "privacy-ledger"
LEDGER_FILE = "privacy_ledger.json"
PERSONAL_STATE = "personal-parts"
RESIDUAL_STATE = "compression-residual"  # error feedback of update-compression
PERSONAL_FILE = "personal.pt"
PERSONAL_MODEL_STATE = "personal-model"  # personal-model=ditto: the site's own whole model
PERSONAL_MODEL_FILE = "personal_model.pt"
MODEL_CACHE = "model-cache"  # the model the site holds: global, or broadcast under downlink-compression (fedmoe.federation.downlink)
MODEL_CACHE_VERSION = "model-cache-version"


def answer(msg: Message, context: Context, handler) -> Message:
    """Reply with ``handler(msg, context, cfg, site, model, site tensors)`` run on the message's
    model. Every reply says which model version the site now holds; a sparse downlink message the
    site cannot complete is answered with model-cache-miss instead. Nothing leaves that the
    release classes of fedmoe.federation.wire do not allow."""
    cfg = RunConfig.from_run_config(context.run_config)
    site = int(context.node_config["partition-id"])
    model = tasks.build_model(cfg)
    try:
        version = receive_model(msg, context, cfg, model)
    except downlink.CacheMiss as miss:
        return Message(wire.encode_model_cache_miss(site, miss.held), reply_to=msg)
    restore_personal(cfg, context, model, state_folder(msg, context, site))
    data = tasks.site_data(cfg, site, int(context.node_config["num-partitions"]))
    content = wire.stamp_model_version(handler(msg, context, cfg, site, model, data), version)
    opted_in = frozenset({"dp-site-evaluation"} if cfg.dp_site_evaluation else ())
    problems = wire.release_violations(content, cfg.dp, opted_in)
    if problems:
        raise RuntimeError(f"site {site}: reply withheld: " + "; ".join(problems))
    return Message(content, reply_to=msg)


def receive_model(msg: Message, context: Context, cfg: RunConfig, model: nn.Module) -> int:
    """Load the message's model into ``model``, completing a sparse message from the copy the
    site keeps in Context.state (fedmoe.federation.downlink) or, for a message that starts from
    the initial model, from that model rebuilt out of the run config if its digest matches; keep
    the result; returns its version."""
    config = msg.content[wire.CONFIG]
    base = int(config.get(wire.BASE_VERSION, downlink.WHOLE_MODEL))
    cached, cached_version = None, downlink.WHOLE_MODEL
    if MODEL_CACHE in context.state:
        cached = dict(context.state[MODEL_CACHE])
        cached_version = int(context.state[MODEL_CACHE_VERSION]["version"])
    if wire.INITIAL_MODEL in config and cached_version < base:
        initial = tasks.initial_model(cfg).state_dict()
        if state_sha256(initial) == str(config[wire.INITIAL_MODEL]):
            cached, cached_version = dict(wire.to_record(initial)), base
    encoding = str(config.get(wire.DOWNLINK_ENCODING, "none"))
    received = msg.content[wire.ARRAYS]
    if encoding != "none":  # a compressed step: decoded in numpy against the copy it starts from
        received, cached = wire.to_numpy(received), wire.to_numpy(cached) if cached is not None else None
        arrays = wire.to_record(downlink.complete(received, base, cached, cached_version, encoding))
    else:
        arrays = ArrayRecord(downlink.complete(dict(received), base, cached, cached_version))
    model.load_state_dict(wire.to_state_dict(arrays))
    version = int(config.get(wire.MODEL_VERSION, 0))
    context.state[MODEL_CACHE] = arrays
    context.state[MODEL_CACHE_VERSION] = ConfigRecord({"version": version})
    return version


def state_folder(msg: Message, context: Context, site: int) -> Path:
    """Where the site keeps what must survive a restart in this run: its privacy ledger and its
    personal parts (``<state-dir>/<run name>``, default ``<run folder>/sites/site-<id>``)."""
    run_dir = Path(str(msg.content[wire.CONFIG][wire.RUN_DIR]))
    state_dir = context.node_config.get("state-dir")
    folder = Path(str(state_dir)) / run_dir.name if state_dir else run_dir / "sites" / f"site-{site}"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)  # the site's alone, whatever the umask lets others read
    return folder


def restore_personal(cfg: RunConfig, context: Context, model: nn.Module, folder: Path) -> None:
    """Put the site's personal parts (fedmoe.federation.personalization) over the global ones: from
    Context.state, or after a restart from its state folder; in its first round it starts from
    the global values."""
    if personal_keys(model.state_dict(), cfg.personalize):
        kept = load_kept(context, folder, PERSONAL_STATE, PERSONAL_FILE)
        if kept is not None:
            model.load_state_dict(kept, strict=False)


def load_kept(context: Context, folder: Path, state_key: str, file_name: str) -> dict[str, torch.Tensor] | None:
    """Tensors the site keeps for itself: from Context.state, or after a restart from its state folder."""
    if state_key in context.state:
        return wire.to_state_dict(context.state[state_key])
    if (folder / file_name).exists():
        return torch.load(folder / file_name, weights_only=True)
    return None


def keep(context: Context, folder: Path, state_key: str, file_name: str, tensors: dict[str, torch.Tensor]) -> None:
    context.state[state_key] = wire.to_record(tensors)
    atomic_torch_save(folder / file_name, tensors)


def load_ledger(cfg: RunConfig, context: Context, path: Path, site: int, num_examples: int) -> privacy.PrivacyLedger:
    """The site's ledger: the longer of Context.state and disk, or a new one with the noise
    multiplier planned once for the whole run."""
    from fedmoe import privacy

    found = [privacy.PrivacyLedger.load(path)]
    if LEDGER_STATE in context.state:
        found.append(privacy.PrivacyLedger.from_json(str(context.state[LEDGER_STATE]["json"])))
    found = [ledger for ledger in found if ledger is not None]
    if found:
        return max(found, key=lambda ledger: ledger.steps)
    steps = privacy.steps_per_epoch(num_examples, cfg.batch_size)
    sigma = cfg.noise_multiplier or privacy.plan_noise_multiplier(
        cfg.target_epsilon, cfg.target_delta, 1.0 / steps, steps * cfg.local_epochs * cfg.num_server_rounds,
        count_releases=cfg.num_server_rounds, count_noise_multiplier=cfg.count_noise_multiplier,
        accountant=cfg.accountant,
    )
    return privacy.PrivacyLedger(
        site=site, target_epsilon=cfg.target_epsilon, delta=cfg.target_delta, noise_multiplier=sigma,
        count_noise_multiplier=cfg.count_noise_multiplier, sample_rate=1.0 / steps, num_examples=num_examples,
        accountant=cfg.accountant,
    )


def save_ledger(ledger: privacy.PrivacyLedger, context: Context, path: Path) -> None:
    ledger.save(path)
    context.state[LEDGER_STATE] = ConfigRecord({"json": ledger.to_json()})


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(context.run_config)
    if attacks.is_attacker(cfg.attack, cfg.attack_sites, int(context.node_config["partition-id"])):
        from clients.hostile import hostile_train_site

        return answer(msg, context, hostile_train_site)
    return answer(msg, context, train_site)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return answer(msg, context, evaluate_site)


def train_site(msg: Message, context: Context, cfg: RunConfig, site: int, model: nn.Module, data) -> RecordDict:
    """One honest round: route the local data, (under DP) release the routing counts through the
    Gaussian mechanism, choose the active experts, train the shared tensors and those experts
    (DP-SGD under DP), send them with the counts."""
    inputs, targets, _, _ = data
    server_round = int(msg.content[wire.CONFIG]["server-round"])
    seed = round_seed(cfg.seed, site, server_round)
    counts = routing_counts(model, inputs)

    ledger = None
    if cfg.dp:
        # imported here: Opacus takes seconds to import, and in a deployment every task is a new
        # process; evaluate tasks and dp=false runs do without it
        from fedmoe import privacy

        randomness = privacy.dp_generator(seed if cfg.dp_reproducible_noise else None)
        path = state_folder(msg, context, site) / LEDGER_FILE
        ledger = load_ledger(cfg, context, path, site, len(targets))
        ledger.reproducible_noise |= cfg.dp_reproducible_noise
        count_release = (cfg.count_noise_multiplier, 1.0, 1)
        training = (ledger.noise_multiplier, ledger.sample_rate,
                    cfg.local_epochs * privacy.steps_per_epoch(len(targets), cfg.batch_size))
        projected = ledger.epsilon([count_release, training])
        if projected > cfg.target_epsilon:
            return wire.encode_budget_exhausted(site, ledger.epsilon(), projected)
        sensitivity = privacy.count_sensitivity(model.config.num_tokens, cfg.top_k, cfg.num_moe_layers)
        counts = privacy.release_counts(counts, cfg.count_noise_multiplier, sensitivity, randomness)
        ledger.charge([count_release])

    active = list(range(len(counts))) if cfg.strategy == "fedavg" else select_active_experts(
        counts, cfg.num_experts, cfg.active_min_share, cfg.active_top_m)
    freeze_inactive_experts(model, active)
    compress = cfg.update_compression != "none"
    keeps_received = compress or cfg.personal_model == "ditto"
    received = {k: v.detach().clone() for k, v in model.state_dict().items()} if keeps_received else {}
    torch.manual_seed(seed)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.round_learning_rate(server_round), cfg.adam_bc_floor)
    with iterate_average(model, optimizer, cfg.ema_decay):
        if ledger is None:
            loader = make_loader(inputs, targets, cfg.batch_size, torch.Generator().manual_seed(seed))
            loss = train_epochs(model, loader, optimizer, cfg.local_epochs)
        else:
            steps_before = ledger.steps
            privacy.train_private(model, TensorDataset(inputs, targets), cfg.batch_size, optimizer, cfg.local_epochs,
                                  ledger, cfg.max_grad_norm, cfg.dp_mode, randomness, cfg.max_physical_batch_size)
            ledger.close_round(server_round, [count_release, (ledger.noise_multiplier, ledger.sample_rate,
                                                              ledger.steps - steps_before)])
            save_ledger(ledger, context, path)
            loss = None  # computed on private examples and charged to nothing: it stays here
    trained = trained_state(model)
    personal = {key: trained.pop(key) for key in personal_keys(trained, cfg.personalize)}
    if personal:
        keep(context, state_folder(msg, context, site), PERSONAL_STATE, PERSONAL_FILE, personal)
    if compress:
        trained = compress_update(context, trained, received, cfg.update_compression)
    if cfg.personal_model == "ditto":
        train_personal_model(context, state_folder(msg, context, site), cfg, data, received, server_round, seed)
    return wire.encode_train_reply(trained, site, len(targets), active, counts, loss, ledger)


def compress_update(context: Context, trained: dict[str, torch.Tensor], received: dict[str, torch.Tensor],
                    method: str) -> dict[str, np.ndarray]:
    """The update (trained - received), compressed and packed into one array; what the compression
    lost is owed next round and kept in the node state (fedmoe.federation.compression)."""
    residual = wire.to_numpy(context.state[RESIDUAL_STATE]) if RESIDUAL_STATE in context.state else None
    feedback = ErrorFeedback(residual)
    payload = feedback.compress({k: v.numpy() for k, v in trained.items()}, {k: v.numpy() for k, v in received.items()}, method)
    context.state[RESIDUAL_STATE] = wire.to_record(feedback.residual)
    return {PACKED: pack(payload)}


def train_personal_model(context: Context, folder: Path, cfg: RunConfig, data, received: dict[str, torch.Tensor],
                         server_round: int, seed: int) -> None:
    """personal-model=ditto: the site's own whole model v (the received global model in its first
    round) takes personal-epochs of training without noise on Ditto's objective
    F_site(v) + (ditto-lambda / 2) ||v - w||^2, w the global model the site received this round
    (fedmoe.training.ProximalLoss), and is kept like the personal parts.

    It runs after the reply is complete and nothing the site sends reads it: the reply is a
    function of the received model, the data and the DP mechanism's noise alone, so its guarantee
    holds whatever v is. v is the site's, like its data; only its accuracy on the site's own test
    split leaves, and under DP only with dp-site-evaluation=true, outside the guarantee."""
    inputs, targets, _, _ = data
    personal = tasks.build_model(cfg)
    personal.load_state_dict(load_kept(context, folder, PERSONAL_MODEL_STATE, PERSONAL_MODEL_FILE) or received)
    freeze_inactive_experts(personal, range(cfg.num_moe_layers * cfg.num_experts))
    optimizer = make_optimizer(cfg.optimizer, personal.parameters(),
                               cfg.round_learning_rate(server_round, cfg.personal_learning_rate), cfg.adam_bc_floor)
    loader = make_loader(inputs, targets, cfg.personal_batch_size, torch.Generator().manual_seed(seed))
    train_epochs(personal, loader, optimizer, cfg.personal_epochs, ProximalLoss(personal, received, cfg.ditto_lambda))
    keep(context, folder, PERSONAL_MODEL_STATE, PERSONAL_MODEL_FILE, personal.state_dict())


def evaluate_site(msg: Message, context: Context, cfg: RunConfig, site: int, model: nn.Module, data) -> RecordDict:
    _, _, test_inputs, test_targets = data
    if cfg.personal_model == "ditto":  # the site judges the model it would use: its own
        kept = load_kept(context, state_folder(msg, context, site), PERSONAL_MODEL_STATE, PERSONAL_MODEL_FILE)
        if kept is not None:
            model.load_state_dict(kept)
    loss, accuracy = evaluate_model(model, test_inputs, test_targets)
    per_nat = tasks.bits_per_nat(cfg, site)
    bits_per_char = None if per_nat is None else loss * per_nat
    return wire.encode_evaluate_reply(site, len(test_targets), accuracy, loss, bits_per_char)
