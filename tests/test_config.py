"""Run config: pyproject defaults match RunConfig, bad keys and values fail naming the key."""

import os
import subprocess
import sys
import tomllib

import pytest

from fedmoe.config import ConfigError, RunConfig
from tests.conftest import ROOT


def test_pyproject_holds_every_key_with_its_default():
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == RunConfig().as_run_config()
    assert RunConfig.from_run_config(app_config) == RunConfig()


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"no-such-key": 1}, "no-such-key"),
        ({"top-k": 9}, "top-k"),
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"learning-rate": -1.0}, "learning-rate"),
        ({"partitioning": "random"}, "partitioning"),
        ({"batch-size": "big"}, "batch-size"),
        ({"patch-size": 5}, "patch-size"),
        ({"active-min-share": float("nan")}, "active-min-share"),
        ({"downlink-compression": "int8", "sparse-downlink": False}, "downlink-compression"),
        ({"adapter": "lora"}, "adapter"),  # task fmnist
        ({"task": "hf-moe", "hf-model": "llama"}, "hf-model"),
    ],
)
def test_bad_config_fails_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.from_run_config(overrides)


def test_ints_are_accepted_for_floats():
    assert RunConfig.from_run_config({"learning-rate": 1}).learning_rate == 1.0


def test_every_problem_is_named_at_once_one_line_each():
    with pytest.raises(ConfigError) as raised:
        RunConfig.from_run_config({"top_k": 3, "numexperts": 4, "learning-rate": "x", "target-epsilon": -1.0, "top-k": 9})
    assert str(raised.value).splitlines() == [
        "run config 'top_k': unknown key; did you mean 'top-k'?",
        "run config 'numexperts': unknown key; did you mean 'num-experts'?",
        "run config 'learning-rate': expected float, got 'x'",
        "run config 'target-epsilon': must be > 0, got -1.0",
        "run config 'top-k': must be <= num-experts (8), got 9",
    ]


def test_an_unknown_key_with_nothing_close_points_to_the_list():
    with pytest.raises(ConfigError, match="'zzz': unknown key; every key is in \\[tool.flwr.app.config\\] of pyproject.toml"):
        RunConfig.from_run_config({"zzz": 1})


@pytest.mark.parametrize("argument, line", [
    ("num-expert=4", "run config 'num-expert': unknown key; did you mean 'num-experts'?"),
    ("active-min-share=1.5", "run config 'active-min-share': must be in [0, 1], got 1.5"),
    ("num-experts=4 top-k=6", "run config 'top-k': must be <= num-experts (4), got 6"),
    ("target-epsilon=-2.0", "run config 'target-epsilon': must be > 0, got -2.0"),
    ("task='charlm' text-dir='no/such/folder'", "run config 'text-dir': no such folder, got '{cwd}/no/such/folder'"),
    ("partitioning=dirichlet", "-c 'partitioning=dirichlet': The provided configuration string is in an invalid format."),
])
def test_the_launcher_refuses_a_bad_config_before_flower_or_torch_start(tmp_path, argument, line):
    """Exit status 2, one line naming the key, nothing started: no run folder, torch not imported
    (``-X importtime`` lists every module the process imported)."""
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "experiments.launch", "--results-dir", str(tmp_path), "-c", argument],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60,
    )
    assert completed.returncode == 2
    imports = [l for l in completed.stderr.splitlines() if l.startswith("import time:")]
    problems = [l for l in completed.stderr.splitlines() if not l.startswith("import time:")]
    assert len(problems) == 1 and problems[0].startswith(line.format(cwd=tmp_path))
    assert not any(l.split("|")[-1].strip() == "torch" for l in imports)
    assert not list(tmp_path.iterdir())
