"""Per-module summary of the last `mutmut run` (make mutation), with the equivalent mutants set apart.

    .venv/bin/python scripts/mutation_report.py [--survivors FILE]

Reads `mutmut results --all true`. Every survivor needs a verdict in tests/survivors.txt, one
line "mutant-name  equivalent: why" or "mutant-name  accepted: why":
  equivalent  no test can tell it from the original (the line says why); left out of the score
  accepted    a real change no test pins, left so on purpose (the line says why); counts as survived
The score of a module is killed / (mutants - equivalent); a timeout counts as killed (the tests
caught a hang) unless the mutant has a verdict. Prints a Markdown table (the one
TESTING.md records) and every survivor without a verdict, with its diff in --survivors FILE
when given. Exits 1 when such a survivor remains.
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
VERDICTS = ROOT / "tests" / "survivors.txt"


def verdicts() -> dict[str, str]:
    """{mutant name: 'equivalent' or 'accepted'} from tests/survivors.txt."""
    found = {}
    for line in VERDICTS.read_text().splitlines() if VERDICTS.exists() else []:
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.strip().partition(" ")
            verdict = reason.strip().split(":", 1)[0]
            if verdict not in ("equivalent", "accepted"):
                raise SystemExit(f"{VERDICTS}: {name}: the verdict must be 'equivalent:' or 'accepted:', got {reason.strip()!r}")
            found[name] = verdict
    return found


def module_of(mutant: str) -> str:
    """'fedmoe.privacy.accounting.xǁPrivacyLedgerǁcharge__mutmut_3' -> 'fedmoe/privacy/accounting.py'."""
    parts = mutant.split(".")
    function_at = next(i for i, part in enumerate(parts) if part.startswith("x"))
    return "/".join(parts[:function_at]) + ".py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--survivors", type=Path, help="write the diff of every unexplained survivor here")
    args = parser.parse_args(argv)
    listing = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True, check=True)
    status = dict(re.findall(r"^\s*(\S+): (.+)$", listing.stdout, flags=re.MULTILINE))
    verdict = verdicts()
    by_module: dict[str, Counter] = defaultdict(Counter)
    unexplained = []
    for name, state in status.items():
        counts = by_module[module_of(name)]
        counts["mutants"] += 1
        # a verdict outranks a timeout: an equivalent mutant can still time out when its tests are slow
        if state == "killed" or (state == "timeout" and name not in verdict):
            counts["killed"] += 1
        elif verdict.get(name) == "equivalent":
            counts["equivalent"] += 1
        else:
            counts["survived" if state in ("survived", "timeout") else "other"] += 1
            counts["accepted"] += verdict.get(name) == "accepted"
            if name not in verdict:
                unexplained.append((name, state))
    stale = sorted(set(verdict) - {n for n, s in status.items() if s != "killed"})
    print("| module | mutants | killed | equivalent | survived (accepted) | not run | killed of non-equivalent |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for module, c in sorted(by_module.items()):
        score = c["killed"] / max(c["mutants"] - c["equivalent"], 1)
        print(f"| {module} | {c['mutants']} | {c['killed']} | {c['equivalent']} | {c['survived']} ({c['accepted']}) "
              f"| {c['other']} | {score:.1%} |")
    for name, state in unexplained:
        print(f"unexplained {state}: {name}")
    for name in stale:
        print(f"has a verdict but was killed or is gone: {name}")
    if args.survivors:
        diffs = [subprocess.run([str(MUTMUT), "show", name], cwd=ROOT, capture_output=True, text=True).stdout
                 for name, _ in unexplained]
        args.survivors.write_text("\n".join(diffs))
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
