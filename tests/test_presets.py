"""The experiment drivers' presets: every run they would make is a valid run config, and a bad one
stops a driver before its first run instead of hours into a grid or a benchmark."""

import importlib

import pytest

from experiments.reporting import checked_run_config, chosen_preset, driver_parser


def chosen(module, name: str) -> dict:
    return chosen_preset(module.PRESETS, driver_parser("", module.PRESETS).parse_args(["--preset", name, "--out", "x"]))


@pytest.mark.parametrize("driver", ["benchmark", "dp_tuning", "privacy_sweep", "attacks"])
def test_every_run_of_every_preset_is_a_valid_run_config(driver):
    module = importlib.import_module(f"experiments.{driver}")
    for name in module.PRESETS:
        preset = chosen(module, name)  # ends the process (SystemExit 2) on a bad config
        if driver == "benchmark":
            for method in preset.get("methods", module.METHODS):
                checked_run_config(module.method_config(preset, method))
        if driver == "dp_tuning":
            for point in module.preset_points(preset):
                checked_run_config({**preset["config"], **point})


def test_a_bad_grid_point_stops_the_tuning_before_any_run(tmp_path, monkeypatch, capsys):
    from experiments import dp_tuning

    ran = []
    monkeypatch.setattr(dp_tuning, "run_app", lambda *args, **kwargs: ran.append(args))
    preset = {"sites": 3, "config": {"num-server-rounds": 2}, "grid": {"local-epochs": [1, 0]}}
    with pytest.raises(SystemExit) as exit_info:
        dp_tuning.run_tuning(preset, tmp_path)
    assert exit_info.value.code == 2 and ran == []
    assert "local-epochs" in capsys.readouterr().err


def test_a_method_with_a_bad_run_config_stops_the_benchmark_before_any_run(tmp_path, monkeypatch, capsys):
    from experiments import benchmark

    ran = []
    monkeypatch.setattr(benchmark, "run_app", lambda *args, **kwargs: ran.append(args))
    monkeypatch.setattr(benchmark, "train_in_process", lambda *args: ran.append(args))
    # the personal methods keep parts of a model that the hf-moe task does not have
    preset = {"sites": 3, "config": {**benchmark.PRESETS["hf-smoke"]["config"]}}
    with pytest.raises(SystemExit) as exit_info:
        benchmark.run_benchmark(preset, tmp_path, methods=("local_only", "expert_matched", "expert_matched_personal_all"))
    assert exit_info.value.code == 2 and ran == []
    assert "personalize" in capsys.readouterr().err


def test_a_second_preset_run_into_the_same_folder_keeps_the_first_presets_rows(tmp_path, monkeypatch):
    from experiments import dp_tuning
    from experiments.reporting import read_rows

    def fake_run(config, **kwargs):  # a summary as the app writes it; the accuracy names the point
        return {"final_accuracy": config["learning-rate"] + config.get("local-epochs", 0),
                "rounds": [{"epsilon_max": 1.0}]}

    monkeypatch.setattr(dp_tuning, "run_app", fake_run)
    first = {"sites": 3, "config": {"num-server-rounds": 2, "learning-rate": 0.01}, "grid": {"batch-size": [64]}}
    second = {"sites": 3, "config": {"num-server-rounds": 2, "learning-rate": 0.02}, "grid": {"local-epochs": [2]}}
    dp_tuning.run_tuning(first, tmp_path)
    dp_tuning.run_tuning(second, tmp_path)
    rows = read_rows(tmp_path / "tuning.csv")
    assert [(r["run"], r["batch-size"], r["local-epochs"], float(r["final_accuracy"])) for r in rows] == [
        ("batch-size=64", "64", "", 0.01), ("local-epochs=2", "", "2", 2.02)]
    assert "batch-size" in (tmp_path / "tuning.md").read_text()


def test_a_ditto_sites_own_model_trains_as_local_only_does_unless_told_otherwise():
    """full-scattering: the DP methods step with batches of 1024 (its dp-config); local_only, and so
    the Ditto site's own model, with the config's 64 at 0.002 for one epoch a round."""
    from experiments import benchmark

    preset = chosen(benchmark, "full-scattering")
    config = benchmark.method_config(preset, "expert_matched_ditto_dp")
    assert (config["batch-size"], config["personal-batch-size"]) == (1024, 64)
    assert (config["personal-learning-rate"], config["personal-epochs"]) == (0.002, 1)
    told = chosen_preset(benchmark.PRESETS, driver_parser("", benchmark.PRESETS).parse_args(
        ["--preset", "full-scattering", "--out", "x", "-c", "personal-learning-rate=0.01"]))
    assert benchmark.method_config(told, "expert_matched_ditto_dp")["personal-learning-rate"] == 0.01
