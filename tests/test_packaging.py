"""`pip install .` puts only fedmoe into site-packages, and its console commands run the app."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)], check=True)
    (path,) = out.glob("fedmoe-*.whl")
    return path


def test_wheel_has_no_generic_top_level_names(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"fedmoe", "fedmoe-0.1.0.dist-info"}
    # the Flower app travels inside the package, with the pyproject.toml flwr run reads
    for part in ("pyproject.toml", "server/app.py", "clients/app.py", "experiments/launch.py"):
        assert f"fedmoe/flower_app/{part}" in names
    entry_points = zipfile.ZipFile(wheel).read("fedmoe-0.1.0.dist-info/entry_points.txt").decode()
    for command in ("fedmoe-run", "fedmoe-sweep", "fedmoe-benchmark", "fedmoe-audit"):
        assert command in entry_points


def test_installed_commands_run_and_audit_a_job_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed fedmoe, before anything else
    probe = subprocess.run([sys.executable, "-c", "import fedmoe, experiments; print(fedmoe.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'experiments'" in probe.stderr
    run = subprocess.run([str(site / "bin" / "fedmoe-run"), "--sites", "2", "-c",
                          "num-server-rounds=1 max-examples-per-site=200 d-model=16 expert-hidden=16"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    run_dir = (work / "results" / "latest").resolve()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["config"]["dp"] is True
    assert Path(summary["config"]["results-dir"]) == work / "results"
    audit = subprocess.run([str(site / "bin" / "fedmoe-audit"), str(run_dir)],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert audit.returncode == 0 and "PASS" in audit.stdout, audit.stdout + audit.stderr
