"""A tiny real benchmark (so the driver cannot rot): every method runs, files and ratios exist."""

import json

import pytest

import torch

from experiments.benchmark import run_benchmark, site_groups
from tests.conftest import TINY_BENCHMARK, TINY_BENCHMARK_METHODS


def test_every_method_reports_the_same_schema(tiny_benchmark):
    out, _ = tiny_benchmark
    saved = json.loads((out / "results.json").read_text())
    assert tuple(saved["methods"]) == TINY_BENCHMARK_METHODS
    for name, r in saved["methods"].items():
        assert 0.0 <= r["final_accuracy"] <= 1.0, name
        assert set(r["per_site_accuracy"]) == {"0", "1", "2"}, name
        assert r["rounds"] == 2 and len(r["accuracy_per_round"]) == 2, name
        assert r["epsilon"] is None
    for name in ("expert_matched", "fedavg_full_moe", "fedavg_dense"):
        assert saved["methods"][name]["uplink_bytes_total"] > 0
    assert saved["methods"]["local_only"]["uplink_bytes_total"] == 0


def test_in_process_methods_pool_the_sites_they_should():
    targets = [torch.tensor([0, 1, 1, 0]), torch.tensor([5, 7]), torch.tensor([1, 0, 0]), torch.tensor([5, 7, 7]),
               torch.tensor([0, 1, 2])]
    assert site_groups("local_only", targets) == {"0": [0], "1": [1], "2": [2], "3": [3], "4": [4]}
    assert site_groups("centralized", targets) == {"all": [0, 1, 2, 3, 4]}
    # same set of classes, whatever the counts; {0, 1, 2} is not {0, 1}
    assert sorted(site_groups("class_pooled", targets).values()) == [[0, 2], [1, 3], [4]]


def test_expert_matched_sends_less_than_fedavg_over_the_whole_moe(tiny_benchmark):
    _, result = tiny_benchmark
    em, fa = result["methods"]["expert_matched"], result["methods"]["fedavg_full_moe"]
    # fedavg sends the whole model from each of 3 sites in each of 2 rounds
    assert fa["uplink_bytes_total"] == 3 * 2 * fa["full_model_bytes"]
    assert em["uplink_bytes_total"] < fa["uplink_bytes_total"]
    ratio = result["headline"]["uplink_ratio_fedavg_full_moe_over_expert_matched"]
    assert ratio == pytest.approx(fa["uplink_bytes_total"] / em["uplink_bytes_total"]) and ratio > 1
    assert "per_site_accuracy_relative_gain_over_local_only" in result["headline"]
    # the dense model is one expert of width top-k x expert-hidden: every site's counts have one column
    assert all(len(c) == 1 for c in result["methods"]["fedavg_dense"]["site_expert_counts"].values())
    assert all(len(c) == 8 for c in fa["site_expert_counts"].values())


def test_tables_and_plots_are_written(tiny_benchmark):
    out, _ = tiny_benchmark
    table = (out / "results.md").read_text()
    assert "| method |" in table and "uplink_ratio_fedavg_full_moe_over_expert_matched" in table
    for png in ("accuracy_rounds.png", "accuracy_uplink.png", "expert_utilisation.png"):
        assert (out / png).stat().st_size > 1000, png


def test_unknown_method_fails_before_running(tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        run_benchmark(TINY_BENCHMARK, tmp_path, methods=("expert_matched", "fedprox"))
    assert not (tmp_path / "results.json").exists()


def test_drivers_take_run_config_overrides_on_top_of_the_preset():
    from experiments.benchmark import PRESETS
    from experiments.reporting import chosen_preset, driver_parser

    args = driver_parser("", PRESETS).parse_args(
        ["--preset", "full", "--out", "x", "-c", "max-examples-per-site=2000 dp=false", "-c", "task='fmnist' top-k=1"])
    preset = chosen_preset(PRESETS, args)
    assert preset["config"]["max-examples-per-site"] == 2000 and preset["config"]["dp"] is False
    assert preset["config"]["task"] == "fmnist" and preset["config"]["top-k"] == 1
    assert preset["config"]["num-experts"] == 32 and preset["sites"] == 10
    assert "max-examples-per-site" not in PRESETS["full"]["config"]  # the preset itself is unchanged
    bad = driver_parser("", PRESETS).parse_args(["--preset", "full", "--out", "x", "-c", "top-k=64"])
    with pytest.raises(SystemExit) as exited:
        chosen_preset(PRESETS, bad)  # the full preset has 32 experts
    assert exited.value.code == 2


def test_seeds_are_summarised_by_mean_and_sample_std(tmp_path, monkeypatch):
    import experiments.benchmark as benchmark

    accuracy = {0: 0.5, 1: 0.7, 2: 0.9}  # mean 0.7, sample std 0.2
    site_accuracy = {0: (0.6, 0.8), 1: (0.6, 0.6), 2: (0.9, 0.7)}  # per-seed site means 0.7, 0.6, 0.8

    def fake_benchmark(preset, out, target, methods):
        seed = preset["config"]["seed"]
        result = {"final_accuracy": accuracy[seed], "epsilon": None, "wall_seconds": 1.0,
                  "per_site_accuracy": dict(zip(("0", "1"), site_accuracy[seed]))}
        report = {"methods": {m: result for m in methods}, "headline": {"gap": accuracy[seed] - 0.5}}
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps(report))
        return report

    monkeypatch.setattr(benchmark, "run_benchmark", fake_benchmark)
    preset = {"sites": 2, "config": {"seed": 9}}
    summary = benchmark.run_seeds(preset, tmp_path, [0, 1, 2], methods=("expert_matched",))
    em = summary["methods"]["expert_matched"]
    assert em["final_accuracy"]["mean"] == pytest.approx(0.7) and em["final_accuracy"]["std"] == pytest.approx(0.2)
    assert em["mean_per_site_accuracy"]["mean"] == pytest.approx(0.7)
    assert em["mean_per_site_accuracy"]["std"] == pytest.approx(0.1)
    assert em["per_site_accuracy"]["0"]["min"] == pytest.approx(0.6) and em["per_site_accuracy"]["1"]["max"] == 0.8
    assert summary["headline"]["gap"]["mean"] == pytest.approx(0.2)
    assert "0.7000 ± 0.2000" in (tmp_path / "seeds.md").read_text()


def test_an_interrupted_benchmark_runs_only_the_methods_it_lacks(tmp_path, monkeypatch):
    import experiments.benchmark as benchmark

    ran = []

    def fake_run_app(overrides, **kwargs):
        ran.append(kwargs["run_name"])
        raise RuntimeError("stop here")

    monkeypatch.setattr(benchmark, "run_app", fake_run_app)
    preset = {"sites": 2, "config": {"seed": 0}, "dp-config": {"batch-size": 8}}
    finished = {"final_accuracy": 0.5, "per_site_accuracy": {"0": 0.5}, "epsilon": None, "uplink_bytes_total": 10,
                "downlink_bytes_total": 10, "rounds": 1, "wall_seconds": 1.0}
    (tmp_path / "results.json").write_text(json.dumps(
        {"config": {"seed": 0}, "sites": 2, "dp-config": {"batch-size": 8}, "methods": {"expert_matched": finished}}))
    methods = ("expert_matched", "expert_matched_dp")
    with pytest.raises(RuntimeError, match="stop here"):
        benchmark.run_benchmark(preset, tmp_path, methods=methods)
    assert ran == ["expert_matched_dp"]
    ran.clear()  # other methods into the same folder: the earlier method stays in results.json
    monkeypatch.setattr(benchmark, "train_in_process", lambda method, config, sites: finished)
    for plot in ("plot_curves", "plot_site_utilisation"):
        monkeypatch.setattr(benchmark, plot, lambda *a, **k: None)
    benchmark.run_benchmark(preset, tmp_path, methods=("local_only",))
    assert set(json.loads((tmp_path / "results.json").read_text())["methods"]) == {"expert_matched", "local_only"}
    ran.clear()  # the same folder, another config: nothing is reused
    with pytest.raises(RuntimeError, match="stop here"):
        benchmark.run_benchmark({**preset, "dp-config": {"batch-size": 16}}, tmp_path, methods=methods)
    assert ran == ["expert_matched"]


def test_a_finished_benchmark_run_again_runs_nothing_and_reports_its_headline(tmp_path, monkeypatch):
    import experiments.benchmark as benchmark

    monkeypatch.setattr(benchmark, "run_app", lambda *a, **k: pytest.fail("nothing should run"))
    for plot in ("plot_curves", "plot_site_utilisation"):
        monkeypatch.setattr(benchmark, plot, lambda *a, **k: None)
    preset = {"sites": 1, "config": {"seed": 0}}
    run = {"per_site_accuracy": {"0": 0.5}, "epsilon": None, "uplink_bytes_total": 10, "downlink_bytes_total": 10,
           "rounds": 1, "wall_seconds": 1.0}
    (tmp_path / "results.json").write_text(json.dumps({"config": {"seed": 0}, "sites": 1, "methods": {
        "expert_matched": {**run, "final_accuracy": 0.75}, "expert_matched_dp": {**run, "final_accuracy": 0.5}}}))
    report = benchmark.run_benchmark(preset, tmp_path, methods=("expert_matched", "expert_matched_dp"))
    assert report["headline"]["accuracy_gap_expert_matched_minus_expert_matched_dp"] == 0.25
    assert "accuracy_gap_expert_matched_minus_expert_matched_dp: 0.2500" in (tmp_path / "results.md").read_text()


def test_dp_methods_take_the_presets_dp_recipe_unless_overridden():
    from experiments.benchmark import PRESETS
    from experiments.reporting import chosen_preset, driver_parser

    args = driver_parser("", PRESETS).parse_args(["--preset", "low-data", "--out", "x", "-c", "learning-rate=0.003"])
    preset = chosen_preset(PRESETS, args)
    assert preset["dp-config"] == {"batch-size": 64}  # -c wins over the DP recipe too
    assert preset["config"]["learning-rate"] == 0.003 and preset["config"]["batch-size"] == 32


def test_only_dp_methods_run_with_the_dp_recipe(tmp_path, monkeypatch):
    import experiments.benchmark as benchmark

    submitted = {}

    def fake_run_app(overrides, **kwargs):
        submitted[kwargs["run_name"]] = overrides
        raise RuntimeError("stop here")

    monkeypatch.setattr(benchmark, "run_app", fake_run_app)
    preset = {"sites": 3, "config": {"batch-size": 32, "learning-rate": 0.002}, "dp-config": {"batch-size": 64}}
    for method in ("expert_matched", "expert_matched_personal_dp"):
        with pytest.raises(RuntimeError, match="stop here"):
            benchmark.run_benchmark(preset, tmp_path / method, methods=(method,))
    assert submitted["expert_matched"]["batch-size"] == 32 and submitted["expert_matched"]["dp"] is False
    personal_dp = submitted["expert_matched_personal_dp"]
    assert personal_dp["batch-size"] == 64 and personal_dp["learning-rate"] == 0.002
    assert personal_dp["dp"] is True and personal_dp["personalize"] == "head" and personal_dp["dp-site-evaluation"]


def test_an_interrupted_sweep_runs_only_what_is_missing_and_keeps_the_rest(tmp_path, monkeypatch):
    import experiments.privacy_sweep as sweep

    ran = []

    def fake_run_app(overrides, **kwargs):
        ran.append(kwargs["run_name"])
        final = {"no-dp-seed0": 0.9, "eps=1-seed0": 0.7}[kwargs["run_name"]]
        return {"final_accuracy": final, "rounds": [{"epsilon_max": 0.99 if overrides["dp"] else None,
                                                     "uplink_bytes": 5, "downlink_bytes": 7}]}

    monkeypatch.setattr(sweep, "run_app", fake_run_app)
    monkeypatch.setattr(sweep, "plot", lambda rows, path: None)
    preset = {"epsilons": [1.0], "seeds": [0], "sites": 2, "config": {}}
    (tmp_path / "sweep.csv").parent.mkdir(exist_ok=True)
    (tmp_path / "sweep.csv").write_text(
        "target_epsilon,seed,dp,achieved_epsilon,final_accuracy,uplink_bytes_total,downlink_bytes_total,rounds,"
        "wall_seconds,run\n,0,False,,0.9,5,7,1,3.5,no-dp-seed0\n")
    rows = sweep.run_sweep(preset, tmp_path)
    assert ran == ["eps=1-seed0"]
    assert [(r["run"], r["dp"], r["final_accuracy"]) for r in rows] == [("no-dp-seed0", False, 0.9),
                                                                        ("eps=1-seed0", True, 0.7)]
    assert len((tmp_path / "sweep.csv").read_text().splitlines()) == 3


def test_language_model_headline_compares_each_site_on_its_own_text():
    from experiments.benchmark import headline

    run = {"final_accuracy": 0.3, "per_site_accuracy": {"0": 0.3, "1": 0.3, "2": 0.3}}
    results = {
        "expert_matched": {**run, "final_bits_per_char": 4.0, "per_site_bits_per_char": {"0": 4.0, "1": 5.0, "2": 3.0}},
        "local_only": {**run, "final_bits_per_char": 9.0, "per_site_bits_per_char": {"0": 4.5, "1": 4.8, "2": 3.5}},
    }
    out = headline(results)
    assert out["bits_per_char_expert_matched_minus_local_only"] == pytest.approx(-5.0)
    assert out["per_site_bits_per_char_expert_matched_minus_local_only"] == pytest.approx((-0.5 + 0.2 - 0.5) / 3)
    assert out["sites_with_lower_bits_per_char_expert_matched_than_local_only"] == 2


def test_a_personalised_language_model_is_compared_per_site_with_its_own_parts():
    from experiments.benchmark import headline

    run = {"final_accuracy": 0.3, "per_site_accuracy": {"0": 0.3, "1": 0.3}}
    results = {  # the personal run's global model (final_bits_per_char) is worse than local_only; its sites are not
        "expert_matched_personal_all": {**run, "final_bits_per_char": 6.0, "per_site_bits_per_char": {"0": 3.0, "1": 3.9}},
        "local_only": {**run, "final_bits_per_char": 5.0, "per_site_bits_per_char": {"0": 3.5, "1": 3.8}},
        "fedavg_dense": {**run, "final_bits_per_char": 4.0, "per_site_bits_per_char": {"0": 4.0, "1": 4.2}},
    }
    out = headline({**results, "expert_matched": {**run, "final_bits_per_char": 4.5,
                                                   "per_site_bits_per_char": {"0": 3.6, "1": 4.0}}})
    assert "bits_per_char_expert_matched_minus_expert_matched_personal_all" not in out
    assert out["per_site_bits_per_char_expert_matched_minus_expert_matched_personal_all"] == pytest.approx((0.6 + 0.1) / 2)
    assert out["bits_per_char_expert_matched_minus_fedavg_dense"] == pytest.approx(0.5)
    assert out["per_site_bits_per_char_expert_matched_personal_all_minus_local_only"] == pytest.approx((-0.5 + 0.1) / 2)
    assert out["sites_with_lower_bits_per_char_expert_matched_personal_all_than_local_only"] == 1
    assert out["per_site_bits_per_char_expert_matched_personal_all_minus_fedavg_dense"] == pytest.approx((-1.0 - 0.3) / 2)
    assert out["sites_with_lower_bits_per_char_expert_matched_personal_all_than_fedavg_dense"] == 2
