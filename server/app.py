"""fedmoe ServerApp: builds the global MoE model, runs ExpertMatched, records every round."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from logging import INFO, WARNING

import torch
from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedmoe.data import tasks
from fedmoe.federation import wire
from fedmoe.config import RunConfig
from fedmoe.federation.personalization import personal_keys
from fedmoe.plots import plot_learning_curve, plot_utilisation, utilisation_panels
from fedmoe.results import RunRecorder, end_status, log_to_file, rounds_without_updates, state_sha256
from fedmoe.federation.site_binding import SiteBinding, read_registry
from fedmoe.training import evaluate

from .grid import PromptGrid
from .strategy import ExpertMatched, FedAvgMoE, RoundStats

STRATEGIES = {"expert-matched": ExpertMatched, "fedavg": FedAvgMoE}

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(context.run_config)
    torch.manual_seed(cfg.seed)
    model = tasks.initial_model(cfg)
    full_model_bytes = wire.to_record(model.state_dict()).count_bytes()
    test_inputs, test_targets = tasks.global_test(cfg)
    # charlm: cross-entropy per byte (nats) -> bits per character of the held-out text
    bits_per_char_per_nat = tasks.bits_per_nat(cfg)

    extra = {"model_parameters": sum(p.numel() for p in model.parameters())}
    if cfg.resume:
        run_name = resolve_resume(Path(cfg.results_dir), cfg.resume)
        recorder = RunRecorder(cfg.results_dir, run_name, cfg.as_run_config(), full_model_bytes, extra, resume=True)
        checkpoint = recorder.load_checkpoint()
        model.load_state_dict(checkpoint["model"])
        done = int(checkpoint["round"])
        recorder.keep_rounds_up_to(done)
        strategy_state = checkpoint["strategy"]
        log(INFO, "fedmoe: resuming %s after round %d", recorder.run_dir, done)
    else:
        run_name = cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-run{context.run_id}"
        recorder = RunRecorder(cfg.results_dir, run_name, cfg.as_run_config(), full_model_bytes, extra)
        done, strategy_state = 0, {}
    with log_to_file(recorder.run_dir / "run.log"):  # the console log, kept beside the results
        initial_state = model.state_dict()
        recorder.summary.setdefault("starts", []).append({"after_round": done, "model_sha256": state_sha256(initial_state)})
        log(INFO, "fedmoe: run folder %s", recorder.run_dir)
        warnings = privacy_warnings(cfg)
        if warnings:
            recorder.summary["privacy_warnings"] = warnings
        if cfg.dp:
            log(INFO, "fedmoe: differential privacy ON: DP-SGD (%s clipping, C=%s), target (epsilon=%s, delta=%s) per site, %s accountant",
                cfg.dp_mode, cfg.max_grad_norm, cfg.target_epsilon, cfg.target_delta, cfg.accountant.upper())
            if not cfg.dp_site_evaluation:
                log(INFO, "fedmoe: sites do not evaluate on their own test splits under DP (those metrics would be charged "
                    "to nothing); dp-site-evaluation=true asks for them, outside the guarantee")
        else:
            log(INFO, "fedmoe: differential privacy OFF (dp=false)")
        for warning in warnings:
            log(WARNING, "fedmoe: %s", warning)
        if done >= cfg.num_server_rounds:
            recorder.finish("completed")
            log(INFO, "fedmoe: nothing to do: %d of %d rounds already done", done, cfg.num_server_rounds)
            return

        robust = {"rules": cfg.robust_rules()} if cfg.strategy == "expert-matched" else {}
        fraction_evaluate = cfg.fraction_evaluate if not cfg.dp or cfg.dp_site_evaluation else 0.0
        strategy = STRATEGIES[cfg.strategy](
            num_experts=cfg.num_experts,
            round_offset=done,
            sparse_downlink=cfg.sparse_downlink,
            max_update_norm=cfg.max_update_norm,
            **robust,
            fraction_train=cfg.fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=cfg.min_nodes,
            min_evaluate_nodes=cfg.min_nodes if fraction_evaluate > 0 else 0,
            min_available_nodes=cfg.min_nodes,
            server_optimizer=cfg.server_optimizer_state(),
            personal=personal_keys(initial_state, cfg.personalize),
            frozen=getattr(model, "frozen_parameters", frozenset()),
            compression=cfg.update_compression,
            downlink_compression=cfg.downlink_compression,
            initial_model_sha256=state_sha256(initial_state) if cfg.derive_initial_model and not done else "",
            site_binding=SiteBinding(read_registry(cfg.site_registry) if cfg.site_registry else None),
        )
        strategy.load_state(strategy_state)

        def central_evaluate(server_round: int, arrays) -> MetricRecord:
            model.load_state_dict(wire.to_state_dict(arrays))
            loss, accuracy = evaluate(model, test_inputs, test_targets)
            if server_round > 0:
                server_round += done
                recorder.checkpoint(server_round, model.state_dict(), strategy.state())
                stats = strategy.round_stats.get(server_round, RoundStats())
                row = {"round": server_round, "accuracy": accuracy, "loss": loss, **dataclasses.asdict(stats)}
                if bits_per_char_per_nat is not None:
                    row["bits_per_char"] = loss * bits_per_char_per_nat
                recorder.record_round(row)
                if cfg.dp:
                    recorder.write_privacy_ledger(strategy.ledgers)
            return MetricRecord({"accuracy": accuracy, "loss": loss})

        try:
            strategy.start(
                grid=PromptGrid(grid), initial_arrays=wire.to_record(initial_state), num_rounds=cfg.num_server_rounds - done,
                timeout=cfg.round_timeout, train_config=ConfigRecord({wire.RUN_DIR: str(recorder.run_dir)}),
                evaluate_config=ConfigRecord({wire.RUN_DIR: str(recorder.run_dir)}), evaluate_fn=central_evaluate,
            )
        except BaseException:
            recorder.finish("failed")
            raise
        rounds = recorder.summary["rounds"]
        idle = rounds_without_updates(rounds)
        if idle:
            log(WARNING, "fedmoe: rounds %s aggregated no site update; the global model did not change in them", idle)
        status, failure = end_status(rounds)
        path = recorder.finish(status, rounds_without_updates=idle, **({"failure": failure} if failure else {}))
        if failure:  # raised so that Flower, too, lists the run as failed
            raise RuntimeError(f"fedmoe: run failed: {failure}")
        tasks.export(cfg, model, recorder.run_dir)  # the model holds the last round's global state
        write_utilisation_heat_map(cfg, recorder)
        plot_learning_curve(rounds, recorder.run_dir / "learning_curve.png",
                            f"{recorder.run_dir.name}: {cfg.task}, {cfg.strategy}, {'DP' if cfg.dp else 'no DP'}")
        log(INFO, "fedmoe: final global accuracy %.4f; summary at %s", recorder.summary["final_accuracy"], path)
        if bits_per_char_per_nat is not None:
            log(INFO, "fedmoe: final bits per character %.4f", recorder.summary["rounds"][-1]["bits_per_char"])


def privacy_warnings(cfg: RunConfig) -> list[str]:
    """What about this run's privacy a reader of its log and summary must not miss."""
    if not cfg.dp:
        return []
    warnings = []
    if cfg.dp_reproducible_noise:
        warnings.append("dp-reproducible-noise=true: DP noise and sampling are seeded from the run config; "
                        "NO privacy guarantee against anyone who knows the config (the server does). Debugging only.")
    if cfg.dp_site_evaluation and cfg.fraction_evaluate > 0:
        warnings.append("dp-site-evaluation=true: sites send accuracy and loss on their own test splits; "
                        "those metrics are outside the DP guarantee")
    return warnings


def write_utilisation_heat_map(cfg: RunConfig, recorder: RunRecorder) -> None:
    """expert_utilisation.png in the run folder: tokens each site (language) routed to each
    expert in the last round, one panel per MoE layer."""
    rounds = [r for r in recorder.summary["rounds"] if r.get("site_expert_counts")]
    if not rounds:
        return
    counts = rounds[-1]["site_expert_counts"]
    panels = utilisation_panels(counts, cfg.num_experts, lambda site: tasks.site_label(cfg, int(site)))
    plot_utilisation(panels, recorder.run_dir / "expert_utilisation.png",
                     f"expert utilisation by {'language' if cfg.task == 'charlm' else 'site'}, round {rounds[-1]['round']}")


def resolve_resume(results_dir: Path, resume: str) -> str:
    """The run folder name ``resume`` refers to ('latest' follows the results/latest link)."""
    target = (results_dir / resume).resolve()
    if not (target / "checkpoint.pt").exists():
        raise ValueError(f"run config 'resume': no checkpoint.pt in {target}")
    return target.name
