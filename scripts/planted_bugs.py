"""Plant known bugs in a throwaway copy of the code, one at a time, and show which tests catch each.

    .venv/bin/python scripts/planted_bugs.py [--tests tests/test_x.py ...]

Each bug is a text replacement in one file (the six that once slipped through every test, issue
"Tests that can fail"). A bug whose text is no longer in the code is reported as stale, so the
list is kept honest as the code moves. Exits 1 if any planted bug leaves every test green.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST_TESTS = ["tests/test_privacy.py", "tests/test_bookkeeping.py", "tests/test_client_privacy.py", "tests/test_aggregation.py", "tests/test_wire.py",
              "tests/test_strategy_robustness.py", "tests/test_threat_model.py", "tests/test_audit_unit.py"]

BUGS = [
    ("the ledger history is not restored into the accountant", "fedmoe/privacy/dp_sgd.py",
     "    engine.accountant.history = list(ledger.history)\n", ""),
    ("the count release is not charged", "clients/app.py",
     "        ledger.charge([count_release])\n", ""),
    ("the count noise is multiplied by 0", "fedmoe/privacy/accounting.py",
     "counts + noise * noise_multiplier * sensitivity", "counts + noise * 0 * noise_multiplier * sensitivity"),
    ("the Gram form of the ghost norm returns a quarter of the squared norm", "fedmoe/privacy/samplers.py",
     "pairs = self._block_grams(a) * self._block_grams(g)\n", "pairs = self._block_grams(a) * self._block_grams(g) / 4\n"),
    ("book-keeping clipping sums the factor products unclipped", "fedmoe/privacy/bookkeeping.py",
     "c = coefficients.to(g.dtype)[sample].unsqueeze(1)", "c = torch.ones_like(coefficients.to(g.dtype))[sample].unsqueeze(1)"),
    ("experts weighted by 1 instead of their routed counts", "server/strategy.py",
     "{e: float(r.expert_counts[e]) for e in r.active_experts}", "{e: 1.0 for e in r.active_experts}"),
    ("the robust rules ignore the weights", "fedmoe/federation/aggregation.py",
     "w = np.asarray(weights, dtype=np.float64)[keep]", "w = np.ones(len(weights))[keep]"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", nargs="+", default=FAST_TESTS)
    args = parser.parse_args(argv)
    escaped = 0
    for description, path, old, new in BUGS:
        with tempfile.TemporaryDirectory(prefix="fedmoe-planted-") as tmp:
            copy = Path(tmp) / "repo"
            shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "results", "mutants", "__pycache__"))
            text = (copy / path).read_text()
            if text.count(old) != 1:
                print(f"STALE   {description}: the text to replace is not (once) in {path}")
                escaped += 1
                continue
            (copy / path).write_text(text.replace(old, new))
            completed = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-p", "no:cacheprovider",
                                        *args.tests], cwd=copy, capture_output=True, text=True)
            failed = re.findall(r"^FAILED (\S+)", completed.stdout, flags=re.MULTILINE)
            if completed.returncode == 0:
                escaped += 1
            verdict = f"caught by {len(failed)} tests" if failed else "ESCAPED: every test passed"
            print(f"{'caught ' if failed else 'ESCAPED'} {description} ({path}): {verdict}")
            for name in failed[:4]:
                print(f"          {name}")
    return 1 if escaped else 0


if __name__ == "__main__":
    sys.exit(main())
