import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# one partition cache for the whole session (Flower processes the tests start inherit it),
# never the user's ~/.cache/fedmoe
os.environ.setdefault("FEDMOE_CACHE_DIR", tempfile.mkdtemp(prefix="fedmoe-test-cache-"))

# The tiny benchmark is also the suite's real simulation run: test_simulation checks its
# expert_matched run (3 sites, 2 rounds, 1 of 8 experts trained per site).
TINY_BENCHMARK = {
    "sites": 3,
    "config": {"num-server-rounds": 2, "max-examples-per-site": 300, "d-model": 16, "expert-hidden": 16,
               "num-experts": 8, "active-top-m": 1, "seed": 3},
}
TINY_BENCHMARK_METHODS = ("expert_matched", "fedavg_full_moe", "fedavg_dense", "local_only", "centralized")


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory):
    from experiments.benchmark import run_benchmark

    out = tmp_path_factory.mktemp("bench")
    return out, run_benchmark(TINY_BENCHMARK, out, methods=TINY_BENCHMARK_METHODS)
