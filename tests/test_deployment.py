"""Deployment: the compose files, and the same commands as real Flower processes on loopback.

One deployment of 3 sites serves a 2-round run, a resumed run that continues it after a
ServerApp restart (fresh ServerApp process, same checkpoint), and a tiny privacy sweep whose
target is the deployment. Nothing is mocked: flower-superlink, flower-supernode and
flower-superexec are the real binaries, flwr run submits.
"""

import csv
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from experiments.deploy import LocalDeployment
from experiments.privacy_sweep import run_sweep
from fedmoe import deployment
from fedmoe.results import state_sha256
from tests.conftest import ROOT

SMALL = {"max-examples-per-site": 300, "d-model": 16, "expert-hidden": 16, "round-timeout": 120.0}
# DP with a fixed noise multiplier and a budget that three rounds cannot exhaust
DP = {"dp": True, "noise-multiplier": 1.0, "target-epsilon": 100.0}


def test_committed_compose_files_are_generated_from_the_topology():
    assert (ROOT / "docker-compose.yml").read_text() == deployment.compose_yaml(3)
    assert (ROOT / "docker" / "compose.tls.yml").read_text() == deployment.compose_yaml(3, tls=True, overlay=True)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose v1 not installed (make setup installs it)")
@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker/compose.tls.yml"]])
def test_compose_files_validate_with_docker_compose(files):
    args = [a for f in files for a in ("-f", f)]
    done = subprocess.run(["docker-compose", *args, "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_compose_commands_are_the_launcher_commands():
    """Every container command equals the local process command up to host names, ports and paths."""
    compose = {s.name: s.argv for s in deployment.topology(3, tls=None)}
    local = LocalDeployment(3, Path("/nonexistent"))
    assert compose.keys() == local.services.keys()
    for name, argv in compose.items():
        flags = [a for a in argv if a.startswith("--")]
        assert flags == [a for a in local.services[name].argv if a.startswith("--")], name


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    with LocalDeployment(3, tmp_path_factory.mktemp("deploy")) as d:
        yield d


@pytest.fixture(scope="module")
def first_run(loopback):
    return loopback.run({**SMALL, **DP, "num-server-rounds": 2, "active-top-m": 1}, run_name="deployed")


def test_deployed_run_completes_with_sparse_uplink(first_run):
    assert first_run["status"] == "completed"
    assert [r["round"] for r in first_run["rounds"]] == [1, 2]
    for r in first_run["rounds"]:
        assert r["replies"] == 3 and not r["lost_nodes"]
        assert 0.0 <= r["accuracy"] <= 1.0
        assert all(0 < b < first_run["full_model_bytes"] for b in r["site_uplink_bytes"].values())


def test_server_restart_resumes_from_the_checkpoint_bit_identical(loopback, first_run, tmp_path):
    run_dir = loopback.workdir / "results" / "deployed"
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["round"] == 2
    # the ServerApp side restarts (its SuperExec process is replaced), then the run resumes
    loopback.stop_service("serverapp")
    loopback.start_service("serverapp")
    resumed = loopback.run({**SMALL, **DP, "num-server-rounds": 3, "active-top-m": 1, "resume": "deployed"}, run_name="ignored")
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    # every site's epsilon continues from its ledger instead of starting again from zero
    eps = [r["site_epsilon"] for r in resumed["rounds"]]
    assert eps[:2] == [r["site_epsilon"] for r in first_run["rounds"]]
    for site in ("0", "1", "2"):
        assert 0 < eps[0][site] < eps[1][site] < eps[2][site]
    ledger = json.loads((run_dir / "privacy_ledger.json").read_text())["sites"]
    assert all(len(ledger[site]["rounds"]) == 3 for site in ("0", "1", "2"))
    assert resumed["starts"][-1] == {"after_round": 2, "model_sha256": state_sha256(saved["model"])}
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["round"] == 3


TINY_SWEEP = {"epsilons": [2.0], "seeds": [0], "sites": 3, "config": {**SMALL, "num-server-rounds": 1}}


def test_privacy_sweep_runs_against_the_deployment(loopback, tmp_path):
    rows = run_sweep(TINY_SWEEP, tmp_path, loopback.target)
    assert [r["target_epsilon"] for r in rows] == ["", "2"]
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    for column in ("target_epsilon", "seed", "achieved_epsilon", "final_accuracy", "uplink_bytes_total", "wall_seconds"):
        assert column in table[0]
    no_dp, dp = table
    assert no_dp["achieved_epsilon"] == "" and 0 < float(dp["achieved_epsilon"]) <= 2.0
    assert all(0.0 <= float(r["final_accuracy"]) <= 1.0 and int(r["uplink_bytes_total"]) > 0 for r in table)
    assert not math.isnan(float(dp["final_accuracy"]))
    # the runs went through the deployment: its three SuperNodes answered
    summary = json.loads((tmp_path / "runs" / "eps=2-seed0" / "summary.json").read_text())
    assert summary["rounds"][0]["replies"] == 3
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert "| target_epsilon |" in (tmp_path / "sweep.md").read_text()
