"""Deployment: the compose files, and the same commands as real Flower processes on loopback.

One secure deployment of 3 sites (TLS, SuperNode authentication, SuperExec secrets, sites bound
to their registered nodes) serves a 2-round run, a resumed run that continues it after a
ServerApp restart (fresh ServerApp process, same checkpoint), a tiny privacy sweep whose target
is the deployment, and the intruders: an unregistered SuperNode, one without TLS, and a
registered one that claims another site's id. An insecure deployment of the same job gives the
same model. Nothing is mocked: flower-superlink, flower-supernode and flower-superexec are the
real binaries, flwr run submits.
"""

import csv
import json
import math
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from experiments.deploy import LocalDeployment
from experiments.launch import BIN, free_port
from experiments.privacy_sweep import run_sweep
from fedmoe import deployment
from fedmoe.results import state_sha256
from tests.conftest import ROOT

SMALL = {"max-examples-per-site": 300, "d-model": 16, "expert-hidden": 16, "round-timeout": 120.0}
# DP with a fixed noise multiplier and a budget that three rounds cannot exhaust
DP = {"dp": True, "noise-multiplier": 1.0, "target-epsilon": 100.0}


def test_committed_compose_file_is_generated_from_the_topology_and_secure():
    text = (ROOT / "docker-compose.yml").read_text()
    assert text == deployment.compose_yaml(3)
    assert "--insecure" not in text and text.count("--enable-supernode-auth") == 1
    assert text.count("--superexec-auth-secret-file") == 2 + 3 * 2  # link and its SuperExec; per site node and SuperExec
    assert "--insecure" in deployment.compose_yaml(3, insecure=True)


def test_each_service_mounts_only_its_own_partys_secrets():
    for service in deployment.topology(3, secrets=deployment.Secrets.in_containers()):
        mounts = [v for v in service.volumes if "deploy-secrets" in v]
        assert mounts == [f"./deploy-secrets/{service.party}:/secrets:ro"], service.name
        expected = "superlink" if service.name in ("superlink", "serverapp") else f"site-{service.name[-1]}"
        assert service.party == expected


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose v1 not installed (make setup installs it)")
@pytest.mark.parametrize("insecure", [False, True])
def test_compose_files_validate_with_docker_compose(insecure, tmp_path):
    path = tmp_path / "docker-compose.yml"
    path.write_text(deployment.compose_yaml(3, insecure=insecure))
    done = subprocess.run(["docker-compose", "-f", str(path), "--project-directory", str(ROOT), "config", "-q"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("insecure", [False, True])
def test_compose_commands_are_the_launcher_commands(insecure):
    """Every container command equals the local process command up to host names, ports and paths."""
    secrets = None if insecure else deployment.Secrets.in_containers()
    compose = {s.name: s.argv for s in deployment.topology(3, secrets=secrets)}
    local = LocalDeployment(3, Path("/nonexistent"), insecure=insecure)
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


def supernode_log(loopback, name):
    return loopback.log_path(name).read_text(errors="replace")


def start_intruder(loopback, name, *flags):
    """A SuperNode process that is not part of the deployment, against its SuperLink."""
    argv = [str(BIN / "flower-supernode"), "--superlink", loopback.superlink_address, "--isolation", "process",
            "--port", str(free_port()), "--max-retries", "1", "--node-config", "partition-id=0 num-partitions=3", *flags]
    log = loopback.log_path(name)
    with open(log, "w") as f:
        process = subprocess.Popen(argv, env=loopback.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return process.wait(timeout=90), log.read_text(errors="replace")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def registered_nodes(loopback) -> set[int]:
    listed = json.loads(loopback.flwr("supernode", "list", "fedmoe-deploy", "--format", "json").stdout)
    return {int(n["node-id"]) for n in listed["nodes"]}


def test_an_unregistered_supernode_is_refused_and_never_addressed(loopback, first_run, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(tmp_path / "rogue")], check=True)
    ca = loopback.secrets.path("superlink", "ca.crt")
    code, log = start_intruder(loopback, "rogue", "--root-certificates", ca, "--auth-supernode-private-key",
                               str(tmp_path / "rogue"))
    assert code != 0 and "Failed to activate SuperNode" in log
    assert "No SuperNode found with the given public key" in supernode_log(loopback, "superlink")
    # the SuperLink knows exactly the three registered sites, so no message can go anywhere else
    assert registered_nodes(loopback) == set(loopback.site_registry.values())
    assert all(r["replies"] == 3 for r in first_run["rounds"])


def test_a_supernode_without_tls_cannot_connect(loopback):
    code, log = start_intruder(loopback, "plaintext", "--insecure")
    assert code != 0 and "Failed to initialize the connection to the SuperLink" in log
    assert len(registered_nodes(loopback)) == 3


NO_DP = {**SMALL, "dp": False, "num-server-rounds": 1, "seed": 4}


def test_secure_and_insecure_deployments_train_the_same_model(loopback, tmp_path):
    secure = loopback.run(NO_DP, run_name="secure")
    with LocalDeployment(3, tmp_path / "insecure", insecure=True) as plain:
        insecure = plain.run(NO_DP, run_name="insecure")
        superlink_argv = supernode_log(plain, "superlink").splitlines()[0]
    assert "--insecure" in superlink_argv and "--insecure" not in supernode_log(loopback, "superlink").splitlines()[0]
    assert secure["status"] == insecure["status"] == "completed"
    assert secure["starts"][0]["model_sha256"] == insecure["starts"][0]["model_sha256"]
    models = [torch.load(d / "checkpoint.pt", weights_only=True)["model"]
              for d in (loopback.workdir / "results" / "secure", tmp_path / "insecure" / "results" / "insecure")]
    assert state_sha256(models[0]) == state_sha256(models[1])


def test_a_registered_node_claiming_another_sites_id_is_rejected(loopback):
    """Last in this module: it leaves site 2's SuperNode lying."""
    for name in ("clientapp-2", "supernode-2"):
        loopback.stop_service(name)
    node = loopback.services["supernode-2"]
    node.argv = [a.replace("partition-id=2", "partition-id=0") for a in node.argv]
    loopback.start_service("supernode-2")
    loopback.start_service("clientapp-2")
    summary = loopback.run({**NO_DP, "num-server-rounds": 2}, run_name="impostor")
    liar = loopback.site_registry["2"]
    assert summary["status"] == "completed"
    for r in summary["rounds"]:
        assert r["replies"] == 2 and set(r["site_update_norm"]) == {"0", "1"}
        assert f"node {liar} is bound to site 2 but claims site 0" in r["rejected_replies"]


def test_a_restarted_deployment_keeps_its_registered_sites(tmp_path):
    """Second start in the same folder: same keys, same SuperLink database, so the sites keep
    their node ids instead of failing to register their keys again."""
    with LocalDeployment(1, tmp_path) as first:
        registry = dict(first.site_registry)
    with LocalDeployment(1, tmp_path) as second:
        assert second.site_registry == registry
        assert registered_nodes(second) == set(registry.values())
        assert "Uvicorn running" in second.log_since_start("superlink")
        assert second.log_path("superlink").read_text().count("Uvicorn running") == 2
