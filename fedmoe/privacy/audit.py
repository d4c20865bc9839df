"""Audit a finished run's privacy claims from its run folder, independently of the code that made them.

    python -m fedmoe.privacy.audit RUN_DIR [--site-ledger PATH ...]

For every site in ``RUN_DIR/privacy_ledger.json`` (the ledgers the sites sent) it checks, using
only the run's files, its config and the Opacus accountant the config names (RDP or PRV):
  - epsilon recomputed from the ledger history equals the epsilon the site reported (in the
    ledger, in each round's record and in summary.json's per-round table) and is within the target;
  - the history is exactly the composition of what each round says it charged, and every round
    charged one count release (count-noise-multiplier, q=1) and its DP-SGD steps at the ledger's
    noise multiplier and a sample rate 1 / ceil(n / batch-size), with n the training examples the
    server saw the site report, local-epochs x ceil(n / batch-size) steps;
  - every round in which the server received the site's update is in the ledger;
  - the noise multiplier is the configured one, or (derived from the target) one whose planned
    history for the whole run stays within the target;
  - the run was not made with dp-reproducible-noise and the ledger does not say it was;
  - a site's own copy of its ledger (``RUN_DIR/sites/site-N/privacy_ledger.json`` when the sites
    kept their state in the run folder, or ``--site-ledger``) agrees with the one the server holds.
Prints one line per site and a verdict; exits 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

from opacus.accountants import create_accountant

REL_TOL = 1e-6
ACCOUNTANTS = ("rdp", "prv")


def accountant_epsilon(history: list[list[float]], delta: float, accountant: str) -> float:
    """Opacus' ``accountant`` on a history of (noise multiplier, sample rate, steps), the steps of
    each mechanism summed in order of first appearance (composition does not depend on order;
    PRV is slow on long alternating histories). PRV: its upper bound at eps_error 0.01."""
    totals: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        totals[(float(s), float(q))] = totals.get((float(s), float(q)), 0) + int(n)
    return _accountant_epsilon(tuple((s, q, n) for (s, q), n in totals.items()), float(delta), accountant)


@functools.lru_cache(maxsize=4096)  # an audit asks for every prefix of every site's history
def _accountant_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in history):
        return math.inf
    counter = create_accountant(accountant)
    counter.history = list(history)
    return float(counter.get_epsilon(delta=delta))


def compose(entries: list[list[float]]) -> list[tuple[float, float, int]]:
    """Entries in order, consecutive ones of the same mechanism merged (as the accountant records them)."""
    out: list[tuple[float, float, int]] = []
    for sigma, q, n in entries:
        entry = (float(sigma), float(q), int(n))
        if out and out[-1][:2] == entry[:2]:
            out[-1] = (entry[0], entry[1], out[-1][2] + entry[2])
        else:
            out.append(entry)
    return out


def close(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-12)


def audit_site(site: str, ledger: dict[str, Any], config: dict[str, Any], rounds: list[dict[str, Any]]) -> tuple[list[str], str]:
    """(problems, summary line) for one site's ledger against the run's config and rounds."""
    problems = []
    delta = float(config["target-delta"])
    target = float(config["target-epsilon"])
    batch, epochs = int(config["batch-size"]), int(config["local-epochs"])
    sigma, sigma_c = float(ledger["noise_multiplier"]), float(ledger["count_noise_multiplier"])
    history = [list(h) for h in ledger["history"]]
    accountant = str(config.get("accountant", "rdp"))  # runs from before the key used RDP
    if accountant not in ACCOUNTANTS:
        problems.append(f"the config names accountant {accountant!r}, not one of {ACCOUNTANTS}")
        accountant = "rdp"
    if ledger.get("accountant") != accountant:
        problems.append(f"accountant {ledger.get('accountant')!r}, the config's is {accountant!r}")

    def epsilon_of(entries: list[list[float]]) -> float:
        return accountant_epsilon(entries, delta, accountant)

    epsilon = epsilon_of(history)
    if ledger.get("reproducible_noise"):
        problems.append("its noise was seeded from the run config (dp-reproducible-noise): no guarantee against the server")
    if str(ledger.get("site")) != site:
        problems.append(f"ledger names site {ledger.get('site')}")
    for key, expected in (("delta", delta), ("count_noise_multiplier", float(config["count-noise-multiplier"]))):
        if not close(float(ledger[key]), expected):
            problems.append(f"{key} {ledger[key]} differs from the config's {expected}")
    if not close(float(ledger["target_epsilon"]), target):
        problems.append(f"target epsilon {ledger['target_epsilon']} differs from the config's {target}")

    # the data size the server saw, and what it fixes
    seen = {int(r["site_num_examples"][site]) for r in rounds if site in r.get("site_num_examples", {})}
    n = int(ledger.get("num_examples", 0))
    if seen and seen != {n}:
        problems.append(f"ledger says {n} training examples, the server saw {sorted(seen)}")
    per_epoch = max(1, math.ceil(n / batch)) if n > 0 else 0
    if n <= 0:
        problems.append("ledger does not say how many training examples the site has")
    elif not close(float(ledger["sample_rate"]), 1.0 / per_epoch):
        problems.append(f"sample rate {ledger['sample_rate']} is not 1/ceil({n}/{batch}) = {1.0 / per_epoch:.6g}")

    # the history is exactly the rounds' charges, each round a count release and its steps
    charged = []
    for record in ledger.get("rounds", []):
        entries = [list(e) for e in record["charged"]]
        charged.extend(entries)
        expected = [[sigma_c, 1.0, 1], [sigma, 1.0 / per_epoch if per_epoch else float("nan"), epochs * per_epoch]]
        if len(entries) != 2 or not all(close(float(a), float(b)) for e, x in zip(entries, expected) for a, b in zip(e, x)):
            problems.append(f"round {record['round']} charged {entries}, expected {expected}")
        prefix = epsilon_of([list(h) for h in compose(charged)])
        if not close(prefix, float(record["epsilon"])):
            problems.append(f"round {record['round']}: recorded epsilon {record['epsilon']}, recomputed {prefix:.6g}")
    if compose(charged) != compose(history):
        problems.append("history is not the composition of the rounds' charges (entries missing or added)")

    ledger_rounds = {int(r["round"]) for r in ledger.get("rounds", [])}
    received = {int(r["round"]) for r in rounds if site in r.get("site_epsilon", {})}
    if received - ledger_rounds:
        problems.append(f"rounds {sorted(received - ledger_rounds)} sent updates the ledger does not charge")

    # what was reported
    if not close(epsilon, float(ledger.get("epsilon", math.nan))):
        problems.append(f"ledger reports epsilon {ledger.get('epsilon')}, its history gives {epsilon:.6g}")
    by_round = {int(r["round"]): float(r["epsilon"]) for r in ledger.get("rounds", [])}
    for r in rounds:
        reported = r.get("site_epsilon", {}).get(site)
        if reported is not None and int(r["round"]) in by_round and not close(float(reported), by_round[int(r["round"])]):
            problems.append(f"round {r['round']}: the site reported epsilon {reported}, its ledger gives {by_round[int(r['round'])]:.6g}")
    if epsilon > target * (1 + REL_TOL):
        problems.append(f"epsilon {epsilon:.6g} exceeds the target {target}")

    # the noise multiplier: the configured one, or one planned to stay within the target
    configured = float(config.get("noise-multiplier", 0.0))
    if configured > 0:
        if not close(sigma, configured):
            problems.append(f"noise multiplier {sigma} differs from the configured {configured}")
    elif math.isfinite(target) and per_epoch:
        total_rounds = int(config["num-server-rounds"])
        planned = epsilon_of([[sigma, 1.0 / per_epoch, epochs * per_epoch * total_rounds], [sigma_c, 1.0, total_rounds]])
        if planned > target * (1 + REL_TOL):
            problems.append(f"noise multiplier {sigma} gives epsilon {planned:.4g} > target over the planned {total_rounds} rounds")

    # counted per round (a count release first, then the steps): with q = 1 a step's entry looks like a release
    releases = sum(int(record["charged"][0][2]) for record in ledger.get("rounds", []))
    steps = sum(int(e[2]) for record in ledger.get("rounds", []) for e in record["charged"][1:])
    line = (f"epsilon {epsilon:.4f} ({accountant.upper()}; target {target:g}, delta {delta:g}) over {len(ledger_rounds)} rounds: "
            f"noise multiplier {sigma:.4g}, sample rate {float(ledger['sample_rate']):.4g}, "
            f"{steps} DP-SGD steps, {releases} count releases (sigma {sigma_c:g})")
    return problems, line


def compare_copies(sent: dict[str, Any], own: dict[str, Any]) -> list[str]:
    """A site's own ledger against the copy it sent: the same parameters, the sent rounds as a
    prefix of its own (it may have charged a round whose reply never arrived, never fewer), and
    its history the composition of its rounds."""
    problems = []
    for key in ("noise_multiplier", "count_noise_multiplier", "sample_rate", "num_examples", "delta", "reproducible_noise"):
        if own.get(key) != sent.get(key):
            problems.append(f"site's own ledger has {key} {own.get(key)}, the server's copy {sent.get(key)}")
    if own["rounds"][: len(sent["rounds"])] != sent["rounds"]:
        problems.append("the rounds in the server's copy are not those of the site's own ledger")
    if compose([e for r in own["rounds"] for e in r["charged"]]) != compose(own["history"]):
        problems.append("the site's own history is not the composition of its rounds' charges")
    return problems


def audit(run_dir: Path, site_ledgers: list[Path] = ()) -> tuple[bool, list[str]]:
    """(every check holds, report lines)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    config, rounds = summary["config"], summary["rounds"]
    lines, ok = [], True
    if not config.get("dp"):
        return False, ["run made with dp=false: there is no privacy guarantee to audit"]
    if config.get("dp-reproducible-noise"):
        ok = False
        lines.append("FAIL run: dp-reproducible-noise=true: noise derivable from the config, no guarantee against the server")
    ledger_path = run_dir / "privacy_ledger.json"
    if not ledger_path.exists():
        return False, [*lines, f"FAIL run: no {ledger_path.name}"]
    sites = json.loads(ledger_path.read_text())["sites"]
    trained = {s for r in rounds for s in r.get("site_epsilon", {})}
    for site in sorted(trained - set(sites), key=int):
        ok = False
        lines.append(f"FAIL site {site}: sent DP updates but has no ledger in {ledger_path.name}")
    own_copies = {str(json.loads(p.read_text())["site"]): json.loads(p.read_text()) for p in site_ledgers}
    for path in sorted(run_dir.glob("sites/site-*/privacy_ledger.json")):
        own_copies.setdefault(path.parent.name.removeprefix("site-"), json.loads(path.read_text()))
    for site, ledger in sorted(sites.items(), key=lambda kv: int(kv[0])):
        problems, line = audit_site(site, ledger, config, rounds)
        if site in own_copies:
            problems += compare_copies(ledger, own_copies[site])
        ok &= not problems
        lines.append(f"{'ok  ' if not problems else 'FAIL'} site {site}: {line}")
        lines.extend(f"       - {p}" for p in problems)
    lines.append(f"verdict: {'PASS' if ok else 'FAIL'}: {len(sites)} site ledgers in {run_dir}")
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder (results/<run name>, or results/latest)")
    parser.add_argument("--site-ledger", type=Path, action="append", default=[],
                        help="a site's own privacy_ledger.json to compare with the server's copy (repeatable)")
    args = parser.parse_args(argv)
    ok, lines = audit(args.run_dir.resolve(), args.site_ledger)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
