"""fedmoe ServerApp: builds the global MoE model, runs ExpertMatched, records every round."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from logging import INFO

import torch
from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedmoe import wire
from fedmoe.config import RunConfig
from fedmoe.data import load_global_test
from fedmoe.model import MoEClassifier
from fedmoe.results import RunRecorder, state_sha256
from fedmoe.training import evaluate

from .strategy import ExpertMatched, FedAvgMoE, RoundStats

STRATEGIES = {"expert-matched": ExpertMatched, "fedavg": FedAvgMoE}

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(context.run_config)
    torch.manual_seed(cfg.seed)
    model = MoEClassifier(cfg.model_config())
    full_model_bytes = wire.to_record(model.state_dict()).count_bytes()
    test_images, test_labels = load_global_test(cfg.data_source).tensors()

    extra = {"model_parameters": sum(p.numel() for p in model.parameters())}
    if cfg.resume:
        run_name = resolve_resume(Path(cfg.results_dir), cfg.resume)
        recorder = RunRecorder(cfg.results_dir, run_name, cfg.as_run_config(), full_model_bytes, extra, resume=True)
        checkpoint = recorder.load_checkpoint()
        model.load_state_dict(checkpoint["model"])
        done = int(checkpoint["round"])
        recorder.keep_rounds_up_to(done)
        ledgers = dict(checkpoint["strategy"].get("ledgers", {}))
        log(INFO, "fedmoe: resuming %s after round %d", recorder.run_dir, done)
    else:
        run_name = cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-run{context.run_id}"
        recorder = RunRecorder(cfg.results_dir, run_name, cfg.as_run_config(), full_model_bytes, extra)
        done, ledgers = 0, {}
    initial_state = model.state_dict()
    recorder.summary.setdefault("starts", []).append({"after_round": done, "model_sha256": state_sha256(initial_state)})
    log(INFO, "fedmoe: run folder %s", recorder.run_dir)
    if cfg.dp:
        log(INFO, "fedmoe: differential privacy ON: DP-SGD (%s clipping, C=%s), target (epsilon=%s, delta=%s) per site, RDP accountant",
            cfg.dp_mode, cfg.max_grad_norm, cfg.target_epsilon, cfg.target_delta)
    else:
        log(INFO, "fedmoe: differential privacy OFF (dp=false)")
    if done >= cfg.num_server_rounds:
        recorder.finish("completed")
        log(INFO, "fedmoe: nothing to do: %d of %d rounds already done", done, cfg.num_server_rounds)
        return

    robust = {"rules": cfg.robust_rules()} if cfg.strategy == "expert-matched" else {}
    strategy = STRATEGIES[cfg.strategy](
        num_experts=cfg.num_experts,
        round_offset=done,
        sparse_downlink=cfg.sparse_downlink,
        max_update_norm=cfg.max_update_norm,
        **robust,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_nodes,
        min_evaluate_nodes=cfg.min_nodes if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.min_nodes,
    )
    strategy.ledgers.update(ledgers)

    def central_evaluate(server_round: int, arrays) -> MetricRecord:
        model.load_state_dict(wire.to_state_dict(arrays))
        loss, accuracy = evaluate(model, test_images, test_labels)
        if server_round > 0:
            server_round += done
            recorder.checkpoint(server_round, model.state_dict(), {"ledgers": strategy.ledgers})
            stats = strategy.round_stats.get(server_round, RoundStats())
            recorder.record_round(
                {"round": server_round, "accuracy": accuracy, "loss": loss, **dataclasses.asdict(stats)}
            )
            if cfg.dp:
                recorder.write_privacy_ledger(strategy.ledgers)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    try:
        strategy.start(
            grid=grid, initial_arrays=wire.to_record(initial_state), num_rounds=cfg.num_server_rounds - done,
            timeout=cfg.round_timeout, train_config=ConfigRecord({wire.RUN_DIR: str(recorder.run_dir)}),
            evaluate_fn=central_evaluate,
        )
    except BaseException:
        recorder.finish("failed")
        raise
    path = recorder.finish("completed")
    log(INFO, "fedmoe: final global accuracy %.4f; summary at %s", recorder.summary["final_accuracy"], path)


def resolve_resume(results_dir: Path, resume: str) -> str:
    """The run folder name ``resume`` refers to ('latest' follows the results/latest link)."""
    target = (results_dir / resume).resolve()
    if not (target / "checkpoint.pt").exists():
        raise ValueError(f"run config 'resume': no checkpoint.pt in {target}")
    return target.name
