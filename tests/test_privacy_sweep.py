"""A tiny real privacy sweep (so the driver cannot rot): files, columns, budget respected."""

import csv
import math

from experiments.privacy_sweep import run_sweep

TINY = {
    "epsilons": [2.0],
    "seeds": [0],
    "sites": 2,
    "config": {"num-server-rounds": 1, "max-examples-per-site": 200, "d-model": 16, "expert-hidden": 16},
}


def test_tiny_sweep_writes_csv_plot_and_table(tmp_path):
    rows = run_sweep(TINY, tmp_path)
    assert [r["target_epsilon"] for r in rows] == ["", "2"]
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    for column in ("target_epsilon", "seed", "achieved_epsilon", "final_accuracy", "uplink_bytes_total", "wall_seconds"):
        assert column in table[0]
    dp_row = table[1]
    assert 0 < float(dp_row["achieved_epsilon"]) <= 2.0
    assert table[0]["achieved_epsilon"] == ""
    assert all(0.0 <= float(r["final_accuracy"]) <= 1.0 and int(r["uplink_bytes_total"]) > 0 for r in table)
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert "| target_epsilon |" in (tmp_path / "sweep.md").read_text()
    assert not math.isnan(float(dp_row["final_accuracy"]))
