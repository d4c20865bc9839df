"""Run folder files: a crash while writing never corrupts the previous summary or checkpoint."""

import json

import pytest
import torch

from fedmoe import results
from fedmoe.results import RunRecorder


class Boom(RuntimeError):
    pass


def test_failed_write_keeps_the_old_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "summary.json"
    results.atomic_write_json(path, {"round": 1})

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write('{"round": 2, "trunc')
        raise Boom

    with pytest.raises(Boom):
        results.atomic_replace(path, crash)
    assert json.loads(path.read_text()) == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_recorder_rounds_checkpoint_latest_and_resume(tmp_path):
    rec = RunRecorder(tmp_path, "run-a", {"k": 1}, 1000)
    row = {"round": 1, "accuracy": 0.5, "loss": 1.0, "uplink_bytes": 10, "downlink_bytes": 20,
           "expert_load_cv": 0.1, "active_experts": {"0": [1]}}
    rec.record_round(dict(row))
    rec.checkpoint(1, {"w": torch.ones(2)}, {"ledgers": {}})
    rec.record_round({**row, "round": 2, "accuracy": 0.6})
    assert (tmp_path / "latest").resolve() == tmp_path / "run-a"
    resumed = RunRecorder(tmp_path, "run-a", {"k": 2}, 1000, resume=True)
    assert resumed.load_checkpoint()["round"] == 1
    resumed.keep_rounds_up_to(1)
    assert [r["round"] for r in resumed.summary["rounds"]] == [1]
    path = resumed.finish("completed")
    summary = json.loads(path.read_text())
    assert summary["status"] == "completed" and summary["resumes"] == [{"config": {"k": 2}}]


def test_a_run_that_aggregated_nothing_fails_unless_budgets_ran_out():
    trained = {"round": 1, "replies": 3}
    nothing = {"round": 2, "replies": 0, "budget_exhausted": {}}
    spent = {"round": 3, "replies": 0, "budget_exhausted": {"0": 8.0, "1": 8.0}}
    assert results.rounds_without_updates([trained, nothing, spent]) == [2, 3]
    assert results.end_status([trained, nothing]) == ("completed", None)
    assert results.end_status([spent]) == ("completed", None)
    status, why = results.end_status([nothing, {**nothing, "round": 3}])
    assert status == "failed" and "no round aggregated a site update (2 rounds)" in why


def test_metrics_csv_has_a_row_per_round_and_the_table_goes_to_run_log(tmp_path, capsys):
    rec = RunRecorder(tmp_path, "run-b", {"k": 1}, 1000)
    row = {"round": 1, "accuracy": 0.5, "loss": 1.25, "uplink_bytes": 10, "downlink_bytes": 20, "expert_load_cv": 0.1,
           "active_experts": {"0": [1]}, "replies": 2, "rejected_replies": ["site 3: NaN"],
           "site_accuracy": {"0": 0.5, "1": 0.7}, "site_epsilon": {"0": 2.0, "1": 4.0}}
    rec.record_round(dict(row))
    rec.record_round({"round": 2, "accuracy": 0.75, "loss": 0.5, "uplink_bytes": 11, "downlink_bytes": 21,
                      "expert_load_cv": 0.2, "active_experts": {"0": [2]}, "replies": 3, "rejected_replies": []})
    lines = (tmp_path / "run-b" / "metrics.csv").read_text().splitlines()
    assert lines[0] == ("round,accuracy,loss,site_accuracy_mean,uplink_bytes,downlink_bytes,epsilon_max,epsilon_mean,"
                        "expert_load_cv,replies,rejected_replies,elapsed_seconds")
    first, second = (line.split(",") for line in lines[1:])
    assert first[:11] == ["1", "0.5", "1.25", "0.6", "10", "20", "4.0", "3.0", "0.1", "2", "1"]
    assert second[:11] == ["2", "0.75", "0.5", "", "11", "21", "", "", "0.2", "3", "0"]
    assert float(first[11]) >= 0 and len(lines) == 3
    printed = capsys.readouterr().out.splitlines()
    assert (tmp_path / "run-b" / "run.log").read_text().splitlines() == printed and len(printed) == 3


def test_result_files_follow_the_umask(tmp_path):
    """mkstemp creates 0600; a finished file gets what the umask gives any new file."""
    import os

    old = os.umask(0o027)
    try:
        results.atomic_write_json(tmp_path / "a.json", {})
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
        os.umask(0o022)
        results.atomic_write_bytes(tmp_path / "b.csv", b"x")
        assert (tmp_path / "b.csv").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
