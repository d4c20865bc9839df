"""README's marked examples run as written, from the repository root, with the venv not activated.

A fenced block right after ``<!-- readme-test -->`` runs with bash; after
``<!-- readme-test python -->`` with the venv's python. Each must exit 0 and leave a completed run.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.launch import free_port

ROOT = Path(__file__).resolve().parent.parent
MARKED = re.compile(r"<!-- readme-test( python)? -->\n```(\w+)\n(.*?)```", re.S)


def readme_examples() -> list[tuple[str, str]]:
    return [("python" if python else "bash", code) for python, _, code in MARKED.findall((ROOT / "README.md").read_text())]


def test_readme_marks_the_quick_examples():
    kinds = [kind for kind, _ in readme_examples()]
    assert kinds.count("bash") >= 2 and kinds.count("python") == 1


def shell_without_venv() -> dict[str, str]:
    """The environment of a shell where the venv was never activated."""
    venv_bin = str(ROOT / ".venv" / "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "FLWR_HOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


def completed_runs() -> set[Path]:
    return {p.parent.resolve() for p in (ROOT / "results").glob("*/summary.json")
            if json.loads(p.read_text()).get("status") == "completed"}


@pytest.mark.parametrize("kind,code", readme_examples(), ids=lambda v: v.splitlines()[-1][:40] if "\n" in v else v)
def test_readme_example_runs_as_written(kind, code):
    env = shell_without_venv()
    # flwr's local SuperLink outlives the command: give it ports of its own to stop it by
    control_port = free_port()
    env.update(FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(control_port))
    command = ["bash", "-e", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
    before = completed_runs()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["pkill", "-f", f"control-api-address 127.0.0.1:{control_port}"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Installing application dependencies" not in done.stdout + done.stderr
    new_runs = completed_runs() - before
    assert len(new_runs) == 1, f"expected one new completed run in results/, got {sorted(new_runs)}"
    summary = json.loads((new_runs.pop() / "summary.json").read_text())
    if "flwr run" in code:
        # the federation in .flwr/config.toml: one SuperNode per domain, not Flower's default 2
        assert {r["replies"] for r in summary["rounds"]} == {3}
