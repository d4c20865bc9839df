"""fedmoe.audit's checks one by one on a ledger written here from the config (test_audit runs it
on a real run folder)."""

import copy
import functools
import json

import pytest
from opacus.accountants import RDPAccountant

from fedmoe.audit import audit, audit_site, compare_copies

CONFIG = {"dp": True, "target-epsilon": 8.0, "target-delta": 1e-5, "batch-size": 32, "local-epochs": 2,
          "count-noise-multiplier": 20.0, "noise-multiplier": 0.0, "num-server-rounds": 3, "dp-reproducible-noise": False}
N, SIGMA = 240, 1.1  # 240 examples in batches of 32: q = 1/8, 16 steps per round (2 epochs)


def epsilon(entries):
    accountant = RDPAccountant()
    for sigma, q, steps in entries:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=1e-5)


def honest(rounds=3):
    """(ledger, summary rows) of site 0 after ``rounds`` rounds, as an honest run writes them."""
    return copy.deepcopy(_honest(rounds))


@functools.lru_cache
def _honest(rounds):
    charged, records, rows = [], [], []
    for r in range(1, rounds + 1):
        entries = [[20.0, 1.0, 1], [SIGMA, 1 / 8, 16]]
        charged += entries
        records.append({"round": r, "charged": entries, "epsilon": epsilon(charged)})
        rows.append({"round": r, "site_epsilon": {"0": records[-1]["epsilon"]}, "site_num_examples": {"0": N}})
    history = []
    for s, q, n in charged:  # consecutive entries never share a mechanism here
        history.append([s, q, n])
    ledger = {"site": 0, "target_epsilon": 8.0, "delta": 1e-5, "noise_multiplier": SIGMA, "count_noise_multiplier": 20.0,
              "sample_rate": 1 / 8, "num_examples": N, "reproducible_noise": False, "accountant": "rdp",
              "history": history, "rounds": records, "epsilon": records[-1]["epsilon"]}
    return ledger, rows


def problems_of(ledger, rows, config=CONFIG):
    return audit_site("0", ledger, config, rows)[0]


def test_an_honest_ledger_passes():
    ledger, rows = honest()
    problems, line = audit_site("0", ledger, CONFIG, rows)
    assert problems == []
    assert f"epsilon {epsilon([[20.0, 1.0, 1], [SIGMA, 1 / 8, 16]] * 3):.4f}" in line
    assert "over 3 rounds" in line and "48 DP-SGD steps, 3 count releases" in line


@pytest.mark.parametrize("change, reason", [
    (lambda l, r: l.update(accountant="prv"), "accountant"),
    (lambda l, r: l.update(reproducible_noise=True), "seeded from the run config"),
    (lambda l, r: l.update(site=1), "names site 1"),
    (lambda l, r: l.update(delta=1e-3), "delta"),
    (lambda l, r: l.update(count_noise_multiplier=40.0), "count_noise_multiplier"),
    (lambda l, r: l.update(target_epsilon=80.0), "target epsilon"),
    (lambda l, r: l.update(num_examples=480), "the server saw [240]"),
    (lambda l, r: l.update(num_examples=0), "how many training examples"),
    (lambda l, r: l.update(sample_rate=1 / 16), "sample rate"),
    (lambda l, r: l["rounds"][1]["charged"].pop(0), "round 2 charged"),
    (lambda l, r: l["rounds"][0]["charged"][1].__setitem__(2, 8), "round 1 charged"),
    (lambda l, r: l["rounds"][2].update(epsilon=1.0), "round 3: recorded epsilon"),
    (lambda l, r: l["history"].pop(), "history is not the composition"),
    (lambda l, r: l["history"].append([20.0, 1.0, 1]), "history is not the composition"),
    (lambda l, r: l["rounds"].pop(), "rounds [3] sent updates"),
    (lambda l, r: l.update(epsilon=l["epsilon"] * 0.9), "ledger reports epsilon"),
    (lambda l, r: r[1]["site_epsilon"].update({"0": 0.1}), "round 2: the site reported epsilon"),
    (lambda l, r: l.update(noise_multiplier=0.1), "round 1 charged"),
])
def test_each_check_fails_its_tampering(change, reason):
    ledger, rows = honest()
    change(ledger, rows)
    problems = problems_of(ledger, rows)
    assert any(reason in p for p in problems), problems


def test_spending_beyond_the_target_fails():
    ledger, rows = honest()
    assert problems_of(ledger, rows, {**CONFIG, "target-epsilon": 0.9 * ledger["epsilon"]})
    tight = {**CONFIG, "target-epsilon": ledger["epsilon"] * 0.99}
    ledger["target_epsilon"] = tight["target-epsilon"]
    assert any("exceeds the target" in p for p in problems_of(ledger, rows, tight))


def test_a_noise_multiplier_must_be_the_configured_one_or_fit_the_planned_run():
    ledger, rows = honest(rounds=1)  # the site has spent one round of the three planned
    assert problems_of(ledger, rows) == []
    assert any("differs from the configured 1.5" in p for p in problems_of(ledger, rows, {**CONFIG, "noise-multiplier": 1.5}))
    assert problems_of(ledger, rows, {**CONFIG, "noise-multiplier": SIGMA}) == []
    # planned for 30 rounds this noise would overspend: only 3 fit the target
    assert any("over the planned 30 rounds" in p for p in problems_of(ledger, rows, {**CONFIG, "num-server-rounds": 30}))


def test_a_site_may_hold_more_rounds_than_the_server_saw_never_different_ones():
    own, _ = honest(rounds=3)
    sent, _ = honest(rounds=2)
    assert compare_copies("0", sent, own) == []
    assert compare_copies("0", own, sent)  # the server holds a round the site does not
    other = copy.deepcopy(own)
    other["rounds"][0]["charged"][1][0] = 9.0
    assert any("not those of" in p for p in compare_copies("0", sent, other))
    other = copy.deepcopy(own)
    other["num_examples"] = 1
    assert any("num_examples" in p for p in compare_copies("0", sent, other))
    other = copy.deepcopy(own)
    other["history"].pop()
    assert any("not the composition" in p for p in compare_copies("0", sent, other))


def test_run_level_verdicts(tmp_path):
    ledger, rows = honest()
    (tmp_path / "summary.json").write_text(json.dumps({"config": CONFIG, "rounds": rows}))
    (tmp_path / "privacy_ledger.json").write_text(json.dumps({"sites": {"0": ledger}}))
    ok, lines = audit(tmp_path)
    assert ok and lines[-1].startswith("verdict: PASS") and lines[0].startswith("ok   site 0")
    rows[0]["site_epsilon"]["1"] = 1.0  # a site that sent DP updates but left no ledger
    (tmp_path / "summary.json").write_text(json.dumps({"config": CONFIG, "rounds": rows}))
    ok, lines = audit(tmp_path)
    assert not ok and "FAIL site 1: sent DP updates but has no ledger in privacy_ledger.json" in lines
    (tmp_path / "privacy_ledger.json").unlink()
    ok, lines = audit(tmp_path)
    assert not ok and lines[-1] == "FAIL run: no privacy_ledger.json"
