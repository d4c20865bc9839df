"""Attack experiments: hostile sites against expert-matched averaging, without and with each defence.

    python -m experiments.attacks --preset smoke|full --out DIR [--target simulation|CONNECTION]

Site 0 attacks (fedmoe.attacks): "scale" (a scaled update to a rarely used expert, claimed with
all its tokens: the expert with the least load in the clean run's last round), "sign-flip" (its
whole update negated and scaled) or "backdoor" (a trigger patch relabelled to class 0 on half its
images, update scaled). Each attack, and the clean federation, runs under each defence:
  none              plain expert-matched averaging
  trimmed-mean      coordinate-wise, 20% cut at each end, per expert and for the shared tensors
  median            coordinate-wise median
  norm-bound        each site's update to each expert (and to the shared tensors) clipped to B
  outliers          updates dropped by the norm (modified z-score > 3.5) and direction
                    (cosine to the median update < 0) tests, at least 3 contributors
  max-update-norm   whole replies whose update norm exceeds 1.5 M rejected
with B the median and M the largest update norm of the sites in the clean undefended run
(calibrated first). Update norms shrink over the rounds (the learning rate decays), so a bound
at a multiple of the median rejects honest first-round replies; 1.5 M rejects none of the clean
run's.

Writes DIR/attacks.json and DIR/attacks.md: per (attack, defence) the final global accuracy on
the clean test set, its drop against the clean run under the same defence, the backdoor's attack
success rate (triggered test images of other classes labelled 0), the accuracy on the 10% of test
images that rely most on the scale attack's target expert (largest share of their token slots
routed to it by the clean undefended model: the images a poisoned expert would hurt most), and
what the defences dropped.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from .launch import Target, exit_on_sigterm, run_app
from .reporting import PIXELS, chosen_preset, driver_parser, markdown_table, progress

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "sites": 5,
        "config": {"num-server-rounds": 3, "max-examples-per-site": 1000, "partitioning": "domain",
                   "dp": False, "seed": 0},
    },
    "full": {
        "sites": 10,
        "config": {"num-server-rounds": 8, "max-examples-per-site": 4000, "partitioning": "domain",
                   "dp": False, "seed": 0},
    },
}
ATTACKER = "0"
TARGET_SHARE = 0.1  # the scale attack is measured on the 10% of test images relying most on its target
TARGET_LABEL = 0
ATTACKS: dict[str, dict[str, Any]] = {
    "clean": {},
    "scale": {"attack": "scale", "attack-sites": ATTACKER, "attack-scale": 20.0},
    "sign-flip": {"attack": "sign-flip", "attack-sites": ATTACKER, "attack-scale": 4.0},
    "backdoor": {"attack": "backdoor", "attack-sites": ATTACKER, "attack-scale": 5.0,
                 "attack-target-label": TARGET_LABEL},
}
DEFENCES = ("none", "trimmed-mean", "median", "norm-bound", "outliers", "max-update-norm")
COLUMNS = ["attack", "defence", "final_accuracy", "accuracy_drop", "attack_success_rate", "target_expert_accuracy",
           "target_expert_drop", "dropped_updates", "rejected_replies", "wall_seconds"]


def defence_config(defence: str, benign_norms: tuple[float, float]) -> dict[str, Any]:
    """Run config of a defence, with (median, largest) update norm of the clean run."""
    median, largest = benign_norms
    return {
        "none": {},
        "trimmed-mean": {"aggregation": "trimmed-mean", "trim-fraction": 0.2},
        "median": {"aggregation": "median"},
        "norm-bound": {"update-norm-bound": median},
        "outliers": {"outlier-mad": 3.5, "outlier-min-cosine": 0.0, "outlier-min-contributors": 3},
        "max-update-norm": {"max-update-norm": 1.5 * largest},
    }[defence]


def update_norms(summary: dict[str, Any]) -> tuple[float, float]:
    """(median, largest) L2 norm of the sites' updates over every round of a run."""
    norms = [n for r in summary["rounds"] for n in r["site_update_norm"].values()]
    return statistics.median(norms), max(norms)


def rarest_expert(summary: dict[str, Any]) -> int:
    """The expert with the least (nonzero) load in the run's last round: a rarely used expert."""
    load = summary["rounds"][-1]["expert_load"]
    return min((e for e, tokens in enumerate(load) if tokens > 0), key=lambda e: load[e])


def final_model(run_dir: Path, config: dict[str, Any]):
    """The run's final global model (its checkpoint)."""
    import torch

    from fedmoe.config import RunConfig
    from fedmoe.models.moe import MoEClassifier

    model = MoEClassifier(RunConfig.from_run_config(config).model_config())
    model.load_state_dict(torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"])
    return model


def global_test(config: dict[str, Any]):
    from fedmoe.config import RunConfig
    from fedmoe.data.fashion_mnist import load_global_test

    return load_global_test(RunConfig.from_run_config(config).data_source).tensors()


def run_measures(run_dir: Path, config: dict[str, Any], test, target_images) -> dict[str, float]:
    """The run's final model: backdoor attack success rate on ``test`` and accuracy on
    ``target_images`` (both (images, labels))."""
    from fedmoe.attacks import attack_success_rate
    from fedmoe.training import evaluate

    model = final_model(run_dir, config)
    images, labels = test
    target_accuracy = evaluate(model, *target_images)[1] if len(target_images[1]) else math.nan
    return {"attack_success_rate": attack_success_rate(model, images, labels, TARGET_LABEL),
            "target_expert_accuracy": target_accuracy}


def run_attacks(preset: dict[str, Any], out: Path, target: Target = Target(),
                attacks: tuple[str, ...] = tuple(ATTACKS), defences: tuple[str, ...] = DEFENCES) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    # the backdoor's trigger is stamped on pixels, and the measures below read pixels
    preset = {**preset, "config": {**PIXELS, **preset["config"]}}
    runs = [(a, d) for a in attacks for d in defences]
    if ("clean", "none") not in runs:
        runs.insert(0, ("clean", "none"))  # calibrates the norm bounds
    started = time.time()
    report: dict[str, Any] = {"sites": preset["sites"], "attacker": ATTACKER, "config": preset["config"],
                              "target": str(target), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": []}
    summaries: dict[tuple[str, str], dict[str, Any]] = {}
    measures: dict[tuple[str, str], dict[str, float]] = {}
    benign_norms, target_expert, target_images = (0.0, 0.0), -1, None
    test = global_test(preset["config"])
    for i, (attack, defence) in enumerate(runs):
        progress(i, len(runs), started, f"{attack} / {defence}")
        targeted = {"attack-expert": target_expert} if attack == "scale" else {}
        config = {**preset["config"], **ATTACKS[attack], **targeted, **defence_config(defence, benign_norms)}
        name = f"{attack}-{defence}"
        shutil.rmtree(out / "runs" / name, ignore_errors=True)
        t0 = time.time()
        summary = run_app(config, sites=preset["sites"], target=target, results_dir=out / "runs", run_name=name, quiet=True)
        wall = time.time() - t0
        summaries[attack, defence] = summary
        if (attack, defence) == ("clean", "none"):  # calibration: the norm bound and the scale attack's target
            from fedmoe.attacks import expert_share

            benign_norms, target_expert = update_norms(summary), rarest_expert(summary)
            share = expert_share(final_model(out / "runs" / name, config), test[0], target_expert)
            reliant = share.topk(int(TARGET_SHARE * len(share))).indices
            target_images = (test[0][reliant], test[1][reliant])
            report.update(benign_update_norm_median=benign_norms[0], benign_update_norm_max=benign_norms[1],
                          scale_target_expert=target_expert,
                          target_expert_test_images=len(reliant), target_expert_min_share=float(share[reliant].min()))
        m = measures[attack, defence] = run_measures(out / "runs" / name, config, test, target_images)
        clean, clean_m = summaries.get(("clean", defence)), measures.get(("clean", defence))
        rounds = summary["rounds"]
        report["rows"].append({
            "attack": attack, "defence": defence,
            "final_accuracy": round(summary["final_accuracy"], 4),
            "accuracy_drop": round(clean["final_accuracy"] - summary["final_accuracy"], 4) if clean else "",
            "attack_success_rate": round(m["attack_success_rate"], 4) if attack in ("clean", "backdoor") else "",
            "target_expert_accuracy": round(m["target_expert_accuracy"], 4) if attack in ("clean", "scale") else "",
            "target_expert_drop": round(clean_m["target_expert_accuracy"] - m["target_expert_accuracy"], 4)
            if attack == "scale" and clean_m else "",
            "dropped_updates": sum(len(r["dropped_updates"]) for r in rounds),
            "rejected_replies": sum(len(r["rejected_replies"]) for r in rounds),
            "wall_seconds": round(wall, 1),
        })
        (out / "attacks.json").write_text(json.dumps(report, indent=2) + "\n")
    progress(len(runs), len(runs), started, "done")
    (out / "attacks.md").write_text(
        f"Attacks by site {ATTACKER} of {preset['sites']} ({report['date']}); benign update norm "
        f"median B = {benign_norms[0]:.4g}, largest M = {benign_norms[1]:.4g}; attack_success_rate: triggered test images of other classes labelled "
        f"{TARGET_LABEL} (clean rows: the same measure without a backdoor); target_expert_accuracy: "
        f"accuracy on the {report.get('target_expert_test_images', 0)} test images relying most on expert "
        f"{target_expert}, the scale attack's target (at least {report.get('target_expert_min_share', 0):.0%} of "
        f"their token slots; drop: against the clean run, same defence)\n\n"
        + markdown_table(report["rows"], COLUMNS) + "\n"
    )
    return report


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    parser = driver_parser(__doc__, PRESETS)
    args = parser.parse_args(argv)
    report = run_attacks(chosen_preset(PRESETS, args), args.out, Target(args.target))
    print(markdown_table(report["rows"], COLUMNS))
    print(f"\nwrote {args.out / 'attacks.json'} and {args.out / 'attacks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
