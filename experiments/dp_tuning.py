"""Tune the DP training recipe: a grid of run-config keys, each point a full run of the app.

    python -m experiments.dp_tuning --preset NAME --out DIR [-c "key=value ..."] [--target ...]

Each grid point (the product of the preset's grid, or its list of points) is the preset's run
config (the default job unless the preset says otherwise) with the point's keys set; the point
runs through experiments.launch like any other run. Writes DIR/tuning.csv (one row per point:
its keys, final global accuracy, epsilon spent, wall time) and DIR/tuning.md (sorted by accuracy,
the winner first). Points already in DIR/tuning.csv are not run again, so an interrupted search
continues where it stopped.
"""

from __future__ import annotations

import itertools
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .benchmark import PRESETS as BENCHMARK_PRESETS
from .launch import Target, exit_on_sigterm, run_app
from .reporting import (PIXELS, checked_run_config, chosen_preset, driver_parser, markdown_table, progress, read_rows,
                        write_rows)

# the benchmark's full and smoke presets on scattering features (the default input since
# 2026-11-26); every grid point runs with the run config's DP (epsilon 8) unless the grid says otherwise
FULL_ON_FEATURES = {key: BENCHMARK_PRESETS["full-scattering"][key] for key in ("sites", "config")}
# the smoke grids ran at one local epoch (the preset took their winner's two later)
SMOKE_ON_FEATURES = {"sites": BENCHMARK_PRESETS["smoke-scattering"]["sites"],
                     "config": {**BENCHMARK_PRESETS["smoke-scattering"]["config"], "local-epochs": 1}}
PRESETS: dict[str, dict[str, Any]] = {
    # the default job (3 sites, domain split, 10 rounds, DP at epsilon 8): batch size and step size
    "batch-lr": {
        "sites": 3, "config": {**PIXELS},
        "grid": {"batch-size": [64, 256, 1024], "learning-rate": [0.002, 0.005, 0.01]},
    },
    # batch-lr's best was its largest batch with its largest step size: both further, and more epochs
    "large-batch": {
        "sites": 3, "config": {**PIXELS},
        "grid": {"batch-size": [1024, 2048], "learning-rate": [0.02, 0.04], "local-epochs": [1, 2]},
    },
    # large-batch's best (1024, 0.04, one epoch): step size and its decay over rounds, and less of
    # the budget for the count releases
    "decay-counts": {
        "sites": 3, "config": {**PIXELS, "batch-size": 1024},
        "grid": {"learning-rate": [0.04, 0.08], "learning-rate-decay": [0.85, 0.7], "count-noise-multiplier": [20.0, 60.0]},
    },
    # the winner (now the default recipe) with a server optimizer on the averaged pseudo-gradient
    "server-momentum": {
        "sites": 3, "config": {**PIXELS, "server-optimizer": "fedavgm"},
        "grid": {"server-momentum": [0.3, 0.6]},
    },
    "server-adam": {
        "sites": 3, "config": {**PIXELS, "server-optimizer": "fedadam"},
        "grid": {"server-learning-rate": [0.01, 0.03]},
    },
    # label skew (each site holds other classes) pulls a learned head towards each site's classes:
    # a fixed simplex-ETF head against the learned one, with and without DP
    "fixed-head": {
        "sites": 3, "config": {**PIXELS},
        "grid": {"head": ["fixed-etf", "linear"], "dp": [False, True]},
    },
    # the clipping norm: with Adam the step does not scale with it, so a small norm (most per-sample
    # gradients clipped, i.e. normalised) trades clipping bias for relatively less noise
    "clip-norm": {
        "sites": 3, "config": {**PIXELS},
        "grid": {"max-grad-norm": [0.1, 0.3, 3.0]},
    },
    # the default job's 10 rounds take about 3 of the 5 minutes it may use: more rounds (more, noisier
    # steps for the same epsilon) with a slower step-size decay
    "more-rounds": {
        "sites": 3, "config": {**PIXELS},
        "grid": {"num-server-rounds": [14], "learning-rate-decay": [0.85, 0.9]},
    },
    # the benchmark's low-data regime (9 sites, 240 training examples each): batch size and step size
    # of its DP methods
    "low-data": {
        "sites": 9, "config": {**PIXELS, "max-examples-per-site": 300},
        "grid": {"batch-size": [32, 64, 128], "learning-rate": [0.005, 0.02]},
    },
    # the benchmark's full preset (10 sites of 4800 training images, 32 experts): a site holds a quarter
    # of a default-job site, so the default batch of 1024 would leave it few steps; sampling rate near
    # the default's at batch 256, twice that at 512
    "full": {
        "sites": BENCHMARK_PRESETS["full"]["sites"], "config": BENCHMARK_PRESETS["full"]["config"],
        "grid": {"batch-size": [256, 512], "learning-rate": [0.01, 0.02]},
    },
    # the full preset on scattering features: its DP gap was
    # 3.85 points at full's batch 256 / 0.02; more and smaller steps, and larger ones
    "full-scattering": {
        **FULL_ON_FEATURES,
        "grid": {"batch-size": [128, 256], "learning-rate": [0.02, 0.04]},
    },
    # full-scattering's best was batch 256 at its larger step size: larger steps and batches (run it
    # into the same --out, where the points full-scattering ran are not run again)
    "full-scattering-larger": {
        **FULL_ON_FEATURES,
        "grid": {"batch-size": [256, 512], "learning-rate": [0.04, 0.08]},
    },
    # full-scattering's winner (batch 256) with two local epochs: twice the noisy steps for the same epsilon
    "full-scattering-epochs": {
        "sites": FULL_ON_FEATURES["sites"], "config": {**FULL_ON_FEATURES["config"], "batch-size": 256},
        "grid": {"local-epochs": [2], "learning-rate": [0.02, 0.04]},
    },
    # full-scattering's winner (batch 256, Adam 0.04) with the step size decaying faster or slower over
    # the 10 rounds than the default job's 0.85 (tuned on pixels): a final step of 0.0030 or 0.019 instead of 0.0093
    "full-scattering-decay": {
        "sites": FULL_ON_FEATURES["sites"], "config": {**FULL_ON_FEATURES["config"], "batch-size": 256,
                                                        "learning-rate": 0.04},
        "grid": {"learning-rate-decay": [0.75, 0.92]},
    },
    # full-scattering's winner training more experts per site: under DP an expert's noise is averaged
    # over the sites that trained it, and with 2 of 32 per layer few sites share one
    "full-scattering-experts": {
        "sites": FULL_ON_FEATURES["sites"], "config": {**FULL_ON_FEATURES["config"], "batch-size": 256,
                                                        "learning-rate": 0.04},
        "grid": {"active-top-m": [4, 8]},
    },
    # full-scattering's winner's 19 noisy steps a round from larger batches over more local epochs: each step
    # averages 2 or 4 times the examples at a noise multiplier of 1.20 or 2.00 instead of 0.84 (epsilon 8; the
    # sites' ledgers), 25% or 37% less noise on the mean gradient for 2 or 4 times the compute
    "full-scattering-fixed-steps": {
        "sites": FULL_ON_FEATURES["sites"], "config": {**FULL_ON_FEATURES["config"], "learning-rate": 0.04},
        "points": [{"batch-size": 512, "local-epochs": 2}, {"batch-size": 1024, "local-epochs": 4}],
    },
    # full-scattering's winner with Adam's second moment discounting the noise's variance (optimizer=adam-bc,
    # fedmoe.training.NoiseAwareAdam): at noise multiplier 0.84 and batch 256 the noise's variance per
    # coordinate (1.1e-5) outweighs most coordinates' squared gradient, so Adam steps as DP-SGD does
    "full-scattering-adam-bc": {
        "sites": FULL_ON_FEATURES["sites"], "config": {**FULL_ON_FEATURES["config"], "batch-size": 256,
                                                        "optimizer": "adam-bc"},
        "points": [{"adam-bc-floor": 0.3, "learning-rate": 0.04}, {"adam-bc-floor": 0.3, "learning-rate": 0.02},
                   {"adam-bc-floor": 0.03, "learning-rate": 0.02}, {"adam-bc-floor": 0.03, "learning-rate": 0.005}],
    },
    # the full preset on features at epsilon 1, whose target (within 6 points of non-DP) batch 1024 over four
    # epochs misses by 1.4: at a fixed budget the planned sigma / B grows with the square root of the epochs over
    # the sampling rate (0.0121 for 1024 x 4 over 10 rounds, 0.0064 for 1024 x 1, 0.0049 for 2048 x 1), so fewer
    # and less noisy steps, against the step size
    "full-scattering-eps1": {
        "sites": FULL_ON_FEATURES["sites"], "config": {**FULL_ON_FEATURES["config"], "target-epsilon": 1.0},
        "points": [{"batch-size": 1024, "local-epochs": 1, "learning-rate": 0.04},
                   {"batch-size": 2048, "local-epochs": 1, "learning-rate": 0.04},
                   {"batch-size": 1024, "local-epochs": 2, "learning-rate": 0.04},
                   {"batch-size": 1024, "local-epochs": 1, "learning-rate": 0.02},
                   {"batch-size": 1024, "local-epochs": 4, "learning-rate": 0.02},
                   {"batch-size": 2048, "local-epochs": 1, "learning-rate": 0.08}],
    },
    # full-scattering-eps1 lost with every cut in steps: more steps instead, spread over more rounds (the same
    # planned noise as 1024 x 4 over 10 rounds, the step size decaying to the same final value), and the noise
    # averaged over more sites: an expert's update is the mean over the sites that trained it, and with 2 of 32
    # experts a layer few sites share one; with 8 experts each is trained by about 2.5 of the 10 sites
    "full-scattering-eps1-sharing": {
        "sites": FULL_ON_FEATURES["sites"],
        "config": {**FULL_ON_FEATURES["config"], "target-epsilon": 1.0, "batch-size": 1024, "learning-rate": 0.04},
        "points": [{"local-epochs": 4, "num-experts": 8},
                   {"local-epochs": 2, "num-server-rounds": 20, "learning-rate-decay": 0.92},
                   {"local-epochs": 4, "num-experts": 8, "active-top-m": 4}],
    },
    # full-scattering-eps1-sharing's best was its 20 rounds: more rounds again, at the same noisy steps (40 rounds
    # of one epoch) and at twice them (20 rounds of four), the step size decaying to about the same final value
    "full-scattering-eps1-rounds": {
        "sites": FULL_ON_FEATURES["sites"],
        "config": {**FULL_ON_FEATURES["config"], "target-epsilon": 1.0, "batch-size": 1024, "learning-rate": 0.04},
        "points": [{"local-epochs": 4, "num-server-rounds": 20, "learning-rate-decay": 0.92},
                   {"local-epochs": 1, "num-server-rounds": 40, "learning-rate-decay": 0.96}],
    },
    # the smoke preset on scattering features (3 sites of 1600 training images, 5 rounds): a batch
    # of 512 leaves a site 15 steps, one of 128 about 60
    "smoke-scattering": {
        **SMOKE_ON_FEATURES,
        "grid": {"batch-size": [128, 256, 512], "learning-rate": [0.01, 0.02, 0.04]},
    },
    # smoke-scattering's best was its smallest batch at the middle step size: smaller batches still
    # (run it into the same --out)
    "smoke-scattering-smaller": {
        **SMOKE_ON_FEATURES,
        "grid": {"batch-size": [32, 64, 128], "learning-rate": [0.005, 0.01, 0.02]},
    },
    # smoke-scattering-smaller's winner (batch 64, Adam 0.01) with more noisy steps per round: two,
    # three or four local epochs, at that step size, half and twice it
    "smoke-scattering-epochs": {
        **SMOKE_ON_FEATURES,  # its config's batch is 64 already
        "grid": {"local-epochs": [2, 3, 4], "learning-rate": [0.005, 0.01, 0.02]},
    },
    # the smoke preset's DP recipe (batch 256 over eight epochs, Adam 0.01) with the same noisy steps a round from
    # larger Poisson batches, as full-scattering-fixed-steps did for the full preset
    "smoke-scattering-fixed-steps": {
        "sites": SMOKE_ON_FEATURES["sites"], "config": {**SMOKE_ON_FEATURES["config"], "learning-rate": 0.01},
        "points": [{"batch-size": 256, "local-epochs": 8}, {"batch-size": 512, "local-epochs": 16},
                   {"batch-size": 512, "local-epochs": 16, "learning-rate": 0.02},
                   {"batch-size": 1024, "local-epochs": 32}],
    },
    # a quick grid for trying the driver
    "smoke": {
        "sites": 3, "config": {**PIXELS, "num-server-rounds": 2, "max-examples-per-site": 1000},
        "grid": {"batch-size": [64, 256]},
    },
}
RESULT_COLUMNS = ["final_accuracy", "epsilon", "wall_seconds", "run"]


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def preset_points(preset: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs a preset asks for: its list of points, or every point of its grid."""
    return preset["points"] if "points" in preset else grid_points(preset["grid"])


def run_name(point: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in point.items())


def run_tuning(preset: dict[str, Any], out: Path, target: Target = Target()) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    points = preset_points(preset)
    for point in points:  # a bad point fails now, not after the hours the points before it take
        checked_run_config({**preset["config"], **point})
    rows = read_rows(out / "tuning.csv")
    # another preset's rows in the same folder may have other keys: the table keeps them all
    keys = [key for row in [*rows, *points] for key in row if key not in RESULT_COLUMNS]
    columns = list(dict.fromkeys(keys)) + RESULT_COLUMNS
    done = {row["run"] for row in rows}
    started = time.time()
    for i, point in enumerate(points):
        name = run_name(point)
        progress(i, len(points), started, name)
        if name in done:
            continue
        shutil.rmtree(out / "runs" / name, ignore_errors=True)
        t0 = time.time()
        summary = run_app({**preset["config"], **point}, sites=preset["sites"], target=target, results_dir=out / "runs",
                          run_name=name, quiet=True)
        eps = [r["epsilon_max"] for r in summary["rounds"] if r.get("epsilon_max") is not None]
        rows.append({**point, "final_accuracy": round(summary["final_accuracy"], 4),
                     "epsilon": round(eps[-1], 3) if eps else "", "wall_seconds": round(time.time() - t0, 1), "run": name})
        write_rows(rows, columns, out / "tuning.csv")
    progress(len(points), len(points), started, "done")
    ranked = sorted(rows, key=lambda r: -float(r["final_accuracy"]))
    (out / "tuning.md").write_text(markdown_table(ranked, columns[:-1]) + "\n")
    return ranked


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    args = driver_parser(__doc__, PRESETS).parse_args(argv)
    ranked = run_tuning(chosen_preset(PRESETS, args), args.out, Target(args.target))
    print((args.out / "tuning.md").read_text())
    print(f"best: {ranked[0]['run']} ({ranked[0]['final_accuracy']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
