"""Benchmark: expert-matched federation against FedAvg, a dense model, isolated sites and pooled
data, on the same split, seed and number of rounds.

    python -m experiments.benchmark --preset smoke|smoke-scattering|full|full-scattering|low-data|low-data-dirichlet|charlm-smoke|charlm-full|hf-smoke --out DIR
                                    [--target simulation|CONNECTION] [--seeds 0,1,2]
                                    [--methods expert_matched,fedavg_full_moe,...]

Methods
  expert_matched       fedmoe: each site trains and sends the shared tensors and its active experts
  fedavg_full_moe      Flower's FedAvg over the whole MoE: every expert trained and sent
  fedavg_dense         FedAvg over a dense model: one expert of width top-k x expert-hidden, i.e. the
                       same feed-forward parameters per token as the MoE activates
  local_only           each site trains the MoE alone on its own data, no federation
  centralized          all sites' training data pooled into one model (the upper bound)
  class_pooled         the sites whose training splits hold the same classes pool their data, one
                       model per such group (on the domain split: one per domain), judged on each
                       site's own test split: what personalisation could reach if federation
                       within a domain were free of noise and loss (classification tasks only)
  expert_matched_dp, fedavg_full_moe_dp   the first two with DP-SGD at target epsilon 8 per site
  expert_matched_personal, expert_matched_personal_dp   expert_matched where each site keeps its own
                       classifier head (personalize=head, never sent), without and with DP; their
                       per-site accuracy is with the site's own head
  expert_matched_personal_all, expert_matched_personal_all_dp   the same with personalize=head,router,expert:
                       the site's own head, routers and a personal expert in every MoE layer
  expert_matched_ditto, expert_matched_ditto_dp   expert_matched where each site also trains a whole
                       model of its own without noise, pulled toward the global model and never sent
                       (personal-model=ditto, Li et al. 2021), without and with DP; their per-site
                       accuracy is that model's
  expert_matched_int8  expert_matched with int8 updates both ways (update-compression and
                       downlink-compression int8, error feedback) and sites that rebuild the
                       initial model from the run config (derive-initial-model)
  expert_matched_int4  the same with int4 updates (two values per byte) and the int8 downlink
DP methods train with the preset's dp-config on top of its config (the DP recipe: batch size and
step size tuned for DP-SGD, BENCHMARKS.md), the other methods with its config.
The federated methods run the fedmoe app (experiments.launch, on the target); local_only,
centralized and class_pooled train in this process with the sites' code: same model, optimiser, per-round learning
rate and epochs per round, on the same partitions.

With --seeds the benchmark runs once per seed (DIR/seed-N/, each as below) and DIR/seeds.md and
DIR/seeds.json give each method's mean and standard deviation over the seeds. A method already in
a results.json of the same config is not run again: an interrupted benchmark continues, and a run
with other --methods into the same DIR adds its methods to those already there.

Writes DIR/results.json (per method: final_accuracy on the global test set, per_site_accuracy on each
site's own test split, uplink/downlink bytes, rounds, wall_seconds, epsilon where DP ran, per-round
curves), DIR/results.md (table and headline ratios), DIR/accuracy_rounds.png,
DIR/accuracy_uplink.png and DIR/expert_utilisation.png (expert-by-site routing shares).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .launch import Target, exit_on_sigterm, run_app
from fedmoe.plots import plot_utilisation, utilisation_panels

from .reporting import PIXELS, checked_run_config, chosen_preset, driver_parser, markdown_table, progress, save_axes

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "sites": 3,
        "config": {**PIXELS, "num-server-rounds": 5, "max-examples-per-site": 2000, "partitioning": "domain",
                   "batch-size": 64, "learning-rate": 0.002, "seed": 0},
    },
    # the charlm task: one Debian fortunes language per site
    "charlm-smoke": {
        "sites": 4,
        "methods": ("expert_matched", "fedavg_full_moe", "local_only", "centralized"),
        "config": {"task": "charlm", "languages": "en,de,ru,pl", "num-moe-layers": 2, "seq-len": 64,
                   "num-server-rounds": 4, "max-examples-per-site": 1500, "batch-size": 32,
                   "learning-rate": 0.002, "seed": 0},
    },
    "charlm-full": {
        "sites": 8,
        # the comparison this preset exists for runs first (fedavg_dense: the MoE's active width, dense)
        "methods": ("expert_matched", "fedavg_dense", "local_only", "expert_matched_personal_all",
                    "expert_matched_dp", "expert_matched_personal_all_dp", "fedavg_full_moe", "centralized"),
        # batch 128 / Adam 0.01 for every method, DP or not (BENCHMARKS.md): expert_matched reached 4.442
        # bits/char against 4.654 at the earlier 32 / 0.002, and DP at epsilon 8 did better with it too
        "config": {"task": "charlm", "num-moe-layers": 2, "seq-len": 64, "num-server-rounds": 10,
                   "max-examples-per-site": 6000, "batch-size": 128, "learning-rate": 0.01, "seed": 0},
    },
    # a Hugging Face transformers MoE (Qwen2-MoE family: routed experts beside a shared expert) on the
    # charlm-smoke text, built small from fedmoe's size keys (fedmoe.models.hf_moe)
    "hf-smoke": {
        "sites": 4,
        "methods": ("expert_matched", "expert_matched_dp", "fedavg_full_moe", "local_only"),
        "config": {"task": "hf-moe", "hf-model": "qwen2-moe", "languages": "en,de,ru,pl", "num-moe-layers": 2,
                   "d-model": 64, "num-heads": 4, "num-experts": 8, "top-k": 2, "expert-hidden": 64, "seq-len": 64,
                   "num-server-rounds": 6, "max-examples-per-site": 1500, "batch-size": 32, "learning-rate": 0.003,
                   "seed": 0},
    },
    # few examples per site (240 to train, 60 to test), three sites per domain: where a site alone
    # has too little data and federation has to pay off
    "low-data": {
        "sites": 9,
        "methods": ("expert_matched", "expert_matched_personal", "local_only", "centralized",
                    "expert_matched_dp", "expert_matched_personal_dp"),
        "config": {**PIXELS, "num-server-rounds": 10, "partitioning": "domain", "max-examples-per-site": 300,
                   "batch-size": 32, "learning-rate": 0.002, "seed": 0},
        "dp-config": {"batch-size": 64, "learning-rate": 0.01},
    },
    # the same few examples per site with label skew instead of domains (Dirichlet, alpha 0.5):
    # a site holds a few classes often and the others rarely or not at all
    "low-data-dirichlet": {
        "sites": 9,
        "methods": ("expert_matched", "expert_matched_personal", "local_only", "centralized",
                    "expert_matched_dp", "expert_matched_personal_dp"),
        "config": {**PIXELS, "num-server-rounds": 10, "partitioning": "dirichlet", "dirichlet-alpha": 0.5,
                   "max-examples-per-site": 300, "batch-size": 32, "learning-rate": 0.002, "seed": 0},
        "dp-config": {"batch-size": 64, "learning-rate": 0.01},
    },
    "full": {  # all 60k training images over 10 sites
        "sites": 10,
        "config": {**PIXELS, "num-server-rounds": 10, "partitioning": "domain", "num-experts": 32, "top-k": 2,
                   "active-top-m": 2, "batch-size": 64, "learning-rate": 0.002, "seed": 0},
        # experiments.dp_tuning --preset full (BENCHMARKS.md): 0.7778 against 0.7156 at the config's 64 / 0.002
        "dp-config": {"batch-size": 256, "learning-rate": 0.02},
    },
}
# the full preset on scattering features (the default input); dp_tuning --preset full-scattering and
# full-scattering-larger (BENCHMARKS.md): 0.8418 at batch 256 / 0.04 against 0.8306-0.8341 at full's 256 / 0.02;
# full-scattering-fixed-steps: the same 20 noisy steps a round from batches of 1024 over four epochs, 0.8477;
# full-scattering-eps1-rounds: those 200 noisy steps as one epoch a round over 40 rounds (the step size decayed
# 0.96 a round), averaged four times as often: 0.8626 against 0.8491 at epsilon 8, 0.8173 against 0.7984 at 1
PRESETS["full-scattering"] = {**PRESETS["full"], "config": {**PRESETS["full"]["config"], "features": "scattering"},
                              "dp-config": {"batch-size": 1024, "local-epochs": 1, "learning-rate": 0.04,
                                            "num-server-rounds": 40, "learning-rate-decay": 0.96}}
# the smoke preset on scattering features, every method at the DP recipe of dp_tuning --preset smoke-scattering,
# smoke-scattering-smaller and smoke-scattering-epochs (BENCHMARKS.md: 0.7836 at batch 64 / 0.01 / two local
# epochs, 0.7522 with one); without DP it reaches 0.8403 against 0.8240 at smoke's 64 / 0.002 / one epoch.
# The DP methods take their noisy steps from batches of 256 over eight epochs: 0.7723 against 0.7507 over
# six seeds (without DP that recipe gives 0.8144, so the other methods keep batch 64 over two epochs).
# Under DP a narrower model (d-model 32, experts of 64 hidden units: 25k trained parameters a site, not 66k)
# gives 0.7887 against 0.7723 over six seeds; without DP it loses (0.8271 against 0.8403, 3 seeds)
PRESETS["smoke-scattering"] = {**PRESETS["smoke"], "config": {**PRESETS["smoke"]["config"], "features": "scattering",
                                                             "learning-rate": 0.01, "local-epochs": 2},
                               "dp-config": {"batch-size": 256, "local-epochs": 8, "d-model": 32, "expert-hidden": 64}}
# the experimenter holds every site's data: per-site test metrics under DP are asked for on purpose
DP = {"dp": True, "target-epsilon": 8.0, "dp-site-evaluation": True}
FEDERATED = {
    "expert_matched": {"strategy": "expert-matched", "dp": False},
    "fedavg_full_moe": {"strategy": "fedavg", "sparse-downlink": False, "dp": False},
    "fedavg_dense": {"strategy": "fedavg", "sparse-downlink": False, "dp": False},  # + dense_overrides(config)
    "expert_matched_dp": {"strategy": "expert-matched", **DP},
    "expert_matched_personal": {"strategy": "expert-matched", "personalize": "head", "dp": False},
    "expert_matched_personal_dp": {"strategy": "expert-matched", "personalize": "head", **DP},
    "expert_matched_personal_all": {"strategy": "expert-matched", "personalize": "head,router,expert", "dp": False},
    "expert_matched_personal_all_dp": {"strategy": "expert-matched", "personalize": "head,router,expert", **DP},
    "expert_matched_ditto": {"strategy": "expert-matched", "personal-model": "ditto", "dp": False},
    "expert_matched_ditto_dp": {"strategy": "expert-matched", "personal-model": "ditto", **DP},
    "fedavg_full_moe_dp": {"strategy": "fedavg", "sparse-downlink": False, **DP},
    "expert_matched_int8": {"strategy": "expert-matched", "update-compression": "int8", "downlink-compression": "int8",
                            "derive-initial-model": True, "dp": False},
    "expert_matched_int4": {"strategy": "expert-matched", "update-compression": "int4", "downlink-compression": "int8",
                            "derive-initial-model": True, "dp": False},
}
IN_PROCESS = ("local_only", "centralized", "class_pooled")
PERSONAL = ("expert_matched_personal", "expert_matched_personal_dp", "expert_matched_personal_all",
            "expert_matched_personal_all_dp", "expert_matched_ditto", "expert_matched_ditto_dp")
METHODS = ("expert_matched", "fedavg_full_moe", "fedavg_dense", "local_only", "centralized", "class_pooled",
           "expert_matched_dp", "fedavg_full_moe_dp", "expert_matched_personal", "expert_matched_personal_dp",
           "expert_matched_personal_all", "expert_matched_personal_all_dp", "expert_matched_ditto",
           "expert_matched_ditto_dp", "expert_matched_int8", "expert_matched_int4")


def method_config(preset: dict[str, Any], method: str) -> dict[str, Any]:
    """The run config ``method`` trains with: the preset's config, its dp-config for DP methods,
    then the method's own keys."""
    config = preset["config"]
    if method in IN_PROCESS:
        return config
    overrides = {**config, **(preset.get("dp-config", {}) if method.endswith("_dp") else {}), **FEDERATED[method]}
    if method == "fedavg_dense":
        overrides.update(dense_overrides(config))
    if FEDERATED[method].get("personal-model") == "ditto":
        overrides.update({k: v for k, v in personal_model_overrides(config).items() if k not in config})
    return overrides


def personal_model_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """A Ditto site's own model trains as local_only's does (the preset's config, not its dp-config):
    the comparison with local_only is then one of the pull toward the global model alone."""
    from fedmoe.config import RunConfig

    cfg = RunConfig.from_run_config(config)
    return {"personal-batch-size": cfg.batch_size, "personal-learning-rate": cfg.learning_rate,
            "personal-epochs": cfg.local_epochs}


def dense_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """A dense feed-forward block with the MoE's active width: one expert, always chosen."""
    from fedmoe.config import RunConfig

    cfg = RunConfig.from_run_config(config)
    return {"num-experts": 1, "top-k": 1, "active-top-m": 1, "expert-hidden": cfg.top_k * cfg.expert_hidden}


def federated_result(summary: dict[str, Any], wall: float) -> dict[str, Any]:
    rounds = summary["rounds"]
    eps = [r["epsilon_max"] for r in rounds if r.get("epsilon_max") is not None]
    return {
        "final_accuracy": summary["final_accuracy"],
        "per_site_accuracy": rounds[-1]["site_accuracy"],
        "uplink_bytes_total": sum(r["uplink_bytes"] for r in rounds),
        "downlink_bytes_total": sum(r["downlink_bytes"] for r in rounds),
        "rounds": len(rounds),
        "wall_seconds": round(wall, 1),
        "epsilon": eps[-1] if eps else None,
        "accuracy_per_round": [r["accuracy"] for r in rounds],
        "uplink_bytes_per_round": [r["uplink_bytes"] for r in rounds],
        "site_expert_counts": rounds[-1]["site_expert_counts"],
        "full_model_bytes": summary["full_model_bytes"],
        **charlm_metrics(summary),
    }


def charlm_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    rounds = summary["rounds"]
    if "bits_per_char" not in rounds[-1]:
        return {}
    return {"bits_per_char_per_round": [r["bits_per_char"] for r in rounds],
            "final_bits_per_char": rounds[-1]["bits_per_char"],
            "per_site_bits_per_char": rounds[-1]["site_bits_per_char"]}


def site_groups(method: str, site_targets: list) -> dict[str, list[int]]:
    """Which sites' training data each in-process model pools: local_only one site each,
    centralized all, class_pooled the sites whose training labels are the same set of classes."""
    if method == "local_only":
        return {str(i): [i] for i in range(len(site_targets))}
    if method == "centralized":
        return {"all": list(range(len(site_targets)))}
    groups: dict[str, list[int]] = {}
    for i, targets in enumerate(site_targets):
        groups.setdefault(",".join(map(str, sorted(set(targets.tolist())))), []).append(i)
    return groups


def train_in_process(method: str, config: dict[str, Any], sites: int) -> dict[str, Any]:
    """local_only (one model per site, its data only), centralized (one model, pooled data) or
    class_pooled (one model per group of sites holding the same classes), trained as a site trains:
    fresh optimiser per round, the round's learning rate, local-epochs, ema-decay."""
    import torch

    from fedmoe.data import tasks
    from fedmoe.config import RunConfig
    from fedmoe.training import evaluate, iterate_average, make_loader, make_optimizer, round_seed, train_epochs

    cfg = RunConfig.from_run_config(config)
    started = time.time()
    data = [tasks.site_data(cfg, i, sites) for i in range(sites)]
    test_inputs, test_targets = tasks.global_test(cfg)
    if method == "class_pooled" and tasks.bits_per_nat(cfg) is not None:
        raise ValueError("class_pooled groups sites by the classes they hold: a classification task only")
    members = site_groups(method, [d[1] for d in data])
    groups = {name: (torch.cat([data[i][0] for i in sites_in]), torch.cat([data[i][1] for i in sites_in]))
              for name, sites_in in members.items()}
    model_of = {i: name for name, sites_in in members.items() for i in sites_in}
    models: dict[str, torch.nn.Module] = {}
    curves: list[list[tuple[float, float]]] = []  # (loss, accuracy) on the global test set per round
    for name, (inputs, targets) in groups.items():
        torch.manual_seed(cfg.seed)
        model = tasks.build_model(cfg)
        curve = []
        for r in range(1, cfg.num_server_rounds + 1):
            seed = round_seed(cfg.seed, members[name][0], r)
            torch.manual_seed(seed)
            optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.round_learning_rate(r), cfg.adam_bc_floor)
            loader = make_loader(inputs, targets, cfg.batch_size, torch.Generator().manual_seed(seed))
            with iterate_average(model, optimizer, cfg.ema_decay):
                train_epochs(model, loader, optimizer, cfg.local_epochs)
            curve.append(evaluate(model, test_inputs, test_targets))
        models[name] = model
        curves.append(curve)
    per_site = {str(i): evaluate(models[model_of[i]], d[2], d[3]) for i, d in enumerate(data)}
    loss_per_round, accuracy_per_round = np.mean(curves, axis=0).T.tolist()  # several models: their mean
    if tasks.bits_per_nat(cfg) is not None:  # text: every window's bytes
        raw_bytes = sum(int(d[0].numel()) + len(d[0]) for d in data)
    else:  # uint8 pixels and one byte per label
        raw_bytes = sum(int(d[0].numel()) + int(d[1].numel()) for d in data)
    result = {
        "final_accuracy": accuracy_per_round[-1],
        "per_site_accuracy": {site: acc for site, (_, acc) in per_site.items()},
        "uplink_bytes_total": 0 if method == "local_only" else raw_bytes,  # pooling moves the raw data
        "downlink_bytes_total": 0,
        "rounds": cfg.num_server_rounds,
        "wall_seconds": round(time.time() - started, 1),
        "epsilon": None,
        "accuracy_per_round": accuracy_per_round,
        "uplink_bytes_per_round": None,
    }
    per_nat = tasks.bits_per_nat(cfg)
    if per_nat is not None:
        result["bits_per_char_per_round"] = [loss * per_nat for loss in loss_per_round]
        result["final_bits_per_char"] = result["bits_per_char_per_round"][-1]
        result["per_site_bits_per_char"] = {
            site: loss * tasks.bits_per_nat(cfg, int(site)) for site, (loss, _) in per_site.items()
        }
    return result


def run_benchmark(preset: dict[str, Any], out: Path, target: Target = Target(),
                  methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    out.mkdir(parents=True, exist_ok=True)
    config, sites = dict(preset["config"]), preset["sites"]
    report: dict[str, Any] = {
        "config": config, "sites": sites, "target": str(target),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "methods": {},
    }
    earlier = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    if earlier and (earlier["config"], earlier["sites"], earlier.get("dp-config")) == (config, sites, preset.get("dp-config")):
        # an interrupted benchmark continues; methods run earlier with other --methods stay in the report
        report["methods"] = dict(earlier["methods"])
    report["dp-config"] = preset.get("dp-config")
    for method in methods:  # a method whose run config is bad fails now, not after the others ran
        checked_run_config(method_config(preset, method))
    started = time.time()
    for i, method in enumerate(methods):
        progress(i, len(methods), started, method)
        if method in report["methods"]:
            continue
        t0 = time.time()
        if method in IN_PROCESS:
            result = train_in_process(method, config, sites)
        else:
            shutil.rmtree(out / "runs" / method, ignore_errors=True)
            summary = run_app(method_config(preset, method), sites=sites, target=target, results_dir=out / "runs",
                              run_name=method, quiet=True)
            result = {**federated_result(summary, time.time() - t0), "run": str(out / "runs" / method)}
        report["methods"][method] = result
        report["headline"] = headline(report["methods"])
        (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    progress(len(methods), len(methods), started, "done")
    report["headline"] = headline(report["methods"])  # also when every method was there already
    (out / "results.md").write_text(markdown_report(report))
    plot_curves(report["methods"], out)
    plot_site_utilisation(report["methods"], config, out / "expert_utilisation.png")
    return report


def run_seeds(preset: dict[str, Any], out: Path, seeds: list[int], target: Target = Target(),
              methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """run_benchmark once per seed into out/seed-N (methods already there are not run again), then
    each method's mean and standard deviation over the seeds in out/seeds.json and out/seeds.md."""
    reports = [run_benchmark({**preset, "config": {**preset["config"], "seed": seed}}, out / f"seed-{seed}", target, methods)
               for seed in seeds]
    summary = {"sites": preset["sites"], "config": preset["config"], "dp-config": preset.get("dp-config", {}),
               "seeds": seeds, "machine": machine(), "methods": {}, "headline": {}}
    for method in methods:
        results = [r["methods"][method] for r in reports]
        summary["methods"][method] = {
            "final_accuracy": mean_std([r["final_accuracy"] for r in results]),
            "mean_per_site_accuracy": mean_std([mean_site_accuracy(r) for r in results]),
            "per_site_accuracy": {site: mean_std([r["per_site_accuracy"][site] for r in results])
                                  for site in results[0]["per_site_accuracy"]},
            "epsilon": results[0]["epsilon"],
            "wall_seconds": mean_std([r["wall_seconds"] for r in results]),
        }
    for key in reports[0]["headline"]:
        summary["headline"][key] = mean_std([r["headline"][key] for r in reports])
    (out / "seeds.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "seeds.md").write_text(seeds_markdown(summary))
    return summary


def mean_std(values: list[float | None]) -> dict[str, float] | None:
    if any(v is None for v in values):
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "min": float(np.min(values)), "max": float(np.max(values))}


def seeds_markdown(summary: dict[str, Any]) -> str:
    def fmt(stat: dict[str, float] | None) -> str:
        return "-" if stat is None else f"{stat['mean']:.4f} ± {stat['std']:.4f}"

    methods = summary["methods"]
    sites = sorted(next(iter(methods.values()))["per_site_accuracy"], key=int)
    rows = [{"method": name, "global accuracy": fmt(m["final_accuracy"]),
             "mean own-site accuracy": fmt(m["mean_per_site_accuracy"]),
             **{f"site {s}": fmt(m["per_site_accuracy"].get(s)) for s in sites},
             "epsilon": "" if m["epsilon"] is None else f"{m['epsilon']:.3f}"} for name, m in methods.items()]
    lines = [f"Benchmark over seeds {summary['seeds']} ({summary['sites']} sites, {summary['machine']}): "
             "mean ± sample standard deviation", "", f"config: `{json.dumps(summary['config'])}`"]
    if summary["dp-config"]:
        lines.append(f"DP methods also: `{json.dumps(summary['dp-config'])}`")
    lines += ["", markdown_table(rows, list(rows[0])), ""]
    lines += [f"- {key}: {fmt(value)}" for key, value in summary["headline"].items()]
    return "\n".join(lines) + "\n"


def plot_site_utilisation(results: dict[str, dict[str, Any]], config: dict[str, Any], path: Path) -> None:
    """Expert-by-site heat map of each federated MoE method's last round, one panel per MoE layer."""
    from fedmoe.data import tasks
    from fedmoe.config import RunConfig

    cfg = RunConfig.from_run_config(config)
    panels = {}
    for method, r in results.items():
        counts = r.get("site_expert_counts")
        experts = len(next(iter(counts.values()))) // cfg.num_moe_layers if counts else 0
        if experts > 1:  # fedavg_dense has one expert: nothing to see
            layers = utilisation_panels(counts, experts, lambda s: tasks.site_label(cfg, int(s)))
            panels.update({f"{method}, {layer}": rows for layer, rows in layers.items()})
    if panels:
        plot_utilisation(panels, path, "tokens routed to each expert, share per site (last round)")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def headline(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The ratios and gaps the benchmark exists for (only those whose methods ran)."""
    out: dict[str, float] = {}
    em, fa, lo = (results.get(m) for m in ("expert_matched", "fedavg_full_moe", "local_only"))
    if em and fa:
        out["uplink_ratio_fedavg_full_moe_over_expert_matched"] = fa["uplink_bytes_total"] / em["uplink_bytes_total"]
        out["downlink_ratio_fedavg_full_moe_over_expert_matched"] = fa["downlink_bytes_total"] / em["downlink_bytes_total"]
    if em:
        for name, other in results.items():
            if name != "expert_matched":
                out[f"accuracy_gap_expert_matched_minus_{name}"] = em["final_accuracy"] - other["final_accuracy"]
    if lo:
        for name in ("expert_matched", *PERSONAL):
            if name in results:
                gain = mean_site_accuracy(results[name]) / mean_site_accuracy(lo) - 1.0
                suffix = "" if name == "expert_matched" else f"_{name}"
                out[f"per_site_accuracy_relative_gain_over_local_only{suffix}"] = gain
    if em and "final_bits_per_char" in em:
        for name, other in results.items():
            if name != "expert_matched" and "final_bits_per_char" in other:
                if name not in PERSONAL:  # a personal run's global model keeps its initial personal parts
                    out[f"bits_per_char_expert_matched_minus_{name}"] = em["final_bits_per_char"] - other["final_bits_per_char"]
                out.update(site_bits_per_char_gaps(results, "expert_matched", name))
    # a personalised site is judged with its own parts on its own text (the global model has none)
    for name in PERSONAL:
        for baseline in ("local_only", "fedavg_dense"):
            if name in results and baseline in results and "per_site_bits_per_char" in results[name]:
                out.update(site_bits_per_char_gaps(results, name, baseline))
    return out


def site_bits_per_char_gaps(results: dict[str, dict[str, Any]], ours: str, theirs: str) -> dict[str, float]:
    """Each site on its own held-out text, where the federated model has to win too: the mean of
    ours minus theirs over the sites, and on how many sites ours is lower."""
    gaps = [results[ours]["per_site_bits_per_char"][site] - bpc
            for site, bpc in results[theirs]["per_site_bits_per_char"].items()]
    return {f"per_site_bits_per_char_{ours}_minus_{theirs}": float(np.mean(gaps)),
            f"sites_with_lower_bits_per_char_{ours}_than_{theirs}": sum(gap < 0 for gap in gaps)}


def mean_site_accuracy(result: dict[str, Any]) -> float | None:
    """Mean accuracy of the sites on their own test splits; None for a method without sites (centralized)."""
    accuracies = list(result["per_site_accuracy"].values())
    return float(np.mean(accuracies)) if accuracies else None


def markdown_report(report: dict[str, Any]) -> str:
    rows = []
    for name, r in report["methods"].items():
        rows.append({
            "method": name,
            "final_accuracy": f"{r['final_accuracy']:.4f}",
            "mean_per_site_accuracy": "-" if mean_site_accuracy(r) is None else f"{mean_site_accuracy(r):.4f}",
            "uplink_MB": f"{r['uplink_bytes_total'] / 1e6:.3f}",
            "downlink_MB": f"{r['downlink_bytes_total'] / 1e6:.3f}",
            "rounds": r["rounds"],
            "wall_s": r["wall_seconds"],
            "epsilon": "" if r["epsilon"] is None else f"{r['epsilon']:.3f}",
        })
        if "final_bits_per_char" in r:
            rows[-1]["bits_per_char"] = f"{r['final_bits_per_char']:.4f}"
            rows[-1]["mean_per_site_bits_per_char"] = f"{float(np.mean(list(r['per_site_bits_per_char'].values()))):.4f}"
    lines = [
        f"Benchmark ({report['sites']} sites, target {report['target']}, {report['date']}, {report['machine']})",
        "", f"config: `{json.dumps(report['config'])}`", "",
        markdown_table(rows, list(rows[0])), "",
        "local_only: final_accuracy is the mean over the sites' own models on the global test set; "
        "centralized, class_pooled: uplink is the pooled raw training data.", "",
    ]
    lines += [f"- {key}: {value}" if isinstance(value, int) else f"- {key}: {value:.4f}"
              for key, value in report["headline"].items()]
    return "\n".join(lines) + "\n"


def plot_curves(results: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.plot(range(1, len(r["accuracy_per_round"]) + 1), r["accuracy_per_round"], "o-", ms=3, label=name)
    save_axes(fig, ax, out / "accuracy_rounds.png", "round (local_only / centralized: epochs)", "global test accuracy")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        if r["uplink_bytes_per_round"]:
            ax.plot(np.cumsum(r["uplink_bytes_per_round"]) / 1e6, r["accuracy_per_round"], "o-", ms=3, label=name)
    ax.set_xscale("log")
    save_axes(fig, ax, out / "accuracy_uplink.png", "cumulative uplink (MB, all sites)", "global test accuracy")


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    parser = driver_parser(__doc__, PRESETS)
    parser.add_argument("--methods", default="", help="comma-separated subset of: " + ", ".join(METHODS)
                        + " (default: the preset's, else all)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds: one benchmark per seed, and mean ± std")
    args = parser.parse_args(argv)
    preset = chosen_preset(PRESETS, args)
    methods = tuple(args.methods.split(",")) if args.methods else preset.get("methods", METHODS)
    if args.seeds:
        summary = run_seeds(preset, args.out, [int(s) for s in args.seeds.split(",")], Target(args.target), methods)
        print(seeds_markdown(summary))
        print(f"wrote {args.out / 'seeds.json'}, seeds.md and one folder per seed in {args.out}")
        return 0
    report = run_benchmark(preset, args.out, Target(args.target), methods)
    print(markdown_report(report))
    print(f"wrote {args.out / 'results.json'}, results.md and PNGs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
