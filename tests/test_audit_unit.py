"""fedmoe.privacy.audit's checks one by one on a ledger written here from the config (test_audit runs it
on a real run folder)."""

import copy
import functools
import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedmoe.privacy.audit import accountant_epsilon, audit, audit_site, close, compare_copies

CONFIG = {"dp": True, "target-epsilon": 8.0, "target-delta": 1e-5, "batch-size": 32, "local-epochs": 2,
          "count-noise-multiplier": 20.0, "noise-multiplier": 0.0, "num-server-rounds": 3, "dp-reproducible-noise": False}
N, SIGMA = 240, 1.1  # 240 examples in batches of 32: q = 1/8, 16 steps per round (2 epochs)


def epsilon(entries, accountant_type=RDPAccountant):
    accountant = accountant_type()
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


@pytest.mark.parametrize("change, expected", [
    (lambda l, r: l.update(accountant="prv"), "accountant 'prv', the config's is 'rdp'"),
    (lambda l, r: l.update(reproducible_noise=True),
     "its noise was seeded from the run config (dp-reproducible-noise): no guarantee against the server"),
    (lambda l, r: l.update(site=1), "ledger names site 1"),
    (lambda l, r: l.update(delta=1e-3), "delta 0.001 differs from the config's 1e-05"),
    (lambda l, r: l.update(count_noise_multiplier=40.0), "count_noise_multiplier 40.0 differs from the config's 20.0"),
    (lambda l, r: l.update(target_epsilon=80.0), "target epsilon 80.0 differs from the config's 8.0"),
    (lambda l, r: l.update(num_examples=480), "ledger says 480 training examples, the server saw [240]"),
    (lambda l, r: l.update(num_examples=0), "ledger does not say how many training examples the site has"),
    (lambda l, r: l.update(sample_rate=1 / 16), "sample rate 0.0625 is not 1/ceil(240/32) = 0.125"),
    (lambda l, r: l["rounds"][1]["charged"].pop(0),
     "round 2 charged [[1.1, 0.125, 16]], expected [[20.0, 1.0, 1], [1.1, 0.125, 16]]"),
    (lambda l, r: l["rounds"][0]["charged"][1].__setitem__(2, 8),
     "round 1 charged [[20.0, 1.0, 1], [1.1, 0.125, 8]], expected [[20.0, 1.0, 1], [1.1, 0.125, 16]]"),
    (lambda l, r: l["rounds"][2].update(epsilon=1.0), r"round 3: recorded epsilon 1\.0, recomputed 5\.97\d+"),
    (lambda l, r: l["history"].pop(), "history is not the composition of the rounds' charges (entries missing or added)"),
    (lambda l, r: l["history"].append([20.0, 1.0, 1]), "history is not the composition of the rounds' charges (entries missing or added)"),
    (lambda l, r: l["rounds"].pop(), "rounds [3] sent updates the ledger does not charge"),
    (lambda l, r: l.update(epsilon=2.5), r"ledger reports epsilon 2\.5, its history gives 5\.97\d+"),
    (lambda l, r: r[1]["site_epsilon"].update({"0": 0.1}), r"round 2: the site reported epsilon 0\.1, its ledger gives 5\.05\d+"),
    (lambda l, r: l.update(noise_multiplier=0.1),
     "round 1 charged [[20.0, 1.0, 1], [1.1, 0.125, 16]], expected [[20.0, 1.0, 1], [0.1, 0.125, 16]]"),
])
def test_each_check_fails_its_tampering(change, expected):
    import re

    ledger, rows = honest()
    change(ledger, rows)
    problems = problems_of(ledger, rows)
    pattern = expected if "\\" in expected else re.escape(expected)
    assert any(re.fullmatch(pattern, p) for p in problems), problems


def test_a_prv_ledger_is_checked_with_opacus_prv_accountant():
    """A PRV run's epsilons, stepped in the order the rounds charged them (the audit sums each
    mechanism's steps first), pass under accountant=prv; RDP epsilons claimed as PRV do not."""
    ledger, rows = honest()
    charged = []
    for record, row in zip(ledger["rounds"], rows):
        charged += record["charged"]
        record["epsilon"] = row["site_epsilon"]["0"] = epsilon(charged, PRVAccountant)
    ledger.update(accountant="prv", epsilon=ledger["rounds"][-1]["epsilon"])
    prv = {**CONFIG, "accountant": "prv"}
    assert problems_of(ledger, rows, prv) == []
    assert ledger["epsilon"] < epsilon(charged) - 0.1  # the tighter bound is not RDP's
    assert "accountant 'prv', the config's is 'rdp'" in problems_of(ledger, rows)

    rdp_ledger, rdp_rows = honest()
    rdp_ledger["accountant"] = "prv"
    assert any(p.startswith("ledger reports epsilon") for p in problems_of(rdp_ledger, rdp_rows, prv))
    assert "the config names accountant 'gdp', not one of ('rdp', 'prv')" in problems_of(ledger, rows, {**CONFIG, "accountant": "gdp"})


def test_the_summary_line_states_the_accounting():
    ledger, rows = honest()
    problems, line = audit_site("0", ledger, CONFIG, rows)
    assert line == (f"epsilon {ledger['epsilon']:.4f} (RDP; target 8, delta 1e-05) over 3 rounds: noise multiplier 1.1, "
                    "sample rate 0.125, 48 DP-SGD steps, 3 count releases (sigma 20)")


def test_accounting_helpers():
    assert accountant_epsilon([], 1e-5, "rdp") == 0.0
    assert accountant_epsilon([[0.0, 0.1, 3]], 1e-5, "prv") == math.inf
    assert accountant_epsilon([[1.0, 0.1, 3]], 1e-5, "rdp") < 10
    assert close(1.0, 1.0 + 1e-7) and not close(1.0, 1.00001) and close(0.0, 1e-13) and not close(0.0, 1e-9)
    assert close(math.inf, math.inf)


def test_an_unbounded_target_is_read_from_the_ledger_and_the_config():
    ledger, rows = honest()
    ledger["target_epsilon"] = "inf"
    assert problems_of(ledger, rows, {**CONFIG, "target-epsilon": "inf"}) == []


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
    assert compare_copies(sent, own) == []
    assert compare_copies(own, sent)  # the server holds a round the site does not
    other = copy.deepcopy(own)
    other["rounds"][0]["charged"][1][0] = 9.0
    assert compare_copies(sent, other) == ["the rounds in the server's copy are not those of the site's own ledger",
                                                "the site's own history is not the composition of its rounds' charges"]
    for key in ("noise_multiplier", "count_noise_multiplier", "sample_rate", "num_examples", "delta", "reproducible_noise"):
        other = copy.deepcopy(own)
        other[key] = 7
        assert compare_copies(sent, other) == [f"site's own ledger has {key} 7, the server's copy {sent[key]}"]
    other = copy.deepcopy(own)
    other["history"].pop()
    assert compare_copies(sent, other) == ["the site's own history is not the composition of its rounds' charges"]


def test_run_level_verdicts(tmp_path):
    ledger, rows = honest()
    (tmp_path / "summary.json").write_text(json.dumps({"config": CONFIG, "rounds": rows}))
    (tmp_path / "privacy_ledger.json").write_text(json.dumps({"sites": {"0": ledger}}))
    ok, lines = audit(tmp_path)
    assert ok and lines[-1] == f"verdict: PASS: 1 site ledgers in {tmp_path}" and lines[0].startswith("ok   site 0: epsilon")
    rows[0]["site_epsilon"]["1"] = 1.0  # a site that sent DP updates but left no ledger
    (tmp_path / "summary.json").write_text(json.dumps({"config": CONFIG, "rounds": rows}))
    ok, lines = audit(tmp_path)
    assert not ok and "FAIL site 1: sent DP updates but has no ledger in privacy_ledger.json" in lines
    (tmp_path / "privacy_ledger.json").unlink()
    ok, lines = audit(tmp_path)
    assert not ok and lines == ["FAIL run: no privacy_ledger.json"]
    (tmp_path / "summary.json").write_text(json.dumps({"config": {**CONFIG, "dp-reproducible-noise": True}, "rounds": rows}))
    ok, lines = audit(tmp_path)
    assert not ok and lines[0] == ("FAIL run: dp-reproducible-noise=true: noise derivable from the config, "
                                   "no guarantee against the server")
    (tmp_path / "summary.json").write_text(json.dumps({"config": {**CONFIG, "dp": False}, "rounds": rows}))
    assert audit(tmp_path) == (False, ["run made with dp=false: there is no privacy guarantee to audit"])


def test_the_command_line_prints_the_report_and_exits_with_the_verdict(tmp_path, capsys):
    from fedmoe.privacy.audit import main

    ledger, rows = honest()
    (tmp_path / "summary.json").write_text(json.dumps({"config": CONFIG, "rounds": rows}))
    (tmp_path / "privacy_ledger.json").write_text(json.dumps({"sites": {"0": ledger}}))
    own = tmp_path / "own.json"
    own.write_text(json.dumps(ledger))
    assert main([str(tmp_path), "--site-ledger", str(own)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("ok   site 0: epsilon") and printed[-1] == f"verdict: PASS: 1 site ledgers in {tmp_path}"
    ledger["noise_multiplier"] = 9.0
    own.write_text(json.dumps(ledger))
    assert main([str(tmp_path), "--site-ledger", str(own)]) == 1
    assert "       - site's own ledger has noise_multiplier 9.0, the server's copy 1.1" in capsys.readouterr().out.splitlines()


def write_run(folder, sites, config=CONFIG):
    """A run folder holding the given {site: (ledger, rows)} as the server writes them."""
    rows = [dict(r) for r in next(iter(sites.values()))[1]]
    for r in rows:
        r["site_epsilon"] = {s: rs[i]["site_epsilon"]["0"] for s, (_, rs) in sites.items() for i in [r["round"] - 1]}
        r["site_num_examples"] = {s: N for s in sites}
    ledgers = {s: {**ledger, "site": int(s)} for s, (ledger, _) in sites.items()}
    (folder / "summary.json").write_text(json.dumps({"config": config, "rounds": rows}))
    (folder / "privacy_ledger.json").write_text(json.dumps({"sites": ledgers}))
    return ledgers


def test_a_failing_site_fails_the_verdict_and_sites_are_listed_in_numeric_order(tmp_path):
    ledgers = write_run(tmp_path, {"10": honest(), "2": honest()})
    ok, lines = audit(tmp_path)
    assert ok and [line[:12] for line in lines[:2]] == ["ok   site 2:", "ok   site 10"]
    ledgers["10"]["epsilon"] = 0.5  # the server's copy under-reports what site 10 spent
    (tmp_path / "privacy_ledger.json").write_text(json.dumps({"sites": ledgers}))
    ok, lines = audit(tmp_path)
    assert not ok and lines[0].startswith("ok   site 2:") and lines[1].startswith("FAIL site 10:")
    assert lines[-1] == f"verdict: FAIL: 2 site ledgers in {tmp_path}"


def test_the_sites_own_ledgers_in_the_run_folder_are_compared(tmp_path):
    """A simulation keeps each site's own ledger in sites/site-N/: the audit reads them itself."""
    ledgers = write_run(tmp_path, {"0": honest(), "1": honest()})
    for site in ("0", "1"):
        (tmp_path / "sites" / f"site-{site}").mkdir(parents=True)
        (tmp_path / "sites" / f"site-{site}" / "privacy_ledger.json").write_text(json.dumps(ledgers[site]))
    assert audit(tmp_path)[0]
    own = {**ledgers["1"], "sample_rate": 0.5}
    (tmp_path / "sites" / "site-1" / "privacy_ledger.json").write_text(json.dumps(own))
    ok, lines = audit(tmp_path)
    assert not ok and lines[0].startswith("ok   site 0:") and lines[1].startswith("FAIL site 1:")
    assert lines[2] == "       - site's own ledger has sample_rate 0.5, the server's copy 0.125"


def test_spending_exactly_the_target_passes():
    ledger, rows = honest()
    spent = ledger["epsilon"]
    assert problems_of(ledger, rows, {**CONFIG, "target-epsilon": spent}) == [f"target epsilon 8.0 differs from the config's {spent}"]
    ledger["target_epsilon"] = spent
    assert problems_of(ledger, rows, {**CONFIG, "target-epsilon": spent}) == []
    below = spent * (1 - 3e-6)
    ledger["target_epsilon"] = below
    assert problems_of(ledger, rows, {**CONFIG, "target-epsilon": below}) == [
        f"epsilon {spent:.6g} exceeds the target {below}",
        f"noise multiplier 1.1 gives epsilon {spent:.4g} > target over the planned 3 rounds",  # the plan was these 3 rounds
    ]


def test_a_configured_noise_multiplier_below_one_is_checked_too():
    ledger, rows = honest()
    assert problems_of(ledger, rows, {**CONFIG, "noise-multiplier": 0.5}) == ["noise multiplier 1.1 differs from the configured 0.5"]


@pytest.mark.parametrize("sigma_c", [20.0, SIGMA], ids=["own-count-noise", "same-noise-merged"])
def test_one_step_rounds_are_counted_as_steps_not_releases(sigma_c):
    """With all examples in one batch (q = 1) a round's step looks like a count release in the
    history; the report counts per round. With the same noise for both, the accountant merges the
    whole history into one entry, and the audit composes the rounds' charges the same way."""
    config = {**CONFIG, "batch-size": 512, "local-epochs": 1, "noise-multiplier": SIGMA, "count-noise-multiplier": sigma_c,
              "target-epsilon": 20.0}
    charged, records, rows = [], [], []
    for r in (1, 2):
        charged += [[sigma_c, 1.0, 1], [SIGMA, 1.0, 1]]
        records.append({"round": r, "charged": [[sigma_c, 1.0, 1], [SIGMA, 1.0, 1]], "epsilon": epsilon(charged)})
        rows.append({"round": r, "site_epsilon": {"0": records[-1]["epsilon"]}, "site_num_examples": {"0": 1}})
    history = [[SIGMA, 1.0, 4]] if sigma_c == SIGMA else charged
    ledger = {**honest()[0], "count_noise_multiplier": sigma_c, "sample_rate": 1.0, "num_examples": 1, "target_epsilon": 20.0,
              "history": history, "rounds": records, "epsilon": records[-1]["epsilon"]}
    problems, line = audit_site("0", ledger, config, rows)
    assert problems == [] and "2 DP-SGD steps, 2 count releases" in line
    ledger["history"] = charged[:-1]
    assert audit_site("0", ledger, config, rows)[0][-2:] == [
        "history is not the composition of the rounds' charges (entries missing or added)",
        f"ledger reports epsilon {records[-1]['epsilon']}, its history gives {epsilon(charged[:-1]):.6g}",
    ]


@pytest.mark.parametrize("where, key, problem", [
    ("ledger", "rounds", "history is not the composition of the rounds' charges (entries missing or added)"),
    ("ledger", "epsilon", "ledger reports epsilon None, its history gives {eps:.6g}"),
    ("ledger", "num_examples", "ledger does not say how many training examples the site has"),
    ("rows", "site_epsilon", None),
    ("rows", "site_num_examples", None),
    ("config", "noise-multiplier", None),
])
def test_missing_keys_are_reported_not_raised(where, key, problem):
    """A tampered or truncated file gets a FAIL line, not a traceback; keys the server may omit
    (site metrics of a round, an unset noise multiplier) change nothing."""
    ledger, rows = honest()
    config = dict(CONFIG)
    {"ledger": [ledger], "rows": rows, "config": [config]}[where][0].pop(key)
    for r in rows[1:] if where == "rows" else []:
        r.pop(key)
    problems = problems_of(ledger, rows, config)
    if problem is None:
        assert problems == []
    else:
        assert problem.format(eps=epsilon([[20.0, 1.0, 1], [SIGMA, 1 / 8, 16]] * 3)) in problems


def test_run_level_failures_with_the_ledgers_present(tmp_path):
    ledgers = write_run(tmp_path, {"0": honest()}, {**CONFIG, "dp-reproducible-noise": True})
    ok, lines = audit(tmp_path)
    assert not ok and lines[0].startswith("FAIL run: dp-reproducible-noise=true") and lines[1].startswith("ok   site 0:")
    rows = json.loads((tmp_path / "summary.json").read_text())["rounds"]
    for r in rows:
        r["site_epsilon"].update({"10": 1.0, "2": 1.0})  # two sites sent DP updates and left no ledger
    (tmp_path / "summary.json").write_text(json.dumps({"config": CONFIG, "rounds": rows}))
    ok, lines = audit(tmp_path)
    assert not ok and lines[:2] == ["FAIL site 2: sent DP updates but has no ledger in privacy_ledger.json",
                                    "FAIL site 10: sent DP updates but has no ledger in privacy_ledger.json"]
    # the site's own copy agrees with the server's, yet the server's under-reports: still a failure
    ledgers = write_run(tmp_path, {"0": honest()})
    (tmp_path / "sites" / "site-0").mkdir(parents=True)
    (tmp_path / "sites" / "site-0" / "privacy_ledger.json").write_text(json.dumps(ledgers["0"]))
    ledgers["0"]["epsilon"] = 0.5
    (tmp_path / "privacy_ledger.json").write_text(json.dumps({"sites": ledgers}))
    ok, lines = audit(tmp_path)
    assert not ok and lines[0].startswith("FAIL site 0:") and "ledger reports epsilon 0.5" in lines[1]


def test_the_command_line_without_site_ledgers(tmp_path, capsys):
    from fedmoe.privacy.audit import main

    write_run(tmp_path, {"0": honest()})
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"verdict: PASS: 1 site ledgers in {tmp_path}"
