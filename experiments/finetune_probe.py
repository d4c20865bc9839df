"""Probe: how far does local fine-tuning take a finished run's global model on each site's own data?

    python -m experiments.finetune_probe RUN_DIR --sites N [--epochs 10] [--learning-rate 0.002] [--batch-size 64] [--out DIR]

Loads RUN_DIR's global model (checkpoint.pt, built from the run's own config), and for every site
fine-tunes a copy on the site's training split without DP (Adam, the given learning rate and
batch size), evaluating it on the site's own test split after each epoch. This is what a site
could do for its own predictions with a model it received: the copy would never be sent nor used
in the shared training, so what the site sends keeps its guarantee. Prints the per-site and mean
accuracy (text tasks: bits per character) after 0..epochs epochs; --out writes finetune_probe.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fedmoe.api import load_model
from fedmoe.config import RunConfig
from fedmoe.data.tasks import bits_per_nat, site_data
from fedmoe.training import evaluate, make_loader, make_optimizer, train_epochs

from .reporting import save_json


def finetune_curve(model, data, epochs: int, learning_rate: float, batch_size: int, seed: int,
                   per_nat: float | None = None) -> list[float]:
    """Own-test accuracy of a fine-tuned copy of ``model`` after 0..epochs epochs on the site's data;
    with ``per_nat`` (text: bits per nat of the site's text), its bits per character instead."""
    inputs, targets, test_inputs, test_targets = data
    tuned = copy.deepcopy(model)
    optimizer = make_optimizer("adam", tuned.parameters(), learning_rate)

    def own_test() -> float:
        loss, accuracy = evaluate(tuned, test_inputs, test_targets)
        return accuracy if per_nat is None else loss * per_nat

    curve = [own_test()]
    for epoch in range(epochs):
        train_epochs(tuned, make_loader(inputs, targets, batch_size, torch.Generator().manual_seed(seed + epoch)), optimizer, 1)
        curve.append(own_test())
    return curve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--sites", type=int, required=True, help="the number of sites the run had")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=0.002)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not (args.run_dir / "summary.json").is_file() or not (args.run_dir / "checkpoint.pt").is_file():
        parser.error(f"{args.run_dir} is not a finished run: it needs summary.json and checkpoint.pt")
    summary = json.loads((args.run_dir / "summary.json").read_text())
    cfg = RunConfig.from_run_config(summary["config"])
    num_sites = args.sites
    model = load_model(args.run_dir)
    metric = "accuracy" if bits_per_nat(cfg) is None else "bits per character"
    curves = {}
    for site in range(num_sites):
        curves[site] = finetune_curve(model, site_data(cfg, site, num_sites), args.epochs, args.learning_rate,
                                      args.batch_size, cfg.seed, bits_per_nat(cfg, site))
        print(f"site {site}: " + " ".join(f"{a:.4f}" for a in curves[site]), flush=True)
    mean = np.mean(list(curves.values()), axis=0)
    print(f"mean own-site {metric} after 0..{args.epochs} epochs: " + " ".join(f"{a:.4f}" for a in mean))
    save_json({"run": str(args.run_dir), "epochs": args.epochs, "learning_rate": args.learning_rate,
               "batch_size": args.batch_size, "metric": metric, "per_site": curves, "mean": mean.tolist()},
              args.out, "finetune_probe.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
