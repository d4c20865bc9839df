"""The simulation on an existing Ray cluster: a head and a worker node started with ``ray start``
on this machine (each its own raylet, one CPU each), the run spread over both, and the same final
model as the run on a Ray instance of its own (dp=false, same seed)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from experiments.launch import Target, free_port, run_app

RAY = Path(sys.executable).parent / "ray"


def ray_start(args, log):
    # --block keeps the node's processes under this one, so the test stops exactly its own nodes
    # (``ray stop`` would stop every Ray instance on the machine)
    return subprocess.Popen([str(RAY), "start", "--block", "--disable-usage-stats", *args], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"})


@pytest.fixture
def two_node_cluster(tmp_path):
    """(address, temp dir). The cluster keeps its address file in its own temp dir, so a Ray user
    elsewhere on the machine that looks for a local cluster does not find this one."""
    temp = Path(tempfile.mkdtemp(prefix="fmray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = free_port()
    address = f"127.0.0.1:{port}"
    log = open(tmp_path / "ray.log", "w")
    nodes = [ray_start(["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={temp}"], log)]
    try:
        wait_for_nodes(address, 1, nodes)
        nodes.append(ray_start([f"--address={address}", "--num-cpus=1"], log))
        wait_for_nodes(address, 2, nodes)
        yield address
    finally:
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGTERM)
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def cluster_query(address, code):
    """Run ``code`` (which prints its answer) in a fresh driver attached to the cluster."""
    done = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={address!r}, logging_level='ERROR')\n{code}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def wait_for_nodes(address, count, nodes, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert all(node.poll() is None for node in nodes), "a ray node exited"
        try:
            alive = cluster_query(address, "print(sum(n['Alive'] for n in ray.nodes()))")
            if int(alive) >= count:
                return
        except AssertionError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{count} Ray nodes not up at {address}")


def test_a_run_on_a_two_node_ray_cluster_uses_both_nodes_and_ends_with_the_single_node_model(tmp_path, two_node_cluster):
    config = {"dp": False, "num-server-rounds": 2, "max-examples-per-site": 200, "d-model": 16, "expert-hidden": 16,
              "batch-size": 32, "learning-rate": 0.005, "seed": 3}
    on_cluster = run_app(config, sites=2, target=Target(ray_address=two_node_cluster), results_dir=tmp_path,
                         run_name="cluster", quiet=True)
    nodes = cluster_query(two_node_cluster, "from ray._private.state import actors\n"
                          "print(len({a['Address']['NodeID'] for a in actors().values() if 'ClientAppActor' in a['ActorClassName']}))")
    assert int(nodes) == 2  # the sites' actors ran on both nodes
    alone = run_app(config, sites=2, results_dir=tmp_path, run_name="alone", quiet=True)
    assert on_cluster["final_accuracy"] == alone["final_accuracy"]
    cluster_model = torch.load(tmp_path / "cluster" / "checkpoint.pt", weights_only=True)["model"]
    alone_model = torch.load(tmp_path / "alone" / "checkpoint.pt", weights_only=True)["model"]
    assert cluster_model.keys() == alone_model.keys()
    assert all(torch.equal(cluster_model[k], alone_model[k]) for k in alone_model)
