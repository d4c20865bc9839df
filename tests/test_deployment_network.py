"""Deployment across hosts (network namespaces), secure as shipped (TLS, SuperNode authentication),
with a site lost mid-run."""

import json
import subprocess
import threading
import time

import pytest

from experiments.deploy import LocalDeployment
from tests.netns import Network, namespaces_available

SMALL = {"max-examples-per-site": 300, "d-model": 16, "expert-hidden": 16}


@pytest.mark.skipif(namespaces_available() is not None, reason=str(namespaces_available()))
def test_multi_host_run_survives_a_lost_site(tmp_path):
    names = ["superlink", "site-0", "site-1", "site-2"]
    network = Network(names)
    placement = {"superlink": "superlink", "serverapp": "superlink"}
    placement.update({f"{kind}-{i}": f"site-{i}" for i in range(3) for kind in ("supernode", "clientapp")})
    try:
        network.up()
        with LocalDeployment(3, tmp_path, host_of=lambda service: network.host(placement[service])) as deployment:
            result = {}
            # round 1 includes every process's cold start; round 2 waits this long for the lost site
            overrides = {**SMALL, "num-server-rounds": 2, "round-timeout": 60.0}
            runner = threading.Thread(target=lambda: result.update(summary=deployment.run(overrides, run_name="netns")))
            runner.start()
            summary_path = tmp_path / "results" / "netns" / "summary.json"
            deadline = time.time() + 400
            while time.time() < deadline and runner.is_alive():
                if summary_path.exists() and json.loads(summary_path.read_text())["rounds"]:
                    break
                time.sleep(1)
            network.cut("site-2")  # site 2's link goes down after round 1
            runner.join(timeout=600)
            assert not runner.is_alive(), "run did not finish"
            summary = result["summary"]
            server_log = (tmp_path / "results" / "netns.log").read_text()  # the run's streamed ServerApp log
    finally:
        network.down()
    rounds = summary["rounds"]
    assert summary["status"] == "completed" and [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["replies"] == 3
    later = rounds[1:]
    assert all(r["replies"] == 2 and "2" not in r["active_experts"] for r in later)
    assert any(r["lost_nodes"] or r["rejected_replies"] for r in later)
    assert "site lost" in server_log or "error reply" in server_log
    assert network.created == []
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    assert network.switch not in done.stdout
