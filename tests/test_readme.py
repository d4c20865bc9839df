"""README's marked examples run as written, in README order, from the repository root, with the
venv not activated.

A fenced block right after ``<!-- readme-test -->`` runs with bash; after
``<!-- readme-test python -->`` with the venv's python; after ``<!-- readme-test file=NAME -->``
it is saved as NAME beside pyproject.toml (removed after these tests). Each must exit 0; a block
that starts a run must leave exactly one new completed run in results/.
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
MARKED = re.compile(r"<!-- readme-test(?: (python|file=\S+))? -->\n```\w+\n(.*?)```", re.S)
STARTS_A_RUN = ("experiments.launch", "flwr run", "fedmoe.run(")


def readme_examples() -> list[tuple[str, str]]:
    return [(kind or "bash", code) for kind, code in MARKED.findall((ROOT / "README.md").read_text())]


def example_id(example) -> str:
    kind, code = example
    return f"{kind}: {code.strip().splitlines()[-1][:50]}"


@pytest.fixture(scope="module")
def written_files():
    written: list[Path] = []
    yield written
    for path in written:
        path.unlink(missing_ok=True)


def test_readme_marks_the_examples():
    kinds = [kind for kind, _ in readme_examples()]
    assert kinds.count("bash") >= 4 and kinds.count("python") >= 3 and "file=my_task.py" in kinds


def shell_without_venv() -> dict[str, str]:
    """The environment of a shell where the venv was never activated."""
    venv_bin = str(ROOT / ".venv" / "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "FLWR_HOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


def completed_runs() -> set[Path]:
    return {p.parent.resolve() for p in (ROOT / "results").glob("*/summary.json")
            if json.loads(p.read_text()).get("status") == "completed"}


@pytest.mark.parametrize("example", readme_examples(), ids=example_id)
def test_readme_example_runs_as_written(example, written_files):
    kind, code = example
    if kind.startswith("file="):
        path = ROOT / kind.removeprefix("file=")
        path.write_text(code)
        written_files.append(path)
        return
    env = shell_without_venv()
    # flwr's local SuperLink outlives the command: give it ports of its own to stop it by
    control_port = free_port()
    env.update(FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(control_port))
    command = ["bash", "-e", "-c", code] if kind == "bash" else [str(ROOT / ".venv" / "bin" / "python"), "-c", code]
    before = completed_runs()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["pkill", "-f", f"control-api-address 127.0.0.1:{control_port}"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Installing application dependencies" not in done.stdout + done.stderr
    if not any(marker in code for marker in STARTS_A_RUN):
        return
    new_runs = completed_runs() - before
    assert len(new_runs) == 1, f"expected one new completed run in results/, got {sorted(new_runs)}"
    summary = json.loads((new_runs.pop() / "summary.json").read_text())
    if "flwr run" in code:
        # the federation in .flwr/config.toml: one SuperNode per domain, not Flower's default 2
        assert {r["replies"] for r in summary["rounds"]} == {3}
