"""Privacy-budget sweep: accuracy against epsilon on the multi-domain split.

    python -m experiments.privacy_sweep --preset smoke|full|recipe|default-job|benchmark-full|benchmark-smoke-scattering --out DIR [--target simulation|CONNECTION]

Runs the fedmoe app (through experiments.launch) once per (target epsilon, seed) with dp=true,
plus a dp=false reference per seed, and writes
  DIR/sweep.csv   target_epsilon, seed, achieved_epsilon, final_accuracy, uplink_bytes_total, wall_seconds, ...
  DIR/sweep.png   final accuracy against epsilon (mean and min-max over seeds), no-DP reference line
  DIR/sweep.md    the table
target_epsilon "inf" means clipping without noise; achieved_epsilon is the largest epsilon any
site reported at the end of the run (from its RDP ledger). Runs already in DIR/sweep.csv are not
run again, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .benchmark import PRESETS as BENCHMARK_PRESETS
from .launch import Target, exit_on_sigterm, run_app
from .reporting import PIXELS, chosen_preset, driver_parser, markdown_table, progress, read_rows, save_axes, write_rows


def benchmark_dp_job(name: str) -> dict[str, Any]:
    """Sites and config of the benchmark preset ``name`` as its DP methods run it (config + dp-config)."""
    preset = BENCHMARK_PRESETS[name]
    return {"sites": preset["sites"], "config": {**preset["config"], **preset.get("dp-config", {})}}


PRESETS = {
    "smoke": {
        "epsilons": [1.0, 2.0, 4.0, 8.0, math.inf],
        "seeds": [0],
        "sites": 3,
        "config": {**PIXELS, "num-server-rounds": 3, "max-examples-per-site": 2000, "partitioning": "domain",
                   "batch-size": 64, "learning-rate": 0.002},
    },
    "full": {
        "epsilons": [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, math.inf],
        "seeds": [0, 1, 2],
        "sites": 3,
        "config": {**PIXELS, "num-server-rounds": 5, "max-examples-per-site": 6000, "partitioning": "domain",
                   "batch-size": 64, "learning-rate": 0.002},
    },
    # the default job as it is (all data, 10 rounds, the tuned DP recipe of BENCHMARKS.md)
    "recipe": {
        "epsilons": [0.5, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0, math.inf],
        "seeds": [0, 1, 2],
        "sites": 3,
        "config": {**PIXELS},
    },
    # the default job as `make run` runs it now (scattering features; "recipe" above keeps its pixel numbers)
    "default-job": {"epsilons": [0.5, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0, math.inf], "seeds": [0, 1, 2], "sites": 3,
                    "config": {}},
    # the benchmark's full preset (10 sites, 32 experts, domain split) with its DP recipe, at the
    # budgets below epsilon 8 whose targets the utility issue names
    "benchmark-full": {"epsilons": [1.0, 3.0], "seeds": [0], **benchmark_dp_job("full"), "reference": False},
    # the full preset on scattering features with its DP recipe (Poisson batches of 1024, one local epoch a
    # round over 40 rounds) at the budgets whose targets the utility issue names
    "benchmark-full-scattering": {"epsilons": [1.0, 3.0, 8.0], "seeds": [0, 1, 2], "reference": False,
                                  **benchmark_dp_job("full-scattering")},
    # the benchmark's smoke preset on scattering features with its DP recipe (batches of 256 over eight local
    # epochs): the current recipe's whole curve over 3 seeds in about 30 minutes
    "benchmark-smoke-scattering": {"epsilons": [0.5, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0, math.inf], "seeds": [0, 1, 2],
                                   **benchmark_dp_job("smoke-scattering")},
}

COLUMNS = ["target_epsilon", "seed", "dp", "achieved_epsilon", "final_accuracy", "uplink_bytes_total",
           "downlink_bytes_total", "rounds", "wall_seconds", "run"]


@dataclass
class SweepPoint:
    target_epsilon: float | None  # None: the dp=false reference
    seed: int

    @property
    def label(self) -> str:
        return "no-dp" if self.target_epsilon is None else f"eps={_fmt_eps(self.target_epsilon)}"


def _fmt_eps(x: float | None) -> str:
    if x is None:
        return ""
    return "inf" if math.isinf(x) else f"{x:g}"


def row_from_summary(point: SweepPoint, summary: dict[str, Any], wall: float, run: str) -> dict[str, Any]:
    rounds = summary["rounds"]
    eps = [r["epsilon_max"] for r in rounds if r.get("epsilon_max") is not None]
    return {
        "target_epsilon": _fmt_eps(point.target_epsilon),
        "seed": point.seed,
        "dp": point.target_epsilon is not None,
        "achieved_epsilon": _fmt_eps(eps[-1]) if eps else "",
        "final_accuracy": round(summary["final_accuracy"], 4),
        "uplink_bytes_total": sum(r["uplink_bytes"] for r in rounds),
        "downlink_bytes_total": sum(r["downlink_bytes"] for r in rounds),
        "rounds": len(rounds),
        "wall_seconds": round(wall, 1),
        "run": run,
    }


def run_sweep(preset: dict[str, Any], out: Path, target: Target = Target()) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    points = [SweepPoint(None, s) for s in preset["seeds"]] if preset.get("reference", True) else []
    points += [SweepPoint(e, s) for e in preset["epsilons"] for s in preset["seeds"]]
    rows = [typed_row(row) for row in read_rows(out / "sweep.csv")]
    done = {row["run"] for row in rows}
    started = time.time()
    for i, point in enumerate(points):
        progress(i, len(points), started, f"{point.label} seed={point.seed}")
        run = f"{point.label}-seed{point.seed}"
        if run in done:
            continue
        overrides = {**preset["config"], "seed": point.seed, "dp": point.target_epsilon is not None}
        if point.target_epsilon is not None:
            overrides["target-epsilon"] = point.target_epsilon
        shutil.rmtree(out / "runs" / run, ignore_errors=True)  # a half-finished run is started again
        t0 = time.time()
        summary = run_app(overrides, sites=preset["sites"], target=target, results_dir=out / "runs",
                          run_name=run, quiet=True)
        rows.append(row_from_summary(point, summary, time.time() - t0, run))
        write_rows(rows, COLUMNS, out / "sweep.csv")
    progress(len(points), len(points), started, "done")
    (out / "sweep.md").write_text(markdown_table(rows, COLUMNS[:-1]) + "\n")
    plot(rows, out / "sweep.png")
    return rows


def typed_row(row: dict[str, str]) -> dict[str, Any]:
    """A sweep.csv row as row_from_summary made it (the CSV holds strings)."""
    return {**row, "seed": int(row["seed"]), "dp": row["dp"] == "True", "final_accuracy": float(row["final_accuracy"]),
            "rounds": int(row["rounds"]), "wall_seconds": float(row["wall_seconds"])}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    dp_rows = [r for r in rows if r["dp"]]
    finite = sorted({float(r["target_epsilon"]) for r in dp_rows if r["target_epsilon"] != "inf"})
    inf_x = (max(finite) * 2.5) if finite else 1.0
    xs, means, lows, highs = [], [], [], []
    for label in [*map(_fmt_eps, finite), "inf"]:
        accs = [r["final_accuracy"] for r in dp_rows if r["target_epsilon"] == label]
        if not accs:
            continue
        xs.append(inf_x if label == "inf" else float(label))
        means.append(np.mean(accs))
        lows.append(min(accs))
        highs.append(max(accs))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, means, "o-", label="expert-matched + DP-SGD (mean over seeds)")
    ax.fill_between(xs, lows, highs, alpha=0.25, label="min-max over seeds")
    reference = [r["final_accuracy"] for r in rows if not r["dp"]]
    if reference:
        ax.axhline(np.mean(reference), color="k", linestyle="--", label="no DP")
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([("∞\n(clip only)" if x == inf_x else f"{x:g}") for x in xs])
    save_axes(fig, ax, path, "target epsilon per site (delta = 1e-5)", "final global test accuracy",
              "fedmoe: accuracy against privacy budget", legend_size=8)


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    parser = driver_parser(__doc__, PRESETS)
    args = parser.parse_args(argv)
    rows = run_sweep(chosen_preset(PRESETS, args), args.out, Target(args.target))
    print(markdown_table(rows, COLUMNS[:-1]))
    print(f"\nwrote {args.out / 'sweep.csv'}, {args.out / 'sweep.png'}, {args.out / 'sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
