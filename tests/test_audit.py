"""fedmoe.privacy.audit on a real DP simulation run: it passes the honest run folder and fails every
tampered copy; the run keeps the sites' own test metrics and training loss to themselves."""

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from experiments.launch import ROOT, toml_value
from fedmoe.privacy.audit import accountant_epsilon, audit
from tests.sites import needs_fmnist

pytestmark = needs_fmnist

CONFIG = {"dp": True, "num-server-rounds": 2, "max-examples-per-site": 200, "d-model": 16, "expert-hidden": 16,
          "batch-size": 32, "target-epsilon": 6.0, "seed": 2}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The run as a user starts it: the launcher's command line, placed by the run config's keys."""
    results = tmp_path_factory.mktemp("audit")
    overrides = {**CONFIG, "results-dir": str(results), "run-name": "dp"}
    launched = subprocess.run(
        [sys.executable, "-m", "experiments.launch", "--sites", "3", "-c", " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert f"check them: python -m fedmoe.privacy.audit {results / 'dp'})" in launched.stdout
    assert f"results: {results / 'dp' / 'summary.json'}" in launched.stdout
    [home] = re.findall(r"^fedmoe: Flower home (\S+) ", (results / "dp.superlink.log").read_text(), flags=re.MULTILINE)
    assert Path(home).parent == Path(tempfile.gettempdir()) and not Path(home).exists()  # its Flower home is gone
    return results / "dp"


def test_an_honest_run_passes_the_audit_from_the_command_line(run_dir):
    completed = subprocess.run([sys.executable, "-m", "fedmoe.privacy.audit", str(run_dir)], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["ok   site 0", "ok   site 1", "ok   site 2"]
    assert lines[-1].startswith("verdict: PASS")


def test_sites_kept_their_test_metrics_and_training_loss(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    for row in summary["rounds"]:
        assert row["site_accuracy"] == {} and row["site_loss"] == {}
        assert math.isnan(row["train_loss"])
        assert set(row["site_epsilon"]) == {"0", "1", "2"} and 0 < max(row["site_epsilon"].values()) <= 6.0
    assert "privacy_warnings" not in summary


def edit(run_dir, tmp_path, name, change):
    copy = tmp_path / name
    shutil.copytree(run_dir, copy)
    path = copy / name_of_file[name]
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))
    return copy


def _lower_reported(d):
    d["sites"]["1"]["epsilon"] = d["sites"]["1"]["epsilon"] / 2


def _drop_history_entry(d):
    d["sites"]["0"]["history"].pop()


def _drop_round_and_its_charges(d):
    site = d["sites"]["2"]
    site["rounds"].pop()
    site["history"] = site["history"][:2]  # the first round's count release and steps only


def _raise_noise_everywhere(d):
    """A ledger consistent in itself, claiming twice the noise: only what the site reported to
    the server every round (summary.json) and its own copy give it away."""
    site = d["sites"]["0"]
    site["noise_multiplier"] *= 2
    site["history"] = [[s * 2 if q != 1.0 else s, q, n] for s, q, n in site["history"]]
    charged = []
    for r in site["rounds"]:
        r["charged"] = [[s * 2 if q != 1.0 else s, q, n] for s, q, n in r["charged"]]
        charged += r["charged"]
        r["epsilon"] = accountant_epsilon(charged, site["delta"], "rdp")
    site["epsilon"] = accountant_epsilon(site["history"], site["delta"], "rdp")


def _lower_summary_epsilon(d):
    d["rounds"][-1]["site_epsilon"]["1"] = 0.5


def _claim_more_data(d):
    d["sites"]["0"]["num_examples"] *= 4
    d["sites"]["0"]["sample_rate"] /= 4


def _reproducible(d):
    d["config"]["dp-reproducible-noise"] = True


def _site_copy_differs(d):
    d["history"][0][0] = d["history"][0][0] * 3


name_of_file = {
    "lower_reported": "privacy_ledger.json", "drop_history_entry": "privacy_ledger.json",
    "drop_round_and_its_charges": "privacy_ledger.json", "raise_noise_everywhere": "privacy_ledger.json",
    "lower_summary_epsilon": "summary.json", "claim_more_data": "privacy_ledger.json", "reproducible": "summary.json",
    "site_copy_differs": "sites/site-1/privacy_ledger.json",
}


@pytest.mark.parametrize("tamper, reason", [
    (_lower_reported, "ledger reports epsilon"),
    (_drop_history_entry, "history is not the composition"),
    (_drop_round_and_its_charges, "sent updates the ledger does not charge"),
    (_raise_noise_everywhere, "the site reported epsilon"),
    (_lower_summary_epsilon, "the site reported epsilon"),
    (_claim_more_data, "the server saw"),
    (_reproducible, "dp-reproducible-noise"),
    (_site_copy_differs, "own"),
])
def test_a_tampered_run_fails_the_audit(run_dir, tmp_path, tamper, reason):
    copy = edit(run_dir, tmp_path, tamper.__name__.lstrip("_"), tamper)
    ok, lines = audit(copy)
    assert not ok and lines[-1].startswith("verdict: FAIL")
    assert any(reason in line for line in lines), "\n".join(lines)


def test_a_run_without_dp_has_nothing_to_audit(run_dir, tmp_path):
    copy = edit(run_dir, tmp_path, "reproducible", lambda d: d["config"].update(dp=False))
    ok, lines = audit(copy)
    assert not ok and "no privacy guarantee" in lines[0]
