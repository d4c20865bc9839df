"""Server strategies: Flower's FedAvg with fedmoe's bookkeeping, and ExpertMatched for sparse
expert uploads.

With x_i the tensors site i sent, n_i its examples and c_ie the tokens it routed to expert e:

    FedAvgMoE (strategy=fedavg): every site trains and sends the whole model; Flower's FedAvg
        x <- sum_i n_i x_i / sum_i n_i   for every tensor
    ExpertMatched (strategy=expert-matched):
        shared tensors   x   <- sum_i n_i x_i / sum_i n_i
        expert e         x_e <- sum_{i in R_e} c_ie x_ie / sum_{i in R_e} c_ie,  R_e = sites that sent e
        untrained expert x_e unchanged, bit for bit
    then, with server-optimizer set, each tensor some site sent moves along x̄ - x by FedAvgM,
    FedAdam or FedYogi (fedmoe.federation.server_optimizers); the others stay bit-identical

With sparse downlink (fedmoe.federation.downlink) each node is sent only the tensors that changed since
the model version it last reported holding; a node the server knows nothing of gets the whole model.

Replies that fail validation (``fedmoe.federation.wire.decode_train_reply``) are dropped with the reason
logged and counted; the round goes on with the rest.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedmoe.federation import wire
from fedmoe.federation.aggregation import RobustRules, SiteUpdate, expert_matched_average, load_coefficient_of_variation
from fedmoe.federation.downlink import WHOLE_MODEL, CompressedBroadcast, ModelVersions
from fedmoe.federation.server_optimizers import ServerOptimizer
from fedmoe.federation.site_binding import SiteBinding


@dataclass
class RoundStats:
    """What crossed the wire in one round and what the sites reported."""

    downlink_bytes: int = 0
    uplink_bytes: int = 0
    site_uplink_bytes: dict[str, int] = field(default_factory=dict)
    replies: int = 0  # valid train replies aggregated
    lost_nodes: list[int] = field(default_factory=list)  # sampled for training, never replied
    rejected_replies: list[str] = field(default_factory=list)
    active_experts: dict[str, list[int]] = field(default_factory=dict)
    site_expert_counts: dict[str, list[float]] = field(default_factory=dict)  # tokens per expert, per site
    expert_load: list[float] = field(default_factory=list)
    expert_load_cv: float = 0.0
    train_loss: float = float("nan")
    budget_exhausted: dict[str, float] = field(default_factory=dict)
    site_epsilon: dict[str, float] = field(default_factory=dict)
    site_accuracy: dict[str, float] = field(default_factory=dict)
    site_loss: dict[str, float] = field(default_factory=dict)
    site_bits_per_char: dict[str, float] = field(default_factory=dict)  # charlm
    model_cache_misses: list[int] = field(default_factory=list)  # nodes that needed the whole model
    dropped_updates: list[str] = field(default_factory=list)  # site updates to units the robust rules dropped
    site_update_norm: dict[str, float] = field(default_factory=dict)  # L2 norm of each site's update
    site_num_examples: dict[str, int] = field(default_factory=dict)  # training examples each site reported
    # the strategy's own work in the round (addressing, decoding and checking replies, aggregation)
    server_seconds: dict[str, float] = field(default_factory=dict)


def timed(part: str):
    """Adds the wall time of a strategy hook to its round's ``server_seconds[part]``."""
    def wrap(hook):
        @functools.wraps(hook)
        def run(self, server_round: int, *args, **kwargs):
            started = time.perf_counter()
            try:
                return hook(self, server_round, *args, **kwargs)
            finally:
                spent = self._stats(server_round + self.round_offset).server_seconds
                spent[part] = spent.get(part, 0.0) + time.perf_counter() - started
        return run
    return wrap


class FedAvgMoE(FedAvg):
    """Flower's FedAvg over the whole MoE model, with fedmoe's reply validation and per-round
    records (bytes each way, lost nodes, rejected replies, expert load, privacy, site metrics).

    Parameters
    ----------
    num_experts : int
        Experts per MoE layer (global expert id = layer * num_experts + expert).
    round_offset : int
        Rounds already done by the run this one resumes (Strategy.start counts from 1).
    sparse_downlink : bool
        Send each node only the tensors changed since the model version it holds.
    max_update_norm : float
        Reject a reply whose whole update has a larger L2 norm (0: no bound).
    server_optimizer : ServerOptimizer | None
        Moves the average along its pseudo-gradient (fedmoe.federation.server_optimizers); None: the
        average is the new model.
    personal : frozenset[str]
        Tensors the sites keep (fedmoe.federation.personalization): never in a valid reply, never aggregated.
    frozen : frozenset[str]
        Tensors no site trains (the model's frozen_parameters, e.g. base weights under LoRA):
        likewise never in a valid reply, never aggregated.
    site_binding : SiteBinding | None
        Which node may speak for which site (fedmoe.federation.site_binding); None: bound on first use.
    compression : str
        How sites encode their updates (fedmoe.federation.compression): decoded before validation.
    downlink_compression : str
        none, fp16, int8 or int4: nodes get compressed steps of the broadcast model
        (fedmoe.federation.downlink.CompressedBroadcast); needs sparse_downlink.
    initial_model_sha256 : str
        Digest of the initial model when every site can rebuild it from the run config (run config
        derive-initial-model, fresh runs): a node never heard from is then taken to hold it and
        gets only what changed since; "" sends such a node the whole model.
    **kwargs
        Passed to FedAvg (fraction_train, min_train_nodes, ...).
    """

    def __init__(self, num_experts: int, round_offset: int = 0, sparse_downlink: bool = True,
                 max_update_norm: float = 0.0, server_optimizer: ServerOptimizer | None = None,
                 personal: frozenset[str] = frozenset(), site_binding: SiteBinding | None = None, compression: str = "none",
                 frozen: frozenset[str] = frozenset(), downlink_compression: str = "none",
                 initial_model_sha256: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        if downlink_compression != "none" and not sparse_downlink:
            raise ValueError("downlink compression sends steps between model versions: it needs sparse_downlink")
        self.broadcast = CompressedBroadcast(downlink_compression) if downlink_compression != "none" else None
        self.compression = compression
        self.personal = personal
        self.frozen = frozen
        self.site_binding = site_binding or SiteBinding()
        self.num_experts = num_experts
        self.max_update_norm = max_update_norm
        self.server_optimizer = server_optimizer
        self.round_offset = round_offset
        self.sparse_downlink = sparse_downlink
        self.initial_model_sha256 = initial_model_sha256
        self.versions = ModelVersions(round_offset, round_offset if initial_model_sha256 else None)
        self.sampled: dict[int, list[int]] = {}
        self.global_arrays: dict[str, np.ndarray] = {}
        self.round_stats: dict[int, RoundStats] = {}
        self.ledgers: dict[str, str] = {}  # site -> its newest privacy ledger (JSON)

    def state(self) -> dict:
        """What a resumed run needs of the strategy (checkpointed with the model; tensors only,
        so the checkpoint loads with weights_only)."""
        state = {"ledgers": dict(self.ledgers)}
        if self.server_optimizer is not None:
            state["server_optimizer"] = self.server_optimizer.state()
        return state

    def load_state(self, state: dict) -> None:
        self.ledgers.update(state.get("ledgers", {}))
        if self.server_optimizer is not None and "server_optimizer" in state:
            self.server_optimizer.load_state(state["server_optimizer"])

    def _stats(self, server_round: int) -> RoundStats:
        return self.round_stats.setdefault(server_round, RoundStats())

    @timed("configure-train")
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self.global_arrays = wire.to_numpy(arrays)
        messages = self.registered_only(server_round, super().configure_train(server_round, arrays, config, grid))
        self.sampled[server_round] = [m.metadata.dst_node_id for m in messages]
        self._stats(server_round).downlink_bytes += self.address_models(messages, arrays)
        return messages

    @timed("configure-evaluate")
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        messages = self.registered_only(server_round, super().configure_evaluate(server_round, arrays, config, grid))
        self._stats(server_round).downlink_bytes += self.address_models(messages, arrays)
        return messages

    def registered_only(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        """The messages to nodes the site binding admits; the others are logged and never sent."""
        kept = []
        for msg in messages:
            if self.site_binding.admits(msg.metadata.dst_node_id):
                kept.append(msg)
            else:
                log(WARNING, "round %d: node %d is not in the site registry: sent nothing", server_round,
                    msg.metadata.dst_node_id)
        return kept

    def address_models(self, messages: list[Message], arrays: ArrayRecord) -> int:
        """Give each message the tensors its node lacks (all of them without sparse downlink) and
        the model version they complete; returns the bytes sent."""
        sent = 0
        if self.broadcast is not None and self.broadcast.stale(self.versions):
            self.broadcast.advance(wire.to_numpy(arrays), self.versions)
        for msg in messages:
            node = msg.metadata.dst_node_id
            base, keys = self.versions.delta(node, arrays.keys()) if self.sparse_downlink else (WHOLE_MODEL, list(arrays.keys()))
            encoding = "none"
            if self.broadcast is not None:
                payload, encoding = self.broadcast.message(base, keys)
                record = wire.to_record(payload)
            else:
                record = ArrayRecord({k: arrays[k] for k in keys})
            config = ConfigRecord({**msg.content[wire.CONFIG], wire.MODEL_VERSION: self.versions.version,
                                   wire.BASE_VERSION: base, wire.DOWNLINK_ENCODING: encoding})
            if base != WHOLE_MODEL and base == self.versions.derivable:
                config[wire.INITIAL_MODEL] = self.initial_model_sha256
            msg.content = RecordDict({wire.ARRAYS: record, wire.CONFIG: config})
            sent += record.count_bytes()
        return sent

    def note_model_version(self, server_round: int, msg: Message) -> bool:
        """Record which model version the replying node holds; False for a model-cache-miss reply
        (logged, counted, and the node gets the whole model next time)."""
        node = msg.metadata.src_node_id
        try:
            wire.raise_for_status(msg.content)
        except wire.ModelCacheMiss as miss:
            log(WARNING, "round %d: node %d: %s; it gets the whole model next time", server_round, node, miss)
            self._stats(server_round).model_cache_misses.append(node)
            self.versions.forget(node)
            return False
        except wire.BudgetExhausted:
            pass
        version = wire.held_model_version(msg.content)
        if version is not None:
            self.versions.heard_from(node, version)
        return True

    def decode_replies(self, server_round: int, replies: Iterable[Message]) -> list[tuple[Message, wire.TrainReply]]:
        """Valid train replies with their messages, in site order; every dropped one is logged and
        recorded with its reason. Replies arrive in whatever order the sites finish; floating-point
        sums depend on order, so a fixed one keeps dp=false runs bit-reproducible."""
        stats = self._stats(server_round)
        valid = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                reason = f"node {node}: error reply: {msg.error.reason}"
            elif not self.note_model_version(server_round, msg):
                continue
            else:
                try:
                    # a site's update is relative to the model it holds: the broadcast one, if compressed
                    held = self.broadcast.model if self.broadcast is not None else self.global_arrays
                    reply = wire.decode_train_reply(msg.content, held, self.num_experts,
                                                    self.max_update_norm, self.personal, self.compression, self.frozen)
                    reason = self.site_binding.check(node, str(reply.site))
                    if reason is None:
                        valid.append((msg, reply))
                        continue
                except wire.BudgetExhausted as exc:
                    reason = self.site_binding.check(node, str(exc.site))
                    if reason is None:
                        log(INFO, "round %d: %s", server_round, exc)
                        stats.budget_exhausted[str(exc.site)] = exc.epsilon
                        continue
                except wire.InvalidReply as exc:
                    reason = f"node {node}: {exc}"
            log(WARNING, "round %d: dropped reply from %s", server_round, reason)
            stats.rejected_replies.append(reason)
        return sorted(valid, key=lambda pair: (pair[1].site, pair[0].metadata.src_node_id))

    @timed("aggregate-train")
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        stats = self._stats(server_round)
        replies = list(replies)
        answered = {msg.metadata.src_node_id for msg in replies}
        stats.lost_nodes = [n for n in self.sampled.get(server_round, []) if n not in answered]
        for node in stats.lost_nodes:
            log(WARNING, "round %d: no train reply from node %d before the round timeout: site lost, "
                "round goes on without it", server_round, node)
        decoded = self.decode_replies(server_round, replies)
        stats.replies = len(decoded)
        if not decoded:
            log(WARNING, "round %d: no valid train replies; global model unchanged", server_round)
            return None, None
        new_arrays = self.average(server_round, decoded)
        if self.server_optimizer is not None:  # moves only the tensors some site sent
            sent = {key for _, reply in decoded for key in reply.arrays}
            new_arrays = wire.to_record(self.server_optimizer.step(self.global_arrays, wire.to_numpy(new_arrays), sent))
        self.versions.record_update(self.global_arrays, wire.to_numpy(new_arrays), server_round)
        valid = [reply for _, reply in decoded]
        load = np.sum([r.expert_counts for r in valid], axis=0)
        stats.uplink_bytes = sum(r.nbytes for r in valid)
        stats.site_uplink_bytes = {str(r.site): r.nbytes for r in valid}
        stats.active_experts = {str(r.site): r.active_experts for r in valid}
        stats.site_expert_counts = {str(r.site): r.expert_counts.tolist() for r in valid}
        stats.site_update_norm = {str(r.site): r.update_norm for r in valid}
        stats.site_num_examples = {str(r.site): r.num_examples for r in valid}
        stats.site_epsilon = {str(r.site): r.epsilon for r in valid if r.epsilon is not None}
        self.ledgers.update({str(r.site): r.ledger_json for r in valid if r.ledger_json})
        stats.expert_load = load.tolist()
        stats.expert_load_cv = float(np.mean([
            load_coefficient_of_variation(layer) for layer in load.reshape(-1, self.num_experts)
        ]))
        metrics = MetricRecord({
            "uplink-bytes": stats.uplink_bytes,
            "rejected-replies": len(stats.rejected_replies),
            "expert-load-cv": stats.expert_load_cv,
        })
        reported = [r for r in valid if r.train_loss is not None]  # sites under DP keep their loss
        if reported:
            weights = np.array([r.num_examples for r in reported], dtype=np.float64)
            stats.train_loss = float(np.dot(weights, [r.train_loss for r in reported]) / weights.sum())
            metrics["train-loss"] = stats.train_loss
        return new_arrays, metrics

    def average(self, server_round: int, decoded: list[tuple[Message, wire.TrainReply]]) -> ArrayRecord:
        """Flower's FedAvg over the valid replies (each holds the whole model but the personal parts,
        which keep their global values)."""
        if self.compression != "none":  # FedAvg averages what the replies stand for, not their payloads
            for msg, reply in decoded:
                msg.content[wire.ARRAYS] = wire.to_record(reply.arrays)
        arrays, _ = super().aggregate_train(server_round, [msg for msg, _ in decoded])
        return wire.to_record({**self.global_arrays, **wire.to_numpy(arrays)})

    @timed("aggregate-evaluate")
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        stats = self._stats(server_round)
        total, acc_sum, loss_sum = 0, 0.0, 0.0
        for msg in replies:
            if msg.has_error():
                log(WARNING, "round %d: evaluation error from node %d: %s", server_round, msg.metadata.src_node_id, msg.error.reason)
                continue
            if not self.note_model_version(server_round, msg):
                continue
            try:
                r = wire.decode_evaluate_reply(msg.content)
            except wire.InvalidReply as exc:
                log(WARNING, "round %d: dropped evaluation reply from node %d: %s", server_round, msg.metadata.src_node_id, exc)
                continue
            claim = self.site_binding.check(msg.metadata.src_node_id, str(r.site))
            if claim is not None:
                log(WARNING, "round %d: dropped evaluation reply: %s", server_round, claim)
                stats.rejected_replies.append(claim)
                continue
            stats.site_accuracy[str(r.site)] = r.accuracy
            stats.site_loss[str(r.site)] = r.loss
            if r.bits_per_char is not None:
                stats.site_bits_per_char[str(r.site)] = r.bits_per_char
            total += r.num_examples
            acc_sum += r.num_examples * r.accuracy
            loss_sum += r.num_examples * r.loss
        if total == 0:
            return None
        return MetricRecord({"accuracy": acc_sum / total, "loss": loss_sum / total})


class ExpertMatched(FedAvgMoE):
    """FedAvg's sampling and messaging with expert-matched aggregation of sparse replies, under
    optional robust rules (fedmoe.federation.aggregation.RobustRules) per expert and for the shared tensors."""

    def __init__(self, num_experts: int, rules: RobustRules = RobustRules(), **kwargs) -> None:
        super().__init__(num_experts, **kwargs)
        self.rules = rules

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> Expert-matched averaging, %d experts per MoE layer", self.num_experts)

    def average(self, server_round: int, decoded: list[tuple[Message, wire.TrainReply]]) -> ArrayRecord:
        updates = [
            SiteUpdate(r.arrays, r.num_examples, {e: float(r.expert_counts[e]) for e in r.active_experts}, site=r.site)
            for _, r in decoded
        ]
        dropped = self._stats(server_round).dropped_updates
        # tensors no reply may carry are left out of the units, or a robust rule (which takes a unit
        # from the sites that sent all of it) would find no site for theirs
        sent = {k: v for k, v in self.global_arrays.items() if k not in self.personal | self.frozen}
        new_arrays = {**self.global_arrays, **expert_matched_average(
            sent, updates, lambda key: wire.expert_id(key, self.num_experts), self.rules, dropped
        )}
        for reason in dropped:
            log(WARNING, "round %d: robust aggregation dropped %s", server_round, reason)
        return wire.to_record(new_arrays)
