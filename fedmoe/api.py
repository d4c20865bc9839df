"""Python API: run the federated job from a script or notebook and load what it trained.

    import fedmoe

    result = fedmoe.run({"num-server-rounds": 3, "dp": True}, sites=3)
    print(result.final_accuracy, result.epsilon, result.run_dir)
    model = fedmoe.load_model(result.run_dir)          # nn.Module in eval mode
    logits, _ = model(images)                          # fmnist: images [N, 1, 28, 28], normalised

``run`` goes through the same launcher as ``python -m experiments.launch`` (a private Flower
simulation SuperLink, ``flwr run``; or a SuperLink connection for a deployment) and checks the
config the same way (a bad config raises ``fedmoe.config.ConfigError``, one line per problem,
naming the key).
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

# The Flower app (clients/, server/, experiments/ and its pyproject.toml) is the repository root in
# a checkout; an installed wheel carries it as fedmoe/flower_app, so that site-packages gets no
# top-level packages with generic names.
_INSTALLED_APP = Path(__file__).resolve().parent / "flower_app"


def app_root() -> Path:
    """The folder ``flwr run`` is given: the Flower app with its pyproject.toml."""
    return _INSTALLED_APP if (_INSTALLED_APP / "pyproject.toml").is_file() else Path(__file__).resolve().parent.parent


def put_app_on_path() -> None:
    """Make the Flower app's modules (and modules beside its pyproject.toml) importable here."""
    root = str(app_root())
    if root not in sys.path:
        sys.path.insert(0, root)


def app_module(name: str) -> ModuleType:
    """Import ``experiments.launch`` and the like from the Flower app, wherever it lives."""
    put_app_on_path()
    return importlib.import_module(name)


@dataclass
class RunResult:
    """What one run left in its folder: summary.json, read back."""

    run_dir: Path
    summary: dict[str, Any] = field(repr=False)

    @property
    def final_accuracy(self) -> float:
        return float(self.summary["final_accuracy"])

    @property
    def epsilon(self) -> float | None:
        """Largest epsilon any site spent (None without DP)."""
        spent = [r["epsilon_max"] for r in self.summary["rounds"] if r.get("epsilon_max") is not None]
        return spent[-1] if spent else None

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return self.summary["rounds"]


def run(config: Mapping[str, Any] | None = None, *, sites: int = 3, target: str = "simulation",
        results_dir: str | Path | None = None, run_name: str | None = None, quiet: bool = False) -> RunResult:
    """Run the app once: ``config`` holds run-config keys as in ``flwr run -c`` (``{"dp": False}``),
    ``sites`` simulated SuperNodes (ignored for a deployment ``target``, whose SuperNodes are the
    sites). Raises ``fedmoe.config.ConfigError`` for a bad config, ``RunFailed`` (experiments.launch) when the
    run does not complete."""
    from .config import launch_config

    launch = app_module("experiments.launch")
    summary = launch.run_app(launch_config(config or {}), sites=sites, target=launch.Target(target),
                             results_dir=results_dir, run_name=run_name, quiet=quiet)
    return RunResult(Path(summary["config"]["results-dir"]) / summary["config"]["run-name"], summary)


def load_model(run_dir: str | Path):
    """The global model a run folder's checkpoint.pt holds (the newest round), built from the run's
    own config, in eval mode. ``run_dir`` may be results/latest."""
    import torch

    from .config import RunConfig
    from .data.tasks import build_model

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    model = build_model(RunConfig.from_run_config(summary["config"]))
    model.load_state_dict(torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"])
    return model.eval()
