"""A real Flower simulation: 3 sites, 2 rounds, through `flwr run` on a private SuperLink (the
expert_matched run of the tiny benchmark, experiments.launch under experiments.benchmark)."""

import json

import pytest
import torch

from fedmoe import results as results_module
from fedmoe.federation import wire
from fedmoe.config import RunConfig
from fedmoe.models.moe import ExpertBank, MoEClassifier

from tests.conftest import TINY_BENCHMARK

OVERRIDES = TINY_BENCHMARK["config"]


@pytest.fixture(scope="module")
def run(tiny_benchmark):
    out, _ = tiny_benchmark
    results = out / "runs"
    return results, json.loads((results / "expert_matched" / "summary.json").read_text())


def test_run_completes_and_writes_summary(run):
    results, summary = run
    assert summary["status"] == "completed"
    assert (results / "latest" / "summary.json").exists()
    assert json.loads((results / "latest" / "summary.json").read_text())["config"]["num-server-rounds"] == 2
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for r in summary["rounds"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["replies"] == 3 and not r["rejected_replies"]
        assert set(r["active_experts"]) == {"0", "1", "2"}
        assert set(r["site_accuracy"]) == {"0", "1", "2"}
    assert summary["final_accuracy"] == summary["rounds"][-1]["accuracy"]
    run_dir = results / "expert_matched"
    for name in ("summary.json", "metrics.csv", "learning_curve.png", "expert_utilisation.png", "run.log", "checkpoint.pt"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o666 & ~results_module.current_umask(), name
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 3
    log = (run_dir / "run.log").read_text()
    assert f"fedmoe: run folder {run_dir}" in log and "final global accuracy" in log and "\n    2  " in log


def test_every_reply_is_smaller_than_the_full_model(run):
    _, summary = run
    full = summary["full_model_bytes"]
    for r in summary["rounds"]:
        assert len(r["site_uplink_bytes"]) == 3
        assert all(0 < b < full for b in r["site_uplink_bytes"].values())
        assert r["uplink_bytes"] == sum(r["site_uplink_bytes"].values())
    # sparse downlink: the whole model only for the first message to each site, then only the
    # tensors changed since the version a site holds (round 2's train messages carry nothing new)
    first, second = summary["rounds"]
    assert 3 * full < first["downlink_bytes"] < 6 * full
    assert 0 < second["downlink_bytes"] < 3 * full
    assert not first["model_cache_misses"] and not second["model_cache_misses"]


def test_untrained_experts_are_bit_identical_and_trained_ones_moved(run):
    results, summary = run
    trained = {e for r in summary["rounds"] for ids in r["active_experts"].values() for e in ids}
    untouched = set(range(8)) - trained
    assert untouched, "with top-m 1, 3 sites and 2 rounds at most 6 of 8 experts can train"
    final = torch.load(results / "expert_matched" / "checkpoint.pt")["model"]
    torch.manual_seed(OVERRIDES["seed"])
    initial = MoEClassifier(RunConfig.from_run_config(OVERRIDES).model_config()).state_dict()
    for key in initial:
        e = wire.expert_id(key, 8)
        if e in untouched:
            assert torch.equal(final[key], initial[key]), key
    for e in trained:
        keys = [f"moe_layers.0.experts.{p}_{e}" for p in ExpertBank.PARAM_NAMES]
        assert any(not torch.equal(final[k], initial[k]) for k in keys), e
