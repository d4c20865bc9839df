"""A tiny real benchmark (so the driver cannot rot): every method runs, files and ratios exist."""

import json

import pytest

from experiments.benchmark import run_benchmark
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
