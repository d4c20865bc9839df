"""fedmoe: federated sparse Mixture-of-Experts with expert-matched averaging and DP-SGD, on Flower.

Python API: ``fedmoe.run(config) -> RunResult`` and ``fedmoe.load_model(run_dir)`` (fedmoe.api).
"""

from .api import RunResult, load_model, run

__all__ = ["RunResult", "load_model", "run"]
