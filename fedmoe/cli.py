"""Console entry points of an installed fedmoe (``pip install .``): each runs a driver of the
Flower app that the wheel carries (fedmoe.api.app_root), with the same arguments as
``python -m experiments.<driver>`` in a checkout."""

from __future__ import annotations

import sys

from .api import app_module


def _driver(module: str) -> None:
    sys.exit(app_module(module).main())


def launch() -> None:
    """fedmoe-run: one federated run (experiments.launch)."""
    _driver("experiments.launch")


def privacy_sweep() -> None:
    """fedmoe-sweep: accuracy against epsilon (experiments.privacy_sweep)."""
    _driver("experiments.privacy_sweep")


def benchmark() -> None:
    """fedmoe-benchmark: expert-matched against FedAvg, dense, isolated and pooled (experiments.benchmark)."""
    _driver("experiments.benchmark")


def audit() -> None:
    """fedmoe-audit: recompute a run's epsilons from its folder (fedmoe.privacy.audit)."""
    _driver("fedmoe.privacy.audit")
