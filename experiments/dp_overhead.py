"""Micro-benchmark: DP-SGD epoch time over non-DP epoch time, same model, same data, one process.

    python -m experiments.dp_overhead [--task fmnist|charlm] [--examples 6400] [--repeats 3] [--device cuda] [--profile] [--out DIR]

Trains the task's default model (2 of 8 experts per MoE layer active, as a site trains them)
for one epoch on random inputs without DP, with book-keeping clipping (one backward pass), with
Opacus ghost clipping (two) and with hooks (per-sample gradients), on one thread. The modes take
turns within each repeat, so background load falls on all of them alike; prints the median epoch
times and their ratios; --out also writes dp_overhead.json. With --device the model trains on
that device and the examples stay on the CPU, as at a site: batches are put together there and
moved, so an epoch's time includes that. --profile then runs one more epoch without DP and one
with book-keeping under torch's profiler and prints (and with --out saves) where each spends its
time: operators by self time on the CPU and, on an accelerator, on the device, how much of the
epoch the device was busy, and where the epoch made the host wait for the device.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from fedmoe import privacy
from fedmoe.config import RunConfig
from fedmoe.data.tasks import build_model
from fedmoe.training import freeze_inactive_experts, make_loader, make_optimizer, train_epochs

from .reporting import save_json

DP_MODES = ("bookkeeping", "ghost", "hooks")


def epoch_seconds(mode: str, images: torch.Tensor, labels: torch.Tensor, cfg: RunConfig, device: torch.device) -> float:
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    freeze_inactive_experts(model, [layer * cfg.num_experts + e for layer in range(cfg.num_moe_layers) for e in (2, 5)])
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.learning_rate)
    started = time.perf_counter()
    if mode == "none":
        train_epochs(model, make_loader(images, labels, cfg.batch_size, torch.Generator().manual_seed(0)), optimizer, 1)
    else:
        ledger = privacy.PrivacyLedger(site=0, target_epsilon=cfg.target_epsilon, delta=cfg.target_delta,
                                       noise_multiplier=1.0, count_noise_multiplier=cfg.count_noise_multiplier,
                                       sample_rate=1 / privacy.steps_per_epoch(len(labels), cfg.batch_size))
        privacy.train_private(model, TensorDataset(images, labels), cfg.batch_size, optimizer, 1, ledger,
                              cfg.max_grad_norm, mode, privacy.dp_generator())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def profile_epoch(mode: str, images: torch.Tensor, labels: torch.Tensor, cfg: RunConfig, device: torch.device,
                  rows: int = 25) -> dict:
    """One epoch of ``mode`` under torch's profiler: the operator tables (self time on the CPU, and
    on the device when there is one) and the device's busy share of the epoch's wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = epoch_seconds(mode, images, labels, cfg, device)
    events = prof.key_averages()
    tables = {"self_cpu": events.table(sort_by="self_cpu_time_total", row_limit=rows)}
    summary = {"mode": mode, "profiled_epoch_seconds": round(wall, 3),
               "self_cpu_seconds": round(sum(e.self_cpu_time_total for e in events) / 1e6, 3)}
    if device.type == "cuda":
        tables["self_device"] = events.table(sort_by="self_device_time_total", row_limit=rows)
        busy = sum(e.self_device_time_total for e in events) / 1e6
        summary.update(device_busy_seconds=round(busy, 3), device_busy_share=round(busy / wall, 3))
    return {"summary": summary, "tables": tables}


def sync_sites(mode: str, images: torch.Tensor, labels: torch.Tensor, cfg: RunConfig, device: torch.device,
               rows: int = 20) -> list[tuple[str, int]]:
    """The host-device synchronisations of one epoch of ``mode`` on a CUDA device (torch's sync
    debug mode warns at each), counted by the innermost line of fedmoe, Opacus or this benchmark
    that asked for one."""
    counts: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        ours = [f for f in traceback.extract_stack()[:-1] if any(part in f.filename for part in ("fedmoe", "opacus", "experiments"))]
        site = f"{ours[-1].filename.rsplit('site-packages/', 1)[-1]}:{ours[-1].lineno} {ours[-1].line}" if ours else f"{filename}:{lineno}"
        counts[site] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            epoch_seconds(mode, images, labels, cfg, device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return counts.most_common(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("fmnist", "charlm"), default="fmnist")
    parser.add_argument("--examples", type=int, default=6400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--features", choices=("pixels", "scattering"), default=RunConfig().features,
                        help="fmnist: the classifier reads pixels or scattering features (default: %(default)s)")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"), help="where the model trains (e.g. cuda)")
    parser.add_argument("--profile", action="store_true", help="then profile one epoch without DP and one with book-keeping")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = RunConfig(task=args.task, features=args.features)
    generator = torch.Generator().manual_seed(0)
    if args.task == "charlm":
        windows = torch.randint(0, 256, (args.examples, cfg.seq_len + 1), generator=generator)
        inputs, targets = windows[:, :-1], windows[:, 1:]
    else:
        side, channels, _ = cfg.input_grid()
        inputs = torch.randn(args.examples, channels, side, side, generator=generator)
        targets = torch.randint(0, 10, (args.examples,), generator=generator)
    modes = ("none", *DP_MODES)
    for mode in modes:  # warm-up
        epoch_seconds(mode, inputs[:256], targets[:256], cfg, args.device)
    seconds = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            seconds[mode].append(epoch_seconds(mode, inputs, targets, cfg, args.device))
    times = {mode: statistics.median(values) for mode, values in seconds.items()}
    result = {
        "task": args.task, "features": cfg.features if args.task == "fmnist" else None,
        "examples": args.examples, "batch_size": cfg.batch_size, "threads": 1, "device": str(args.device),
        "device_name": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None,
        "epoch_seconds": {k: round(v, 3) for k, v in times.items()},
        "overhead": {mode: round(times[mode] / times["none"], 2) for mode in DP_MODES},
    }
    print(json.dumps(result, indent=2))
    save_json(result, args.out, "dp_overhead.json")
    if args.profile:
        for mode in ("none", "bookkeeping"):
            profiled = profile_epoch(mode, inputs, targets, cfg, args.device)
            print(json.dumps(profiled["summary"]))
            for name, table in profiled["tables"].items():
                print(f"--- {mode}, operators by {name.replace('_', ' ')} time\n{table}")
                if args.out:
                    (args.out / f"profile-{mode}-{name}.txt").write_text(table)
            save_json(profiled["summary"], args.out, f"profile-{mode}.json")
            if args.device.type == "cuda":
                sites = sync_sites(mode, inputs, targets, cfg, args.device)
                print(f"--- {mode}, host-device synchronisations by call site (count in one epoch)")
                for site, count in sites:
                    print(f"{count:8d}  {site}")
                save_json({"mode": mode, "sync_sites": sites}, args.out, f"syncs-{mode}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
