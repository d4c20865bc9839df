"""Micro-benchmark: server aggregation time per round against the number of replies.

    python -m experiments.aggregation_bench [--replies 10,100,1000] [--repeats 3] [--out DIR]

Builds N synthetic train replies in fedmoe's wire format for the default model (8 experts; each
site sends the shared tensors and 2 experts, or the whole model for FedAvg) and times the
strategies' ``aggregate_train`` on them: validation of every reply plus the averaging, as in a
round. Prints a table (median seconds over repeats, peak Python-tracked memory of one
aggregation, process peak RSS) and with --out writes aggregation.json.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmoe.federation import wire
from fedmoe.config import RunConfig
from fedmoe.models.moe import MoEClassifier
from server.strategy import ExpertMatched, FedAvgMoE

from .reporting import markdown_table, save_json


def synthetic_replies(global_state: dict[str, torch.Tensor], n: int, num_experts: int, whole_model: bool,
                      seed: int = 0) -> list[Message]:
    """n replies as sites send them: perturbed tensors, 2 active experts (all for whole_model)."""
    rng = np.random.default_rng(seed)
    replies = []
    for site in range(n):
        active = list(range(num_experts)) if whole_model else sorted(rng.choice(num_experts, 2, replace=False).tolist())
        trained = {k: v + 0.01 * torch.randn_like(v) for k, v in global_state.items()
                   if wire.expert_id(k, num_experts) in {None, *active}}
        counts = rng.integers(0, 500, num_experts).astype(float)
        content = wire.encode_train_reply(trained, site, 100 + site, active, counts, 1.0)
        instruction = Message(RecordDict({wire.CONFIG: ConfigRecord({"server-round": 1})}),
                              dst_node_id=site + 1, message_type=MessageType.TRAIN)
        replies.append(Message(content, reply_to=instruction))
    return replies


def time_aggregation(strategy_class, global_state, replies, num_experts: int, repeats: int) -> tuple[float, int]:
    """(median seconds, peak traced bytes) of strategy.aggregate_train over ``replies``; the
    memory is traced in a separate run (tracing slows numpy down several times)."""
    global_arrays = wire.to_numpy(wire.to_record(global_state))

    def aggregate() -> float:
        strategy = strategy_class(num_experts=num_experts)
        strategy.global_arrays = dict(global_arrays)
        started = time.perf_counter()
        arrays, _ = strategy.aggregate_train(1, replies)
        seconds = time.perf_counter() - started
        if arrays is None or strategy.round_stats[1].replies != len(replies):
            raise RuntimeError("aggregation dropped replies: the benchmark input is not valid")
        return seconds

    times = [aggregate() for _ in range(repeats)]
    tracemalloc.start()
    aggregate()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replies", default="10,100,1000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    # Messages are made outside a running Flower app: give them a task identity
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    cfg = RunConfig(features="pixels")  # the model BENCHMARKS.md measured (experiments.reporting.PIXELS)
    torch.manual_seed(0)
    global_state = MoEClassifier(cfg.model_config()).state_dict()
    rows = []
    for n in (int(x) for x in args.replies.split(",")):
        for name, strategy_class, whole in (("expert_matched", ExpertMatched, False), ("fedavg", FedAvgMoE, True)):
            replies = synthetic_replies(global_state, n, cfg.num_experts, whole)
            seconds, peak = time_aggregation(strategy_class, global_state, replies, cfg.num_experts, args.repeats)
            rows.append({"strategy": name, "replies": n, "seconds": round(seconds, 4),
                         "reply_MB_total": round(sum(r.content[wire.ARRAYS].count_bytes() for r in replies) / 1e6, 1),
                         "peak_traced_MB": round(peak / 1e6, 1)})
            print(rows[-1], flush=True)
            del replies
    result = {"model": "default (8 experts, d-model 64)", "repeats": args.repeats, "rows": rows,
              "process_peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    print(markdown_table(rows, list(rows[0])))
    print(f"process peak RSS {result['process_peak_rss_MB']} MB")
    save_json(result, args.out, "aggregation.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
