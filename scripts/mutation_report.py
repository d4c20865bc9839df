"""Per-module summary of the last `mutmut run` (make mutation), with the equivalent mutants set apart.

    .venv/bin/python scripts/mutation_report.py [--survivors FILE]

Reads `mutmut results --all true`. A survivor listed in tests/equivalent_mutants.txt (one
"mutant-name  reason" per line) is equivalent: no test can tell it from the original, and the
line says why. The score of a module is killed / (mutants - equivalent). Prints a Markdown table
(the one TESTING.md records) and every survivor that is not declared equivalent, with its diff
in --survivors FILE when given. Exits 1 when such a survivor remains.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = Path(sys.executable).parent / "mutmut"
EQUIVALENT = ROOT / "tests" / "equivalent_mutants.txt"
KILLED = {"killed", "timeout"}  # a mutant that makes the tests hang is caught too


def equivalent_mutants() -> dict[str, str]:
    found = {}
    for line in EQUIVALENT.read_text().splitlines() if EQUIVALENT.exists() else []:
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.strip().partition(" ")
            found[name] = reason.strip()
    return found


def module_of(mutant: str) -> str:
    """'fedmoe.privacy.xǁPrivacyLedgerǁcharge__mutmut_3' -> 'fedmoe/privacy.py'."""
    parts = mutant.split(".")
    return "/".join(parts[:2]) + ".py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--survivors", type=Path, help="write the diff of every unexplained survivor here")
    args = parser.parse_args(argv)
    listing = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True, check=True)
    status = dict(re.findall(r"^\s*(\S+): (.+)$", listing.stdout, flags=re.MULTILINE))
    equivalent = equivalent_mutants()
    by_module: dict[str, Counter] = defaultdict(Counter)
    unexplained = []
    for name, state in status.items():
        counts = by_module[module_of(name)]
        counts["mutants"] += 1
        if state in KILLED:
            counts["killed"] += 1
        elif name in equivalent:
            counts["equivalent"] += 1
        else:
            counts["survived" if state == "survived" else "other"] += 1
            unexplained.append((name, state))
    stale = sorted(set(equivalent) - {n for n, s in status.items() if s not in KILLED})
    print("| module | mutants | killed | equivalent | survived | not run | killed of non-equivalent |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for module, c in sorted(by_module.items()):
        score = c["killed"] / max(c["mutants"] - c["equivalent"], 1)
        print(f"| {module} | {c['mutants']} | {c['killed']} | {c['equivalent']} | {c['survived']} | {c['other']} | {score:.1%} |")
    for name, state in unexplained:
        print(f"unexplained {state}: {name}")
    for name in stale:
        print(f"listed as equivalent but killed or gone: {name}")
    if args.survivors:
        diffs = [subprocess.run([str(MUTMUT), "show", name], cwd=ROOT, capture_output=True, text=True).stdout
                 for name, _ in unexplained]
        args.survivors.write_text("\n".join(diffs))
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
