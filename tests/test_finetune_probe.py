"""experiments.finetune_probe on a finished run (the tiny benchmark's expert_matched run)."""

import json

import pytest

from experiments import finetune_probe


def test_the_probe_starts_from_the_global_model_each_site_evaluated(tiny_benchmark, tmp_path):
    out, result = tiny_benchmark
    assert finetune_probe.main([str(out / "runs" / "expert_matched"), "--sites", "3", "--epochs", "1",
                                "--out", str(tmp_path)]) == 0
    probe = json.loads((tmp_path / "finetune_probe.json").read_text())
    assert probe["metric"] == "accuracy"
    own = result["methods"]["expert_matched"]["per_site_accuracy"]  # each site's evaluate reply in the run
    for site, curve in probe["per_site"].items():
        assert len(curve) == 2
        assert curve[0] == pytest.approx(own[site])


def test_a_folder_that_is_not_a_finished_run_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune_probe.main([str(tmp_path), "--sites", "3"])
    assert exit_info.value.code == 2
    assert "summary.json" in capsys.readouterr().err
